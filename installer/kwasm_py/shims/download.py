"""EFFECT: read one shim archive into an open file, from a URL or a mirror directory.

The only module that talks HTTP (with ``requests``). What is retried, with the one policy of
``kwasm_py.retry``: connection errors, timeouts, 408/425/429/5xx answers and bodies cut short;
never 4xx answers, TLS failures or bad URLs. Proxies (HTTP(S)_PROXY, NO_PROXY) and
REQUESTS_CA_BUNDLE come from the environment through requests; ``FetchOptions.ca_bundle``
overrides the CA bundle.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import requests
import urllib3

from kwasm_py import retry
from kwasm_py.errors import FetchError
from kwasm_py.shims.catalog import Artifact

CHUNK = 256 * 1024
USER_AGENT = "kwasm-py-shims"
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
NETWORK_HINT = "check the network/proxy (HTTPS_PROXY, NO_PROXY) or use --mirror for air-gapped nodes"


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

    @property
    def backoff_policy(self) -> retry.Backoff:
        """These options as the shared retry policy."""
        return retry.Backoff(retries=self.retries, initial=self.backoff, maximum=self.max_backoff)


class Progress(Protocol):
    """What a download reports; the CLI draws it with rich or prints plain lines."""

    def start(self, label: str, total: int | None) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    """A Progress that reports nothing."""

    def start(self, label: str, total: int | None) -> None:
        del label, total

    def advance(self, nbytes: int) -> None:
        del nbytes

    def finish(self) -> None:
        pass


class _Transient(FetchError):
    """An attempt failed in a way another attempt may fix (retried; never escapes ``read_archive``)."""


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


def too_large(what: str, src: str, cap: int, size: int | None = None) -> FetchError:
    """The error for an archive past the catalog's size cap (``max_archive_bytes``): ``size``
    when it was announced (Content-Length, the mirror file's size), None when the stream ran past."""
    said = f"is {size} bytes" if size is not None else f"ran past {cap} bytes"
    return FetchError(
        f"{what}: {src} {said}, over the catalog's cap of {cap} bytes; aborted, nothing was installed",
        hint="check the url or mirror; raise max_archive_bytes in images/shims.toml only for a real release",
    )


def read_archive(
    src: str,
    out: IO[bytes],
    *,
    what: str,
    opts: FetchOptions,
    progress: Progress,
    session: requests.Session,
    max_bytes: int,
) -> tuple[str, int]:
    """Copy ``src`` (an http(s) URL or a local file) into ``out``, which it truncates first.

    Takes the source, an open writable binary file, a label for messages (``what``), the options,
    a progress sink and the size cap (the artifact's ``max_bytes``). Returns (sha256 hex, bytes
    written). Raises FetchError: at once for 4xx answers, TLS failures, bad URLs, unreadable
    mirror files and a body (announced or streamed) past ``max_bytes``, where the copy stops at
    the cap; after ``opts.retries + 1`` attempts for network errors, 5xx/429 answers and short
    bodies.
    """
    if not src.startswith(("http://", "https://")):
        return _copy_local(Path(src), out, what, progress, max_bytes)

    def attempt() -> tuple[str, int]:
        out.seek(0)
        out.truncate()
        return _download_once(
            url=src, out=out, what=what, opts=opts, progress=progress, session=session, max_bytes=max_bytes
        )

    policy = opts.backoff_policy
    try:
        return retry.call(attempt, policy=policy, retry_on=_Transient)
    except _Transient as ex:
        raise FetchError(
            f"{what}: downloading {src} failed after {policy.attempts} attempts: {ex.message}",
            hint=NETWORK_HINT,
        ) from ex


def _download_once(
    *,
    url: str,
    out: IO[bytes],
    what: str,
    opts: FetchOptions,
    progress: Progress,
    session: requests.Session,
    max_bytes: int,
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
        raise FetchError(f"{what}: invalid URL {url}: {ex}", hint="fix the url in the shim catalog") from ex
    except (requests.ConnectionError, requests.Timeout) as ex:
        raise _Transient(f"{type(ex).__name__}: {_reason(ex)}") from ex
    with resp:
        if resp.status_code in RETRY_STATUS:
            raise _Transient(f"HTTP {resp.status_code} {resp.reason} from {resp.url}")
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
        if total is not None and total > max_bytes:
            raise too_large(what, url, max_bytes, total)
        progress.start(f"{what}", total)
        h = hashlib.sha256()
        n = 0
        try:
            for chunk in resp.raw.stream(CHUNK, decode_content=False):
                if n + len(chunk) > max_bytes:  # no or a lying Content-Length
                    raise too_large(what, url, max_bytes)
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
                progress.advance(len(chunk))
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as ex:
            raise _Transient(f"body cut short after {n} bytes: {_reason(ex)}") from ex
        if total is not None and n != total:
            raise _Transient(f"body cut short: {n} of {total} bytes")
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


def _copy_local(path: Path, out: IO[bytes], what: str, progress: Progress, max_bytes: int) -> tuple[str, int]:
    """Read a mirror directory's file into ``out``; return (sha256 hex, bytes); FetchError past
    ``max_bytes`` (checked on the file's size and while copying: it may grow meanwhile)."""
    try:
        src = path.open("rb")
    except FileNotFoundError as ex:
        raise FetchError(
            f"{what}: {path} does not exist in the mirror directory",
            hint="the mirror must hold the release archives under their original file names",
        ) from ex
    except OSError as ex:
        raise FetchError(
            f"{what}: cannot read {path}: {ex.strerror}", hint="check the mirror directory's permissions"
        ) from ex
    with src:
        size = os.fstat(src.fileno()).st_size
        if size > max_bytes:
            raise too_large(what, str(path), max_bytes, size)
        progress.start(what, size)
        h = hashlib.sha256()
        n = 0
        while chunk := src.read(CHUNK):
            if n + len(chunk) > max_bytes:
                raise too_large(what, str(path), max_bytes)
            out.write(chunk)
            h.update(chunk)
            n += len(chunk)
            progress.advance(len(chunk))
    return h.hexdigest(), n
