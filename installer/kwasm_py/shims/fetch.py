"""EFFECT: fetch shims: download, verify and place them, all of them or none.

The order is the safety argument: read the archive into a temp file in the destination directory
(``download``) -> compare its sha256 with the catalog -> vet EVERY tar member and stream the one
binary into another temp file (``unpack``) -> compare the binary's sha256 when the catalog pins
one -> only then ``os.replace`` into place. Several shims are placed together: if any fails, none
is placed and every temp file is removed. A destination that already holds exactly what the
catalog entry produces (per its ``kwasm-shims.json`` manifest and the file's sha256) is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from kwasm_py.errors import ChecksumError, FetchError, UsageError
from kwasm_py.shims.catalog import Artifact, ShimEntry
from kwasm_py.shims.digests import MANIFEST_NAME, read_manifest
from kwasm_py.shims.digests import file_sha256 as sha256_file
from kwasm_py.shims.download import FetchOptions, NoProgress, Progress, make_session, read_archive, source_for
from kwasm_py.shims.unpack import extract_binary

__all__ = [
    "MANIFEST_NAME",
    "FetchOptions",
    "Fetched",
    "Progress",
    "extract_binary",
    "fetch_shims",
    "make_session",
    "read_manifest",
    "source_for",
]


@dataclass(frozen=True)
class Fetched:
    """A shim binary that is now in place, and where it came from."""

    name: str
    version: str
    arch: str
    handler: str
    runtime_type: str
    path: Path
    binary_sha256: str
    archive_sha256: str
    source: str  # URL (after the mirror rewrite) or local file
    size: int  # bytes downloaded (0 when skipped)
    seconds: float
    skipped: bool = False  # dest already held this exact binary; nothing was downloaded


@dataclass
class _Staged:
    shim: ShimEntry
    artifact: Artifact
    binary_tmp: Path
    archive_tmp: Path | None
    binary_sha256: str
    source: str
    size: int
    seconds: float


def fetch_shims(
    shims: Sequence[ShimEntry],
    arch: str,
    dest: Path,
    *,
    options: FetchOptions | None = None,
    progress: Callable[[], Progress] | None = None,
    session: requests.Session | None = None,
) -> list[Fetched]:
    """Download, verify and place ``shims`` for ``arch`` in ``dest``: all of them, or none.

    Takes catalog entries, an arch (amd64|arm64), the destination directory (created), options,
    a factory of progress sinks (one per download) and optionally a requests session to reuse.
    Returns one Fetched per shim, in the order given (``skipped`` when dest already held it).
    Raises UsageError for a missing CA bundle, CatalogError for an arch the catalog lacks (both
    before any I/O), FetchError when a download or an archive fails and ChecksumError when a
    sha256 differs from the catalog; then nothing new is left in ``dest``.
    """
    opts = options or FetchOptions()
    if opts.ca_bundle and not Path(opts.ca_bundle).is_file():
        raise UsageError(
            f"CA bundle {opts.ca_bundle} does not exist or is not a file",
            hint="give --ca-bundle the path of a PEM file",
        )
    artifacts = [(s, s.artifact(arch)) for s in shims]  # CatalogError before any I/O
    created = not dest.exists()
    try:
        _make_dest(dest)
    except OSError as ex:
        raise FetchError(
            f"cannot create {dest}: {ex.strerror}", hint="choose a writable --dest directory"
        ) from ex
    manifest = read_manifest(dest)
    results: list[Fetched] = []
    staged: list[_Staged] = []
    own_session = session is None
    sess = session or make_session()
    try:
        for shim, artifact in artifacts:
            done = None if opts.force else _already_there(shim, artifact, dest, manifest)
            if done is not None:
                results.append(done)
                continue
            staged.append(
                _stage(
                    shim=shim,
                    artifact=artifact,
                    dest=dest,
                    opts=opts,
                    progress=(progress or NoProgress)(),
                    session=sess,
                )
            )
        results.extend(_place(staged, dest, manifest))
    except BaseException:
        for st in staged:
            for p in (st.binary_tmp, st.archive_tmp):
                if p is not None:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only succeeds when we left it empty
        raise
    finally:
        if own_session:
            sess.close()
    order = {s.name: i for i, s in enumerate(shims)}
    return sorted(results, key=lambda r: order[r.name])


def _place(staged: Sequence[_Staged], dest: Path, manifest: dict[str, dict[str, object]]) -> list[Fetched]:
    """Every archive checked out: rename the binaries into place, then record them."""
    placed: list[Fetched] = []
    for st in staged:
        final = dest / st.shim.binary
        st.binary_tmp.replace(final)
        if st.archive_tmp is not None:
            st.archive_tmp.replace(dest / st.artifact.filename)
        manifest[st.shim.name] = _manifest_entry(st)
        placed.append(
            Fetched(
                name=st.shim.name,
                version=st.shim.version,
                arch=st.artifact.arch,
                handler=st.shim.handler,
                runtime_type=st.shim.runtime_type,
                path=final,
                binary_sha256=st.binary_sha256,
                archive_sha256=st.artifact.archive_sha256,
                source=st.source,
                size=st.size,
                seconds=st.seconds,
            )
        )
    if staged:
        _write_manifest(dest, manifest)
        _fsync_dir(dest)
    return placed


def _stage(
    *,
    shim: ShimEntry,
    artifact: Artifact,
    dest: Path,
    opts: FetchOptions,
    progress: Progress,
    session: requests.Session,
) -> _Staged:
    """Download + verify + extract into temp files in ``dest``; nothing is placed yet."""
    what = f"shim {shim.name} {shim.version} ({artifact.arch})"
    src = source_for(artifact, opts.mirror)
    archive_tmp = _tempfile(dest, f".{artifact.filename}.")
    binary_tmp: Path | None = None
    try:
        started = time.monotonic()
        try:
            with archive_tmp.open("r+b") as out:
                digest, size = read_archive(
                    src,
                    out,
                    what=what,
                    opts=opts,
                    progress=progress,
                    session=session,
                    max_bytes=artifact.max_bytes,
                )
                out.flush()
                os.fsync(out.fileno())
        finally:
            progress.finish()
        seconds = time.monotonic() - started
        _expect(
            digest,
            artifact.archive_sha256,
            f"{what}: {src} has sha256 {digest}, the catalog expects "
            f"{artifact.archive_sha256}; nothing was installed",
        )
        binary_tmp = _tempfile(dest, f".{shim.binary}.")
        binary_sha = extract_binary(archive_tmp, shim.binary, binary_tmp, what=what)
        _expect(
            binary_sha,
            artifact.binary_sha256,
            f"{what}: {shim.binary} inside {artifact.filename} has sha256 {binary_sha}, "
            f"the catalog expects {artifact.binary_sha256}; nothing was installed",
        )
        keep: Path | None = archive_tmp
        if not opts.keep_archives:
            archive_tmp.unlink()
            keep = None
        return _Staged(shim, artifact, binary_tmp, keep, binary_sha, src, size, seconds)
    except BaseException:
        for p in (archive_tmp, binary_tmp):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        raise


def _expect(actual: str, expected: str | None, message: str) -> None:
    if expected is not None and actual != expected:
        raise ChecksumError(
            message,
            hint="the download was altered or the catalog entry is wrong; do not bypass this",
        )


def _tempfile(directory: Path, prefix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=directory)
    os.close(fd)
    return Path(name)


def _already_there(
    shim: ShimEntry, artifact: Artifact, dest: Path, manifest: dict[str, dict[str, object]]
) -> Fetched | None:
    """A Fetched(skipped) when dest holds exactly what this catalog entry would produce."""
    path = dest / shim.binary
    rec = manifest.get(shim.name)
    if not isinstance(rec, dict) or not path.is_file():
        return None
    if rec.get("archive_sha256") != artifact.archive_sha256 or rec.get("arch") != artifact.arch:
        return None
    current = sha256_file(path)
    if current != rec.get("binary_sha256"):
        return None
    if artifact.binary_sha256 is not None and current != artifact.binary_sha256:
        return None
    return Fetched(
        name=shim.name,
        version=shim.version,
        arch=artifact.arch,
        handler=shim.handler,
        runtime_type=shim.runtime_type,
        path=path,
        binary_sha256=current,
        archive_sha256=artifact.archive_sha256,
        source=str(rec.get("source", "")),
        size=0,
        seconds=0.0,
        skipped=True,
    )


def _manifest_entry(st: _Staged) -> dict[str, object]:
    shim, artifact, binary_sha = st.shim, st.artifact, st.binary_sha256
    return {
        "version": shim.version,
        "arch": artifact.arch,
        "binary": shim.binary,
        "handler": shim.handler,
        "runtime_type": shim.runtime_type,
        "archive_sha256": artifact.archive_sha256,
        "binary_sha256": binary_sha,
        "binary_sha256_pinned": artifact.binary_sha256 is not None,
        "source": st.source,
    }


def _write_manifest(directory: Path, shims: dict[str, dict[str, object]]) -> None:
    data = json.dumps({"schema": 1, "shims": shims}, indent=2, sort_keys=True) + "\n"
    tmp = _tempfile(directory, f".{MANIFEST_NAME}.")
    try:
        with tmp.open("w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        tmp.replace(directory / MANIFEST_NAME)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _make_dest(dest: Path, mode: int = 0o755) -> None:
    """Create ``dest`` and its missing parents with exactly ``mode``, whatever the umask (a
    umask of 000 would otherwise leave a shim directory anyone may write to); raises OSError."""
    missing = []
    current = dest
    while not current.is_dir() and current.parent != current:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(mode)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
