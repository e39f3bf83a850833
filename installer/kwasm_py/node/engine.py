"""The node engine: install, uninstall and inspect shims on one node, safely.

The one entry point the CLI, the tests and the benchmarks import (`engine.install(...)`); the
work is done in
- `context`: NodeOptions, Outcome, Report, the Node and `open_node` (layout, state file);
- `planning`: the shims' digests, the mode, the install plan and `plan_only` (`node plan`);
- `install`: install and its steps (the order of effects is in its docstring);
- `verify`: waiting for containerd to report the runtimes, and the rollback when it does not;
- `uninstall`: `plan_uninstall` and uninstall;
- `status`: what is installed and the drift from it.
"""

from __future__ import annotations

from kwasm_py.node.context import (
    KILL_ENV,
    P_SOCKET,
    Node,
    NodeOptions,
    Outcome,
    Report,
    fingerprint,
    open_node,
)
from kwasm_py.node.install import install
from kwasm_py.node.planning import choose_mode, make_plan, plan_only
from kwasm_py.node.status import status
from kwasm_py.node.uninstall import plan_uninstall, uninstall

__all__ = [
    "KILL_ENV",
    "P_SOCKET",
    "Node",
    "NodeOptions",
    "Outcome",
    "Report",
    "choose_mode",
    "fingerprint",
    "install",
    "make_plan",
    "open_node",
    "plan_only",
    "plan_uninstall",
    "status",
    "uninstall",
]
