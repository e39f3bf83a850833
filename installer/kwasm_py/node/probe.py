"""Gather the facts layout detection needs, from the host root and the node's /proc entries
(or, with no /proc of the node in sight, from systemd over D-Bus)."""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from pathlib import PurePosixPath

from kwasm_py.errors import KwasmError
from kwasm_py.node import layout
from kwasm_py.node.dbus import UnitFacts
from kwasm_py.node.hostfs import HostFS
from kwasm_py.node.procfs import HOST, ProcFS

_UNIT_DIRS = (
    PurePosixPath("/etc/systemd/system"),
    PurePosixPath("/lib/systemd/system"),
    PurePosixPath("/usr/lib/systemd/system"),
    PurePosixPath("/run/systemd/system"),
)


def gather(
    fs: HostFS, *, pid: int | None, proc: ProcFS = HOST, units: UnitFacts | None = None
) -> layout.NodeFacts:
    """The facts `layout.detect` decides from: files and units under the root, and the node's
    init and running containerd (read through `proc` for node process `pid`; None: no process
    of the node is reachable, so only files count). `units` is what systemd said over D-Bus
    (node/dbus.py) when the node's /proc is not visible: then init is systemd, its loaded units
    count as unit files and the running containerd's config comes from the units' ExecStart.

    Returns NodeFacts; raises HostIOError when a probed file cannot be read.
    """
    existing = frozenset(p for p in layout.PROBED_PATHS if fs.exists(p))
    unit_files: set[str] = set()
    for unit in layout.UNITS:
        for directory in _UNIT_DIRS:
            if fs.exists(directory / f"{unit}.service"):
                unit_files.add(unit)
    openrc = {svc for svc in layout.UNITS if fs.exists(PurePosixPath("/etc/init.d") / svc)}
    k0s_managed = False
    if layout.K0S_CONFIG in existing:
        text = fs.read_text(layout.K0S_CONFIG) or ""
        k0s_managed = any(line.strip() == "# k0s_managed=true" for line in text.splitlines()[:5])
    versions: dict[PurePosixPath, int] = {}
    for rendered in (layout.K3S_DIR / "config.toml", layout.RKE2_DIR / "config.toml"):
        if rendered in existing:
            with contextlib.suppress(tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
                value = tomllib.loads(fs.read_text(rendered) or "").get("version", 1)
                versions[rendered] = value if isinstance(value, int) else 1
    os_id = ""
    for path in layout.OS_RELEASE:  # the first that exists (os-release(5))
        if (release := fs.read_text(path)) is not None:
            os_id = layout.os_release_id(release)
            break
    init = proc.comm(pid) if pid is not None else ""
    running = proc.containerd_configs(pid) if pid is not None else ()
    if units is not None:  # systemd answered over D-Bus: it is the node's init
        init, running = "systemd", units.running_configs()
        unit_files |= units.loaded
    if not init:
        init = "systemd" if fs.exists(PurePosixPath("/lib/systemd/systemd")) else ""
    return layout.NodeFacts(
        existing=existing,
        systemd_units=frozenset(unit_files),
        openrc_services=frozenset(openrc),
        init=init,
        running_configs=running,
        k0s_managed=k0s_managed,
        rendered_versions=versions,
        os_id=os_id,
    )


# ---------------------------------------------------------------------------------------------
# Can the node execute what we install? (a noexec /opt makes every pod fail with EACCES)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (source: proc(5))."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mount_for(mountinfo: str, path: PurePosixPath) -> tuple[str, frozenset[str]] | None:
    """The mount that holds node path `path`: (mount point, per-mount options), from the text
    of a /proc/PID/mountinfo (proc(5): field 5 is the mount point, field 6 its options). The
    longest mount point containing `path` wins, and of equal ones the last (it is on top).
    None when no line parses. Pure."""
    best: tuple[str, frozenset[str]] | None = None
    text = str(path)
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        point = _unescape(fields[4])
        inside = point in ("/", text) or text.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, frozenset(fields[5].split(",")))
    return best


def exec_blocker(fs: HostFS, directory: PurePosixPath, *, pid: int | None, proc: ProcFS = HOST) -> str | None:
    """Why the node could not execute a file placed in node directory `directory`, or None.

    Looks at the mount holding it as the node sees it (`/proc/PID/mountinfo` of a node process,
    when `pid` is one) and as this machine sees it under the host root (statvfs ST_NOEXEC);
    either one mounted `noexec` is a reason. Reads only; raises nothing.
    """
    try:
        host = fs.resolve(directory)
    except KwasmError:
        host = fs.root / str(directory).lstrip("/")
    node_path = directory
    with contextlib.suppress(ValueError):
        node_path = PurePosixPath("/") / host.relative_to(fs.root)
    if pid is not None:
        found = mount_for(proc.mountinfo(pid), node_path)
        if found is not None and "noexec" in found[1]:
            return f"{found[0]} (holding {node_path}) is mounted noexec on the node (/proc/{pid}/mountinfo)"
    probe = host
    while not probe.exists() and probe not in (fs.root, probe.parent):
        probe = probe.parent
    try:
        flags = os.statvfs(probe).f_flag
    except OSError:
        return None
    if flags & os.ST_NOEXEC:
        return f"{probe} (holding {node_path}) is on a filesystem mounted noexec"
    return None
