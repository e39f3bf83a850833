"""resolve_shims (the agent's --shim-source) and what `shims list` reads from a node root."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from kwasm_py import retry
from kwasm_py.errors import ChecksumError, FetchError, UsageError
from kwasm_py.shims import catalog as shim_catalog
from kwasm_py.shims import source as shim_source
from tests.harness.shim_http import catalog_text, serve, sha, shim_tar

ROOT = Path(__file__).resolve().parent.parent
BIN = "containerd-shim-spin-v2"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "KWASM_SHIM_DIR",
                "KWASM_SHIM_CATALOG"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    retry.set_testing(True)
    yield
    retry.set_testing(False)


def cat_for(url: str, archive: bytes, **spec: object) -> shim_catalog.Catalog:
    return shim_catalog.parse(catalog_text({"spin": {"url": url, "archive_sha256": sha(archive), **spec}}))


def test_packaged_catalog_is_images_shims_toml():
    """The catalog shipped inside the package is byte-identical to images/shims.toml."""
    packaged = resources.files("kwasm_py.shims").joinpath("data/shims.toml").read_bytes()
    assert packaged == (ROOT / "images" / "shims.toml").read_bytes()
    assert shim_source.read_catalog().names() == ["spin", "wasmtime"]


def test_read_catalog_from_env(tmp_path, monkeypatch):
    """$KWASM_SHIM_CATALOG selects another catalog file; a missing one is a usage error."""
    p = tmp_path / "c.toml"
    p.write_text(catalog_text({"only": {"url": "https://x/o.tar.gz", "archive_sha256": "a" * 64}}))
    monkeypatch.setenv("KWASM_SHIM_CATALOG", str(p))
    assert shim_source.read_catalog().names() == ["only"]
    with pytest.raises(UsageError, match="cannot read shim catalog"):
        shim_source.read_catalog(tmp_path / "missing.toml")


def test_fetch_source_then_image_source(tmp_path, monkeypatch):
    """fetch downloads into a directory; image then finds the same files via KWASM_SHIM_DIR
    and checks them against the recorded manifest."""
    archive, body = shim_tar()
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        cat = cat_for(srv.url("/a.tar.gz"), archive)
        got = shim_source.resolve_shims("fetch", arch="amd64", directory=tmp_path / "amd64", catalog=cat)
    assert [(g.name, g.handler, g.path.read_bytes(), g.verified) for g in got] == [
        ("spin", "spin", body, "archive")
    ]
    monkeypatch.setenv("KWASM_SHIM_DIR", str(tmp_path))
    img = shim_source.resolve_shims("image", arch="amd64", catalog=cat)
    assert img[0].path == tmp_path / "amd64" / BIN and img[0].sha256 == sha(body)
    assert img[0].verified == "manifest"
    (tmp_path / "amd64" / BIN).write_bytes(b"changed")
    with pytest.raises(ChecksumError, match=r"expected .* \(manifest\)") as ei:
        shim_source.resolve_shims("image", arch="amd64", catalog=cat)
    assert "refetch" in ei.value.hint


def test_image_source_without_baked_shims(tmp_path):
    """An image without shims says so and points at the other sources."""
    cat = cat_for("https://x/a.tar.gz", b"x")
    with pytest.raises(FetchError, match="does not exist") as ei:
        shim_source.resolve_shims("image", arch="amd64", directory=tmp_path, catalog=cat)
    assert "--shim-source fetch" in ei.value.hint


def test_dir_source_checks_file_and_pinned_hash(tmp_path):
    """dir needs a directory, an executable regular file, and the pinned hash when there is one."""
    body = b"node-local shim"
    (tmp_path / BIN).write_bytes(body)
    unpinned = cat_for("https://x/a.tar.gz", b"x")
    with pytest.raises(UsageError, match="needs a directory"):
        shim_source.resolve_shims("dir", arch="amd64", catalog=unpinned)
    with pytest.raises(FetchError, match="not executable"):
        shim_source.resolve_shims("dir", arch="amd64", directory=tmp_path, catalog=unpinned)
    (tmp_path / BIN).chmod(0o755)
    got = shim_source.resolve_shims("dir", arch="amd64", directory=tmp_path, catalog=unpinned)
    assert got[0].sha256 == sha(body) and got[0].verified == "none"
    pinned = cat_for("https://x/a.tar.gz", b"x", binary_sha256=sha(body))
    ok = shim_source.resolve_shims("dir", arch="amd64", directory=tmp_path, catalog=pinned)
    assert ok[0].verified == "catalog"
    wrong = cat_for("https://x/a.tar.gz", b"x", binary_sha256="0" * 64)
    with pytest.raises(ChecksumError):
        shim_source.resolve_shims("dir", arch="amd64", directory=tmp_path, catalog=wrong)


def test_unknown_source_and_arch_are_usage_errors(tmp_path):
    """A bad source kind or architecture is refused before touching anything."""
    cat = cat_for("https://x/a.tar.gz", b"x")
    with pytest.raises(UsageError, match="unknown shim source"):
        shim_source.resolve_shims("s3", catalog=cat)  # type: ignore[arg-type]
    with pytest.raises(shim_catalog.CatalogError, match="mips"):
        shim_source.resolve_shims("dir", arch="mips", directory=tmp_path, catalog=cat)


def node_root(tmp_path: Path, state: object | None) -> Path:
    root = tmp_path / "node"
    bind = root / "opt" / "kwasm" / "bin"
    bind.mkdir(parents=True)
    (bind / BIN).write_bytes(b"spin shim")
    (bind / "containerd-shim-extra-v2").write_bytes(b"other")
    (bind / "not-a-shim").write_bytes(b"x")
    if state is not None:
        (root / "opt" / "kwasm" / "kwasm-state.json").write_text(
            state if isinstance(state, str) else json.dumps(state)
        )
    return root


def test_installed_shims_with_contract_like_state(tmp_path):
    """Installed binaries are listed with sha256 and compared with the state file's records."""
    root = node_root(
        tmp_path,
        {"runtimes": [{"handler": "spin", "shim": f"/opt/kwasm/bin/{BIN}",
                       "sha256": sha(b"spin shim"), "runtime_type": "io.containerd.spin.v2"},
                      {"handler": "extra", "shim": "/opt/kwasm/bin/containerd-shim-extra-v2",
                       "sha256": "f" * 64}]},
    )  # fmt: skip
    got = {i.binary: i for i in shim_source.installed_shims(root, shim_source.read_catalog())}
    assert sorted(got) == ["containerd-shim-extra-v2", BIN]
    spin = got[BIN]
    assert spin.sha256 == spin.state_sha256 == sha(b"spin shim")
    assert spin.state_handlers == ("spin",) and spin.catalog_name == "spin"
    assert spin.catalog_match == "unknown"  # upstream publishes no binary hash
    assert got["containerd-shim-extra-v2"].state_sha256 == "f" * 64


@pytest.mark.parametrize(
    "state",
    [None, "not json", [], {"runtimes": "x"}, {"v": 1, "node": {"shims": [{"binary": BIN}]}}],
)
def test_state_file_is_read_tolerantly(tmp_path, state):
    """Missing, broken or differently shaped state files never break the listing."""
    root = node_root(tmp_path, state)
    got = shim_source.installed_shims(root, shim_source.read_catalog())
    assert [i.binary for i in got] == ["containerd-shim-extra-v2", BIN]
    assert all(i.state_sha256 is None for i in got)
