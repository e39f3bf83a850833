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

Flavours (what runs containerd on the node) are described in ``flavors``.

``down`` ends exactly the processes ``up`` started, by PID (checked against their start time),
unmounts the node's overlay and removes its copy.

Modules: ``roots`` (cached Debian roots), ``flavors`` (what runs containerd, shaping a root),
``nodes`` (up, down, list, run inside), ``host`` (commands, /proc, mounts on this machine).
The names callers use are re-exported here: ``from kwasm_py import sandbox; sandbox.up(...)``.
"""

from __future__ import annotations

from kwasm_py.sandbox.flavors import (
    DEFAULT_SOCKET,
    FLAVORS,
    K3S_CONFIG_DIR,
    K3S_SOCKET,
    Flavor,
    flavor,
    prepare_flavor,
)
from kwasm_py.sandbox.host import Log, proc_start_time
from kwasm_py.sandbox.nodes import (
    DEFAULT_STATE,
    NODE_FILE,
    Node,
    check_name,
    containerd_process,
    down,
    down_all,
    free_name,
    list_nodes,
    load,
    node_run,
    ready,
    scratch_state,
    state_dir,
    stop,
    up,
)
from kwasm_py.sandbox.roots import (
    DEFAULT_CACHE,
    PACKAGES,
    SUITES,
    cache_dir,
    check_prerequisites,
    check_suite,
    debian_mirror,
    ensure_root,
    locked,
    root_paths,
)

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_SOCKET",
    "DEFAULT_STATE",
    "FLAVORS",
    "K3S_CONFIG_DIR",
    "K3S_SOCKET",
    "NODE_FILE",
    "PACKAGES",
    "SUITES",
    "Flavor",
    "Log",
    "Node",
    "cache_dir",
    "check_name",
    "check_prerequisites",
    "check_suite",
    "containerd_process",
    "debian_mirror",
    "down",
    "down_all",
    "ensure_root",
    "flavor",
    "free_name",
    "list_nodes",
    "load",
    "locked",
    "node_run",
    "prepare_flavor",
    "proc_start_time",
    "ready",
    "root_paths",
    "scratch_state",
    "state_dir",
    "stop",
    "up",
]
