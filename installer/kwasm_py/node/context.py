"""The engine's shared context: what a run was asked (NodeOptions), what it did (Outcome,
Report), and the node it acts on (Node, `open_node`), read from the host root and the state file.
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kwasm_py.containerd import dropin
from kwasm_py.errors import (
    KwasmError,
    ManagedNode,
    UsageError,
)
from kwasm_py.model import (
    BACKUP_DIR_NAME,
    DEFAULT_INSTALL_DIR,
    STATE_FILE_NAME,
    ConfigKind,
    ContainerdVersion,
    InstallMode,
    Layout,
    RestartMethod,
    RestartSpec,
    ShimSpec,
)
from kwasm_py.node import cri, dbus, layout, restart
from kwasm_py.node import probe as nodeprobe
from kwasm_py.node import state as st
from kwasm_py.node.hostfs import HostFS
from kwasm_py.node.procfs import HOST, ProcFS

KILL_ENV = "KWASM_TEST_KILL_AT"


P_SOCKET = layout.DEFAULT_SOCKET  # tests: SIGKILL ourselves at a named step


@dataclass(frozen=True)
class NodeOptions:
    """What a `kwasm-py node ...` run was asked to do (node paths are inside `host_root`)."""

    host_root: Path
    shims: tuple[ShimSpec, ...] = ()
    config: PurePosixPath | None = None
    restart: RestartSpec | None = None  # None: from the detected layout
    socket: PurePosixPath | None = None
    pid: int = 1
    install_dir: PurePosixPath = DEFAULT_INSTALL_DIR
    force: bool = False
    verify_timeout: float = 60.0
    lock_timeout: float = 120.0
    verify: bool = False  # also ask containerd when nothing needs to change (repair if it lost it)
    mode: InstallMode = InstallMode.AUTO  # edit the main config, or a drop-in of our own
    # Node path of systemd's D-Bus socket: reach the node without its /proc (no hostPID): units
    # and their ExecStart over D-Bus, `dbus:UNIT` restarts, containerd's socket under the root.
    bus: PurePosixPath | None = None


@dataclass
class Outcome:
    """What an install or uninstall did."""

    ok: bool = True
    changed: bool = False
    restarted: bool = False
    verified: bool = False
    layout: str = ""
    config: str = ""
    runtimes: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The outcome as the JSON object `node install|uninstall -o json` prints."""
        return {
            "ok": self.ok,
            "changed": self.changed,
            "restarted": self.restarted,
            "verified": self.verified,
            "layout": self.layout,
            "config": self.config,
            "runtimes": self.runtimes,
            "notes": self.notes,
        }


@dataclass
class Report:
    """What `status` found: the state file, drift from it, and containerd's own answer."""

    installed: bool
    layout: str
    config: str
    status: str = ""
    runtimes: list[dict[str, str]] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    containerd: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as the JSON object `node status -o json` prints."""
        return {
            "installed": self.installed,
            "status": self.status,
            "layout": self.layout,
            "config": self.config,
            "runtimes": self.runtimes,
            "drift": self.drift,
            "containerd": self.containerd,
        }


def _kill_point(step: str) -> None:
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class Node:
    """One node as the engine sees it: files, state, layout, containerd, and the ports that
    act on it (restarter, CRI client, /proc reader)."""

    opts: NodeOptions
    fs: HostFS
    layout: Layout
    state: st.State | None
    step: str = "start"
    pid_ok: bool = True  # --pid is a process of this node (its / is --host-root); False over D-Bus
    restarter: restart.Restarter = field(default_factory=restart.NodeRestarter)
    cri_client: cri.CriClient = field(default_factory=cri.GrpcCri)
    proc: ProcFS = HOST
    mode: dropin.ModeChoice | None = None  # set by `choose_mode` (install and plan)
    created: list[PurePosixPath] = field(default_factory=list)  # dirs this run created
    _containerd: ContainerdVersion | None = None
    _asked: bool = False

    def crash_watch(self, spec: RestartSpec) -> restart.CrashWatch:
        """A CrashWatch for a restart by `spec` just done: through --pid, or over the node's
        D-Bus socket (host path) for `dbus:UNIT`."""
        bus = self.fs.resolve(self.opts.bus or dbus.SYSTEM_BUS) if spec.method is RestartMethod.DBUS else None
        return restart.CrashWatch(spec, pid=self.opts.pid, proc=self.proc, bus=bus)

    @property
    def install_dir(self) -> PurePosixPath:
        """Node path of kwasm-py's directory (binaries, state, backup)."""
        return self.opts.install_dir

    @property
    def state_path(self) -> PurePosixPath:
        """Node path of the state file."""
        return self.install_dir / STATE_FILE_NAME

    @property
    def backup_dir(self) -> PurePosixPath:
        """Node path of the directory holding the original config's backup."""
        return self.install_dir / BACKUP_DIR_NAME

    @property
    def socket(self) -> str:
        """Where the node's containerd socket is reachable from here (under the host root when
        the node is reached over D-Bus, through /proc/PID/root otherwise)."""
        if self.opts.bus is not None:
            return str(self.fs.resolve(self.layout.socket))
        return self.proc.socket_path(self.opts.pid, self.layout.socket)

    def containerd_version(self) -> ContainerdVersion | None:
        """Ask the running containerd its version once; None when it does not answer."""
        if not self._asked and self.reachable:
            self._asked = True
            try:
                self._containerd = self.cri_client.version(self.socket, timeout=2.0)
            except KwasmError:
                self._containerd = None
        return self._containerd

    def cri_status(self) -> cri.CriStatus:
        """containerd's CRI status; raises UsageError when --pid is not a process of this node,
        RestartError when containerd does not answer."""
        if not self.reachable:
            raise UsageError(
                f"--pid {self.opts.pid} is not a process of the node at {self.fs.root} "
                "(its / is elsewhere), so its containerd cannot be reached through it",
                hint="pass a PID of the node (PID 1 in a hostPID pod), or --restart none",
            )
        return self.cri_client.status(self.socket, timeout=3.0)

    @property
    def reachable(self) -> bool:
        """Whether containerd's socket and the restart are in reach: through --pid, or over D-Bus
        (--bus; then no process of the node is visible, and pid_ok is False)."""
        return self.pid_ok or self.opts.bus is not None

    def require_pid(self) -> None:
        """Raise UsageError when a restart is due but --pid is not a process of this node."""
        if self.layout.restart.method is not RestartMethod.NONE and not self.reachable:
            self.cri_status()


def _read_state(fs: HostFS, path: PurePosixPath) -> st.State | None:
    info = fs.read(path)
    return None if info is None else st.from_json(info.data, source=str(path))


def _host_root(opts: NodeOptions) -> Path:
    """--host-root as a Path; raises UsageError when it is not a directory or cannot be read."""
    root = Path(opts.host_root)
    try:
        is_dir = root.is_dir()
    except OSError as err:  # EACCES: e.g. /proc/PID/root without CAP_SYS_PTRACE
        raise UsageError(
            f"--host-root {root} cannot be read: {err.strerror}",
            hint="mount the node's / into the pod (hostPath) and pass that path",
        ) from err
    if not is_dir:
        raise UsageError(f"--host-root {root} is not a directory")
    return root


def open_node(
    opts: NodeOptions,
    *,
    restarter: restart.Restarter | None = None,
    cri_client: cri.CriClient | None = None,
    proc: ProcFS | None = None,
) -> Node:
    """Detect the layout (or take it from the state file / overrides) and read the state.

    Takes the options and the ports (None: the real ones: nsenter restarts, gRPC CRI, this
    machine's /proc). Returns the Node; raises UsageError for a bad --host-root, HostIOError for
    an unreadable state file, detection's errors when no layout is found and neither
    --config nor a state file says which file to use, and ManagedNode (Talos) in any case.
    Changes nothing.
    """
    root = _host_root(opts)
    fs = HostFS(root)
    proc = proc or HOST
    state = _read_state(fs, opts.install_dir / STATE_FILE_NAME)
    bus = fs.resolve(opts.bus or dbus.SYSTEM_BUS)
    pid_ok = opts.bus is None and proc.sees_root(opts.pid, root)  # D-Bus: no node PID in sight
    detected: Layout | None
    try:
        if opts.bus is not None:
            facts = nodeprobe.gather(fs, pid=None, units=dbus.read_facts(bus))
        else:
            facts = nodeprobe.gather(fs, pid=opts.pid if pid_ok else None, proc=proc)
        detected = layout.detect(facts)
    except ManagedNode:
        raise  # no --config or state file makes that node's files kwasm-py's to write
    except KwasmError:
        if opts.config is None and state is None:
            raise
        detected = None
    if state is not None and opts.config is None:
        detected = _owned_layout(state, detected)  # keep working on the file we own
    elif state is not None and opts.config is not None:
        _require_recorded_config(state, opts.config, opts.install_dir / STATE_FILE_NAME)
    chosen = layout.override(detected, config=opts.config, restart=opts.restart, socket=opts.socket)
    if opts.bus is not None and opts.restart is None:
        chosen = dbus.over_bus(chosen)  # systemd:UNIT (detected or recorded) -> dbus:UNIT
    return Node(
        opts=opts,
        fs=fs,
        layout=chosen,
        state=state,
        pid_ok=pid_ok,
        restarter=restarter or restart.NodeRestarter(proc, bus=bus),
        cri_client=cri_client or cri.GrpcCri(),
        proc=proc,
    )


def _require_recorded_config(state: st.State, config: PurePosixPath, state_path: PurePosixPath) -> None:
    """Raise UsageError when `--config` names a file other than the one the state file says
    kwasm-py installed into (or, for a drop-in, the main config importing it).

    Working on another file would leave the first install's tables where containerd still reads
    them (so a check of containerd would pass for the wrong reason) and the state would forget
    them: an install nobody can uninstall.
    """
    recorded = PurePosixPath(state.config.path)
    allowed = {recorded} | ({PurePosixPath(state.config.main)} if state.config.main else set())
    if PurePosixPath(config) in allowed:
        return
    raise UsageError(
        f"kwasm-py installed into {recorded} (see {state_path}); --config {config} is another file",
        hint=(
            f"leave out --config to keep working on {recorded}; to move the runtime, run "
            f"`kwasm-py node uninstall` first, then install with --config {config}"
        ),
    )


def _owned_layout(state: st.State, detected: Layout | None) -> Layout:
    """The layout the state file describes (detection agreeing with it adds what it knows)."""
    path = PurePosixPath(state.config.path)
    if detected is not None and detected.name == state.layout and detected.config_path == path:
        return detected
    kind = ConfigKind(state.config.kind)
    rendered = None
    if state.config.main:
        rendered = PurePosixPath(state.config.main)  # a drop-in: the main config importing it
    elif detected is not None and detected.name == state.layout:
        rendered = detected.rendered_path
    elif kind is ConfigKind.TEMPLATE and path.name.endswith(".toml.tmpl"):
        rendered = path.parent / "config.toml"  # k3s and rke2 render beside the template
    spec = layout.parse_restart(state.restart) if state.restart else None
    found = f"; detection now finds {detected.name} at {detected.config_path}" if detected else ""
    return Layout(
        name=state.layout,
        config_path=path,
        kind=kind,
        restart=spec or (detected.restart if detected else RestartSpec(RestartMethod.SYSTEMD, "containerd")),
        socket=PurePosixPath(state.socket) if state.socket else (detected.socket if detected else P_SOCKET),
        rendered_path=rendered,
        evidence=(f"the state file says kwasm-py installed into {path} ({state.layout}){found}",),
    )


def fingerprint(path: Path) -> list[int] | None:
    """(size, mtime_ns, inode) of a file, or None when it is absent."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def _runtime_dicts(
    records: tuple[st.RuntimeRecord, ...] | list[st.RuntimeRecord],
) -> list[dict[str, str]]:
    return [
        {"handler": r.handler, "runtime_type": r.runtime_type, "shim": r.shim, "sha256": r.sha256}
        for r in records
    ]
