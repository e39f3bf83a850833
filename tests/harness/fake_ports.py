"""Fakes for the node engine's ports: a /proc tree, and a containerd that is restarted and asked
over CRI in process (it implements both `restart.Restarter` and `cri.CriClient`)."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kwasm_py.errors import RestartError
from kwasm_py.model import ContainerdVersion, RestartSpec
from kwasm_py.node.cri import CriStatus
from kwasm_py.node.procfs import ProcFS

C16 = ContainerdVersion(1, 6, 20)
CRI_IDS = ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime")


def fake_process(
    proc_root: Path,
    pid: int,
    *,
    comm: str,
    argv: list[str] | None = None,
    ppid: int = 0,
    start: int = 100,
    state: str = "S",
    namespace: str = "pid:[4026531836]",
    root: Path | None = None,
) -> None:
    """Write /proc/PID/{comm,cmdline,stat,ns/pid,root} for one process under `proc_root`."""
    entry = proc_root / str(pid)
    (entry / "ns").mkdir(parents=True, exist_ok=True)
    (entry / "comm").write_text(comm + "\n")
    (entry / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in (argv or [comm])))
    rest = " ".join(["0"] * 17)  # fields 5..21; starttime is field 22
    (entry / "stat").write_text(f"{pid} ({comm}) {state} {ppid} {rest} {start} 0 0\n")
    (entry / "ns" / "pid").symlink_to(namespace)
    if root is not None:
        (entry / "root").symlink_to(root)


def node_proc(tmp: Path, node_root: Path, *, init: str = "systemd") -> ProcFS:
    """A /proc in which PID 1 is the node's init with `node_root` as its /."""
    fake_process(tmp, 1, comm=init, root=node_root)
    return ProcFS(tmp)


def _runtimes(config: dict[str, object]) -> dict[str, str]:
    plugins = config.get("plugins")
    out: dict[str, str] = {}
    if not isinstance(plugins, dict):
        return out
    for plugin in CRI_IDS:
        runtimes = plugins.get(plugin, {}).get("containerd", {}).get("runtimes", {})
        for handler, table in runtimes.items():
            out[handler] = table.get("runtime_type", "")
    return out


@dataclass
class FakeContainerd:
    """A containerd that reads `config` (a host path) when restarted and then reports its
    runtimes over "CRI". `registers=False` models a containerd that ignores the file;
    `down_after` lists the restarts (1-based) after which it does not come back."""

    config: Path
    events: list[str]
    version_: ContainerdVersion = C16
    registers: bool = True
    down_after: frozenset[int] = frozenset()
    restarts: list[RestartSpec] = field(default_factory=list)
    on_restart: Callable[[], None] = lambda: None
    on_status: Callable[[], None] = lambda: None
    runtimes: dict[str, str] = field(default_factory=dict)
    up: bool = True

    def __post_init__(self) -> None:
        self.runtimes = self._read()

    def _read(self) -> dict[str, str]:
        try:
            return _runtimes(tomllib.loads(self.config.read_text()))
        except FileNotFoundError:
            return {}

    def restart(
        self, spec: RestartSpec, *, pid: int, timeout: float, started: Callable[[], None] = lambda: None
    ) -> None:
        """Record the restart, let the test look at the node mid-restart, re-read the config."""
        self.restarts.append(spec)
        self.events.append(f"restart {spec}")
        self.on_restart()
        started()
        self.up = len(self.restarts) not in self.down_after
        if self.registers:
            self.runtimes = self._read()

    def version(self, socket: str, *, timeout: float) -> ContainerdVersion:
        """The configured version (RestartError while down)."""
        if not self.up:
            raise RestartError(f"containerd at {socket} did not answer CRI Version: down")
        return self.version_

    def status(self, socket: str, *, timeout: float) -> CriStatus:
        """Ready with the runtimes read at the last restart (RestartError while down)."""
        self.events.append("status")
        self.on_status()
        if not self.up:
            raise RestartError(f"containerd at {socket} did not answer CRI Status: down")
        return CriStatus(runtime_ready=True, runtimes=dict(self.runtimes))
