"""EFFECT: the cached node roots: Debian built once with debootstrap, kept as tarball + copy.

The tarball under ``$KWASM_CACHE/roots`` is the cached artefact; the unpacked copy beside it is
every node's read-only overlay lower layer. Both appear by rename only once complete, and a
flock serialises builds, so an interrupted or concurrent build is never used half-made.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from kwasm_py.errors import SandboxError, UsageError
from kwasm_py.sandbox.host import Log, quiet, run

SUITES = ("bookworm", "sid")
PACKAGES = ("systemd", "systemd-sysv", "dbus", "containerd", "runc")
DEFAULT_CACHE = Path("/var/cache/kwasm-py")
_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
_MIRROR_RE = re.compile(r"(https?://\S+/debian)/?(?:\s|$)")


def cache_dir() -> Path:
    """Where node roots are cached: $KWASM_CACHE, default /var/cache/kwasm-py."""
    return Path(os.environ.get("KWASM_CACHE") or DEFAULT_CACHE)


def check_prerequisites(*, build: bool = False) -> None:
    """Raise SandboxError unless we are root and the tools nodes need (and, with BUILD, the
    tools a root build needs) are installed."""
    if os.geteuid() != 0:
        raise SandboxError(
            "sandbox nodes need root (overlay mounts, systemd-nspawn, nsenter)",
            hint="run it again as root, e.g. with sudo",
        )
    tools = ["systemd-nspawn", "nsenter", "mount", "umount"] + (["debootstrap"] if build else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SandboxError(
            f"missing tools for sandbox nodes: {', '.join(missing)}",
            hint="apt-get install debootstrap systemd-container util-linux",
        )


def check_suite(suite: str) -> None:
    """Raise a usage error unless SUITE is one we know how to build."""
    if suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}", hint=f"one of: {', '.join(SUITES)}")


def debian_mirror() -> str:
    """The Debian mirror this machine's apt sources use ($KWASM_DEBIAN_MIRROR overrides).

    Raises SandboxError when no source line names one.
    """
    env = os.environ.get("KWASM_DEBIAN_MIRROR")
    if env:
        return env
    files: list[Path] = []
    for src in _SOURCES:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            if line.lstrip().startswith("#"):
                continue
            m = _MIRROR_RE.search(line)
            if m:
                return m.group(1)
    raise SandboxError(
        "no Debian mirror found in this machine's apt sources",
        hint="set KWASM_DEBIAN_MIRROR to the mirror's URL (ending in /debian)",
    )


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on PATH (created) for the block: one build at a time per cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def root_paths(suite: str, cache: Path | None = None) -> tuple[Path, Path]:
    """(tarball, unpacked lower dir) of SUITE's cached node root."""
    roots = (cache or cache_dir()) / "roots"
    return roots / f"{suite}.tar", roots / suite


def ensure_root(suite: str, *, cache: Path | None = None, log: Log = quiet) -> Path:
    """Return SUITE's unpacked node root, building it (debootstrap, ~1 min) when absent.

    Raises UsageError for an unknown suite, SandboxError when a tool is missing or the build
    or unpack fails.
    """
    check_suite(suite)
    tar, lower = root_paths(suite, cache)
    if lower.is_dir():
        return lower
    check_prerequisites(build=not tar.is_file())
    with locked(tar.with_suffix(".lock")):
        if lower.is_dir():
            return lower
        if not tar.is_file():
            _debootstrap(suite, tar, log)
        log(f"unpacking {tar}")
        tmp = lower.with_name(f"{suite}.unpack")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        run(["tar", "-C", str(tmp), "-xf", str(tar), "--numeric-owner", "--xattrs"], "unpack")
        tmp.rename(lower)
    return lower


def _debootstrap(suite: str, tar: Path, log: Log) -> None:
    mirror = debian_mirror()
    build = tar.with_name(f"{suite}.build")
    shutil.rmtree(build, ignore_errors=True)
    log(f"building the {suite} node root with debootstrap (about a minute)")
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        suite,
        str(build),
        mirror,
    ]
    run(argv, f"debootstrap {suite}")
    # The downloaded packages are not needed on a node: keep the root small.
    archives = build / "var/cache/apt/archives"
    for deb in archives.glob("*.deb"):
        deb.unlink()
    tmp = tar.with_name(f"{suite}.tar.tmp")
    run(["tar", "-C", str(build), "-cf", str(tmp), "--numeric-owner", "--xattrs", "."], "tar")
    tmp.rename(tar)
    shutil.rmtree(build, ignore_errors=True)
    log(f"cached {tar} ({tar.stat().st_size // 2**20} MiB)")
