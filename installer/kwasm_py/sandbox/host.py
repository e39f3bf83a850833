"""EFFECT: this machine's side of sandbox nodes: commands, /proc process facts, mounts.

Processes are named by (PID, start time) so a recycled PID is never signalled; the nspawn
processes this Python process started are kept in ``CHILDREN`` so they are waited for, not
leaked as zombies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kwasm_py.errors import SandboxError

Log = Callable[[str], None]
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def quiet(_: str) -> None:
    """Default progress sink: say nothing."""


def run(argv: Sequence[str], what: str, *, timeout: float = 900) -> str:
    """Run ARGV on this machine; return its stdout.

    Raises SandboxError (``what`` failed, with the last lines of its output) when it cannot
    start, times out or exits non-zero.
    """
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as ex:
        raise SandboxError(
            f"{what} failed: {ex}", hint="see `kwasm-py sandbox --help` for what it needs"
        ) from ex
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SandboxError(
            f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}",
            hint=f"run `{' '.join(argv)}` by hand to see its whole output",
        )
    return proc.stdout


def proc_start_time(pid: int) -> int | None:
    """Start time of PID (clock ticks after boot, /proc/PID/stat field 22), None when it is
    gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, start: int) -> bool:
    """Whether the process PID that started at START still runs."""
    return proc_start_time(pid) == start


def children(pid: int) -> list[int]:
    """The direct children of PID ([] when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def ns_pids(pid: int) -> list[int]:
    """PID's ids in each nested PID namespace, outermost first (``NSpid:``); [] when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def reap(pid: int) -> None:
    """Collect PID's exit status if it is our child, so it does not linger as a zombie."""
    proc = CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_pid(pid: int, start: int, sig: int) -> None:
    """Send SIG to PID only if it is still the process that started at START."""
    if alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: list[tuple[int, int]], timeout: float) -> bool:
    """Wait until none of the (PID, start) processes runs; False when TIMEOUT passed first."""
    deadline = time.monotonic() + timeout
    while True:
        for pid, _ in pids:
            reap(pid)
        if not any(alive(p, s) for p, s in pids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling process exit with a deadline


def mountpoints_under(path: Path) -> list[str]:
    """Mount points at or below PATH, deepest first."""
    prefix = str(path.resolve())
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if mp == prefix or mp.startswith(prefix + "/"):
            out.append(mp)
    return sorted(out, key=len, reverse=True)


def unmount_all(path: Path) -> None:
    """Unmount everything at or below PATH (lazily where a plain unmount is refused)."""
    for mp in mountpoints_under(path):
        proc = subprocess.run(["umount", mp], capture_output=True, check=False)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


def mount_overlay(lower: Path, node_dir: Path) -> Path:
    """Mount an overlay of LOWER (read-only) with NODE_DIR/upper; return the merged root."""
    upper, work, merged = node_dir / "upper", node_dir / "work", node_dir / "root"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], "overlay mount")
    return merged


CGROUP_FS = Path("/sys/fs/cgroup")


def node_cgroups(node_dir: Path, *, fs: Path = CGROUP_FS) -> list[Path]:
    """The cgroups of the sandbox node whose copy is NODE_DIR: one per hierarchy systemd tracks
    processes in (cgroup2: FS itself, or FS/unified on a hybrid host; v1 FS/systemd), under
    FS/.../kwasm-sandbox/, named after NODE_DIR; [] when FS has neither. Nothing is created.

    Every node needs its own: `systemd-nspawn --keep-unit` puts the node's systemd in
    `<nspawn's cgroup>/payload`, so nodes booted from one cgroup shared one tree, and one node's
    systemd removed `system.slice/containerd.service` (pruned as empty) while another node's
    containerd was being started into it: `status=219/CGROUP` (seen on a loaded machine).
    """
    digest = hashlib.sha256(str(node_dir.resolve()).encode()).hexdigest()[:8]
    key = f"{node_dir.name}-{digest}"
    mounts = [fs] if (fs / "cgroup.controllers").is_file() else [fs / "unified", fs / "systemd"]
    return [m / "kwasm-sandbox" / key for m in mounts if (m / "cgroup.procs").is_file()]


def in_cgroups(argv: Sequence[str], cgroups: Sequence[Path]) -> list[str]:
    """ARGV wrapped to run in CGROUPS, which are created here: `sh` moves itself into each
    (`cgroup.procs`) and then execs ARGV, so the PID Popen returns is ARGV's.

    Raises SandboxError when a cgroup cannot be created.
    """
    for cg in cgroups:
        try:
            cg.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SandboxError(
                f"cannot create cgroup {cg}: {err.strerror}", hint="sandbox nodes need root"
            ) from err
    script = (
        'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
    )
    return ["sh", "-c", script, "sh", str(len(cgroups)), *(str(c / "cgroup.procs") for c in cgroups), *argv]


def remove_cgroups(cgroups: Sequence[Path]) -> None:
    """Remove CGROUPS and every cgroup below them, deepest first, once their processes are gone
    (a cgroup that still has some stays: its removal is refused with EBUSY)."""
    for cg in cgroups:
        if not cg.is_dir():
            continue
        below = [p for p in cg.rglob("*") if p.is_dir() and not p.is_symlink()]
        for d in [*sorted(below, key=lambda p: len(p.parts), reverse=True), cg]:
            with contextlib.suppress(OSError):
                d.rmdir()
