"""Which containerd binary on the node root pre-flight runs: the running containerd's own,
else one that says the running version (see `choose_binary`).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import PurePosixPath

from kwasm_py.model import ContainerdVersion
from kwasm_py.node.hostfs import HostFS
from kwasm_py.node.procfs import HOST, ProcFS, config_from_argv

# Where distributions put containerd (k3s: its multi-call binary answers to this name).
CANDIDATES = (
    PurePosixPath("/usr/bin/containerd"),
    PurePosixPath("/usr/local/bin/containerd"),
    PurePosixPath("/bin/containerd"),
    PurePosixPath("/var/lib/rancher/rke2/bin/containerd"),
    PurePosixPath("/var/lib/rancher/k3s/data/current/bin/containerd"),
    PurePosixPath("/snap/microk8s/current/bin/containerd"),
)
TIMEOUT = 20.0  # s, for one chrooted containerd run (`--version`, `config dump`)

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_argv(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` (a chrooted containerd) capturing text output; raises TimeoutExpired after
    `TIMEOUT` s, OSError when it cannot start."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def running(fs: HostFS, pid: int, proc: ProcFS) -> list[tuple[PurePosixPath, PurePosixPath]]:
    """(--config, binary) of each containerd in the PID namespace of `pid` whose binary is on
    the node root: argv[0] when absolute (k3s's `.../bin/containerd` link to its multi-call
    binary), else the file /proc/PID/exe names."""
    out = []
    for found in proc.find(pid, "containerd"):
        args, exe = proc.argv(found.pid), proc.exe(found.pid)
        if args is None or exe is None:
            continue
        for candidate in (args[0] if args else "", exe):
            path = PurePosixPath(candidate)
            if path.is_absolute() and path.name.startswith("containerd"):
                host = fs.resolve(path)
                if host.is_file() and os.access(host, os.X_OK):
                    out.append((config_from_argv(args[1:]), path))
                    break
    return out


def choose_binary(
    fs: HostFS,
    *,
    pid: int | None,
    config: PurePosixPath,
    version: tuple[int, int, int] | None,
    runner: Runner | None = None,
    proc: ProcFS = HOST,
) -> tuple[PurePosixPath | None, str]:
    """The node's containerd binary to run pre-flight with, or (None, why not).

    The binary of the containerd running with `config` (processes in the PID namespace of
    `pid`); else, when the running containerd's `version` is known (from CRI), the first
    running binary or `CANDIDATES` entry whose `--version` says that version (asked through
    `runner`; None: `run_argv`); else the first candidate on the root.
    """
    found = running(fs, pid, proc) if pid is not None else []
    for cfg, path in found:
        if cfg == config:
            return path, ""
    candidates = list(dict.fromkeys([p for _c, p in found] + [c for c in CANDIDATES if _executable(fs, c)]))
    if not candidates:
        looked = ", ".join(str(p) for p in CANDIDATES[:3])
        return None, f"no containerd binary on the node root (looked in {looked}, ...)"
    if version is None:
        return candidates[0], ""
    wanted = ".".join(str(v) for v in version)
    for path in candidates:
        try:
            said = (runner or run_argv)(["chroot", str(fs.root), str(path), "--version"])
        except (OSError, subprocess.SubprocessError):
            continue
        if said.returncode == 0 and re.search(rf"[ v]{re.escape(wanted)}\b", said.stdout):
            return path, ""
    return None, f"no containerd binary on the node root says version {wanted}, which the node runs"


def _executable(fs: HostFS, path: PurePosixPath) -> bool:
    host = fs.resolve(path)
    return host.is_file() and os.access(host, os.X_OK)


def for_version(
    fs: HostFS, *, pid: int | None, config: PurePosixPath, containerd: ContainerdVersion | None, proc: ProcFS
) -> tuple[PurePosixPath | None, str]:
    """`choose_binary` for the running containerd's version as CRI reported it (or unknown)."""
    version = (containerd.major, containerd.minor, containerd.patch) if containerd else None
    return choose_binary(fs, pid=pid, config=config, version=version, proc=proc)
