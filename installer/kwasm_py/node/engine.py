"""The node engine: install, uninstall and inspect shims on one node, safely.

Order of effects on install (each a possible crash point, each safe to resume):
lock -> backup the original config once -> state file `pending` -> shim binaries -> config ->
restart -> containerd confirms the runtime -> state file `installed`.
If containerd does not come back or does not list the runtime, the previous config and binaries
are put back, containerd is restarted again, and the run fails saying so.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from kwasm_py.containerd import config as cc
from kwasm_py.containerd import dropin, effective, template
from kwasm_py.errors import (
    ChecksumError,
    HostIOError,
    KwasmError,
    RestartError,
    UsageError,
    VerifyError,
)
from kwasm_py.model import (
    BACKUP_DIR_NAME,
    BIN_DIR_NAME,
    DEFAULT_INSTALL_DIR,
    STATE_FILE_NAME,
    ConfigKind,
    ContainerdVersion,
    CriSchema,
    InstallMode,
    Layout,
    RestartMethod,
    RestartSpec,
    ShimSpec,
)
from kwasm_py.node import cri, dbus, layout, ownership, plan, preflight, restart, sources, uninstall_plan
from kwasm_py.node import probe as nodeprobe
from kwasm_py.node import state as st
from kwasm_py.node.hostfs import HostFS, file_sha256
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


# ---------------------------------------------------------------------------------------------
# Shared context


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
    an unreadable state file, and detection's errors when no layout is found and neither
    --config nor a state file says which file to use. Changes nothing.
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
    except KwasmError:
        if opts.config is None and state is None:
            raise
        detected = None
    if state is not None and opts.config is None:
        detected = _owned_layout(state, detected)  # keep working on the file we own
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


def _shim_digests(opts: NodeOptions, state: st.State | None = None) -> list[tuple[ShimSpec, str]]:
    """Each shim with its sha256; a source whose fingerprint the state file recorded is not
    hashed again (a no-op re-run with a 50 MB shim would otherwise spend ~0.1 s on it)."""
    out = []
    for shim in opts.shims:
        path = Path(shim.source)
        if not path.is_file():
            raise UsageError(f"shim {path} does not exist or is not a file")
        if not os.access(path, os.X_OK):
            raise UsageError(f"shim {path} is not executable", hint=f"chmod +x {path}")
        record = state.runtime(shim.handler) if state is not None else None
        known = record is not None and record.source == str(path) and record.source_stat is not None
        if known and record is not None and record.source_stat == fingerprint(path):
            digest: str | None = record.sha256
        else:
            digest = file_sha256(path)
        assert digest is not None
        if shim.sha256 and shim.sha256.lower() != digest:
            raise ChecksumError(
                f"shim {path} has sha256 {digest}, expected {shim.sha256.lower()}",
                hint="the file is not the release you meant; fetch it again",
            )
        out.append((shim, digest))
    return out


def choose_mode(node: Node) -> dropin.ModeChoice:
    """Resolve `--mode` for this node and point `node.layout` at the file to write.

    A node kwasm-py already installed on keeps the file its state names (auto), or is refused
    a different explicit mode with a hint (move it with uninstall + install). Otherwise the
    main config as containerd reads it (a template's render) and the containerd version decide,
    see `containerd.dropin.choose`. Returns the choice (also kept in `node.mode`); raises
    UsageError where the asked mode cannot work on this node.
    """
    if node.mode is not None:
        return node.mode
    lay, requested = node.layout, node.opts.mode
    if node.state is not None:
        kept = InstallMode.DROPIN if lay.kind is ConfigKind.DROP_IN else InstallMode.EDIT
        if requested not in (InstallMode.AUTO, kept) and lay.name != "k0s":
            raise UsageError(
                f"kwasm-py installed into {lay.config_path} ({kept.value}); --mode {requested.value} "
                "would move the runtime",
                hint=f"run `kwasm-py node uninstall`, then install again with --mode {requested.value}",
            )
        node.mode = dropin.ModeChoice(kept, lay, f"{kept.value}: kwasm-py installed into {lay.config_path}")
        return node.mode
    main = lay.rendered_path if lay.kind is not ConfigKind.CONFIG else lay.config_path
    text = node.fs.read_text(main) if main is not None else None
    try:
        data = cc.load(text, source=str(main)).data if text else {}
    except KwasmError:
        data = {}  # the plan reports what is wrong with the file itself
    node.mode = dropin.choose(requested, layout=lay, main_data=data, containerd=node.containerd_version())
    node.layout = node.mode.layout
    return node.mode


def _main_edit(node: Node, choice: dropin.ModeChoice) -> plan.MainEdit | None:
    """The `imports` entry `--mode dropin` adds to the main config (None: nothing to add)."""
    entry = choice.add_import
    if entry is None:
        if node.state is not None and node.state.config.imports_added and node.state.config.main:
            kept = PurePosixPath(node.state.config.main)  # still ours: keep recording it
            text = node.fs.read_text(kept) or ""
            return plan.MainEdit(kept, text, text, node.state.config.imports_added)
        return None
    main = choice.layout.rendered_path
    assert main is not None
    old = node.fs.read_text(main)
    new = dropin.add_import(old or "", entry, source=str(main))
    return plan.MainEdit(main, old, new, entry)


def make_plan(node: Node, shims: list[tuple[ShimSpec, str]]) -> plan.Plan:
    """The install plan for `node` and the shims with their sha256 (see `plan.make_plan`).

    Reads the config, the rendered file, imported files and the installed binaries, asks
    containerd its version; raises what `plan.make_plan` raises, and ConflictError for a runtime
    of the same handler in an imported file. Writes nothing.
    """
    choice = choose_mode(node)
    main_edit = _main_edit(node, choice)
    fs, lay = node.fs, node.layout
    own = fs.read_text(lay.config_path)
    reference = fs.read_text(lay.rendered_path) if lay.rendered_path is not None else None
    if main_edit is not None:
        reference = main_edit.new_text  # what containerd reads once our imports entry is in
    eff = sources.effective_config(node.fs, lay, own, reference, containerd=node.containerd_version())
    bin_dir = plan.shim_dir(lay, node.install_dir)
    ours = {s.handler: str(bin_dir / s.binary_name) for s, _ in shims}
    # A template's render and k0s's generated CRI file carry a copy of our table.
    merged = None if lay.kind is ConfigKind.CONFIG else ours
    if eff is not None and lay.kind is not ConfigKind.TEMPLATE:
        effective.check_handlers(eff, list(ours), edited=str(lay.config_path), merged_ours=merged)
    containerd = node.containerd_version()
    if containerd is None and node.state is not None and node.state.containerd:
        containerd = cri.parse_version(node.state.containerd)
    installed = {bin_dir / s.binary_name: fs.sha256(bin_dir / s.binary_name) for s, _ in shims}
    base_digests = None
    if reference is not None and lay.kind is ConfigKind.TEMPLATE:
        found = template.base_binaries(
            reference, [s.handler for s, _ in shims], [c.runtimes_path() for c in CriSchema]
        )
        base_digests = {p: fs.sha256(PurePosixPath(p)) for p in found}
    the_plan = plan.make_plan(
        base_digests=base_digests,
        layout=lay,
        own_text=own,
        reference_text=reference,
        containerd=containerd,
        shims=shims,
        installed=installed,
        install_dir=node.install_dir,
        state=ownership.rebase(node.state, str(lay.config_path), fs.sha256(lay.config_path)),
        force=node.opts.force,
        effective=sources.decision_data(eff, lay),
    )
    text, dropped, notes = ownership.drop_unrequested(
        the_plan.new_text,
        node.state,
        path=str(lay.config_path),
        handlers={s.handler for s, _ in shims},
        install_dir=node.install_dir,
    )
    the_plan = replace(
        the_plan,
        new_text=text,
        dropped=dropped,
        notes=(f"mode {choice.mode.value}: {choice.reason}", *the_plan.notes, *notes),
        main_edit=main_edit,
    )
    if eff is None:
        return the_plan
    if lay.kind is ConfigKind.TEMPLATE:  # after the plan: its base-render check names the cause
        # a base-render runtime the plan adopted (it runs the very shim asked for) is no conflict
        added = [e.handler for e in the_plan.entries if e.runtime_type == ours.get(e.handler)]
        effective.check_handlers(eff, added, edited=str(lay.config_path), merged_ours=merged)
    if lay.kind is not ConfigKind.DROP_IN:  # k0s merges its drop-ins itself
        effective.check_takes_effect(eff, the_plan.schema, edited=str(eff.main))
    if not eff.imports:
        return the_plan
    loads = "containerd loads " + ", ".join(s.path for s in eff.sources)
    return replace(the_plan, notes=(*the_plan.notes, loads, eff.describe(the_plan.schema.plugin_id)))


# ---------------------------------------------------------------------------------------------
# install


def _preflight(node: Node, the_plan: plan.Plan) -> str:
    """The node's own containerd on what it would load (raises PreflightError)."""
    pid = node.opts.pid if node.pid_ok else None
    return preflight.run(
        node.fs, the_plan=the_plan, pid=pid, containerd=node.containerd_version(), proc=node.proc
    )


def plan_only(
    opts: NodeOptions, *, cri_client: cri.CriClient | None = None, proc: ProcFS | None = None
) -> tuple[Node, plan.Plan]:
    """What `install` would do, changing nothing: the Node and the install Plan.

    Raises UsageError without --shim or for a bad shim, ChecksumError for a wrong --sha256, and
    what `open_node` and `make_plan` raise.
    """
    node = open_node(opts, cri_client=cri_client, proc=proc)
    if not opts.shims:
        raise UsageError("no --shim given")
    the_plan = make_plan(node, _shim_digests(opts))
    try:
        verdict = _preflight(node, the_plan)
    except preflight.PreflightError as err:
        return node, replace(the_plan, preflight=f"REFUSED: {err.message}")
    return node, replace(the_plan, preflight=verdict)


def plan_uninstall(
    opts: NodeOptions,
    handlers: list[str],
    *,
    cri_client: cri.CriClient | None = None,
    proc: ProcFS | None = None,
) -> tuple[Node, uninstall_plan.UninstallPlan | None]:
    """What `uninstall` of `handlers` (all when empty) would do, changing nothing.

    Returns the Node (its layout pointed at the file the state names) and the UninstallPlan,
    None when kwasm-py installed nothing here. Raises what `open_node` and
    `uninstall_plan.make_plan` raise.
    """
    node = open_node(opts, cri_client=cri_client, proc=proc)
    if node.state is None:
        return node, None
    return node, _uninstall_plan(node, handlers)


def _uninstall_plan(node: Node, handlers: list[str]) -> uninstall_plan.UninstallPlan:
    """Read what uninstall decides from and plan it; points `node.layout` at the state's file."""
    state = node.state
    assert state is not None
    cfg_path = PurePosixPath(state.config.path)
    node.layout = replace(node.layout, config_path=cfg_path)
    old = node.fs.read(cfg_path)
    backup = node.fs.read(PurePosixPath(state.config.backup)) if state.config.backup else None
    return uninstall_plan.make_plan(
        state=state,
        state_path=node.state_path,
        handlers=handlers,
        old_data=old.data if old else None,
        backup_data=backup.data if backup else None,
        install_dir=node.install_dir,
    )


def _runtime_dicts(
    records: tuple[st.RuntimeRecord, ...] | list[st.RuntimeRecord],
) -> list[dict[str, str]]:
    return [
        {"handler": r.handler, "runtime_type": r.runtime_type, "shim": r.shim, "sha256": r.sha256}
        for r in records
    ]


def _quick_noop(node: Node, shims: list[tuple[ShimSpec, str]]) -> bool:
    """The state file says it is all in place, and the files agree: nothing to do."""
    state = node.state
    if state is None or state.status != st.INSTALLED:
        return False
    if state.config.path != str(node.layout.config_path):
        return False
    if node.fs.sha256(node.layout.config_path) != state.config.written_sha256:
        return False
    wanted = {s.handler for s, _ in shims}
    if wanted != {r.handler for r in state.runtimes}:
        return False
    for shim, digest in shims:
        record = state.runtime(shim.handler)
        if record is None or record.sha256 != digest or record.name != shim.name:
            return False
        installed = node.fs.resolve(PurePosixPath(record.shim))
        if record.shim_stat is not None and record.shim_stat == fingerprint(installed):
            continue  # the file we wrote, untouched since
        if node.fs.sha256(PurePosixPath(record.shim)) != digest:
            return False
    return True


def install(
    opts: NodeOptions,
    *,
    log: Callable[[str], None] = lambda _m: None,
    restarter: restart.Restarter | None = None,
    cri_client: cri.CriClient | None = None,
    proc: ProcFS | None = None,
) -> Outcome:
    """Install `opts.shims` on the node: binaries, config, restart, containerd confirms, state.

    Takes the options, a progress logger and the ports (None: the real ones, see `open_node`).
    Returns the Outcome (a no-op re-run changes nothing and restarts nothing). Raises
    UsageError / ChecksumError for bad input before anything changes, ConfigError /
    ConflictError for a config it refuses, LockHeld when another run holds the node, and
    HostIOError, RestartError or VerifyError when a step fails (after rolling back, see
    `_rollback`: the message names the step and what was put back).
    """
    if not opts.shims:
        raise UsageError("no --shim given")
    root = _host_root(opts)
    fs = HostFS(root)
    known = _read_state(fs, opts.install_dir / STATE_FILE_NAME)
    shims = _shim_digests(opts, known)  # before the lock: bad input fails fast, changes nothing
    with fs.lock(timeout=opts.lock_timeout):
        node = open_node(opts, restarter=restarter, cri_client=cri_client, proc=proc)
        choose_mode(node)  # the file to write (raises for a --mode that would move the runtime)
        outcome = Outcome(layout=node.layout.name, config=str(node.layout.config_path))
        if _quick_noop(node, shims):
            assert node.state is not None
            outcome.runtimes = _runtime_dicts(node.state.runtimes)
            if not opts.verify or node.layout.restart.method is RestartMethod.NONE:
                outcome.notes.append("already installed: the state file, config and binaries agree")
                return outcome
            wanted = {r.handler: r.runtime_type for r in node.state.runtimes}
            if _reports(node, wanted):
                outcome.verified = True
                outcome.notes.append("already installed, and containerd reports it")
                return outcome
            outcome.notes.append("files are in place but containerd does not report the runtime")
            node.state = replace(node.state, status=st.PENDING)  # converge: restart once
        _require_exec(node)
        the_plan = make_plan(node, shims)
        outcome.notes.extend(the_plan.notes)
        outcome.notes.append(f"pre-flight {_preflight(node, the_plan)}")  # raises: nothing written
        if the_plan.changes:
            node.require_pid()
        _apply(node, the_plan, outcome, log=log)
        return outcome


def _require_exec(node: Node) -> None:
    """Refuse, before anything changes, an install directory the node cannot execute from."""
    bin_dir = plan.shim_dir(node.layout, node.install_dir)
    blocked = nodeprobe.exec_blocker(
        node.fs, bin_dir, pid=node.opts.pid if node.pid_ok else None, proc=node.proc
    )
    if blocked:
        raise HostIOError(
            f"the node cannot execute shims installed in {bin_dir}: {blocked}",
            hint="pass --install-dir on a filesystem the node mounts without noexec (e.g. /var/lib/kwasm)",
        )


def _apply(node: Node, the_plan: plan.Plan, outcome: Outcome, *, log: Callable[[str], None]) -> None:
    fs, lay, opts = node.fs, node.layout, node.opts
    prev_state = node.state
    cfg_path = lay.config_path
    old_info = fs.read(cfg_path)
    # 1. back up the original once (the first time kwasm-py touches this file)
    own_prev = prev_state if prev_state is not None and prev_state.config.path == str(cfg_path) else None
    old_sha = hashlib.sha256(old_info.data).hexdigest() if old_info else None
    if own_prev is not None and not ownership.changed_since_our_write(own_prev, str(cfg_path), old_sha):
        backup = own_prev.config.backup
        original_sha = own_prev.config.original_sha256
        created = own_prev.config.created
    else:
        # First write, or the file changed since our last write (regenerated by its owner):
        # today's file is the pre-image, unless it still holds our tables (then there is none).
        created = old_info is None
        original_sha = old_sha
        backup = None
        if old_info is not None and not ownership.holds_ours_bytes(
            old_info.data, own_prev, install_dir=node.install_dir
        ):
            backup_path = node.backup_dir / (cfg_path.name + ".orig")
            node.step = "backup"
            node.created += fs.makedirs(node.backup_dir)
            fs.atomic_write(backup_path, old_info.data, mode=0o600, keep_metadata=False)
            backup = str(backup_path)
    _kill_point("backup")
    new_bytes = the_plan.new_text.encode()
    records = tuple(
        st.RuntimeRecord(
            handler=entry.handler,
            name=step.shim.name,
            runtime_type=entry.runtime_type,
            shim=str(step.dest),
            sha256=step.sha256,
            table=entry.as_table(),
            replaced=the_plan.replaced.get(entry.handler),
            source=step.shim.source,
            source_stat=fingerprint(Path(step.shim.source)),
        )
        for entry, step in zip(the_plan.entries, the_plan.binaries, strict=True)
    )
    containerd = the_plan.containerd
    new_state = st.State(
        status=st.PENDING,
        layout=lay.name,
        config=st.ConfigRecord(
            path=str(cfg_path),
            kind=lay.kind.value,
            created=created,
            original_sha256=original_sha,
            written_sha256=hashlib.sha256(new_bytes).hexdigest(),
            backup=backup,
            schema=the_plan.schema.value,
            version_added=the_plan.version_added,
            main=str(lay.rendered_path) if lay.kind is ConfigKind.DROP_IN and lay.rendered_path else None,
            imports_added=the_plan.main_edit.entry if the_plan.main_edit else None,
        ),
        runtimes=records + the_plan.dropped,  # still ours until their binaries are gone
        containerd=str(containerd) if containerd else "",
        restart=str(lay.restart),
        socket=str(lay.socket),
        updated=_now(),
        companion=the_plan.companion,
    )
    # 2. intent: from here on the tables and files named in the state are ours (and the
    #    directories we create: made now, so the state file lists them)
    node.step = "state"
    for directory in (node.install_dir, *(b.dest.parent for b in the_plan.writes)):
        node.created += fs.makedirs(directory)
    if lay.kind is ConfigKind.DROP_IN and the_plan.config_changed:
        node.created += fs.makedirs(cfg_path.parent)
    known = prev_state.created_dirs if prev_state else ()
    new_state = replace(new_state, created_dirs=tuple(dict.fromkeys([*known, *map(str, node.created)])))
    fs.atomic_write(node.state_path, new_state.to_json(), mode=0o600, keep_metadata=False)
    if own_prev is not None and own_prev.config.backup and own_prev.config.backup != backup:
        fs.remove(PurePosixPath(own_prev.config.backup))  # the pre-image of a file that is gone
    # 3. binaries (keep what was there for rollback)
    previous_bins: dict[PurePosixPath, bytes | None] = {}
    try:
        node.step = "binary"
        for step in the_plan.writes:
            old_bin = fs.read(step.dest)
            previous_bins[step.dest] = old_bin.data if old_bin else None
            digest = fs.copy_in(Path(step.shim.source), step.dest, mode=0o755)
            if digest != step.sha256:
                raise ChecksumError(f"{step.shim.source} changed while it was being copied")
            log(f"step=binary dest={step.dest} sha256={digest}")
        _kill_point("binary")
        # 4. config
        node.step = "config"
        edit = the_plan.main_edit
        if edit is not None and edit.changed:
            main_info = fs.read(edit.path)
            fs.atomic_write(edit.path, edit.new_text.encode(), mode=main_info.mode if main_info else 0o644)
            log(f"step=config path={edit.path} action=import entry={edit.entry}")
        if the_plan.old_text != the_plan.new_text:
            fs.atomic_write(cfg_path, new_bytes, mode=0o644)
            log(f"step=config path={cfg_path}")
        _kill_point("config")
        # 5. restart when containerd has to read something new (or we cannot know it did)
        interrupted = prev_state is not None and prev_state.status != st.INSTALLED
        must_restart = the_plan.config_changed or interrupted
        if must_restart and interrupted and not the_plan.config_changed:
            must_restart = not _registered(node, the_plan)
        node.step = "restart"
        if must_restart and lay.restart.method is not RestartMethod.NONE:
            log(f"step=restart method={lay.restart}")
            node.restarter.restart(
                lay.restart, pid=opts.pid, timeout=opts.verify_timeout, started=lambda: _kill_point("restart")
            )
            outcome.restarted = True
        # 6. containerd itself must list the runtime
        node.step = "verify"
        if lay.restart.method is not RestartMethod.NONE:
            _wait_registered(node, the_plan, timeout=opts.verify_timeout)
            outcome.verified = True
    except KwasmError as err:
        _rollback(node, err, old_info, previous_bins, prev_state, the_plan, outcome)
        raise
    # 7. done: binaries of runtimes no longer asked for go, then the state forgets them
    kept = {r.shim for r in records}
    moved = own_prev.runtimes if own_prev is not None else ()  # a binary whose place changed
    for record in (*the_plan.dropped, *moved):
        if record.shim not in kept and fs.remove(PurePosixPath(record.shim)):
            log(f"step=binary action=remove path={record.shim}")
    _kill_point("state")
    node.step = "state"
    final = replace(
        new_state,
        status=st.INSTALLED,
        updated=_now(),
        runtimes=tuple(replace(r, shim_stat=fingerprint(fs.resolve(PurePosixPath(r.shim)))) for r in records),
    )
    fs.atomic_write(node.state_path, final.to_json(), mode=0o600, keep_metadata=False)
    outcome.changed = the_plan.changes or outcome.restarted
    outcome.runtimes = _runtime_dicts(records)


def _reports(node: Node, wanted: dict[str, str]) -> bool:
    """containerd answers, is ready, and lists every handler with its runtime_type."""
    try:
        status = node.cri_status()
    except KwasmError:
        return False
    return status.runtime_ready and all(status.runtimes.get(h) == t for h, t in wanted.items())


def _registered(node: Node, the_plan: plan.Plan) -> bool:
    return _reports(node, {e.handler: e.runtime_type for e in the_plan.entries})


def _wait_registered(node: Node, the_plan: plan.Plan, *, timeout: float) -> None:
    wanted = {e.handler: e.runtime_type for e in the_plan.entries}
    watch = restart.CrashWatch(node.layout.restart, pid=node.opts.pid, proc=node.proc)
    gone = {r.handler: r.runtime_type for r in the_plan.dropped}
    try:
        restart.wait_until(
            node.cri_status,
            lambda s: (
                s.runtime_ready
                and all(s.runtimes.get(h) == t for h, t in wanted.items())
                and not any(s.runtimes.get(h) == t for h, t in gone.items())
            ),
            timeout=timeout,
            what="containerd to report runtime(s) " + ", ".join(sorted(wanted)),
            watch=watch,
        )
    except RestartError as err:
        if watch.exits >= watch.limit:
            raise RestartError(
                f"containerd crash-loops with the new config ({err.message})",
                hint="see the node's containerd log (journalctl -u containerd)",
            ) from err
        try:
            current = node.cri_status()
        except KwasmError:
            raise RestartError(
                f"containerd did not come back after the restart ({err.message})",
                hint="see the node's containerd log (journalctl -u containerd)",
            ) from err
        missing = {h: current.runtimes.get(h) for h, t in wanted.items() if current.runtimes.get(h) != t}
        if not missing and current.runtime_ready:
            raise VerifyError(
                "containerd still reports runtime(s) no longer asked for: "
                + ", ".join(h for h, t in gone.items() if current.runtimes.get(h) == t)
                + f" (it reads {node.layout.rendered_path or node.layout.config_path})",
                hint="another file containerd loads may define them; see `kwasm-py node plan`",
            ) from err
        raise VerifyError(
            "containerd runs but does not report the runtime as configured: "
            + ", ".join(f"{h} -> {v!r}" for h, v in missing.items())
            + f" (it reads {node.layout.rendered_path or node.layout.config_path})",
            hint="containerd ignored the edited file: check --config, the config version, "
            "and that the file is the one containerd reads",
        ) from err


def _rollback(
    node: Node,
    err: KwasmError,
    old_info: Any,
    previous_bins: dict[PurePosixPath, bytes | None],
    prev_state: st.State | None,
    the_plan: plan.Plan,
    outcome: Outcome,
) -> None:
    """Put back the previous config, binaries and state; restart; amend the error message."""
    fs, lay = node.fs, node.layout
    failed_step = node.step
    notes = []
    try:
        if old_info is None:
            fs.remove(lay.config_path)
        elif fs.sha256(lay.config_path) != hashlib.sha256(old_info.data).hexdigest():
            fs.atomic_write(lay.config_path, old_info.data, mode=old_info.mode)
        edit = the_plan.main_edit
        if edit is not None and edit.changed:
            if edit.old_text is None:
                fs.remove(edit.path)
            elif fs.read_text(edit.path) != edit.old_text:
                fs.atomic_write(edit.path, edit.old_text.encode(), mode=0o644)
        for dest, data in previous_bins.items():
            if data is None:
                fs.remove(dest)
            else:
                fs.atomic_write(dest, data, mode=0o755, keep_metadata=False)
        if prev_state is None:
            fs.remove(node.state_path)
            if lay.config_path.name + ".orig" in fs.listdir(node.backup_dir):
                fs.remove(node.backup_dir / (lay.config_path.name + ".orig"))
            fs.rmdir_if_empty(node.backup_dir)
            for name in (BIN_DIR_NAME, plan.RANCHER_SHIM_DIR):
                fs.rmdir_if_empty(node.install_dir / name)
            fs.rmdir_if_empty(node.install_dir)
        else:
            fs.atomic_write(node.state_path, prev_state.to_json(), mode=0o600, keep_metadata=False)
        for directory in reversed(node.created):  # what this run created, innermost first
            fs.rmdir_if_empty(directory)
        notes.append("rolled back the config and shim binaries")
        if failed_step in ("restart", "verify") and lay.restart.method is not RestartMethod.NONE:
            node.restarter.restart(lay.restart, pid=node.opts.pid, timeout=node.opts.verify_timeout)
            outcome.restarted = True
            restart.wait_until(
                node.cri_status,
                lambda s: s.runtime_ready,
                timeout=node.opts.verify_timeout,
                what="containerd to run again with the previous config",
                watch=restart.CrashWatch(lay.restart, pid=node.opts.pid, proc=node.proc),
            )
            notes.append("containerd runs again with the previous config")
    except KwasmError as second:
        notes.append(f"rollback incomplete: {second.message}")
    err.message = f"{failed_step}: {err.message}; " + "; ".join(notes)
    err.args = (err.message,)
    err.step = failed_step


# ---------------------------------------------------------------------------------------------
# uninstall


def uninstall(
    opts: NodeOptions,
    handlers: list[str],
    *,
    log: Callable[[str], None] = lambda _m: None,
    restarter: restart.Restarter | None = None,
    cri_client: cri.CriClient | None = None,
    proc: ProcFS | None = None,
) -> Outcome:
    """Remove exactly what install added for `handlers` (all when empty), restart, verify.

    Takes the options, the handlers, a progress logger and the ports (None: the real ones).
    Returns the Outcome ("nothing installed" when there is no state file). Raises UsageError
    for a handler kwasm-py did not install, LockHeld, and HostIOError / RestartError when a step
    fails (the config is put back first; the message says so).
    """
    root = _host_root(opts)
    fs = HostFS(root)
    state_path = opts.install_dir / STATE_FILE_NAME
    if _read_state(fs, state_path) is None:
        return Outcome(notes=["nothing installed by kwasm-py on this node"])
    with fs.lock(timeout=opts.lock_timeout):
        node = open_node(opts, restarter=restarter, cri_client=cri_client, proc=proc)
        state = node.state
        if state is None:
            return Outcome(notes=["nothing installed by kwasm-py on this node"])
        the_plan = _uninstall_plan(node, handlers)
        lay, cfg_path = node.layout, the_plan.config_path
        outcome = Outcome(layout=state.layout, config=str(cfg_path))
        chosen, keep = list(the_plan.chosen), list(the_plan.keep)
        old = fs.read(cfg_path)
        outcome.notes.extend(the_plan.notes)
        new_data = the_plan.new_data
        main_fix = _unimport(node, state) if not keep else None
        changed = the_plan.changed or main_fix is not None
        if changed:
            node.require_pid()
        try:
            node.step = "config"
            if the_plan.changed:
                if new_data is None:
                    fs.remove(cfg_path)
                    if str(cfg_path.parent) in state.created_dirs:
                        fs.rmdir_if_empty(cfg_path.parent)
                else:
                    fs.atomic_write(cfg_path, new_data, mode=old.mode if old else 0o644)
                log(f"step=config path={cfg_path} action=restore")
            if main_fix is not None:
                main_path, _before, after = main_fix
                fs.atomic_write(main_path, after.encode(), mode=0o644)
                log(f"step=config path={main_path} action=unimport entry={state.config.imports_added}")
            node.step = "restart"
            if changed and lay.restart.method is not RestartMethod.NONE:
                node.restarter.restart(lay.restart, pid=opts.pid, timeout=opts.verify_timeout)
                outcome.restarted = True
                gone = {r.handler for r in chosen}
                node.step = "verify"
                restart.wait_until(
                    node.cri_status,
                    lambda s: (
                        s.runtime_ready
                        and not any(
                            s.runtimes.get(r.handler) == r.runtime_type for r in chosen if r.handler in gone
                        )
                    ),
                    timeout=opts.verify_timeout,
                    what="containerd to run without runtime(s) " + ", ".join(sorted(gone)),
                    watch=restart.CrashWatch(lay.restart, pid=opts.pid, proc=node.proc),
                )
                outcome.verified = True
        except KwasmError as err:
            err.step = err.step or node.step
            if main_fix is not None:
                fs.atomic_write(main_fix[0], main_fix[1].encode(), mode=0o644)
            if the_plan.changed and old is not None:
                fs.atomic_write(cfg_path, old.data, mode=old.mode)
            if changed:
                err.message += "; put the config back as it was"
                if lay.restart.method is not RestartMethod.NONE:
                    try:
                        node.restarter.restart(lay.restart, pid=opts.pid, timeout=opts.verify_timeout)
                        restart.wait_until(
                            node.cri_status,
                            lambda s: s.runtime_ready,
                            timeout=opts.verify_timeout,
                            what="containerd to run again with the previous config",
                            watch=restart.CrashWatch(lay.restart, pid=opts.pid, proc=node.proc),
                        )
                        err.message += "; containerd runs again with the previous config"
                    except KwasmError as again:
                        err.message += f"; restart after that failed too: {again.message}"
            raise
        for record in chosen:
            if fs.remove(PurePosixPath(record.shim)):
                log(f"step=binary action=remove path={record.shim}")
        remaining = the_plan.remaining_state(updated=_now())
        if remaining is not None:
            fs.atomic_write(node.state_path, remaining.to_json(), mode=0o600, keep_metadata=False)
        else:
            if state.config.backup:
                fs.remove(PurePosixPath(state.config.backup))
            fs.remove(node.state_path)
            fs.rmdir_if_empty(node.backup_dir)
            for name in (BIN_DIR_NAME, plan.RANCHER_SHIM_DIR):
                fs.rmdir_if_empty(node.install_dir / name)
        outcome.changed = True
        outcome.runtimes = _runtime_dicts(chosen)
    if not keep:
        fs.rmdir_if_empty(opts.install_dir)
        for directory in reversed(state.created_dirs):  # innermost first; kept when not empty
            fs.rmdir_if_empty(PurePosixPath(directory))
    return outcome


def _unimport(node: Node, state: st.State) -> tuple[PurePosixPath, str, str] | None:
    """The main config without the `imports` entry a drop-in install added: (path, now, after),
    None when there is nothing to take out (never added, or already gone)."""
    entry, main = state.config.imports_added, state.config.main
    if not entry or not main:
        return None
    path = PurePosixPath(main)
    text = node.fs.read_text(path)
    if text is None:
        return None
    after = dropin.remove_import(text, entry, source=main)
    return None if after == text else (path, text, after)


# ---------------------------------------------------------------------------------------------
# status


def status(
    opts: NodeOptions,
    *,
    ask_containerd: bool = False,
    cri_client: cri.CriClient | None = None,
    proc: ProcFS | None = None,
) -> Report:
    """What kwasm-py installed on the node and how far the node drifted from it.

    Takes the options, whether to ask containerd over CRI (its failure to answer is reported,
    not raised) and the ports (None: the real ones). Returns the Report; raises what
    `open_node` raises. Changes nothing.
    """
    node = open_node(opts, cri_client=cri_client, proc=proc)
    state = node.state
    report = Report(
        installed=state is not None and state.status == st.INSTALLED,
        status=state.status if state else "absent",
        layout=state.layout if state else node.layout.name,
        config=state.config.path if state else str(node.layout.config_path),
    )
    if ask_containerd:
        try:
            cs = node.cri_status()
            report.containerd = {
                "ready": cs.runtime_ready,
                "version": str(node.containerd_version() or ""),
                "runtimes": cs.runtimes,
            }
        except KwasmError as err:
            report.containerd = {"ready": False, "error": err.message}
    if state is None:
        return report
    report.runtimes = _runtime_dicts(state.runtimes)
    text = node.fs.read_text(PurePosixPath(state.config.path))
    data: dict[str, Any] = {}
    if text is None:
        report.drift.append(f"config {state.config.path} is gone")
    else:
        try:
            data = cc.load(text, source=state.config.path).data
        except KwasmError as err:
            report.drift.append(err.message)
    schema = CriSchema(state.config.schema)
    for record in state.runtimes:
        table = cc.find_runtime(data, schema, record.handler)
        if text is not None and not ownership.is_ours(table, record, install_dir=node.install_dir):
            report.drift.append(
                f"config {state.config.path} no longer has runtime {record.handler} as installed"
            )
        digest = node.fs.sha256(PurePosixPath(record.shim))
        if digest is None:
            report.drift.append(f"shim {record.shim} is missing")
        elif digest != record.sha256:
            report.drift.append(
                f"shim {record.shim} changed (sha256 {digest[:12]}…, installed {record.sha256[:12]}…)"
            )
        seen = (report.containerd or {}).get("runtimes")
        if seen is not None and seen.get(record.handler) != record.runtime_type:
            report.drift.append(f"containerd does not report runtime {record.handler}")
    return report
