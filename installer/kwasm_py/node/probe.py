"""Gather the facts layout detection needs, from the host root and the node's /proc entries."""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path, PurePosixPath

from kwasm_py.node import layout, restart
from kwasm_py.node.hostfs import HostFS

_UNIT_DIRS = (
    PurePosixPath("/etc/systemd/system"),
    PurePosixPath("/lib/systemd/system"),
    PurePosixPath("/usr/lib/systemd/system"),
    PurePosixPath("/run/systemd/system"),
)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def running_configs(pid: int) -> tuple[PurePosixPath, ...]:
    """The --config of every containerd in the node's PID namespace (node paths)."""
    configs = []
    for proc in restart.find_processes(pid, "containerd"):
        try:
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        path = str(layout.DEFAULT_CONFIG)
        for i, arg in enumerate(args):
            if arg in ("--config", "-c") and i + 1 < len(args):
                path = args[i + 1]
            elif arg.startswith("--config="):
                path = arg.split("=", 1)[1]
        configs.append(PurePosixPath(path))
    return tuple(configs)


def gather(fs: HostFS, *, pid: int | None) -> layout.NodeFacts:
    existing = frozenset(p for p in layout.PROBED_PATHS if fs.exists(p))
    units = set()
    for unit in layout.UNITS:
        for directory in _UNIT_DIRS:
            if fs.exists(directory / f"{unit}.service"):
                units.add(unit)
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
    init = _comm(pid) if pid is not None else ""
    if not init:
        init = "systemd" if fs.exists(PurePosixPath("/lib/systemd/systemd")) else ""
    return layout.NodeFacts(
        existing=existing,
        systemd_units=frozenset(units),
        openrc_services=frozenset(openrc),
        init=init,
        running_configs=running_configs(pid) if pid is not None else (),
        k0s_managed=k0s_managed,
        rendered_versions=versions,
    )
