"""`kwasm-py node ...`: what the DaemonSet pod does on its node, as commands.

Paths given to --config, --socket and --install-dir are node paths (inside --host-root).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kwasm_py import contract
from kwasm_py.cli import node_plan
from kwasm_py.errors import (
    ChecksumError,
    ConfigError,
    ConflictError,
    KwasmError,
    LayoutError,
    LockHeld,
    UsageError,
)
from kwasm_py.model import DEFAULT_INSTALL_DIR, InstallMode, OutputFormat, ShimSpec

if TYPE_CHECKING:
    from kwasm_py.node.engine import Outcome, Report

app = typer.Typer(no_args_is_help=True, help="Install or remove containerd shims on a node.")

HostRoot = Annotated[
    Path,
    typer.Option("--host-root", envvar="KWASM_HOST_ROOT", help="Where the node's / is mounted here."),
]


def _env_list(ctx: typer.Context, param: typer.CallbackParam, values: list[str] | None) -> list[str] | None:
    """KWASM_SHIM / KWASM_HANDLER hold several values separated by commas (or spaces); each
    --shim / --handler on the command line is one value, taken as given (a path may hold a comma)."""
    source = ctx.get_parameter_source(param.name) if param.name else None
    if values and source is not None and source.name == "ENVIRONMENT":  # typer vendors click's enum
        return [v for value in values for v in value.split(",") if v]
    return values


Shims = Annotated[
    list[str] | None,
    typer.Option(
        "--shim",
        envvar="KWASM_SHIM",
        callback=_env_list,
        help="Shim binary (containerd-shim-NAME-vN) to install; repeatable (KWASM_SHIM: comma-separated).",
    ),
]
Handlers = Annotated[
    list[str] | None,
    typer.Option(
        "--handler",
        envvar="KWASM_HANDLER",
        callback=_env_list,
        help="Runtime handler (default: NAME); one per --shim (KWASM_HANDLER: comma-separated).",
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", envvar="KWASM_CONFIG", help="Node path of the file to edit."),
]
RestartOpt = Annotated[
    str,
    typer.Option(
        "--restart",
        envvar="KWASM_RESTART",
        help="auto, none, systemd:UNIT, dbus:UNIT, openrc:SERVICE or signal:PROCESS.",
    ),
]
PidOpt = Annotated[
    int, typer.Option("--pid", envvar="KWASM_PID", help="A node process to nsenter (hostPID: 1).")
]
InstallDir = Annotated[
    str,
    typer.Option("--install-dir", envvar="KWASM_INSTALL_DIR", help="Node dir for shims and state."),
]
SocketOpt = Annotated[
    str | None,
    typer.Option("--socket", envvar="KWASM_SOCKET", help="Node path of containerd's socket."),
]
BusOpt = Annotated[
    str | None,
    typer.Option(
        "--bus",
        envvar="KWASM_BUS",
        help="Node path of systemd's D-Bus socket: no --pid needed (units, restarts over D-Bus).",
    ),
]
Output = Annotated[OutputFormat, typer.Option("--output", "-o", help="text or json.")]
Timeout = Annotated[
    float,
    typer.Option(
        "--verify-timeout",
        "--timeout",
        envvar="KWASM_VERIFY_TIMEOUT",
        help="Seconds to wait for containerd after a restart (a crash loop rolls back sooner).",
    ),
]
ModeOpt = Annotated[
    InstallMode,
    typer.Option(
        "--mode",
        envvar="KWASM_MODE",
        help="auto: a drop-in of our own where containerd merges a directory it imports, else an edit; "
        "dropin; edit.",
    ),
]
LockTimeout = Annotated[
    float,
    typer.Option("--lock-timeout", envvar="KWASM_LOCK_TIMEOUT", help="Seconds to wait for the node lock."),
]


def _split(values: list[str] | None) -> list[str]:
    return [v for v in values or [] if v]


def _shims(paths: list[str], handlers: list[str], sha256: list[str]) -> tuple[ShimSpec, ...]:
    from kwasm_py.node.plan import parse_shim_binary

    if handlers and len(handlers) != len(paths):
        raise UsageError("give one --handler per --shim (or none)")
    if sha256 and len(sha256) != len(paths):
        raise UsageError("give one --sha256 per --shim (or none)")
    specs = []
    for i, path in enumerate(paths):
        name, version = parse_shim_binary(path)
        specs.append(
            ShimSpec(
                source=path,
                name=name,
                handler=handlers[i] if handlers else name,
                sha256=sha256[i] if sha256 else None,
                shim_version=version,
            )
        )
    return tuple(specs)


def _options(
    *,
    host_root: Path,
    shims: tuple[ShimSpec, ...] = (),
    config: str | None = None,
    restart: str = "auto",
    pid: int = 1,
    install_dir: str = str(DEFAULT_INSTALL_DIR),
    socket: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
    lock_timeout: float = 120.0,
    verify: bool = False,
    mode: InstallMode = InstallMode.AUTO,
    bus: str | None = None,
) -> Any:
    from kwasm_py.node import layout
    from kwasm_py.node.engine import NodeOptions

    def node_path(value: str | None, flag: str) -> PurePosixPath | None:
        if value is None:
            return None
        path = PurePosixPath(value)
        if not path.is_absolute():
            raise UsageError(f"{flag} {value!r} must be an absolute path on the node")
        return path

    return NodeOptions(
        host_root=host_root,
        shims=shims,
        config=node_path(config, "--config"),
        restart=layout.parse_restart(restart),
        socket=node_path(socket, "--socket"),
        pid=pid,
        install_dir=node_path(install_dir, "--install-dir") or DEFAULT_INSTALL_DIR,
        force=force,
        verify_timeout=timeout,
        lock_timeout=lock_timeout,
        verify=verify,
        mode=mode,
        bus=node_path(bus, "--bus"),
    )


def _emit_result(result: contract.EngineResult) -> None:
    sys.stdout.write(result.dumps() + "\n")


def _runtimes(records: list[dict[str, str]]) -> tuple[contract.Runtime, ...]:
    return tuple(contract.Runtime.from_json(r) for r in records)


def _change_result(command: contract.Command, outcome: Outcome) -> contract.EngineResult:
    """An engine Outcome (install/uninstall) as the process contract's result."""
    return contract.EngineResult(
        command=command,
        ok=outcome.ok,
        changed=outcome.changed,
        restarted=outcome.restarted,
        verified=outcome.verified,
        layout=outcome.layout,
        config=outcome.config,
        runtimes=_runtimes(outcome.runtimes),
        notes=tuple(outcome.notes),
    )


def _status_result(report: Report) -> contract.EngineResult:
    """An engine Report (status) as the process contract's result."""
    cs = report.containerd
    return contract.EngineResult(
        command="status",
        installed=report.installed,
        status=report.status,
        layout=report.layout,
        config=report.config,
        runtimes=_runtimes(report.runtimes),
        drift=tuple(report.drift),
        containerd=None if cs is None else contract.ContainerdView.from_json(cs),
    )


#: Errors the engine raises before it changes anything: the agent reports them as step pre-flight.
PRE_FLIGHT = (UsageError, ChecksumError, ConfigError, ConflictError, LayoutError, LockHeld)


def _run_step(step: contract.Command, output: OutputFormat, action: Callable[[], Any]) -> Any:
    """Run an engine action; JSON output prints the outcome (or the failure) as one object.

    Returns the outcome for text output (after printing its notes), None when JSON was printed.
    """
    try:
        outcome = action()
    except KwasmError as err:
        if output is OutputFormat.JSON:
            where = err.step or ("pre-flight" if isinstance(err, PRE_FLIGHT) else step)
            _emit_result(contract.EngineResult.failed(step, step=where, error=err.message, hint=err.hint))
        raise
    if output is OutputFormat.JSON:
        _emit_result(_change_result(step, outcome))
        return None
    for note in outcome.notes:
        print(f"note: {note}")
    return outcome


def _log(message: str) -> None:
    print(message, file=sys.stderr)


@app.command()
def plan(
    host_root: HostRoot,
    shim: Shims = None,
    handler: Handlers = None,
    config: ConfigOpt = None,
    restart: RestartOpt = "auto",
    pid: PidOpt = 1,
    install_dir: InstallDir = str(DEFAULT_INSTALL_DIR),
    socket: SocketOpt = None,
    bus: BusOpt = None,
    uninstall: Annotated[
        bool, typer.Option("--uninstall", help="Show what `uninstall` would do instead (--handler picks).")
    ] = False,
    force: Annotated[bool, typer.Option("--force")] = False,
    mode: ModeOpt = InstallMode.AUTO,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Show what `install` would do; change nothing."""
    if uninstall:  # what `uninstall` would do
        opts = _options(
            host_root=host_root, restart=restart, pid=pid, install_dir=install_dir, socket=socket, bus=bus
        )
        node_plan.print_uninstall_plan(opts, _split(handler), output)
        return
    opts = _options(
        host_root=host_root,
        shims=_shims(_split(shim), _split(handler), []),
        config=config,
        restart=restart,
        pid=pid,
        install_dir=install_dir,
        socket=socket,
        force=force,
        mode=mode,
        bus=bus,
    )
    node_plan.print_plan(opts, output)


@app.command()
def install(
    host_root: HostRoot,
    shim: Shims = None,
    handler: Handlers = None,
    config: ConfigOpt = None,
    restart: RestartOpt = "auto",
    pid: PidOpt = 1,
    install_dir: InstallDir = str(DEFAULT_INSTALL_DIR),
    socket: SocketOpt = None,
    bus: BusOpt = None,
    sha256: Annotated[list[str] | None, typer.Option("--sha256", help="Expected sha256 per shim.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Take over a runtime of the same handler.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            envvar="KWASM_VERIFY",
            help="Ask containerd even when nothing changes; repair if needed.",
        ),
    ] = False,
    timeout: Timeout = 60.0,
    lock_timeout: LockTimeout = 120.0,
    mode: ModeOpt = InstallMode.AUTO,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Install shims, configure containerd, restart it and check it registered them."""
    from kwasm_py.node import engine

    def action() -> Any:
        opts = _options(
            host_root=host_root,
            shims=_shims(_split(shim), _split(handler), _split(sha256)),
            config=config,
            restart=restart,
            pid=pid,
            install_dir=install_dir,
            socket=socket,
            bus=bus,
            force=force,
            timeout=timeout,
            lock_timeout=lock_timeout,
            verify=verify,
            mode=mode,
        )
        return engine.install(opts, log=_log)

    outcome = _run_step("install", output, action)
    if outcome is None:
        return
    runtimes = ", ".join(f"{r['handler']} -> {r['runtime_type']}" for r in outcome.runtimes)
    if not outcome.changed:
        print(f"unchanged: {runtimes} in {outcome.config} ({outcome.layout}); nothing to do")
        return
    verified = "containerd reports it" if outcome.verified else "not verified (--restart none)"
    print(f"changed: {runtimes} in {outcome.config} ({outcome.layout}); {verified}")


@app.command()
def uninstall(
    host_root: HostRoot,
    handler: Handlers = None,
    restart: RestartOpt = "auto",
    pid: PidOpt = 1,
    install_dir: InstallDir = str(DEFAULT_INSTALL_DIR),
    socket: SocketOpt = None,
    bus: BusOpt = None,
    timeout: Timeout = 60.0,
    lock_timeout: LockTimeout = 120.0,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Remove exactly what `install` added, restart containerd, check the runtime is gone."""
    from kwasm_py.node import engine

    def action() -> Any:
        opts = _options(
            host_root=host_root,
            restart=restart,
            pid=pid,
            install_dir=install_dir,
            socket=socket,
            bus=bus,
            timeout=timeout,
            lock_timeout=lock_timeout,
        )
        return engine.uninstall(opts, _split(handler), log=_log)

    outcome = _run_step("uninstall", output, action)
    if outcome is not None and outcome.changed:
        names = ", ".join(r["handler"] for r in outcome.runtimes)
        print(f"removed: {names} from {outcome.config} ({outcome.layout})")


@app.command()
def status(
    host_root: HostRoot,
    pid: PidOpt = 1,
    install_dir: InstallDir = str(DEFAULT_INSTALL_DIR),
    config: ConfigOpt = None,
    socket: SocketOpt = None,
    bus: BusOpt = None,
    ask: Annotated[
        bool, typer.Option("--containerd/--no-containerd", help="Also ask containerd over CRI.")
    ] = True,
    output: Output = OutputFormat.TEXT,
) -> None:
    """What kwasm-py installed here, whether it still holds, and what containerd says."""
    from kwasm_py.node import engine

    opts = _options(
        host_root=host_root, pid=pid, install_dir=install_dir, config=config, socket=socket, bus=bus
    )
    report = engine.status(opts, ask_containerd=ask)
    if output is OutputFormat.JSON:
        _emit_result(_status_result(report))
        return
    print(f"layout:     {report.layout}")
    print(f"config:     {report.config}")
    print(f"state:      {report.status}")
    for r in report.runtimes:
        print(f"runtime:    {r['handler']} -> {r['runtime_type']} (sha256 {r['sha256'][:16]}…)")
    if report.containerd is not None:
        cs = report.containerd
        if "error" in cs:
            print(f"containerd: not answering ({cs['error']})")
        else:
            runtimes = ", ".join(f"{k}={v}" for k, v in sorted(cs["runtimes"].items()))
            ready = "ready" if cs["ready"] else "NOT ready"
            print(f"containerd: {cs['version']} {ready}; runtimes: {runtimes}")
    for d in report.drift:
        print(f"drift:      {d}")
    if report.drift:
        raise typer.Exit(1)
