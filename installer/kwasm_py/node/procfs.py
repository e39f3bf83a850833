"""The one reader of /proc: node processes, their argv, their root, their PID namespace.

Everything the engine learns about running processes (the node's init, the running containerd
and the file it was started with, whether ``--pid`` belongs to the node at ``--host-root``, which
process to signal) goes through a ``ProcFS``. It reads a directory laid out like ``/proc``
(proc(5)); the real one by default, a small tree in tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kwasm_py.node.layout import DEFAULT_CONFIG


@dataclass(frozen=True)
class Proc:
    """One incarnation of a process: its pid and its start time (proc(5) stat field 22)."""

    pid: int
    start_ticks: int


def config_from_argv(argv: list[str]) -> PurePosixPath:
    """The config file containerd reads given its argv (`--config F`, `--config=F`, `-c F`).

    Takes the arguments after argv[0]; returns containerd's default `/etc/containerd/config.toml`
    when no flag names one (containerd's `defaults.DefaultConfigPath` on Linux).
    """
    path = str(DEFAULT_CONFIG)
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return PurePosixPath(path)


class ProcFS:
    """Processes as seen through a proc filesystem mounted at `root` (default `/proc`).

    Every method answers "absent" (None, empty, False) for a process that is gone or unreadable:
    processes come and go between two reads, so no method raises for that.
    """

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = Path(root)

    def _entry(self, pid: int, name: str) -> Path:
        return self.root / str(pid) / name

    def pids(self) -> list[int]:
        """Every pid listed in the proc root, ascending; [] when it cannot be listed."""
        try:
            return sorted(int(e) for e in os.listdir(self.root) if e.isdigit())
        except OSError:
            return []

    def comm(self, pid: int) -> str:
        """The process's name (`/proc/PID/comm`, stripped), "" when it is gone."""
        try:
            return self._entry(pid, "comm").read_text().strip()
        except OSError:
            return ""

    def mountinfo(self, pid: int) -> str:
        """The process's mount table (`/proc/PID/mountinfo`, see proc(5)), "" when it is gone."""
        try:
            return self._entry(pid, "mountinfo").read_text()
        except OSError:
            return ""

    def exe(self, pid: int) -> str | None:
        """The path `/proc/PID/exe` names (the binary the process runs), None when unreadable."""
        try:
            return os.readlink(self._entry(pid, "exe"))
        except OSError:
            return None

    def argv(self, pid: int) -> list[str] | None:
        """The process's argv (`/proc/PID/cmdline` split at NULs), None when it is gone."""
        try:
            raw = self._entry(pid, "cmdline").read_bytes()
        except OSError:
            return None
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]

    def stat_fields(self, pid: int) -> list[str] | None:
        """`/proc/PID/stat` fields after the `(comm)` field: [state, ppid, ...]; None when gone.

        Index i here is proc(5) field i + 3 (state is field 3, ppid 4, starttime 22 -> 19).
        """
        try:
            raw = self._entry(pid, "stat").read_text()
        except OSError:
            return None
        try:
            return raw[raw.rindex(")") + 2 :].split()
        except ValueError:
            return None

    def proc(self, pid: int) -> Proc | None:
        """The current incarnation of `pid`, None when it is gone."""
        fields = self.stat_fields(pid)
        if not fields or len(fields) < 20:
            return None
        return Proc(pid, int(fields[19]))

    def alive(self, proc: Proc) -> bool:
        """Whether this incarnation of the process still runs (same start time, not a zombie)."""
        fields = self.stat_fields(proc.pid)
        if fields is None or len(fields) < 20:
            return False
        return int(fields[19]) == proc.start_ticks and fields[0] != "Z"

    def pid_namespace(self, pid: int) -> str | None:
        """The `pid:[INODE]` link of `/proc/PID/ns/pid`, None when unreadable."""
        try:
            return os.readlink(self._entry(pid, "ns/pid"))
        except OSError:
            return None

    def root_path(self, pid: int) -> Path:
        """Where the process's / is reachable from here (`/proc/PID/root`)."""
        return self._entry(pid, "root")

    def sees_root(self, pid: int, root: Path) -> bool:
        """Whether process `pid` has `root` as its / (so it is a process of that node)."""
        try:
            theirs, ours = self.root_path(pid).stat(), Path(root).stat()
        except OSError:
            return False
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)

    def find(self, pid: int, name: str) -> list[Proc]:
        """Processes called `name` in the PID namespace of `pid` (the node's processes)."""
        namespace = self.pid_namespace(pid)
        found = []
        for entry in self.pids():
            if self.comm(entry) != name or self.pid_namespace(entry) != namespace:
                continue
            proc = self.proc(entry)
            if proc is not None:
                found.append(proc)
        return found

    def descendants(self, pid: int, name: str) -> list[Proc]:
        """Processes called `name` below `pid` in the process tree."""
        children: dict[int, list[int]] = {}
        for entry in self.pids():
            fields = self.stat_fields(entry)
            if fields and len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(entry)
        out, todo = [], list(children.get(pid, []))
        while todo:
            child = todo.pop()
            if self.comm(child) == name:
                proc = self.proc(child)
                if proc is not None:
                    out.append(proc)
            todo.extend(children.get(child, []))
        return out

    def containerd_configs(self, pid: int) -> tuple[PurePosixPath, ...]:
        """The config file of every containerd in the PID namespace of `pid` (node paths)."""
        configs = []
        for proc in self.find(pid, "containerd"):
            argv = self.argv(proc.pid)
            if argv is not None:
                configs.append(config_from_argv(argv[1:]))
        return tuple(configs)

    def socket_path(self, pid: int, socket: PurePosixPath) -> str:
        """Where the node's socket `socket` is reachable from here (`/proc/PID/root/<socket>`)."""
        return f"{self.root_path(pid)}{socket}"


HOST = ProcFS()  # this machine's /proc
