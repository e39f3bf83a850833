"""EFFECT: download, verify and unpack shim archives. The only module that imports ``requests``.

The order is the safety argument: download into a temp file in the destination directory ->
compare the archive's sha256 with the catalog -> check EVERY tar member (no absolute paths, no
``..``, no links leaving the tree, no devices) -> stream the one binary into another temp file ->
compare its sha256 when the catalog pins one -> only then ``os.replace`` into place. Several shims
are placed together: if any fails, none is placed and every temp file is removed.

Retries: connection errors, timeouts, 5xx/429 answers and truncated bodies are retried with
exponential backoff (``FetchOptions.retries``); 4xx answers, TLS failures and checksum mismatches
are not. ``set_testing(True)`` keeps the retries but skips the sleeping, as ``stamina`` does.
Proxies (HTTP(S)_PROXY, NO_PROXY) and REQUESTS_CA_BUNDLE come from the environment through
requests; ``FetchOptions.ca_bundle`` overrides the CA bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

import requests
import urllib3

from kwasm_py.errors import ChecksumError, FetchError, UsageError
from kwasm_py.shims.catalog import Artifact, ShimEntry
from kwasm_py.shims.digests import MANIFEST_NAME, read_manifest
from kwasm_py.shims.digests import file_sha256 as sha256_file

CHUNK = 256 * 1024
MAX_BINARY_BYTES = 1 << 30  # a shim is tens of MB; refuse archive members claiming more
USER_AGENT = "kwasm-py-shims"
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

_testing = False


def set_testing(testing: bool) -> None:
    """Switch backoff sleeps off (True) or on (False); retries still happen and are counted."""
    global _testing  # noqa: PLW0603 - one process-wide switch, like stamina.set_testing
    _testing = testing


def is_testing() -> bool:
    return _testing


@dataclass(frozen=True)
class FetchOptions:
    """How to reach the archives. Defaults suit a node or an image build on the internet."""

    mirror: str | None = None  # http(s) base URL or local directory holding the same file names
    ca_bundle: str | None = None  # PEM file; None: requests' default / REQUESTS_CA_BUNDLE
    retries: int = 4  # extra attempts after the first
    backoff: float = 0.5  # first pause, doubled per attempt, with jitter
    max_backoff: float = 8.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # between bytes, not for the whole download
    keep_archives: bool = False  # also place the verified archives in dest (to seed a mirror)
    force: bool = False  # download even when dest already holds the recorded binary


class Progress(Protocol):
    """What a download reports; the CLI draws it with rich or prints plain lines."""

    def start(self, label: str, total: int | None) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class _NoProgress:
    def start(self, label: str, total: int | None) -> None:
        del label, total

    def advance(self, nbytes: int) -> None:
        del nbytes

    def finish(self) -> None:
        pass


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


def make_session() -> requests.Session:
    """A session that honours the proxy/CA environment and names itself."""
    session = requests.Session()
    session.trust_env = True  # HTTP(S)_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, .netrc
    session.headers["User-Agent"] = USER_AGENT
    return session


def source_for(artifact: Artifact, mirror: str | None) -> str:
    """Where to read ``artifact`` from: its URL, or the same file name under the mirror."""
    if not mirror:
        return artifact.url
    if mirror.startswith(("http://", "https://")):
        return mirror.rstrip("/") + "/" + artifact.filename
    base = mirror.removeprefix("file://")
    return str(Path(base) / artifact.filename)


def fetch_shims(
    shims: Sequence[ShimEntry],
    arch: str,
    dest: Path,
    *,
    options: FetchOptions | None = None,
    progress: Callable[[], Progress] | None = None,
    session: requests.Session | None = None,
) -> list[Fetched]:
    """Download, verify and place ``shims`` for ``arch`` in ``dest``: all of them, or none."""
    opts = options or FetchOptions()
    if opts.ca_bundle and not Path(opts.ca_bundle).is_file():
        raise UsageError(f"CA bundle {opts.ca_bundle} does not exist or is not a file")
    artifacts = [(s, s.artifact(arch)) for s in shims]  # CatalogError before any I/O
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as ex:
        raise FetchError(f"cannot create {dest}: {ex.strerror}") from ex
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
                    progress=(progress or _NoProgress)(),
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
                if src.startswith(("http://", "https://")):
                    digest, size = _download(
                        url=src, out=out, what=what, opts=opts, progress=progress, session=session
                    )
                else:
                    digest, size = _copy_local(Path(src), out, what, progress)
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


def _download(
    *,
    url: str,
    out: IO[bytes],
    what: str,
    opts: FetchOptions,
    progress: Progress,
    session: requests.Session,
) -> tuple[str, int]:
    """GET ``url`` into ``out`` with bounded retries; return (sha256 hex, bytes)."""
    attempts = opts.retries + 1
    last = ""
    for attempt in range(1, attempts + 1):
        out.seek(0)
        out.truncate()
        try:
            return _download_once(url=url, out=out, what=what, opts=opts, progress=progress, session=session)
        except _Retryable as ex:
            last = str(ex)
        if attempt < attempts:
            _pause(attempt, opts)
    raise FetchError(
        f"{what}: downloading {url} failed after {attempts} attempts: {last}",
        hint="check the network/proxy (HTTPS_PROXY, NO_PROXY) or use --mirror for air-gapped nodes",
    )


class _Retryable(Exception):
    """An attempt failed in a way another attempt may fix."""


def _download_once(
    *,
    url: str,
    out: IO[bytes],
    what: str,
    opts: FetchOptions,
    progress: Progress,
    session: requests.Session,
) -> tuple[str, int]:
    timeout = (opts.connect_timeout, opts.read_timeout)
    verify: bool | str = opts.ca_bundle or True
    try:
        resp = session.get(url, stream=True, timeout=timeout, verify=verify, allow_redirects=True)
    except requests.exceptions.SSLError as ex:
        raise FetchError(
            f"{what}: TLS verification failed for {url}: {_reason(ex)}",
            hint="pass --ca-bundle PEM (or set REQUESTS_CA_BUNDLE) for a private CA",
        ) from ex
    except requests.exceptions.InvalidURL as ex:
        raise FetchError(f"{what}: invalid URL {url}: {ex}") from ex
    except (requests.ConnectionError, requests.Timeout) as ex:
        raise _Retryable(f"{type(ex).__name__}: {_reason(ex)}") from ex
    with resp:
        if resp.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {resp.status_code} {resp.reason} from {resp.url}")
        if resp.status_code != 200:
            via = f" (redirected to {resp.url})" if resp.url != url else ""
            raise FetchError(
                f"{what}: {url} answered HTTP {resp.status_code} {resp.reason}{via}",
                hint=(
                    "check the version and asset name in images/shims.toml, "
                    "or that the mirror serves this file name"
                ),
            )
        total = _content_length(resp)
        progress.start(f"{what}", total)
        h = hashlib.sha256()
        n = 0
        try:
            for chunk in resp.raw.stream(CHUNK, decode_content=False):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
                progress.advance(len(chunk))
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as ex:
            raise _Retryable(f"body cut short after {n} bytes: {_reason(ex)}") from ex
        if total is not None and n != total:
            raise _Retryable(f"body cut short: {n} of {total} bytes")
        return h.hexdigest(), n


def _content_length(resp: requests.Response) -> int | None:
    try:
        value = int(resp.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _reason(ex: BaseException) -> str:
    """The innermost useful message of a requests/urllib3 exception chain."""
    inner: BaseException = ex
    while True:
        nxt = inner.args[0] if inner.args and isinstance(inner.args[0], BaseException) else None
        nxt = nxt or getattr(inner, "reason", None)
        if not isinstance(nxt, BaseException) or nxt is inner:
            break
        inner = nxt
    return str(inner) or type(inner).__name__


def _pause(attempt: int, opts: FetchOptions) -> None:
    if _testing:
        return
    delay = min(opts.max_backoff, opts.backoff * 2 ** (attempt - 1))
    time.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not cryptography


def _copy_local(path: Path, out: IO[bytes], what: str, progress: Progress) -> tuple[str, int]:
    """Read a mirror directory's file into ``out``; return (sha256 hex, bytes)."""
    try:
        src = path.open("rb")
    except FileNotFoundError:
        raise FetchError(
            f"{what}: {path} does not exist in the mirror directory",
            hint="the mirror must hold the release archives under their original file names",
        ) from None
    except OSError as ex:
        raise FetchError(f"{what}: cannot read {path}: {ex.strerror}") from ex
    with src:
        progress.start(what, os.fstat(src.fileno()).st_size)
        h = hashlib.sha256()
        n = 0
        while chunk := src.read(CHUNK):
            out.write(chunk)
            h.update(chunk)
            n += len(chunk)
            progress.advance(len(chunk))
    return h.hexdigest(), n


def check_members(members: Sequence[tarfile.TarInfo], *, what: str) -> None:
    """Refuse the whole archive if any member could write outside the extraction directory."""
    for m in members:
        name = m.name
        parts = PurePosixPath(name).parts
        if name.startswith("/") or PurePosixPath(name).is_absolute():
            raise FetchError(f"{what}: archive member {name!r} has an absolute path; refused")
        if ".." in parts:
            raise FetchError(f"{what}: archive member {name!r} climbs out with '..'; refused")
        if m.isdev():
            raise FetchError(f"{what}: archive member {name!r} is a device or FIFO; refused")
        if m.issym() or m.islnk():
            target = PurePosixPath(m.linkname)
            base = PurePosixPath(name).parent if m.issym() else PurePosixPath()
            if target.is_absolute() or _escapes(base / target):
                kind = "symlink" if m.issym() else "hard link"
                raise FetchError(
                    f"{what}: archive member {name!r} is a {kind} to {m.linkname!r} "
                    "outside the archive; refused"
                )
        elif not (m.isreg() or m.isdir()):
            raise FetchError(f"{what}: archive member {name!r} has an unsupported type; refused")


def _escapes(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in (".", ""):
            depth += 1
    return False


def extract_binary(archive: Path, binary: str, out_path: Path, *, what: str) -> str:
    """Check every member of ``archive``, stream the regular file named ``binary`` to
    ``out_path`` (fsynced, mode 0755) and return its sha256."""
    try:
        tf = tarfile.open(archive, mode="r:*")  # noqa: SIM115 - closed below, after the checks
    except (tarfile.TarError, OSError) as ex:
        raise FetchError(f"{what}: not a readable tar archive: {ex}") from ex
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as ex:
            raise FetchError(f"{what}: the archive is corrupt: {ex}") from ex
        check_members(members, what=what)
        found = [m for m in members if PurePosixPath(m.name).name == binary and not m.isdir()]
        if len(found) != 1:
            names = ", ".join(m.name for m in members[:8]) or "nothing"
            many = "more than one" if found else "no"
            raise FetchError(f"{what}: the archive holds {many} {binary} (it has: {names})")
        member = found[0]
        if not member.isreg():
            raise FetchError(f"{what}: {member.name} in the archive is not a regular file")
        if member.size > MAX_BINARY_BYTES:
            raise FetchError(f"{what}: {member.name} claims {member.size} bytes; refused")
        src = tf.extractfile(member)
        if src is None:
            raise FetchError(f"{what}: cannot read {member.name} from the archive")
        h = hashlib.sha256()
        try:
            with src, out_path.open("wb") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                out.flush()
                os.fsync(out.fileno())
        except (tarfile.TarError, EOFError, zlib.error) as ex:
            raise FetchError(f"{what}: the archive is corrupt: {ex}") from ex
    out_path.chmod(0o755)
    return h.hexdigest()


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
