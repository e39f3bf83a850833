"""The kubelet's confirmation before the label: a verified install waits (bounded) until the
Node's ``status.runtimeHandlers`` lists each installed handler, where the Node reports the field.

No I/O: :class:`KubeletGate` decides from Node objects the agent hands it and from its clock;
the agent labels, records phase verifying, or fails at step ``kubelet``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kwasm_py.cluster import nodeview
from kwasm_py.contract import EngineResult
from kwasm_py.model import JSON

#: Seconds the agent waits for the kubelet by default (``--kubelet-timeout``). The kubelet
#: refreshes the runtime's status every 5 s (``updateRuntimeUp``) and posts a changed node
#: status within ``nodeStatusUpdateFrequency`` (10 s by default, KubeletConfiguration); 120 s
#: leaves room for a slow kubelet and API server.
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class AwaitKubelet:
    """A verified install waiting for the kubelet to list its handlers (until ``deadline``,
    on the agent's monotonic clock)."""

    result: EngineResult
    repair: bool
    deadline: float

    @property
    def handlers(self) -> list[str]:
        """The handlers the install added."""
        return [r.handler for r in self.result.runtimes]


def confirmed_by(node: JSON, handlers: list[str]) -> nodeview.Check | None:
    """Takes a Node and the handlers installed; returns ``"cri"`` when the Node reports no
    runtime handlers (containerd's word decides), ``"kubelet"`` when it lists all of them, None
    when the kubelet does not list them yet."""
    missing = nodeview.kubelet_missing(node, handlers)
    if missing is None:
        return "cri"
    return None if missing else "kubelet"


@dataclass
class KubeletGate:
    """Holds at most one install waiting for the kubelet; ``timeout`` seconds on ``clock``."""

    timeout: float
    clock: Callable[[], float]
    waiting: AwaitKubelet | None = None

    @property
    def deadline(self) -> float | None:
        """When the wait in progress ends (None: nothing waits)."""
        return self.waiting.deadline if self.waiting is not None else None

    def start(self, node: JSON, result: EngineResult, *, repair: bool) -> nodeview.Check | None:
        """Takes the Node and a verified install; returns the check that confirms it now, or
        None after starting to wait for the kubelet."""
        check = confirmed_by(node, [r.handler for r in result.runtimes])
        if check is None:
            self.waiting = AwaitKubelet(result, repair, self.clock() + self.timeout)
        return check

    def update(self, node: JSON) -> tuple[AwaitKubelet, nodeview.Check] | None:
        """Takes a newer Node; returns the waiting install and its check once the kubelet lists
        every handler (the wait ends), None while it does not."""
        waiting = self.waiting
        check = confirmed_by(node, waiting.handlers) if waiting is not None else None
        if waiting is None or check is None:
            return None
        self.waiting = None
        return waiting, check

    def due(self) -> bool:
        """Whether the wait in progress has run out of time."""
        return self.waiting is not None and self.clock() >= self.waiting.deadline

    def cancel(self) -> AwaitKubelet | None:
        """Takes nothing; ends the wait; returns what waited (None: nothing)."""
        waiting, self.waiting = self.waiting, None
        return waiting

    def failure(self, node: JSON, waiting: AwaitKubelet) -> str:
        """Takes the Node at the deadline and what waited; returns the one-line reason."""
        missing = nodeview.kubelet_missing(node, waiting.handlers) or waiting.handlers
        reported = ",".join(h or "(default)" for h in nodeview.runtime_handlers(node) or []) or "none"
        return (
            f"the kubelet does not report runtime handler {','.join(missing)} in status.runtimeHandlers"
            f" after {self.timeout:g}s (it reports {reported})"
        )
