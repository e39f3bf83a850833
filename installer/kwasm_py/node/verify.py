"""After the restart: wait until containerd itself reports the runtimes, or put the previous
config, binaries and state back (`_rollback`) and restart again.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath
from typing import Any

from kwasm_py.errors import (
    KwasmError,
    RestartError,
    VerifyError,
)
from kwasm_py.model import (
    BIN_DIR_NAME,
    RestartMethod,
)
from kwasm_py.node import plan, restart
from kwasm_py.node import state as st
from kwasm_py.node.context import Node, Outcome


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
    watch = node.crash_watch(node.layout.restart)
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
) -> KwasmError:
    """Put back the previous config, binaries and state; restart containerd on them.

    Returns the error to raise (from `err`): `err`'s kind and hint, its message prefixed with the
    failed step and followed by what the rollback did (or could not do)."""
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
                watch=node.crash_watch(lay.restart),
            )
            notes.append("containerd runs again with the previous config")
    except KwasmError as second:
        notes.append(f"rollback incomplete: {second.message}")
    return err.amended(f"{failed_step}: {err.message}; " + "; ".join(notes), step=failed_step)
