"""EFFECT: find the catalog, and find shim binaries for the agent (image, fetch or node dir).

``resolve_shims`` is what the agent calls for ``--shim-source image|fetch|dir``. It returns local
paths plus what the node engine needs (handler, runtime_type, sha256). ``requests`` is imported
only for the ``fetch`` source, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import platform
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from kwasm_py.errors import ChecksumError, FetchError, UsageError
from kwasm_py.model import BIN_DIR_NAME, CATALOG_ENV, DEFAULT_INSTALL_DIR, STATE_FILE_NAME
from kwasm_py.shims.catalog import Catalog, ShimEntry, normalize_arch, parse
from kwasm_py.shims.digests import file_sha256 as sha256_file
from kwasm_py.shims.digests import read_manifest

if TYPE_CHECKING:
    from kwasm_py.shims.fetch import FetchOptions, Progress

# Where images/Dockerfile bakes the shims: IMAGE_SHIM_DIR/<arch>/<binary>. KWASM_SHIM_DIR overrides.
IMAGE_SHIM_DIR = PurePosixPath("/opt/kwasm-py/shims")
# Where --shim-source fetch downloads to when no directory is given (inside the agent's pod).
FETCH_CACHE_DIR = PurePosixPath("/var/cache/kwasm-py/shims")
SHIM_DIR_ENV = "KWASM_SHIM_DIR"

ShimSourceKind = Literal["image", "fetch", "dir"]
SHIM_SOURCES: tuple[ShimSourceKind, ...] = ("image", "fetch", "dir")


@dataclass(frozen=True)
class ResolvedShim:
    """A shim binary on this machine, ready for ``kwasm-py node install --shim PATH``."""

    name: str
    handler: str
    runtime_type: str
    path: Path
    sha256: str
    version: str  # catalog version (what the catalog says the source should hold)
    verified: str  # how sha256 was checked: "catalog", "manifest", "archive" or "none"


def read_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Parse the catalog at ``path``, $KWASM_SHIM_CATALOG, or the copy shipped in the package."""
    chosen = path or os.environ.get(CATALOG_ENV)
    if chosen:
        p = Path(chosen)
        try:
            text = p.read_text()
        except OSError as ex:
            raise UsageError(f"cannot read shim catalog {p}: {ex.strerror}") from ex
        return parse(text, source=str(p))
    ref = resources.files("kwasm_py.shims").joinpath("data/shims.toml")
    return parse(ref.read_text(), source="kwasm_py/shims/data/shims.toml")


def host_arch() -> str:
    """This machine's architecture as amd64/arm64."""
    return normalize_arch(platform.machine())


def resolve_arch(arch: str) -> str:
    """``auto`` -> this machine's architecture; otherwise validated amd64/arm64 (or aliases)."""
    return host_arch() if arch == "auto" else normalize_arch(arch)


def resolve_shims(
    source: ShimSourceKind,
    *,
    names: Sequence[str] = (),
    arch: str = "auto",
    directory: Path | None = None,
    catalog: Catalog | None = None,
    fetch_options: FetchOptions | None = None,
    progress: Callable[[], Progress] | None = None,
) -> list[ResolvedShim]:
    """Local binaries for the named (default: the catalog's default) shims.

    - ``image``: baked into the image at ``directory`` or $KWASM_SHIM_DIR/<arch> or
      /opt/kwasm-py/shims/<arch>; checked against the catalog's binary sha256 when it pins one,
      else against the image's kwasm-shims.json (written by the verified build-time fetch).
    - ``fetch``: downloaded and verified now (``kwasm_py.shims.fetch``) into ``directory`` (default
      /var/cache/kwasm-py/shims/<arch>); skipped when the directory already holds them.
    - ``dir``: a node-local directory (``directory`` is required) holding ``<binary>`` files;
      checked against the catalog's binary sha256 when pinned, else taken as the operator's.
    """
    if source not in SHIM_SOURCES:
        raise UsageError(f"unknown shim source {source!r} (use {', '.join(SHIM_SOURCES)})")
    cat = catalog or read_catalog()
    a = resolve_arch(arch)
    shims = cat.select(names)
    if source == "fetch":
        from kwasm_py.shims import fetch as artifacts

        dest = directory or Path(FETCH_CACHE_DIR) / a
        fetched = artifacts.fetch_shims(shims, a, dest, options=fetch_options, progress=progress)
        return [
            ResolvedShim(
                name=f.name,
                handler=f.handler,
                runtime_type=f.runtime_type,
                path=f.path,
                sha256=f.binary_sha256,
                version=f.version,
                verified="catalog" if cat.get(f.name).artifact(a).binary_sha256 else "archive",
            )
            for f in fetched
        ]
    if source == "image":
        base = Path(os.environ.get(SHIM_DIR_ENV) or IMAGE_SHIM_DIR)
        where = directory or base / a
        hint = "the image was built without baked shims: use --shim-source fetch or dir"
    else:
        if directory is None:
            raise UsageError("--shim-source dir needs a directory (--shim-dir)")
        where = directory
        hint = "put the shim binaries there, or use --shim-source image or fetch"
    manifest = read_manifest(where)
    return [_check_local(s, a, where, manifest, hint=hint) for s in shims]


def _check_local(
    shim: ShimEntry,
    arch: str,
    where: Path,
    manifest: dict[str, dict[str, object]],
    *,
    hint: str,
) -> ResolvedShim:
    path = where / shim.binary
    try:
        st = path.stat()
    except FileNotFoundError as ex:
        raise FetchError(f"shim {shim.name}: {path} does not exist", hint=hint) from ex
    except OSError as ex:
        raise FetchError(
            f"shim {shim.name}: cannot read {path}: {ex.strerror}", hint="check the directory's permissions"
        ) from ex
    if not stat.S_ISREG(st.st_mode):
        raise FetchError(f"shim {shim.name}: {path} is not a regular file", hint=hint)
    if not st.st_mode & 0o111:
        raise FetchError(f"shim {shim.name}: {path} is not executable", hint=f"chmod 755 {path}")
    digest = sha256_file(path)
    pinned = shim.artifacts[arch].binary_sha256 if arch in shim.artifacts else None
    rec = manifest.get(shim.name, {})
    recorded = rec.get("binary_sha256") if rec.get("arch") == arch else None
    if pinned is not None:
        expected, verified = pinned, "catalog"
    elif isinstance(recorded, str):
        expected, verified = recorded, "manifest"
    else:
        expected, verified = None, "none"
    if expected is not None and digest != expected:
        raise ChecksumError(
            f"shim {shim.name}: {path} has sha256 {digest}, expected {expected} ({verified})",
            hint="the file changed since it was verified; refetch it",
        )
    return ResolvedShim(
        name=shim.name,
        handler=shim.handler,
        runtime_type=shim.runtime_type,
        path=path,
        sha256=digest,
        version=str(rec.get("version", shim.version)),
        verified=verified,
    )


# ---- what is installed on a node root (for `kwasm-py shims list`) ----


@dataclass(frozen=True)
class InstalledShim:
    """A containerd-shim-*-v* file in <host-root>/<install-dir>/bin and what we know of it."""

    binary: str
    path: Path
    sha256: str
    state_sha256: str | None  # what the node state file recorded for it, if anything
    state_handlers: tuple[str, ...]  # handlers the state file lists for this binary
    catalog_name: str | None  # catalog shim with this binary name
    catalog_match: str  # "pinned" (sha equals catalog), "differs", "unknown" (unpublished)


def installed_shims(
    host_root: Path, catalog: Catalog, *, install_dir: PurePosixPath = DEFAULT_INSTALL_DIR
) -> list[InstalledShim]:
    """Installed shim binaries on a node root, with their sha256 and the state file's view."""
    base = host_root / install_dir.relative_to("/")
    state = read_state_runtimes(base / STATE_FILE_NAME)
    by_binary = {s.binary: s for s in catalog.shims}
    found = []
    for path in _iter_shim_files(base / BIN_DIR_NAME):
        digest = sha256_file(path)
        recs = [r for r in state if PurePosixPath(r.get("shim", "")).name == path.name]
        state_sha = next((r["sha256"] for r in recs if r.get("sha256")), None)
        entry = by_binary.get(path.name)
        pinned = {a.binary_sha256 for a in entry.artifacts.values()} if entry else set()
        pinned.discard(None)
        match = "unknown" if not pinned else "pinned" if digest in pinned else "differs"
        found.append(
            InstalledShim(
                binary=path.name,
                path=path,
                sha256=digest,
                state_sha256=state_sha,
                state_handlers=tuple(r["handler"] for r in recs if r.get("handler")),
                catalog_name=entry.name if entry else None,
                catalog_match=match,
            )
        )
    return found


def _iter_shim_files(bin_dir: Path) -> Iterator[Path]:
    if not bin_dir.is_dir():
        return
    for p in sorted(bin_dir.glob("containerd-shim-*-v*")):
        try:
            mode = p.lstat().st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) and not p.name.endswith(".part"):
            yield p


def read_state_runtimes(path: Path) -> list[dict[str, str]]:
    """Runtime records from the node state file, read tolerantly (the lead owns its format).

    Accepts any JSON object holding a list of objects with some of the keys handler / shim /
    sha256 / runtime_type (at top level as "runtimes" or "shims", or one level down). Anything
    unreadable yields [].
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    out: list[dict[str, str]] = []
    for lst in _candidate_lists(doc):
        for item in lst:
            if isinstance(item, dict):
                rec = {
                    k: str(v)
                    for k, v in item.items()
                    if k in ("handler", "shim", "sha256", "runtime_type", "binary") and isinstance(v, str)
                }
                if "shim" not in rec and "binary" in rec:
                    rec["shim"] = rec["binary"]
                if rec.get("shim") or rec.get("handler"):
                    out.append(rec)
    return out


def _candidate_lists(doc: object) -> Iterator[list[object]]:
    if not isinstance(doc, dict):
        return
    for key in ("runtimes", "shims"):
        value = doc.get(key)
        if isinstance(value, list):
            yield value
        elif isinstance(value, dict):  # {"spin": {...}} keyed by handler
            yield [{"handler": k, **v} for k, v in value.items() if isinstance(v, dict)]
    for value in doc.values():
        if isinstance(value, dict) and value is not doc:
            for key in ("runtimes", "shims"):
                inner = value.get(key)
                if isinstance(inner, list):
                    yield inner
