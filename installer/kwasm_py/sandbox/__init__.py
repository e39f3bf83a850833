"""Throwaway real nodes on this machine: systemd (or a k3d-like init) + containerd under nspawn.

A sandbox node is a Debian root built once with ``debootstrap`` (cached as a tarball and an
unpacked copy under ``$KWASM_CACHE/roots``), given to each node as an overlayfs (the cached root
is the read-only lower layer, each node writes its own upper layer) and booted with
``systemd-nspawn``. Seen from this machine:

- ``Node.root`` is where the node's ``/`` is: what a DaemonSet pod sees at its hostPath mount
  of ``/``; pass it as ``kwasm-py node ... --host-root``.
- ``Node.pid`` is the node's PID 1 (the child of ``systemd-nspawn``): what PID 1 is to a
  ``hostPID`` pod; pass it as ``--pid``. Commands run inside the node through
  ``nsenter --target PID --mount --uts --ipc --net --pid``.
- The node's containerd socket lives in the node's own ``/run`` tmpfs, reachable from here as
  ``/proc/PID/root/<socket>``. This machine's own containerd is never involved.

Flavours (what runs containerd on the node):

- ``containerd``: the Debian ``containerd.service`` (bookworm: containerd 1.6, sid: 2.x).
- ``k3s`` / ``k3s-agent``: a ``k3s.service`` / ``k3s-agent.service`` running a *stand-in* for
  k3s (``data/sandbox-k3s-standin.sh``): it renders containerd's config from
  ``config.toml.tmpl`` / ``config-v3.toml.tmpl`` the way k3s does (``{{ template "base" . }}``
  and the other actions k3s's templates use, with the stand-in's values; a spin shim on its PATH
  adds a ``spin`` runtime, as k3s does) and runs containerd with k3s's paths. It is not k3s.
- ``k3d``: no systemd. PID 1 is a small init (``data/sandbox-k3d-init.sh``) that runs the same
  k3s stand-in and starts it again when it exits: restart with ``signal:containerd``.

``down`` ends exactly the processes ``up`` started, by PID (checked against their start time),
unmounts the node's overlay and removes its copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

from kwasm_py.errors import SandboxError, UsageError
from kwasm_py.node import restart

SUITES = ("bookworm", "sid")
FLAVORS = ("containerd", "k3s", "k3s-agent", "k3d")
PACKAGES = ("systemd", "systemd-sysv", "dbus", "containerd", "runc")
DEFAULT_CACHE = Path("/var/cache/kwasm-py")
DEFAULT_STATE = Path("/var/lib/kwasm-py/sandboxes")
NODE_FILE = "node.json"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
_MIRROR_RE = re.compile(r"(https?://\S+/debian)/?(?:\s|$)")
K3S_CONFIG_DIR = "/var/lib/rancher/k3s/agent/etc/containerd"
K3S_SOCKET = "/run/k3s/containerd/containerd.sock"
DEFAULT_SOCKET = "/run/containerd/containerd.sock"

Log = Callable[[str], None]
T = TypeVar("T")
# nspawn processes this Python process started: kept so they are waited for, not leaked.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _quiet(_: str) -> None:
    """Default progress sink: say nothing."""


@dataclass(frozen=True)
class Flavor:
    """How a node flavour runs containerd."""

    name: str
    unit: str | None  # systemd unit that owns containerd; None: no systemd (k3d-like)
    socket: str  # containerd's socket (node path)
    config: str  # the config file containerd reads (node path)
    restart: str  # the --restart value that fits this node

    @property
    def boots_systemd(self) -> bool:
        return self.unit is not None


_FLAVORS = {
    "containerd": Flavor(
        "containerd",
        "containerd.service",
        DEFAULT_SOCKET,
        "/etc/containerd/config.toml",
        "systemd:containerd",
    ),
    "k3s": Flavor("k3s", "k3s.service", K3S_SOCKET, f"{K3S_CONFIG_DIR}/config.toml", "systemd:k3s"),
    "k3s-agent": Flavor(
        "k3s-agent",
        "k3s-agent.service",
        K3S_SOCKET,
        f"{K3S_CONFIG_DIR}/config.toml",
        "systemd:k3s-agent",
    ),
    "k3d": Flavor("k3d", None, K3S_SOCKET, f"{K3S_CONFIG_DIR}/config.toml", "signal:containerd"),
}


def flavor(name: str) -> Flavor:
    """The flavour called NAME, or a usage error listing the known ones."""
    try:
        return _FLAVORS[name]
    except KeyError:
        raise UsageError(f"unknown sandbox flavour {name!r}", hint=f"one of: {', '.join(FLAVORS)}") from None


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
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Node:
        return cls(**data)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Locations and prerequisites


def cache_dir() -> Path:
    """Where node roots are cached: $KWASM_CACHE, default /var/cache/kwasm-py."""
    return Path(os.environ.get("KWASM_CACHE") or DEFAULT_CACHE)


def state_dir() -> Path:
    """Where booted nodes live: $KWASM_SANDBOXES, default /var/lib/kwasm-py/sandboxes."""
    return Path(os.environ.get("KWASM_SANDBOXES") or DEFAULT_STATE)


def check_prerequisites(*, build: bool = False) -> None:
    """Raise SandboxError unless we are root and the tools nodes need are installed."""
    if os.geteuid() != 0:
        raise SandboxError(
            "sandbox nodes need root (overlay mounts, systemd-nspawn, nsenter)",
            hint="run it again as root, e.g. with sudo",
        )
    tools = ["systemd-nspawn", "nsenter", "mount", "umount"] + (["debootstrap"] if build else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SandboxError(
            f"missing tools for sandbox nodes: {', '.join(missing)}",
            hint="apt-get install debootstrap systemd-container util-linux",
        )


def check_suite(suite: str) -> None:
    """Raise a usage error unless SUITE is one we know how to build."""
    if suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}", hint=f"one of: {', '.join(SUITES)}")


def check_name(name: str) -> None:
    """Raise a usage error unless NAME is a usable machine name."""
    if not _NAME_RE.match(name):
        raise UsageError(
            f"bad sandbox name {name!r}",
            hint="use lower-case letters, digits and '-', at most 40 characters",
        )


def debian_mirror() -> str:
    """The Debian mirror this machine's apt sources use ($KWASM_DEBIAN_MIRROR overrides)."""
    env = os.environ.get("KWASM_DEBIAN_MIRROR")
    if env:
        return env
    files: list[Path] = []
    for src in _SOURCES:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            if line.lstrip().startswith("#"):
                continue
            m = _MIRROR_RE.search(line)
            if m:
                return m.group(1)
    raise SandboxError(
        "no Debian mirror found in this machine's apt sources",
        hint="set KWASM_DEBIAN_MIRROR to the mirror's URL (ending in /debian)",
    )


# ---------------------------------------------------------------------------------------------
# Cached roots


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on PATH (created) for the block: one build at a time per cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def root_paths(suite: str, cache: Path | None = None) -> tuple[Path, Path]:
    """(tarball, unpacked lower dir) of SUITE's cached node root."""
    roots = (cache or cache_dir()) / "roots"
    return roots / f"{suite}.tar", roots / suite


def ensure_root(suite: str, *, cache: Path | None = None, log: Log = _quiet) -> Path:
    """Return SUITE's unpacked node root, building it (debootstrap, ~1 min) when absent.

    The tarball is the cached artefact; the unpacked copy (the overlay lower layer) is made
    from it. Both appear by rename only once complete, so an interrupted build is redone.
    """
    check_suite(suite)
    tar, lower = root_paths(suite, cache)
    if lower.is_dir():
        return lower
    check_prerequisites(build=not tar.is_file())
    with locked(tar.with_suffix(".lock")):
        if lower.is_dir():
            return lower
        if not tar.is_file():
            _debootstrap(suite, tar, log)
        log(f"unpacking {tar}")
        tmp = lower.with_name(f"{suite}.unpack")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _run(["tar", "-C", str(tmp), "-xf", str(tar), "--numeric-owner", "--xattrs"], "unpack")
        tmp.rename(lower)
    return lower


def _debootstrap(suite: str, tar: Path, log: Log) -> None:
    mirror = debian_mirror()
    build = tar.with_name(f"{suite}.build")
    shutil.rmtree(build, ignore_errors=True)
    log(f"building the {suite} node root with debootstrap (about a minute)")
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        suite,
        str(build),
        mirror,
    ]
    _run(argv, f"debootstrap {suite}")
    # The downloaded packages are not needed on a node: keep the root small.
    archives = build / "var/cache/apt/archives"
    for deb in archives.glob("*.deb"):
        deb.unlink()
    tmp = tar.with_name(f"{suite}.tar.tmp")
    _run(["tar", "-C", str(build), "-cf", str(tmp), "--numeric-owner", "--xattrs", "."], "tar")
    tmp.rename(tar)
    shutil.rmtree(build, ignore_errors=True)
    log(f"cached {tar} ({tar.stat().st_size // 2**20} MiB)")


def _run(argv: Sequence[str], what: str, *, timeout: float = 900) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as ex:
        raise SandboxError(f"{what} failed: {ex}") from ex
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SandboxError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# Processes


def proc_start_time(pid: int) -> int | None:
    """Start time of PID (clock ticks after boot), None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(pid: int, start: int) -> bool:
    return proc_start_time(pid) == start


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _ns_pid(pid: int) -> list[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def node_run(
    node: Node, *argv: str, timeout: float = 30, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ARGV inside NODE and return the finished process (text output)."""
    proc = subprocess.run(
        restart.in_node(node.pid, argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise SandboxError(
            f"{' '.join(argv)} on node {node.name} failed (exit {proc.returncode}): {proc.stderr.strip()}"
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
        start = proc_start_time(int(entry.name))
        if start is not None:
            return int(entry.name), start
    return None


# ---------------------------------------------------------------------------------------------
# Up / down / list


def _data(name: str) -> bytes:
    return (resources.files("kwasm_py.sandbox") / "data" / name).read_bytes()


_K3S_UNIT = """\
# kwasm-py sandbox: a k3s-shaped node. ExecStart is a STAND-IN for k3s (see the script's
# header): it renders containerd's config from the k3s templates and runs containerd. Not k3s.
[Unit]
Description=k3s stand-in ({mode}): renders containerd's config like k3s and runs containerd
After=network.target

[Service]
Type=notify
ExecStart=/usr/local/bin/k3s {mode}
KillMode=process
Delegate=yes
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def prepare_flavor(root: Path, name: str, fl: Flavor) -> None:
    """Shape the node root ROOT (before boot) for flavour FL."""
    _write(root / "etc/hostname", f"{name}\n".encode())
    if fl.name == "containerd":
        return
    # k3s-shaped: containerd is k3s's business; no containerd.service, no /etc/containerd.
    for p in (
        root / "etc/systemd/system/multi-user.target.wants/containerd.service",
        root / "lib/systemd/system/containerd.service",
        root / "usr/lib/systemd/system/containerd.service",
    ):
        if p.is_symlink() or p.exists():
            p.unlink()
    shutil.rmtree(root / "etc/containerd", ignore_errors=True)
    share = root / "usr/local/share/kwasm-sandbox"
    _write(root / "usr/local/bin/k3s", _data("sandbox-k3s-standin.sh"), 0o755)
    _write(share / "k3s-base-v2.toml", _data("sandbox-k3s-base-v2.toml"))
    _write(share / "k3s-base-v3.toml", _data("sandbox-k3s-base-v3.toml"))
    _write(share / "k3s-render.awk", _data("sandbox-k3s-render.awk"))
    (root / K3S_CONFIG_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if fl.unit is None:
        _write(root / "usr/local/sbin/k3d-init", _data("sandbox-k3d-init.sh"), 0o755)
        return
    mode = "agent" if fl.name == "k3s-agent" else "server"
    unit = root / "etc/systemd/system" / fl.unit
    _write(unit, _K3S_UNIT.format(mode=mode).encode())
    wants = root / "etc/systemd/system/multi-user.target.wants" / fl.unit
    wants.parent.mkdir(parents=True, exist_ok=True)
    wants.symlink_to(f"/etc/systemd/system/{fl.unit}")


def _mountpoints_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if mp == prefix or mp.startswith(prefix + "/"):
            out.append(mp)
    return sorted(out, key=len, reverse=True)


def _unmount_all(path: Path) -> None:
    for mp in _mountpoints_under(path):
        proc = subprocess.run(["umount", mp], capture_output=True, check=False)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


def _mount_overlay(lower: Path, node_dir: Path) -> Path:
    upper, work, merged = node_dir / "upper", node_dir / "work", node_dir / "root"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], "overlay mount")
    return merged


def load(name: str, *, state: Path | None = None) -> Node:
    """The registered node NAME, or SandboxError."""
    path = (state or state_dir()) / name / NODE_FILE
    try:
        return Node.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise SandboxError(f"no sandbox node called {name!r}", hint="see `kwasm-py sandbox list`") from None
    except (OSError, ValueError, TypeError) as ex:
        raise SandboxError(f"cannot read {path}: {ex}") from ex


def list_nodes(*, state: Path | None = None) -> list[tuple[Node, bool]]:
    """Every registered node and whether its processes still run."""
    base = state or state_dir()
    out = []
    if base.is_dir():
        for d in sorted(base.iterdir()):
            if (d / NODE_FILE).is_file():
                node = load(d.name, state=base)
                out.append((node, _alive(node.nspawn_pid, node.nspawn_start)))
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


def up(
    *,
    suite: str = "bookworm",
    flavor_name: str = "containerd",
    name: str | None = None,
    cache: Path | None = None,
    state: Path | None = None,
    timeout: float = 90.0,
    log: Log = _quiet,
    prepare: Callable[[Path], None] | None = None,
) -> Node:
    """Build (once) and boot a node; return it once its containerd answers on its socket.

    PREPARE, when given, is called with the node's root before boot (tests use it to shape a
    node: leftover files, unit drop-ins).
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
    except FileExistsError:
        raise SandboxError(
            f"a sandbox node called {name!r} exists already",
            hint=f"stop it with `kwasm-py sandbox down {name}` or pick another --name",
        ) from None
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
    root = _mount_overlay(lower, node_dir)
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
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    nspawn_start = proc_start_time(proc.pid) or 0
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
    node = Node.from_json({**partial, "pid": pid, "pid_start": proc_start_time(pid) or 0})
    _save(node_dir, node)
    _wait_for(lambda: ready(node) or None, deadline, proc, node_dir, "containerd")
    return node


def _save(node_dir: Path, node: Node) -> None:
    tmp = node_dir / f".{NODE_FILE}.tmp"
    tmp.write_text(json.dumps(node.to_json(), indent=2) + "\n")
    tmp.rename(node_dir / NODE_FILE)


def _node_pid1(nspawn_pid: int) -> int | None:
    for child in _children(nspawn_pid):
        ns = _ns_pid(child)
        if len(ns) > 1 and ns[-1] == 1:
            return child
    return None


def ready(node: Node) -> bool:
    """True when NODE's containerd (and its unit, under systemd) is up and answers."""
    if node.unit is not None:
        state = node_run(node, "systemctl", "is-active", node.unit, timeout=10).stdout.strip()
        if state != "active":
            return False
    return node_run(node, "ctr", "--address", node.socket, "version", timeout=10).returncode == 0


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


def _stop_pid(pid: int, start: int, sig: int) -> None:
    if _alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: list[tuple[int, int]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        for pid, _ in pids:
            _reap(pid)
        if not any(_alive(p, s) for p, s in pids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling process exit with a deadline


def stop(node: Node, *, timeout: float = 30.0) -> None:
    """End NODE's processes (nspawn, then its PID 1 if left), by PID; wait until gone."""
    pids = [(node.nspawn_pid, node.nspawn_start)]
    if node.pid:
        pids.append((node.pid, node.pid_start))
    # SIGTERM asks nspawn for an orderly shutdown of the node (SIGRTMIN+3 to systemd).
    _stop_pid(node.nspawn_pid, node.nspawn_start, signal.SIGTERM)
    if _wait_gone(pids, timeout):
        return
    for pid, start in reversed(pids):
        _stop_pid(pid, start, signal.SIGKILL)
    if not _wait_gone(pids, 10.0):
        raise SandboxError(f"node {node.name}: processes {pids} did not exit after SIGKILL")


def _teardown_dir(node_dir: Path) -> None:
    node_file = node_dir / NODE_FILE
    if node_file.is_file():
        with contextlib.suppress(SandboxError, OSError, ValueError, TypeError):
            stop(Node.from_json(json.loads(node_file.read_text())))
    _unmount_all(node_dir)
    if _mountpoints_under(node_dir):
        raise SandboxError(f"cannot unmount everything under {node_dir}")
    shutil.rmtree(node_dir, ignore_errors=True)


def down(name: str, *, state: Path | None = None, timeout: float = 30.0) -> Node:
    """Stop node NAME (its own processes, by PID), unmount and remove its copy."""
    check_prerequisites()
    node = load(name, state=state)
    stop(node, timeout=timeout)
    _teardown_dir(Path(node.dir))
    return node


def down_all(*, state: Path | None = None, timeout: float = 30.0) -> list[Node]:
    """Stop every registered node."""
    return [down(n.name, state=state, timeout=timeout) for n, _ in list_nodes(state=state)]


def scratch_state(prefix: str = "kwasm-nodes-") -> Path:
    """A fresh registry folder for nodes that must not mix with the user's (tests, benches)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
