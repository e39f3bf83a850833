"""Restarting the node's containerd from outside, as a hostPID pod does, and waiting for it.

Commands run inside the node through ``nsenter --target PID --mount --uts --ipc --net --pid``,
so the node's own systemctl / rc-service act on the node's own services. The socket of the
node's containerd is reached from here as ``/proc/PID/root/<socket>``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar

from kwasm_py.errors import RestartError
from kwasm_py.model import RestartMethod, RestartSpec
from kwasm_py.node import dbus
from kwasm_py.node.procfs import HOST, Proc, ProcFS


def in_node(pid: int, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside the namespaces of node process `pid`."""
    return [
        "nsenter",
        f"--target={pid}",
        "--mount",
        "--uts",
        "--ipc",
        "--net",
        "--pid",
        "--",
        *argv,
    ]


def restart_command(spec: RestartSpec) -> list[str]:
    """The command (inside the node) that restarts containerd as `spec` says; [] for none."""
    if spec.method is RestartMethod.SYSTEMD:
        return ["systemctl", "restart", spec.target]
    if spec.method is RestartMethod.OPENRC:
        return ["rc-service", spec.target, "restart"]
    if spec.method is RestartMethod.SIGNAL:
        return ["kill", "-TERM", f"<{spec.target} pid>"]
    return []


def reset_failed_command(spec: RestartSpec) -> list[str]:
    """`systemctl reset-failed UNIT` for a systemd restart, else [].

    Clears the unit's failed state and its start rate limit counter, so a restart is not
    refused as `start-limit-hit` after a few install/uninstall cycles (systemd's default is 5
    starts in 10 s, which Debian's containerd.service does not override). Source: systemctl(1),
    `reset-failed` ("also resets ... the start rate limit counter"); Kubernetes' node e2e tests
    run it before restarting the kubelet for the same reason.
    """
    if spec.method is RestartMethod.SYSTEMD:
        return ["systemctl", "reset-failed", spec.target]
    return []


def describe(spec: RestartSpec, pid: int, *, bus: PurePosixPath | None = None) -> str:
    """The restart as a user would type it (for `plan`): `spec` through node process `pid`, or
    over the D-Bus socket `bus` (a node path; default the system bus) for `dbus:UNIT`."""
    if spec.method is RestartMethod.NONE:
        return "none (--restart none)"
    if spec.method is RestartMethod.SIGNAL:
        return f"SIGTERM the {spec.target} process of node PID {pid}; its parent restarts it"
    if spec.method is RestartMethod.DBUS:
        return dbus.describe(spec, bus or dbus.SYSTEM_BUS)
    restart_line = " ".join(in_node(pid, restart_command(spec)))
    reset = reset_failed_command(spec)
    return f"{' '.join(in_node(pid, reset))}; {restart_line}" if reset else restart_line


def restart(
    spec: RestartSpec,
    *,
    pid: int,
    timeout: float = 90.0,
    started: Callable[[], None] = lambda: None,
    proc: ProcFS = HOST,
    bus: Path | None = None,
) -> None:
    """Restart the node's containerd as `spec` says; return once the restart has completed.

    Takes the restart, a process of the node (`pid`, for nsenter and to find the process to
    signal), the seconds to wait and `started`, run as soon as the restart is under way (the
    command spawned, or the signal sent), before waiting for it: the point where a crash leaves
    containerd mid-restart. `proc` is the /proc to read; `bus` the node's D-Bus socket (host
    path) for `dbus:UNIT` (node/dbus.py; no nsenter, `pid` unused). Raises RestartError when the
    command cannot run, fails or times out, or the process to signal is not found or ignores
    SIGTERM.
    """
    if spec.method is RestartMethod.NONE:
        return
    if spec.method is RestartMethod.DBUS:
        dbus.restart(spec, bus=bus or Path(str(dbus.SYSTEM_BUS)), timeout=timeout, started=started)
        return
    if spec.method is RestartMethod.SIGNAL:
        targets = proc.descendants(pid, spec.target) or proc.find(pid, spec.target)
        if not targets:
            raise RestartError(f"no {spec.target} process found under node PID {pid}")
        for target in targets:
            try:
                os.kill(target.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        started()
        deadline = time.monotonic() + timeout
        while any(proc.alive(p) for p in targets):
            if time.monotonic() > deadline:
                raise RestartError(f"{spec.target} (pid {targets[0].pid}) ignored SIGTERM")
            time.sleep(0.005)
        return
    command = " ".join(restart_command(spec))
    argv = in_node(pid, restart_command(spec))
    reset = reset_failed_command(spec)
    if reset:
        _run_quietly(in_node(pid, reset), timeout=min(timeout, 15.0))
    try:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as err:
        raise RestartError(f"cannot run {argv[0]}: not found on this machine") from err
    started()
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        child.kill()
        child.communicate()
        raise RestartError(f"`{command}` did not finish within {timeout:.0f} s") from err
    if child.returncode != 0:
        detail = (stderr or stdout).strip().splitlines()
        why = ""
        if spec.method is RestartMethod.SYSTEMD:
            show = ["systemctl", "show", f"--property={','.join(UNIT_FAILURE_PROPERTIES)}", spec.target]
            done = _run_quietly(in_node(pid, show), timeout=min(timeout, 15.0))
            why = unit_failure(done.stdout) if done is not None and done.returncode == 0 else ""
        raise RestartError(
            f"`{command}` failed in the node (exit {child.returncode})"
            + (f": {detail[0]}" if detail else "")  # systemctl's first line names the cause
            + (f" ({why})" if why else ""),
            hint=f"see the node's log of it: journalctl -u {spec.target}"
            if spec.method is RestartMethod.SYSTEMD
            else "",
        )


UNIT_FAILURE_PROPERTIES = ("Result", "ExecMainCode", "ExecMainStatus")
# systemd's own exit statuses of a unit process it could not set up (the command never ran).
# Source: systemd.exec(5), "Process Exit Codes"; the ones a containerd unit can meet.
SYSTEMD_EXIT_STATUS = {
    200: "CHDIR", 203: "EXEC", 204: "MEMORY", 205: "LIMITS", 206: "OOM_ADJUST", 207: "SIGNAL_MASK",
    210: "CHROOT", 214: "SETSCHEDULER", 216: "GROUP", 217: "USER", 218: "CAPABILITIES",
    219: "CGROUP", 220: "SETSID", 226: "NAMESPACE", 233: "RUNTIME_DIRECTORY", 238: "STATE_DIRECTORY",
}  # fmt: skip
_CLD = {"1": "exited", "2": "killed", "3": "dumped"}  # ExecMainCode: the CLD_* code of waitid(2)


def unit_failure(show: str) -> str:
    """What `systemctl show --property=Result,ExecMainCode,ExecMainStatus UNIT` printed (`show`)
    says about a failed start, as one phrase ("" when it says nothing useful).

    A status of systemd's own (200-245) means systemd could not set the process up, so the
    program itself never ran; it is named as systemd names it (systemd.exec(5)).
    """
    props = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    result, code, status = (
        props.get("Result", ""),
        props.get("ExecMainCode", ""),
        props.get("ExecMainStatus", ""),
    )
    parts = [f"unit result {result}"] if result and result != "success" else []
    if code in _CLD and status.isdigit() and status != "0":
        name = SYSTEMD_EXIT_STATUS.get(int(status)) if code == "1" else None
        if name:
            parts.append(f"main process status={status}/{name}: systemd could not set it up, it never ran")
        else:
            parts.append(f"main process {_CLD[code]}, {'signal' if code != '1' else 'status'} {status}")
    return ", ".join(parts)


def _run_quietly(argv: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str] | None:
    """Run a helper command in the node; None when it could not run (its failure is not ours)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


# Between two CRI polls while containerd comes back: it answers 30-50 ms after a SIGTERM restart
# here, so a short step does not miss it by much (the floor it is measured against polls every
# 2 ms); a poll before the socket is there fails at once.
POLL = 0.005  # s
CRASH_LIMIT = 2  # containerd exits after our restart before we stop waiting and roll back
_WATCH_EVERY = 0.2  # seconds between two looks at the containerd unit (a `systemctl show`)
# seconds between two scans of the processes below the supervisor: a containerd that refuses its
# config exits within 20-100 ms (measured with 1.6 here), so a slower scan would miss most exits
_SCAN_EVERY = 0.05


class CrashWatch:
    """Notices containerd exiting again and again after a restart (a crash loop).

    Built right after the restart; `check()` is called while waiting for containerd and raises
    RestartError once containerd has exited `limit` times since, or its systemd unit is `failed`
    (it will not come back on its own). For a systemd unit, exits are the unit's `NRestarts`
    (systemd's count of automatic restarts, source: org.freedesktop.systemd1(5)) plus one while
    it waits in `auto-restart`; otherwise they are incarnations of the processes called
    `containerd` below `pid` (the restarting parent) seen and then gone, sampled every 0.05 s
    (an incarnation that lives shorter than that may go unseen: the timeout is the backstop).
    For `dbus:UNIT` the same unit properties are read over the node's D-Bus socket `bus` (one
    connection, kept until `close()`), or through `unit_reader` (tests).
    """

    def __init__(
        self,
        spec: RestartSpec,
        *,
        pid: int,
        limit: int = CRASH_LIMIT,
        proc: ProcFS = HOST,
        bus: Path | None = None,
        unit_reader: Callable[[str], dict[str, str]] | None = None,
    ) -> None:
        self.spec, self.pid, self.limit, self.proc = spec, pid, limit, proc
        self.bus, self.unit_reader = bus, unit_reader
        self._conn: dbus.SystemdBus | None = None
        self.name = spec.target if spec.method is RestartMethod.SIGNAL else "containerd"
        self.exits = 0
        self.started = time.monotonic()
        self._next = 0.0
        self._restarts: str | None = None
        self._seen: set[Proc] | None = None  # None: no baseline yet (taken by the first check)

    def _baseline(self) -> None:
        """What runs now; taken at the first check, so a restart that needs no waiting pays
        nothing (containerd usually answers at the first poll)."""
        unit = self._unit()
        self._restarts = unit.get("NRestarts") if unit.get("NRestarts", "").isdigit() else None
        self._seen = set() if unit else set(self._processes())
        if unit.get("SubState") == "auto-restart":
            self.exits = 1

    def _processes(self) -> list[Proc]:
        if self.spec.method in (RestartMethod.NONE, RestartMethod.DBUS):  # no process view over D-Bus
            return []
        # only processes below `pid`: a namespace-wide search would count other daemons' exits
        return [p for p in self.proc.descendants(self.pid, self.name) if self.proc.alive(p)]

    def close(self) -> None:
        """Close the D-Bus connection, if one was opened."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _bus_unit(self) -> dict[str, str]:
        try:
            if self.unit_reader is not None:
                return self.unit_reader(self.spec.target)
            if self._conn is None:
                self._conn = dbus.SystemdBus(self.bus or Path(str(dbus.SYSTEM_BUS)), timeout=2.0)
            return self._conn.unit_state(self.spec.target)
        except RestartError:
            return {}  # as a failed `systemctl show`: nothing counted this time

    def _unit(self) -> dict[str, str]:
        if self.spec.method is RestartMethod.DBUS:
            return self._bus_unit()
        if self.spec.method is not RestartMethod.SYSTEMD:
            return {}
        argv = ["systemctl", "show", "--property=ActiveState,SubState,NRestarts", self.spec.target]
        done = _run_quietly(in_node(self.pid, argv), timeout=5.0)
        if done is None or done.returncode != 0:
            return {}
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def check(self) -> None:
        """Raise RestartError when containerd is crash-looping; cheap to call in a poll loop."""
        now = time.monotonic()
        if now < self._next:
            return
        unit_based = self.spec.method in (RestartMethod.SYSTEMD, RestartMethod.DBUS)
        self._next = now + (_WATCH_EVERY if unit_based else _SCAN_EVERY)
        if self._seen is None:
            self._baseline()
            return
        unit = self._unit()
        if unit:
            # systemd counts for us: automatic restarts since ours, plus one exit it is about
            # to restart from (RestartSec) or that ended the unit.
            restarts = unit.get("NRestarts", "")
            done = int(restarts) - int(self._restarts or 0) if restarts.isdigit() and self._restarts else 0
            pending = unit.get("SubState") == "auto-restart" or unit.get("ActiveState") == "failed"
            self.exits = max(self.exits, done + int(pending))
        else:
            current = set(self._processes())
            self.exits += len(self._seen - current)
            self._seen = current
        where = f"unit {self.spec.target}" if unit else f"node PID {self.pid}"
        if unit.get("ActiveState") == "failed":
            raise RestartError(
                f"{where} is failed ({unit.get('SubState', '?')}) after the restart: containerd "
                f"exited {self.exits} time(s) and will not be started again"
            )
        if self.exits >= self.limit:
            raise RestartError(
                f"containerd exited {self.exits} times within {now - self.started:.1f} s of the "
                f"restart ({where})"
            )


T = TypeVar("T")


def wait_until(
    check: Callable[[], T],
    ready: Callable[[T], bool],
    *,
    timeout: float,
    what: str,
    watch: CrashWatch | None = None,
) -> T:
    """Poll `check` (containerd's CRI status) until `ready` holds of its answer; return that answer.

    A RestartError from `check` (containerd not answering) counts as "not yet". Raises
    RestartError after `timeout` seconds, naming `what` and the last reason, or as soon as
    `watch` sees containerd crash-looping (then the message says so, and the caller need not
    wait any longer).
    """
    try:
        return _poll(check, ready, timeout=timeout, what=what, watch=watch)
    finally:
        if watch is not None:
            watch.close()  # its D-Bus connection (reopened if the watch is used again)


def _poll(
    check: Callable[[], T], ready: Callable[[T], bool], *, timeout: float, what: str, watch: CrashWatch | None
) -> T:
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            current = check()
            if ready(current):
                return current
            last_error = f"containerd answered, but {what} was not true yet"
        except RestartError as err:
            last_error = err.message
        if watch is not None:
            try:
                watch.check()
            except RestartError as err:
                raise RestartError(f"stopped waiting for {what}: {err.message}") from err
        if time.monotonic() > deadline:
            raise RestartError(f"gave up after {timeout:.0f} s waiting for {what}: {last_error}")
        time.sleep(POLL)


class Restarter(Protocol):
    """Restarts the node's containerd: the engine's port for it (fakes implement it in tests)."""

    def restart(
        self,
        spec: RestartSpec,
        *,
        pid: int,
        timeout: float,
        started: Callable[[], None] = ...,
    ) -> None:
        """Restart as `spec` says through node process `pid`; return once it completed.

        Calls `started` once the restart is under way; raises RestartError when it fails.
        """
        ...


class NodeRestarter:
    """The real Restarter: nsenter + systemctl / rc-service, or SIGTERM, read through `proc`;
    `dbus:UNIT` over the D-Bus socket `bus` (a host path)."""

    def __init__(self, proc: ProcFS = HOST, bus: Path | None = None) -> None:
        self.proc = proc
        self.bus = bus

    def restart(
        self,
        spec: RestartSpec,
        *,
        pid: int,
        timeout: float,
        started: Callable[[], None] = lambda: None,
    ) -> None:
        """Restart the node's containerd (see the module function `restart`, which it calls)."""
        restart(spec, pid=pid, timeout=timeout, started=started, proc=self.proc, bus=self.bus)
