"""ORCHESTRATION: the agent's safeguards, kept out of its watch loop (issues 13.3, 13.9, 14.2).

* :func:`attempt_allowed`, the bounded-disruption budget: at most ``max_attempts`` install
  attempts (each may restart containerd) for unchanged inputs, then the node is held;
* :func:`critical` and :func:`check_stop`: SIGTERM ends the agent at once, except inside a
  critical section (an engine run and the patch that records it), which it lets finish;
* :func:`finish`, what the agent does after SIGTERM: uninstall when the Node no longer opts in
  (the DaemonSet deletes the pod because the node stopped matching its opt-in affinity), or say
  in an Event that the node stays installed and unmanaged.

They work on the agent through :class:`AgentView`, the part of
:class:`~kwasm_py.cluster.agent.Agent` they use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

from kwasm_py.cluster import disruption, nodeview
from kwasm_py.cluster.agentlog import Logger
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.cluster.progress import Progress
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON


class AgentStopped(BaseException):
    """Raised (from the SIGTERM handler or after a critical section) to end the agent."""


class _Config(Protocol):
    @property
    def node_name(self) -> str: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def drift_interval(self) -> float: ...
    @property
    def stop_lease_wait(self) -> float: ...


class AgentView(Protocol):
    """What the safeguards read and set on the agent."""

    api: AgentApi
    log: Logger
    progress: Progress
    node: JSON
    installed: bool | None
    attempts: disruption.Attempts | None
    held: str | None
    store: disruption.AttemptStore
    held_retry: str
    next_retry: float | None
    next_drift: float | None
    stopping: bool
    critical_depth: int
    final_deadline: float | None
    inputs: Callable[[JSON], str]
    clock: Callable[[], float]  # monotonic: the agent's timers

    @property
    def cfg(self) -> _Config: ...

    def emit(self, reason: str, message: str, *, warning: bool = False) -> None: ...

    def unprovision(self, node: JSON) -> None: ...

    def engine_says_installed(self) -> bool: ...


@contextlib.contextmanager
def critical(agent: AgentView) -> Iterator[None]:
    """Takes the agent; a section SIGTERM must not cut short (an engine run and the patch that
    records it). Raises AgentStopped on leaving it when a stop was requested meanwhile (not
    while finishing after SIGTERM: :func:`finish` ends by itself)."""
    agent.critical_depth += 1
    try:
        yield
    finally:
        agent.critical_depth -= 1
    if agent.stopping and agent.critical_depth == 0 and agent.final_deadline is None:
        raise AgentStopped


def check_stop(agent: AgentView) -> None:
    """Takes the agent (while it waits for a restart Lease); raises AgentStopped when a stop was
    requested, or, while finishing after SIGTERM, once the finishing deadline passed."""
    if agent.final_deadline is not None:  # finishing: wait for a Lease until the deadline
        if agent.clock() > agent.final_deadline:
            raise AgentStopped
        return
    if agent.stopping:
        raise AgentStopped


def attempt_allowed(agent: AgentView, node: JSON, *, verb: str = "install") -> bool:
    """Takes the agent, its Node and the engine verb (install, or uninstall: a failing uninstall
    restarts containerd too); records one more attempt in the store *before* the attempt (an
    agent killed by its own restart still counts it) and returns True; or, when
    ``max_attempts`` were made for these inputs, holds the node (labels removed, phase failed
    at step ``budget`` and the condition False through
    :meth:`~kwasm_py.cluster.progress.Progress.failed`, one Warning ``ProvisionHeld`` /
    ``UnprovisionHeld``; the inputs are
    re-checked every drift interval, or on the next Node event for an uninstall) and returns
    False. Raises KubeError when a patch fails."""
    inputs = agent.inputs(node)
    if verb != "install":  # a separate budget: an opt-out after failed installs starts afresh
        inputs = disruption.fingerprint(options=[verb, inputs])
    # This process wrote every record since it started, so its own is authoritative; the store
    # holds what earlier pods of this agent attempted.
    record = agent.attempts if agent.attempts is not None else agent.store.load()
    limit = agent.cfg.max_attempts
    if record is not None and disruption.exhausted(record, inputs, limit=limit):
        agent.next_retry = agent.clock() + agent.cfg.drift_interval
        agent.next_drift = None
        if agent.held != inputs:
            reason = disruption.held_reason(limit=limit, verb=verb)
            agent.progress.failed(node, step="budget", reason=reason)
            agent.held = inputs
            agent.held_retry = disruption.retry_token(node)
            agent.emit("ProvisionHeld" if verb == "install" else "UnprovisionHeld", reason, warning=True)
            agent.log("held", level="warning", verb=verb, attempts=record.count, inputs=inputs[:12])
        return False
    agent.held = None
    attempt = disruption.next_attempt(record, inputs)
    agent.attempts = attempt
    _save(agent, attempt)
    agent.log("attempt", verb=verb, count=attempt.count, limit=limit, inputs=inputs[:12])
    return True


def no_restart(agent: AgentView, *, restarted: bool) -> None:
    """Takes the agent after an install that succeeded and whether it restarted containerd;
    gives the attempt back when it did not (a no-op re-run costs no disruption, so API trouble
    after a good install never spends the budget). Returns nothing."""
    rec = agent.attempts
    if rec is not None and not restarted:
        agent.attempts = disruption.Attempts(inputs=rec.inputs, count=max(0, rec.count - 1))
        _save(agent, agent.attempts)


def forget_attempts(agent: AgentView) -> None:
    """Takes the agent once the node is provisioned or cleaned up; forgets the attempt record
    (the next failure starts a fresh budget) and any hold. Returns nothing."""
    agent.attempts = None
    agent.held = None
    _save(agent, None)


def _save(agent: AgentView, record: disruption.Attempts | None) -> None:
    try:
        agent.store.save(record)
    except OSError as ex:  # still counted in memory; only a pod restart would forget it
        agent.log("attempts_unsaved", level="warning", error=ex.strerror or str(ex))


def retry_requested(agent: AgentView, node: JSON) -> bool:
    """Takes the agent and a Node event; returns whether the node is held and its retry
    annotation changed since (``kwasm-py annotate-node --retry``): then it is tried at once, not
    at the next periodic check."""
    return agent.held is not None and disruption.retry_token(node) != agent.held_retry


def finish(agent: AgentView) -> None:
    """Takes the agent after SIGTERM. When its Node no longer opts in, uninstalls now (waiting
    at most ``stop_lease_wait`` seconds for a restart Lease; the DaemonSet's grace period covers
    that plus a containerd restart) and removes the labels; when the Node still opts in and is
    installed, emits a Warning ``AgentStopped``. Returns nothing; API errors are logged."""
    agent.final_deadline = agent.clock() + agent.cfg.stop_lease_wait
    try:
        node = agent.api.get_node(agent.cfg.node_name)
        agent.node = node
        if nodeview.opted_in(node):
            if agent.installed or nodeview.provisioned(node):
                agent.emit(
                    "AgentStopped",
                    "agent stopping while the node is opted in: its runtimes stay installed"
                    " and unmanaged until an agent runs on it again",
                    warning=True,
                )
            return
        if agent.installed is None:
            agent.installed = agent.engine_says_installed()
        if agent.installed or nodeview.provisioned(node) or nodeview.status_of(node):
            agent.log("stop_uninstall")
            agent.unprovision(node)
    except AgentStopped:
        agent.log("stop_uninstall_abandoned", level="warning", reason="no restart Lease in time")
        agent.emit("UnprovisionAbandoned", "agent stopped before it could uninstall", warning=True)
    except KubeError as ex:
        if ex.status != 404:  # a deleted Node needs nothing
            agent.log("stop_api_error", level="warning", error=ex.message)
