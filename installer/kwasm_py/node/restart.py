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
from kwasm_py.node.procfs import HOST, ProcFS


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


def describe(spec: RestartSpec, pid: int, *, bus: PurePosixPath | None = None) -> str:
    """The restart as a user would type it (for `plan`): `spec` through node process `pid`, or
    over the D-Bus socket `bus` (a node path; default the system bus) for `dbus:UNIT`."""
    if spec.method is RestartMethod.NONE:
        return "none (--restart none)"
    if spec.method is RestartMethod.SIGNAL:
        return f"SIGTERM the {spec.target} process of node PID {pid}; its parent restarts it"
    if spec.method is RestartMethod.DBUS:
        return dbus.describe(spec, bus or dbus.SYSTEM_BUS)
    return " ".join(in_node(pid, restart_command(spec)))


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
        raise RestartError(
            f"`{command}` failed in the node (exit {child.returncode})"
            + (f": {detail[-1]}" if detail else ""),
        )


T = TypeVar("T")


def wait_until(
    check: Callable[[], T],
    ready: Callable[[T], bool],
    *,
    timeout: float,
    what: str,
) -> T:
    """Poll `check` (containerd's CRI status) until `ready` holds of its answer; return that answer.

    A RestartError from `check` (containerd not answering) counts as "not yet". Raises
    RestartError after `timeout` seconds, naming `what` and the last reason.
    """
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
        if time.monotonic() > deadline:
            raise RestartError(f"gave up after {timeout:.0f} s waiting for {what}: {last_error}")
        time.sleep(0.02)


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
