"""The node engine: install, uninstall and inspect shims on one node, safely.

The one entry point the CLI, the tests and the benchmarks import (`engine.install(...)`); the
work is done in
- `context`: NodeOptions, Outcome, Report, the Node and `open_node` (layout, state file);
- `planning`: the shims' digests, the mode, the install plan and `plan_only` (`node plan`);
- `install`: install and its steps (the order of effects is in its docstring);
- `verify`: waiting for containerd to report the runtimes, and the rollback when it does not;
- `uninstall`: `plan_uninstall` and uninstall;
- `status`: what is installed and the drift from it.

`install` here adds one thing on top of `install.install`: moving a provisioned node to the
file another `--mode` asks for (edit -> drop-in or back) with one restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from kwasm_py.errors import KwasmError
from kwasm_py.model import STATE_FILE_NAME, ConfigKind, InstallMode, RestartMethod, RestartSpec
from kwasm_py.node import cri, restart
from kwasm_py.node import install as _install
from kwasm_py.node.context import (
    KILL_ENV,
    P_SOCKET,
    Node,
    NodeOptions,
    Outcome,
    Report,
    fingerprint,
    open_node,
)
from kwasm_py.node.hostfs import HostFS
from kwasm_py.node.planning import choose_mode, make_plan, plan_only
from kwasm_py.node.procfs import ProcFS
from kwasm_py.node.state import from_json
from kwasm_py.node.status import status
from kwasm_py.node.uninstall import plan_uninstall, uninstall

__all__ = [
    "KILL_ENV",
    "P_SOCKET",
    "Node",
    "NodeOptions",
    "Outcome",
    "Report",
    "choose_mode",
    "fingerprint",
    "install",
    "make_plan",
    "open_node",
    "plan_only",
    "plan_uninstall",
    "status",
    "uninstall",
]


def installed_mode(opts: NodeOptions) -> InstallMode | None:
    """The mode the node was installed with when `opts.mode` asks for the other one (so the
    runtime has to move), else None (nothing installed, auto, the same mode, or k0s, whose
    drop-in is the only way). Reads the state file only; raises HostIOError for a bad one."""
    if opts.mode is InstallMode.AUTO or not opts.host_root.is_dir():
        return None
    found = HostFS(opts.host_root).read(opts.install_dir / STATE_FILE_NAME)
    if found is None:
        return None
    state = from_json(found.data, source=str(opts.install_dir / STATE_FILE_NAME))
    kept = InstallMode.DROPIN if state.config.kind == ConfigKind.DROP_IN.value else InstallMode.EDIT
    return None if kept is opts.mode or state.layout == "k0s" else kept


def install(
    opts: NodeOptions,
    *,
    log: Callable[[str], None] = lambda _m: None,
    restarter: restart.Restarter | None = None,
    cri_client: cri.CriClient | None = None,
    proc: ProcFS | None = None,
) -> Outcome:
    """Install `opts.shims` (see `install.install`, which does the work and says what it raises).

    When the node was installed with the other `--mode` (edit or drop-in), the runtime moves:
    our tables and files come out of the old place without a restart, the install writes the
    new place and restarts containerd once, and no copy is left behind. If that install fails
    (after its own rollback), the old install is put back and the error says so.
    """
    old = installed_mode(opts)
    if old is None:
        return _install.install(opts, log=log, restarter=restarter, cri_client=cri_client, proc=proc)
    log(f"step=move from={old.value} to={opts.mode.value}")
    removed = uninstall(
        replace(opts, restart=RestartSpec(RestartMethod.NONE)),
        [],
        log=log,
        restarter=restarter,
        cri_client=cri_client,
        proc=proc,
    )
    try:
        outcome = _install.install(opts, log=log, restarter=restarter, cri_client=cri_client, proc=proc)
    except KwasmError as err:
        try:
            _install.install(
                replace(opts, mode=old), log=log, restarter=restarter, cri_client=cri_client, proc=proc
            )
            back = f"; the {old.value} install is back in place"
        except KwasmError as again:
            back = f"; putting the {old.value} install back failed too: {again.message}"
        raise err.amended(f"moving to --mode {opts.mode.value}: {err.message}{back}") from err
    outcome.notes.insert(0, f"moved the runtime from {removed.config} ({old.value}) to {outcome.config}")
    return outcome
