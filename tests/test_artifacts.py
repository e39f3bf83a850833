"""kwasm_py.shims.fetch against a real HTTP(S) server in this process (127.0.0.1 only)."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import pytest

from kwasm_py import retry
from kwasm_py.errors import ChecksumError, FetchError, UsageError
from kwasm_py.shims import catalog as shim_catalog
from kwasm_py.shims import fetch as artifacts
from tests.harness.shim_http import (
    Member,
    catalog_text,
    forward_proxy,
    make_tar,
    make_tls,
    serve,
    sha,
    shim_tar,
)

BIN = "containerd-shim-spin-v2"


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    """Retries run without sleeping; any real sleep in the retry policy fails the test."""
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy",
                "ALL_PROXY", "all_proxy"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    retry.set_testing(True)

    def forbidden(_: float) -> None:
        raise AssertionError("artifacts slept in a test")

    monkeypatch.setattr(retry.time, "sleep", forbidden)
    yield
    retry.set_testing(False)


def one(url: str, archive: bytes, **spec: object) -> list[shim_catalog.ShimEntry]:
    cat = shim_catalog.parse(catalog_text({"spin": {"url": url, "archive_sha256": sha(archive), **spec}}))
    return cat.select()


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_fetch_places_verified_executable_binary(tmp_path):
    """A good archive ends up as an executable binary plus a manifest, and nothing else."""
    archive, body = shim_tar()
    with serve() as srv:
        srv.add("/spin.tar.gz", data=archive)
        res = artifacts.fetch_shims(one(srv.url("/spin.tar.gz"), archive), "amd64", tmp_path / "d")
    dest = tmp_path / "d"
    assert files(dest) == [BIN, artifacts.MANIFEST_NAME]
    assert (dest / BIN).read_bytes() == body
    assert stat.S_IMODE((dest / BIN).stat().st_mode) == 0o755
    assert res[0].binary_sha256 == sha(body) and res[0].size == len(archive)
    rec = artifacts.read_manifest(dest)["spin"]
    assert rec["binary_sha256"] == sha(body) and rec["archive_sha256"] == sha(archive)


def test_first_attempts_fail_then_succeed(tmp_path):
    """Two 503 answers are retried (without sleeping) and the third attempt succeeds."""
    archive, body = shim_tar()
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive, fail_first=2)
        artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", tmp_path)
        assert srv.hits("/a.tar.gz") == 3
    assert (tmp_path / BIN).read_bytes() == body


def test_retries_are_bounded(tmp_path):
    """A server that keeps failing is asked retries+1 times, then a clear error; nothing left."""
    archive, _ = shim_tar()
    opts = artifacts.FetchOptions(retries=2)
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive, fail_first=100)
        with pytest.raises(FetchError, match=r"after 3 attempts.*HTTP 503") as ei:
            artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", tmp_path / "d", options=opts)
        assert srv.hits("/a.tar.gz") == 3
    assert srv.url("/a.tar.gz") in ei.value.message
    assert "\n" not in ei.value.message and "HTTPS_PROXY" in ei.value.hint
    assert isinstance(ei.value.__cause__, FetchError)  # the last attempt's failure, chained
    assert not (tmp_path / "d").exists()


def test_backoff_sleeps_grow_when_not_testing(tmp_path, monkeypatch):
    """Outside testing mode the pauses between attempts exist and grow (recorded, not slept)."""
    archive, _ = shim_tar()
    pauses: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", pauses.append)
    retry.set_testing(False)
    opts = artifacts.FetchOptions(retries=3, backoff=1.0, max_backoff=100.0)
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive, fail_first=3)
        artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", tmp_path, options=opts)
    assert len(pauses) == 3
    assert 0.5 <= pauses[0] <= 1.0 and 1.0 <= pauses[1] <= 2.0 and 2.0 <= pauses[2] <= 4.0


def test_checksum_mismatch_rejected_and_nothing_left(tmp_path):
    """An archive whose sha256 differs from the catalog is refused; dest keeps only its old file."""
    archive, _ = shim_tar()
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "unrelated").write_text("x")
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        shims = one(srv.url("/a.tar.gz"), archive + b"x")  # catalog hash of other bytes
        with pytest.raises(ChecksumError, match="nothing was installed"):
            artifacts.fetch_shims(shims, "amd64", dest)
        assert srv.hits("/a.tar.gz") == 1  # a mismatch is not retried
    assert files(dest) == ["unrelated"]


def test_truncated_body_retried_then_succeeds(tmp_path):
    """A body cut short once is detected by its length and fetched again."""
    archive, body = shim_tar(payload=os.urandom(300_000))
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive, truncate_first=1)
        artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", tmp_path)
        assert srv.hits("/a.tar.gz") == 2
    assert (tmp_path / BIN).read_bytes() == body


def test_truncated_body_always_fails_cleanly(tmp_path):
    """A body that is always cut short ends in an error that says so, leaving nothing."""
    archive, _ = shim_tar(payload=os.urandom(300_000))
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive, always_truncate=True)
        with pytest.raises(FetchError, match="cut short"):
            artifacts.fetch_shims(
                one(srv.url("/a.tar.gz"), archive),
                "amd64",
                tmp_path / "d",
                options=artifacts.FetchOptions(retries=1),
            )
    assert not (tmp_path / "d").exists()


def test_404_names_url_and_shim_and_is_not_retried(tmp_path):
    """A 404 is one clear error naming the URL and the shim, asked exactly once."""
    archive, _ = shim_tar()
    with serve() as srv:
        url = srv.url("/releases/v1.2.3/missing.tar.gz")
        with pytest.raises(FetchError) as ei:
            artifacts.fetch_shims(one(url, archive), "amd64", tmp_path / "d")
        assert srv.hits("/releases/v1.2.3/missing.tar.gz") == 1
    msg = ei.value.message
    assert url in msg and "shim spin v1.2.3" in msg and "404" in msg
    assert "shims.toml" in ei.value.hint
    assert not (tmp_path / "d").exists()


def test_redirect_is_followed(tmp_path):
    """A 302 to another path (as release downloads do) is followed to the archive."""
    archive, body = shim_tar()
    with serve() as srv:
        srv.add("/download/a.tar.gz", redirect="/objects/blob-123")
        srv.add("/objects/blob-123", data=archive)
        artifacts.fetch_shims(one(srv.url("/download/a.tar.gz"), archive), "amd64", tmp_path)
        assert srv.log == ["/download/a.tar.gz", "/objects/blob-123"]
    assert (tmp_path / BIN).read_bytes() == body


BAD_MEMBERS = {
    "dotdot": Member("../evil", b"x"),
    "nested-dotdot": Member("bin/../../evil", b"x"),
    "absolute": Member("/tmp/evil", b"x"),
    "symlink-absolute": Member("link", kind="symlink", target="/etc/passwd"),
    "symlink-escape": Member("sub/link", kind="symlink", target="../../evil"),
    "hardlink-escape": Member("hl", kind="hardlink", target="../evil"),
    "chardev": Member("dev", kind="chardev"),
    "fifo": Member("pipe", kind="fifo"),
}


@pytest.mark.parametrize("filters", [True, False], ids=["data-filter", "no-tarfile-filters"])
@pytest.mark.parametrize("bad", sorted(BAD_MEMBERS))
def test_unsafe_archive_member_rejects_archive(tmp_path, bad, filters, monkeypatch):
    """An archive with any unsafe member is refused as a whole; nothing is written anywhere.
    Without tarfile's filters (Python < 3.11.4, Debian bookworm's 3.11.2) the fallback check
    refuses the same members with the same one-line error."""
    from kwasm_py.shims import unpack

    monkeypatch.setattr(unpack, "_HAS_FILTERS", filters)
    _, body = shim_tar()
    archive = make_tar([Member(BIN, body), BAD_MEMBERS[bad]])
    dest = tmp_path / "a" / "b"
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        with pytest.raises(FetchError, match="refused") as ei:
            artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", dest)
    assert repr(BAD_MEMBERS[bad].name) in ei.value.message and "\n" not in ei.value.message
    assert "shim catalog" in ei.value.hint
    assert "unsafe to extract" not in ei.value.message  # each refusal says what it is
    if bad != "absolute" and filters:  # the data filter strips a leading '/'; we refuse such names
        assert isinstance(ei.value.__cause__, tarfile.FilterError)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a"]


def test_safe_links_inside_the_tree_are_accepted(tmp_path):
    """Directories and links that stay inside the archive do not trip the checks."""
    _, body = shim_tar()
    archive = make_tar(
        [
            Member("dist", kind="dir"),
            Member(f"dist/{BIN}", body),
            Member("dist/latest", kind="symlink", target=BIN),
        ]
    )
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", tmp_path)
    assert (tmp_path / BIN).read_bytes() == body


def test_pinned_binary_hash_mismatch_rejected(tmp_path):
    """When the catalog pins the binary's sha256, a different binary is refused."""
    archive, _ = shim_tar()
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        shims = one(srv.url("/a.tar.gz"), archive, binary_sha256="0" * 64)
        with pytest.raises(ChecksumError, match="inside"):
            artifacts.fetch_shims(shims, "amd64", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_archive_without_the_binary_is_an_error(tmp_path):
    """An archive that lacks the catalog's binary name says what it holds instead."""
    archive = make_tar([Member("README.md", b"hi")])
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        with pytest.raises(FetchError, match=r"no containerd-shim-spin-v2 \(it has: README.md\)"):
            artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", tmp_path / "d")


def test_several_shims_all_or_nothing(tmp_path):
    """If the second shim fails, the first (already verified) one is not placed either."""
    a1, _ = shim_tar()
    a2, _ = shim_tar("containerd-shim-other-v2")
    with serve() as srv:
        srv.add("/1.tar.gz", data=a1)
        text = catalog_text(
            {
                "spin": {"url": srv.url("/1.tar.gz"), "archive_sha256": sha(a1)},
                "other": {"url": srv.url("/2.tar.gz"), "archive_sha256": sha(a2)},
            }
        )
        with pytest.raises(FetchError, match="404"):
            artifacts.fetch_shims(shim_catalog.parse(text).select(), "amd64", tmp_path / "d")
        assert srv.hits("/1.tar.gz") == 1
    assert not (tmp_path / "d").exists()


def test_second_fetch_skips_unless_changed_or_forced(tmp_path):
    """A dest holding the recorded binary is not downloaded again; tampering or --force is."""
    archive, body = shim_tar()
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        shims = one(srv.url("/a.tar.gz"), archive)
        artifacts.fetch_shims(shims, "amd64", tmp_path)
        again = artifacts.fetch_shims(shims, "amd64", tmp_path)
        assert again[0].skipped and srv.hits("/a.tar.gz") == 1
        (tmp_path / BIN).write_bytes(b"tampered")
        fixed = artifacts.fetch_shims(shims, "amd64", tmp_path)
        assert not fixed[0].skipped and srv.hits("/a.tar.gz") == 2
        artifacts.fetch_shims(shims, "amd64", tmp_path, options=artifacts.FetchOptions(force=True))
        assert srv.hits("/a.tar.gz") == 3
    assert (tmp_path / BIN).read_bytes() == body


def test_mirror_directory(tmp_path):
    """--mirror DIR reads the archive by its release file name, with the same verification."""
    archive, body = shim_tar()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "containerd-shim-spin-v2-linux-x86_64.tar.gz").write_bytes(archive)
    url = "https://github.invalid/releases/download/v1/containerd-shim-spin-v2-linux-x86_64.tar.gz"
    shims = one(url, archive)
    res = artifacts.fetch_shims(
        shims, "amd64", tmp_path / "d", options=artifacts.FetchOptions(mirror=str(mirror))
    )
    assert (tmp_path / "d" / BIN).read_bytes() == body
    assert res[0].source == str(mirror / "containerd-shim-spin-v2-linux-x86_64.tar.gz")
    (mirror / "containerd-shim-spin-v2-linux-x86_64.tar.gz").unlink()
    with pytest.raises(FetchError, match="does not exist in the mirror"):
        artifacts.fetch_shims(
            shims, "amd64", tmp_path / "e", options=artifacts.FetchOptions(mirror=str(mirror))
        )
    assert not (tmp_path / "e").exists()


def test_mirror_url(tmp_path):
    """--mirror URL asks the internal server for the same file name, never the upstream host."""
    archive, body = shim_tar()
    url = "https://github.invalid/releases/download/v1/containerd-shim-spin-v2-linux-x86_64.tar.gz"
    with serve() as srv:
        srv.add("/mirror/containerd-shim-spin-v2-linux-x86_64.tar.gz", data=archive)
        opts = artifacts.FetchOptions(mirror=srv.url("/mirror/"))
        artifacts.fetch_shims(one(url, archive), "amd64", tmp_path, options=opts)
        assert srv.log == ["/mirror/containerd-shim-spin-v2-linux-x86_64.tar.gz"]
    assert (tmp_path / BIN).read_bytes() == body


def test_keep_archives_seeds_a_mirror(tmp_path):
    """--keep-archives leaves the verified archive under its release file name."""
    archive, _ = shim_tar()
    with serve() as srv:
        srv.add("/rel/x.tar.gz", data=archive)
        opts = artifacts.FetchOptions(keep_archives=True)
        shims = one(srv.url("/rel/x.tar.gz"), archive)
        artifacts.fetch_shims(shims, "amd64", tmp_path, options=opts)
    assert (tmp_path / "x.tar.gz").read_bytes() == archive


def test_proxy_environment_is_used(tmp_path, monkeypatch):
    """With HTTP_PROXY set, the download goes through the proxy (which records it)."""
    archive, body = shim_tar()
    with serve() as srv, forward_proxy() as proxy:
        srv.add("/a.tar.gz", data=archive)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", tmp_path)
        assert proxy.requests == [srv.url("/a.tar.gz")]
    assert (tmp_path / BIN).read_bytes() == body


def test_no_proxy_bypasses_the_proxy(tmp_path, monkeypatch):
    """NO_PROXY=127.0.0.1 sends the request straight to the server, not to the proxy."""
    archive, _ = shim_tar()
    with serve() as srv, forward_proxy() as proxy:
        srv.add("/a.tar.gz", data=archive)
        monkeypatch.setenv("http_proxy", proxy.url)
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", tmp_path)
        assert proxy.requests == [] and srv.hits("/a.tar.gz") == 1


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    try:
        return make_tls(tmp_path_factory.mktemp("tls"))
    except FileNotFoundError:
        pytest.skip("openssl CLI not installed")


def test_private_ca_needs_ca_bundle(tmp_path, tls, monkeypatch):
    """An HTTPS server signed by a private CA fails verification (not retried) until the CA
    bundle is given, by option or by REQUESTS_CA_BUNDLE."""
    ca, cert, key = tls
    archive, body = shim_tar()
    with serve(tls=(cert, key)) as srv:
        srv.add("/a.tar.gz", data=archive)
        shims = one(srv.url("/a.tar.gz"), archive)
        with pytest.raises(FetchError, match="TLS verification failed") as ei:
            artifacts.fetch_shims(shims, "amd64", tmp_path / "x")
        assert "--ca-bundle" in ei.value.hint and not (tmp_path / "x").exists()
        opts = artifacts.FetchOptions(ca_bundle=str(ca))
        artifacts.fetch_shims(shims, "amd64", tmp_path / "opt", options=opts)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
        artifacts.fetch_shims(shims, "amd64", tmp_path / "env")
    assert (tmp_path / "opt" / BIN).read_bytes() == body == (tmp_path / "env" / BIN).read_bytes()


def test_missing_ca_bundle_is_a_usage_error(tmp_path):
    """A --ca-bundle path that does not exist is refused before any download."""
    archive, _ = shim_tar()
    opts = artifacts.FetchOptions(ca_bundle=str(tmp_path / "nope.pem"))
    with pytest.raises(UsageError, match=r"nope\.pem"):
        artifacts.fetch_shims(one("https://x.invalid/a.tar.gz", archive), "amd64", tmp_path / "d",
                              options=opts)  # fmt: skip
    assert not (tmp_path / "d").exists()


def test_size_cap_from_the_catalog(tmp_path):
    """The top-level max_archive_bytes applies to every archive, an archive's own one wins, and
    the shipped catalog caps its downloads; bad values are refused by the loader."""
    spec = {"url": "https://x/a.tar.gz", "archive_sha256": "a" * 64}
    cat = shim_catalog.parse(catalog_text({"spin": spec}, max_archive_bytes=1000))
    assert cat.get("spin").artifact("amd64").max_bytes == 1000
    cat = shim_catalog.parse(
        catalog_text({"spin": {**spec, "max_archive_bytes": 50}}, max_archive_bytes=1000)
    )
    assert cat.get("spin").artifact("amd64").max_bytes == 50
    cat = shim_catalog.parse(catalog_text({"spin": spec}))
    assert cat.get("spin").artifact("amd64").max_bytes == shim_catalog.DEFAULT_MAX_ARCHIVE_BYTES
    shipped = shim_catalog.parse((Path(__file__).parent.parent / "images/shims.toml").read_text())
    assert {a.max_bytes for s in shipped.shims for a in s.artifacts.values()} == {128 * 2**20}
    for bad in (0, -1, '"big"', "true", 1.5):
        with pytest.raises(shim_catalog.CatalogError, match="max_archive_bytes must be a positive"):
            shim_catalog.parse(
                catalog_text({"spin": spec}).replace("schema = 1", f"schema = 1\nmax_archive_bytes = {bad}")
            )


@pytest.mark.parametrize("length", [None, ""], ids=["announced too large", "no Content-Length"])
def test_download_past_the_cap_is_aborted_and_nothing_placed(tmp_path, length):
    """An archive bigger than its cap is refused (by its Content-Length, or while streaming when
    the server sends none) at once, without a retry, with no file left in dest beyond what was
    there, and with the cap named in the one-line error."""
    archive, _ = shim_tar(payload=os.urandom(64 * 1024))  # random: gzip cannot shrink it
    cap = len(archive) - 1
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "unrelated").write_text("x")
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive, length=length)
        shims = one(srv.url("/a.tar.gz"), archive, max_archive_bytes=cap)
        with pytest.raises(FetchError) as info:
            artifacts.fetch_shims(shims, "amd64", dest)
        assert srv.hits("/a.tar.gz") == 1
    message = info.value.message
    assert f"cap of {cap} bytes" in message and "nothing was installed" in message and "\n" not in message
    assert "max_archive_bytes" in info.value.hint
    assert files(dest) == ["unrelated"]


def test_download_exactly_at_the_cap_is_placed(tmp_path):
    """The cap is inclusive: an archive of exactly max_archive_bytes is fetched as usual."""
    archive, body = shim_tar(payload=os.urandom(64 * 1024))
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive, length="")
        shims = one(srv.url("/a.tar.gz"), archive, max_archive_bytes=len(archive))
        artifacts.fetch_shims(shims, "amd64", tmp_path / "d")
    assert (tmp_path / "d" / BIN).read_bytes() == body


def test_mirror_file_past_the_cap_is_refused(tmp_path):
    """A mirror directory's file over the cap is refused before it is copied; nothing placed."""
    archive, _ = shim_tar(payload=os.urandom(64 * 1024))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "a.tar.gz").write_bytes(archive)
    shims = one("https://github.invalid/v1/a.tar.gz", archive, max_archive_bytes=1024)
    with pytest.raises(FetchError, match=r"is \d+ bytes, over the catalog's cap of 1024 bytes"):
        artifacts.fetch_shims(
            shims, "amd64", tmp_path / "d", options=artifacts.FetchOptions(mirror=str(mirror))
        )
    assert files(tmp_path / "d") == []


def test_fetch_dest_directories_are_0755_under_an_open_umask(tmp_path):
    """Under umask 000 the shim directory (and its missing parents) is created 0755, not
    world-writable; an existing parent keeps its mode."""
    archive, _ = shim_tar()
    old = os.umask(0)
    try:
        with serve() as srv:
            srv.add("/a.tar.gz", data=archive)
            artifacts.fetch_shims(one(srv.url("/a.tar.gz"), archive), "amd64", tmp_path / "a/b")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a/b").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a/b" / BIN).stat().st_mode) == 0o755
