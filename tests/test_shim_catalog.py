"""The shim catalog: the shipped images/shims.toml, and the parser's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from kwasm_py.errors import CatalogError
from kwasm_py.shims import catalog as shim_catalog
from tests.harness.shim_http import catalog_text

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "images" / "shims.toml"
GOOD = "a" * 64


def shipped() -> shim_catalog.Catalog:
    return shim_catalog.parse(SHIPPED.read_text(), source=str(SHIPPED))


def test_shipped_catalog_defaults_cover_both_arches():
    """Spin is the default shim, and every default shim has amd64 and arm64 archives."""
    cat = shipped()
    defaults = cat.select()
    assert defaults[0].name == "spin"
    for s in defaults:
        assert sorted(s.artifacts) == ["amd64", "arm64"], s.name


def test_shipped_spin_points_at_upstream_release_assets():
    """Spin's URLs are the upstream release assets for its version, per architecture."""
    spin = shipped().get("spin")
    assert (spin.handler, spin.runtime_type, spin.binary) == (
        "spin",
        "io.containerd.spin.v2",
        "containerd-shim-spin-v2",
    )
    base = f"https://github.com/spinframework/containerd-shim-spin/releases/download/{spin.version}/"
    assert spin.artifact("amd64").url == base + "containerd-shim-spin-v2-linux-x86_64.tar.gz"
    assert spin.artifact("arm64").url == base + "containerd-shim-spin-v2-linux-aarch64.tar.gz"


def test_shipped_entries_are_https_versioned_and_distinct():
    """Every shipped URL is https, names its version, and no two archives share a file name."""
    names = []
    for s in shipped().shims:
        for a in s.artifacts.values():
            assert a.url.startswith("https://"), a.url
            assert s.version in a.url, a.url
            names.append(a.filename)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("bad", ["PLACEHOLDER", "TODO", "0" * 63, "g" * 64, "sha256:" + GOOD])
def test_placeholder_archive_hash_makes_catalog_unusable(bad):
    """A placeholder archive_sha256 fails the whole catalog, so no fetch or image build runs."""
    text = catalog_text({"spin": {"url": "https://x/a.tar.gz", "archive_sha256": bad}})
    with pytest.raises(CatalogError, match="archive_sha256"):
        shim_catalog.parse(text)


def test_binary_hash_is_sha_or_unpublished():
    """binary_sha256 accepts 64 hex digits or the word unpublished, nothing else."""
    ok = catalog_text(
        {"spin": {"url": "https://x/a.tar.gz", "archive_sha256": GOOD, "binary_sha256": "B" * 64}}
    )
    assert shim_catalog.parse(ok).get("spin").artifact("amd64").binary_sha256 == "b" * 64
    unpub = catalog_text({"spin": {"url": "https://x/a.tar.gz", "archive_sha256": GOOD}})
    assert shim_catalog.parse(unpub).get("spin").artifact("amd64").binary_sha256 is None
    bad = catalog_text(
        {"spin": {"url": "https://x/a.tar.gz", "archive_sha256": GOOD, "binary_sha256": "tbd"}}
    )
    with pytest.raises(CatalogError, match="binary_sha256"):
        shim_catalog.parse(bad)


BASE = catalog_text({"spin": {"url": "https://x/a.tar.gz", "archive_sha256": GOOD}})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.replace("schema = 1", "schema = 2"), "schema"),
        (lambda t: t.replace("[shims.spin.arch.amd64]", "[shims.spin.arch.s390x]"), "unknown arch"),
        (lambda t: t.replace('binary = "containerd-shim-spin-v2"', 'binary = "../x"'), "binary"),
        (lambda t: t.replace('handler = "spin"', 'handler = "Spin!"'), "handler"),
        (
            lambda t: t.replace('runtime_type = "io.containerd.spin.v2"', 'runtime_type = "x"'),
            "runtime_type",
        ),
        (lambda t: t.replace('version = "v1.2.3"', 'versoin = "v1.2.3"'), "unknown key"),
        (lambda t: t.replace('url = "https://x/a.tar.gz"', 'url = "ftp://x/a"'), "url"),
        (lambda t: t + "\n[shims.x", "not valid TOML"),
        (lambda t: t.replace("default = true", 'default = "yes"'), "default"),
    ],
)
def test_malformed_catalog_is_refused_with_the_key(edit, match):
    """Each malformed catalog yields a one-line CatalogError that names the offending key and
    points at the format's description."""
    with pytest.raises(CatalogError, match=match) as ei:
        shim_catalog.parse(edit(BASE))
    assert "\n" not in ei.value.message and "images/shims.toml" in ei.value.hint


def test_duplicate_handler_refused():
    """Two shims claiming the same runtime handler are refused."""
    text = catalog_text(
        {
            "spin": {"url": "https://x/a.tar.gz", "archive_sha256": GOOD},
            "other": {"url": "https://x/b.tar.gz", "archive_sha256": GOOD, "handler": "spin"},
        }
    )
    with pytest.raises(CatalogError, match="handler 'spin'"):
        shim_catalog.parse(text)


def test_select_defaults_names_and_unknown():
    """No names selects defaults; names are deduplicated in order; unknown names list the known."""
    cat = shipped()
    assert [s.name for s in cat.select(["wasmtime", "spin", "wasmtime"])] == ["wasmtime", "spin"]
    assert all(s.default for s in cat.select())
    with pytest.raises(CatalogError, match=r"unknown shim 'nope'.*spin"):
        cat.select(["nope"])
    with pytest.raises(CatalogError, match="no arm64 archive"):
        shim_catalog.parse(BASE).get("spin").artifact("arm64")


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", "amd64"), ("amd64", "amd64"), ("aarch64", "arm64"), ("arm64", "arm64")],
)
def test_normalize_arch(machine, arch):
    """uname -m spellings map to the catalog's amd64/arm64."""
    assert shim_catalog.normalize_arch(machine) == arch


def test_normalize_arch_rejects_unknown():
    """An architecture without shims is a clear error."""
    with pytest.raises(CatalogError, match="riscv64"):
        shim_catalog.normalize_arch("riscv64")


def test_handlers_map():
    """handlers() maps each handler to its runtime_type for manifests and the node engine."""
    assert shipped().handlers()["spin"] == "io.containerd.spin.v2"
