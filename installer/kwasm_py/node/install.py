"""The node engine: install, uninstall and inspect shims on one node, safely.

Order of effects on install (each a possible crash point, each safe to resume):
lock -> backup the original config once -> state file `pending` -> shim binaries -> config ->
restart -> containerd confirms the runtime -> state file `installed`.
If containerd does not come back or does not list the runtime, the previous config and binaries
are put back, containerd is restarted again, and the run fails saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path, PurePosixPath

from kwasm_py.errors import (
    ChecksumError,
    HostIOError,
    KwasmError,
    UsageError,
)
from kwasm_py.model import (
    STATE_FILE_NAME,
    ConfigKind,
    RestartMethod,
    ShimSpec,
)
from kwasm_py.node import cri, ownership, plan, restart
from kwasm_py.node import probe as nodeprobe
from kwasm_py.node import state as st
from kwasm_py.node.context import (
    Node,
    NodeOptions,
    Outcome,
    _host_root,
    _kill_point,
    _now,
    _read_state,
    _runtime_dicts,
    fingerprint,
    open_node,
)
from kwasm_py.node.hostfs import HostFS
from kwasm_py.node.planning import _preflight, _preflight_ahead, _shim_digests, choose_mode, make_plan
from kwasm_py.node.procfs import ProcFS
from kwasm_py.node.verify import _registered, _reports, _rollback, _wait_registered


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
    with fs.lock(timeout=opts.lock_timeout), contextlib.ExitStack() as joined:
        node = open_node(opts, restarter=restarter, cri_client=cri_client, proc=proc)
        # Pre-flight's dump of today's config runs while containerd is asked its version and
        # the plan is made; a node the state file calls installed is most likely a no-op,
        # which needs no dump: there it starts once the no-op check has failed.
        ahead = None
        if node.state is None or node.state.status != st.INSTALLED:
            ahead = joined.enter_context(_preflight_ahead(node))
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
        if ahead is None:
            ahead = joined.enter_context(_preflight_ahead(node))
        _require_exec(node)
        the_plan = make_plan(node, shims)
        outcome.notes.extend(the_plan.notes)
        outcome.notes.append(f"pre-flight {_preflight(node, the_plan, ahead)}")  # raises: nothing written
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
        raise _rollback(node, err, old_info, previous_bins, prev_state, the_plan, outcome) from err
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
