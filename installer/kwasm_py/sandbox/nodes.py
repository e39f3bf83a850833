"""EFFECT: sandbox nodes: boot (``up``), stop (``down``), list, and run commands inside them.

Each node's folder under ``$KWASM_SANDBOXES`` holds its overlay (upper, work, merged root), the
nspawn log and ``node.json``, the registry record written (by rename) as soon as nspawn runs, so
``down`` can stop a node whose boot never completed. ``down`` ends exactly the processes ``up``
started, by PID checked against their start time, unmounts the node's overlay and removes its
folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from kwasm_py.errors import SandboxError, UsageError
from kwasm_py.node import restart
from kwasm_py.sandbox import host
from kwasm_py.sandbox.flavors import Flavor, flavor, prepare_flavor
from kwasm_py.sandbox.host import Log, quiet
from kwasm_py.sandbox.roots import check_prerequisites, check_suite, ensure_root

DEFAULT_STATE = Path("/var/lib/kwasm-py/sandboxes")
NODE_FILE = "node.json"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
T = TypeVar("T")


@dataclass(frozen=True)
class Node:
    """A booted sandbox node, as recorded in its registry file."""

    name: str
    suite: str
    flavor: str
    dir: str  # this node's folder (upper layer, work dir, mount point, log)
    root: str  # host path of the node's `/`
    nspawn_pid: int
    nspawn_start: int  # start time (clock ticks since boot, /proc/PID/stat field 22)
    pid: int  # the node's PID 1 as this machine sees it
    pid_start: int
    socket: str  # containerd's socket, node path
    restart: str  # the --restart value that fits this node
    unit: str | None

    @property
    def host_socket(self) -> Path:
        """containerd's socket as reachable from this machine (through the node's /run)."""
        return Path(f"/proc/{self.pid}/root{self.socket}")

    def to_json(self) -> dict[str, object]:
        """The record as a JSON object (what ``node.json`` holds)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Node:
        """The record from ``to_json``'s output; TypeError when fields are missing or unknown."""
        return cls(**data)  # type: ignore[arg-type]


def state_dir() -> Path:
    """Where booted nodes live: $KWASM_SANDBOXES, default /var/lib/kwasm-py/sandboxes."""
    return Path(os.environ.get("KWASM_SANDBOXES") or DEFAULT_STATE)


def scratch_state(prefix: str = "kwasm-nodes-") -> Path:
    """A fresh registry folder for nodes that must not mix with the user's (tests, benches)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))


def check_name(name: str) -> None:
    """Raise a usage error unless NAME is a usable machine name."""
    if not _NAME_RE.match(name):
        raise UsageError(
            f"bad sandbox name {name!r}",
            hint="use lower-case letters, digits and '-', at most 40 characters",
        )


# ---------------------------------------------------------------------------------------------
# Inside a node


def node_run(
    node: Node, *argv: str, timeout: float = 30, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ARGV inside NODE (nsenter into its PID 1) and return the finished process (text
    output). With CHECK, a non-zero exit raises SandboxError."""
    proc = subprocess.run(
        restart.in_node(node.pid, argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise SandboxError(
            f"{' '.join(argv)} on node {node.name} failed (exit {proc.returncode}): {proc.stderr.strip()}",
            hint=f"look inside with `nsenter --target {node.pid} --mount --uts --ipc --net --pid`",
        )
    return proc


def containerd_process(node: Node) -> tuple[int, int] | None:
    """(host PID, start time) of the containerd daemon running in NODE, None when none runs."""
    try:
        ns = Path(f"/proc/{node.pid}/ns/pid").readlink()
    except OSError:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "containerd":
                continue
            if (entry / "ns/pid").readlink() != ns:
                continue
        except OSError:
            continue
        start = host.proc_start_time(int(entry.name))
        if start is not None:
            return int(entry.name), start
    return None


def ready(node: Node) -> bool:
    """True when NODE's containerd (and its unit, under systemd) is up and answers."""
    if node.unit is not None:
        state = node_run(node, "systemctl", "is-active", node.unit, timeout=10).stdout.strip()
        if state != "active":
            return False
    return node_run(node, "ctr", "--address", node.socket, "version", timeout=10).returncode == 0


# ---------------------------------------------------------------------------------------------
# Registry


def load(name: str, *, state: Path | None = None) -> Node:
    """The registered node NAME; SandboxError when there is none or its record is unreadable."""
    path = (state or state_dir()) / name / NODE_FILE
    try:
        return Node.from_json(json.loads(path.read_text()))
    except FileNotFoundError as ex:
        raise SandboxError(f"no sandbox node called {name!r}", hint="see `kwasm-py sandbox list`") from ex
    except (OSError, ValueError, TypeError) as ex:
        raise SandboxError(
            f"cannot read {path}: {ex}", hint=f"remove {path.parent} once nothing of it runs"
        ) from ex


def list_nodes(*, state: Path | None = None) -> list[tuple[Node, bool]]:
    """Every registered node and whether its processes still run."""
    base = state or state_dir()
    out = []
    if base.is_dir():
        for d in sorted(base.iterdir()):
            if (d / NODE_FILE).is_file():
                node = load(d.name, state=base)
                out.append((node, host.alive(node.nspawn_pid, node.nspawn_start)))
    return out


def free_name(suite: str, fl: str, *, state: Path | None = None) -> str:
    """A default name for a new node: SUITE[-FLAVOUR][-N], the first one not taken."""
    base = state or state_dir()
    stem = suite if fl == "containerd" else f"{suite}-{fl}"
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}-{n}"
        if not (base / name).exists():
            return name
        n += 1


def _save(node_dir: Path, node: Node) -> None:
    tmp = node_dir / f".{NODE_FILE}.tmp"
    tmp.write_text(json.dumps(node.to_json(), indent=2) + "\n")
    tmp.rename(node_dir / NODE_FILE)


# ---------------------------------------------------------------------------------------------
# Up


def up(
    *,
    suite: str = "bookworm",
    flavor_name: str = "containerd",
    name: str | None = None,
    cache: Path | None = None,
    state: Path | None = None,
    timeout: float = 90.0,
    log: Log = quiet,
    prepare: Callable[[Path], None] | None = None,
) -> Node:
    """Build (once) and boot a node; return it once its containerd answers on its socket.

    PREPARE, when given, is called with the node's root before boot (tests use it to shape a
    node: leftover files, unit drop-ins). Raises UsageError for a bad suite, flavour or name,
    SandboxError when the node exists already, a tool is missing, or the boot fails or times
    out (then everything it started is stopped and removed again).
    """
    check_suite(suite)
    fl = flavor(flavor_name)
    base = state or state_dir()
    name = name or free_name(suite, fl.name, state=base)
    check_name(name)
    check_prerequisites()
    lower = ensure_root(suite, cache=cache, log=log)
    base.mkdir(parents=True, exist_ok=True)
    node_dir = base / name
    try:
        node_dir.mkdir()
    except FileExistsError as ex:
        raise SandboxError(
            f"a sandbox node called {name!r} exists already",
            hint=f"stop it with `kwasm-py sandbox down {name}` or pick another --name",
        ) from ex
    try:
        node = _boot(
            lower=lower,
            node_dir=node_dir,
            name=name,
            suite=suite,
            fl=fl,
            timeout=timeout,
            log=log,
            prepare=prepare,
        )
    except BaseException:
        _teardown_dir(node_dir)
        raise
    return node


def _boot(
    *,
    lower: Path,
    node_dir: Path,
    name: str,
    suite: str,
    fl: Flavor,
    timeout: float,
    log: Log,
    prepare: Callable[[Path], None] | None,
) -> Node:
    root = host.mount_overlay(lower, node_dir)
    prepare_flavor(root, name, fl)
    if prepare is not None:
        prepare(root)
    argv = ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "--private-network"]
    argv += ["-D", str(root), "-M", name]
    if fl.boots_systemd:
        argv.append("-b")
    else:
        # PID 1 is our init script; SIGTERM to nspawn reaches it so it can stop containerd.
        argv += ["--kill-signal=SIGTERM", "/usr/local/sbin/k3d-init"]
    env = dict(os.environ)
    if suite != "bookworm":
        # systemd >= 256 refuses the legacy/hybrid cgroup hierarchy unless told to use cgroup2.
        env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
    log(f"booting {name} ({suite}, {fl.name})")
    with (node_dir / "nspawn.log").open("wb") as out:
        proc = subprocess.Popen(
            host.in_cgroups(argv, host.node_cgroups(node_dir)),  # nodes must not share a cgroup tree
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    host.CHILDREN[proc.pid] = proc
    nspawn_start = host.proc_start_time(proc.pid) or 0
    deadline = time.monotonic() + timeout
    partial = {
        "name": name,
        "suite": suite,
        "flavor": fl.name,
        "dir": str(node_dir),
        "root": str(root),
        "nspawn_pid": proc.pid,
        "nspawn_start": nspawn_start,
        "pid": 0,
        "pid_start": 0,
        "socket": fl.socket,
        "restart": fl.restart,
        "unit": fl.unit,
    }
    # Record the nspawn PID at once, so `down` can stop it even if the boot never completes.
    _save(node_dir, Node.from_json(partial))
    pid = _wait_for(lambda: _node_pid1(proc.pid), deadline, proc, node_dir, "the node's PID 1")
    node = Node.from_json({**partial, "pid": pid, "pid_start": host.proc_start_time(pid) or 0})
    _save(node_dir, node)
    _wait_for(lambda: ready(node) or None, deadline, proc, node_dir, "containerd")
    return node


def _node_pid1(nspawn_pid: int) -> int | None:
    for child in host.children(nspawn_pid):
        ns = host.ns_pids(child)
        if len(ns) > 1 and ns[-1] == 1:
            return child
    return None


def _wait_for(
    probe: Callable[[], T | None],
    deadline: float,
    proc: subprocess.Popen[bytes],
    node_dir: Path,
    what: str,
) -> T:
    delay = 0.02
    while True:
        if proc.poll() is not None:
            raise SandboxError(
                f"systemd-nspawn exited (status {proc.returncode}) before {what} was up: "
                f"{_log_tail(node_dir)}",
                hint=f"full log: {node_dir / 'nspawn.log'}",
            )
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise SandboxError(
                f"{what} was not up in time: {_log_tail(node_dir)}",
                hint=f"full log: {node_dir / 'nspawn.log'}",
            )
        time.sleep(delay)  # polling a condition with a deadline, not synchronising on time
        delay = min(delay * 2, 0.25)


def _log_tail(node_dir: Path) -> str:
    try:
        lines = (node_dir / "nspawn.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in lines[-3:]) or "(empty log)"


# ---------------------------------------------------------------------------------------------
# Down


def stop(node: Node, *, timeout: float = 30.0) -> None:
    """End NODE's processes (nspawn, then its PID 1 if left), by PID; wait until gone.

    Raises SandboxError when they survive SIGKILL.
    """
    pids = [(node.nspawn_pid, node.nspawn_start)]
    if node.pid:
        pids.append((node.pid, node.pid_start))
    # SIGTERM asks nspawn for an orderly shutdown of the node (SIGRTMIN+3 to systemd).
    host.signal_pid(node.nspawn_pid, node.nspawn_start, signal.SIGTERM)
    if host.wait_gone(pids, timeout):
        return
    for pid, start in reversed(pids):
        host.signal_pid(pid, start, signal.SIGKILL)
    if not host.wait_gone(pids, 10.0):
        raise SandboxError(
            f"node {node.name}: processes {pids} did not exit after SIGKILL",
            hint="they are stuck in the kernel (D state); see /proc/PID/stack",
        )


def _teardown_dir(node_dir: Path) -> None:
    node_file = node_dir / NODE_FILE
    if node_file.is_file():
        with contextlib.suppress(SandboxError, OSError, ValueError, TypeError):
            stop(Node.from_json(json.loads(node_file.read_text())))
    host.remove_cgroups(host.node_cgroups(node_dir))
    host.unmount_all(node_dir)
    if host.mountpoints_under(node_dir):
        raise SandboxError(
            f"cannot unmount everything under {node_dir}",
            hint=f"see `findmnt -R {node_dir}`, unmount by hand, then run down again",
        )
    shutil.rmtree(node_dir, ignore_errors=True)


def down(name: str, *, state: Path | None = None, timeout: float = 30.0) -> Node:
    """Stop node NAME (its own processes, by PID), unmount and remove its copy; return it.

    Raises SandboxError when it is not registered or cannot be stopped or unmounted.
    """
    check_prerequisites()
    node = load(name, state=state)
    stop(node, timeout=timeout)
    _teardown_dir(Path(node.dir))
    return node


def down_all(*, state: Path | None = None, timeout: float = 30.0) -> list[Node]:
    """Stop every registered node; return them."""
    return [down(n.name, state=state, timeout=timeout) for n, _ in list_nodes(state=state)]
