"""Uninstall: plan it (`plan_uninstall`, pure planning in `uninstall_plan`) and remove exactly
what install added, restarting and verifying; the config is put back when a step fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import PurePosixPath

from kwasm_py.containerd import dropin
from kwasm_py.errors import (
    KwasmError,
)
from kwasm_py.model import (
    BIN_DIR_NAME,
    STATE_FILE_NAME,
    RestartMethod,
)
from kwasm_py.node import cri, plan, restart, uninstall_plan
from kwasm_py.node import state as st
from kwasm_py.node.context import (
    Node,
    NodeOptions,
    Outcome,
    _host_root,
    _now,
    _read_state,
    _runtime_dicts,
    open_node,
)
from kwasm_py.node.hostfs import HostFS
from kwasm_py.node.procfs import ProcFS


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
                # Only the tables we wrote go (their runtime_type is our binary): a runtime we
                # adopted from k3s's base render (runtime_type io.containerd.NAME.v2) stays.
                gone = {r.handler for r in chosen if r.runtime_type == r.shim}
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
                    what="containerd to run without runtime(s) " + ", ".join(sorted(gone))
                    if gone
                    else "containerd to run again",
                    watch=node.crash_watch(lay.restart),
                )
                outcome.verified = True
        except KwasmError as err:
            notes = ""
            if main_fix is not None:
                fs.atomic_write(main_fix[0], main_fix[1].encode(), mode=0o644)
            if the_plan.changed and old is not None:
                fs.atomic_write(cfg_path, old.data, mode=old.mode)
            if changed:
                notes += "; put the config back as it was"
                if lay.restart.method is not RestartMethod.NONE:
                    try:
                        node.restarter.restart(lay.restart, pid=opts.pid, timeout=opts.verify_timeout)
                        restart.wait_until(
                            node.cri_status,
                            lambda s: s.runtime_ready,
                            timeout=opts.verify_timeout,
                            what="containerd to run again with the previous config",
                            watch=node.crash_watch(lay.restart),
                        )
                        notes += "; containerd runs again with the previous config"
                    except KwasmError as again:
                        notes += f"; restart after that failed too: {again.message}"
            raise err.amended(err.message + notes, step=err.step or node.step) from err
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
