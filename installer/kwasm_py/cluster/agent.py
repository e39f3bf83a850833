"""ORCHESTRATION: the resident node agent behind `kwasm-py agent` (the DaemonSet's entrypoint).

It watches its own Node and converges the node to the opt-in the Node carries:

* opted in (annotation or label ``kwasm.sh/kwasm-node=true``): run the node engine's install;
  only once the engine reports containerd verified the runtime, label the node
  ``kwasm.sh/kwasm-provisioned=true``, write the status annotation and an Event ``Provisioned``.
  A failure (including an engine answer outside the contract) removes the label, records the
  reason, emits a Warning ``ProvisionFailed`` and retries with backoff.
* not opted in: uninstall what the engine recorded, remove label and status, Event
  ``Unprovisioned``.
* provisioned: every ``drift_interval`` ask the engine for drift; repair and emit ``Repaired``.

Its parts: this watch loop; :mod:`~kwasm_py.cluster.leases` (installs and uninstalls may restart
containerd, so each holds one of N restart Leases); :mod:`~kwasm_py.cluster.engine_proc` (the
engine as a child process, through :mod:`kwasm_py.contract`, which keeps this resident process
small: it never imports the engine, grpc, tomlkit or the kubernetes client); and
:mod:`~kwasm_py.cluster.agentlog` (log lines and Events).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kwasm_py.cluster import disruption, nodeview, safeguards, untaint
from kwasm_py.cluster.agentlog import Logger, micro_time, node_event
from kwasm_py.cluster.engine_proc import Engine, EngineFailed
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.cluster.leases import RestartLeases
from kwasm_py.cluster.safeguards import AgentStopped
from kwasm_py.contract import EngineResult
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON, PROVISIONED_LABEL, STATUS_ANNOTATION


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter; ``scale=0`` turns waiting off (tests)."""

    initial: float = 2.0
    factor: float = 2.0
    maximum: float = 300.0
    scale: float = 1.0

    def delay(self, attempt: int) -> float:
        """Takes the attempt number (1 for the first retry); returns seconds to wait: initial *
        factor^(attempt-1), capped at maximum, times scale, with +-20% jitter."""
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return base * self.scale * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto


@dataclass(frozen=True)
class AgentConfig:
    """The agent's settings: its node, the Lease and Event namespaces, restart parallelism,
    Lease term, drift interval and watch timeout (seconds), and the retry backoff."""

    node_name: str
    namespace: str  # the installer namespace: restart Leases live here
    event_namespace: str = "default"
    max_parallel_restarts: int = 1
    lease_duration: int = 60
    drift_interval: float = 300.0
    watch_timeout: int = 300
    backoff: Backoff = Backoff()
    max_attempts: int = disruption.DEFAULT_MAX_ATTEMPTS  # install attempts per unchanged inputs
    stop_lease_wait: float = 60.0  # on SIGTERM, wait this long for a restart Lease to uninstall


class Agent:
    """One node's agent: watches the Node through ``api``, drives ``engine``, records on the Node.

    Takes the API port, the engine port, the settings and (for tests) the log, wall clock and
    sleep. ``run`` is the whole life; the other public methods are its steps.
    """

    def __init__(
        self,
        api: AgentApi,
        engine: Engine,
        config: AgentConfig,
        *,
        log: Logger | None = None,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        inputs: Callable[[JSON], str] | None = None,
        store: disruption.AttemptStore | None = None,
    ) -> None:
        self.api = api
        # The digest of what an install depends on (cluster/inputs.py); by default only the
        # Node's retry annotation, so a bump still re-arms the budget.
        self.inputs = inputs or (lambda n: disruption.fingerprint(retry=disruption.retry_token(n)))
        self.attempts: disruption.Attempts | None = None  # this process's last recorded attempt
        self.held: str | None = None  # the inputs digest the agent gave up on
        self.held_retry = ""  # the retry annotation when it gave up
        self.store = store or disruption.MemoryStore()
        self.engine = engine
        self.cfg = config
        self.log = log or Logger(node=config.node_name)
        self.wall_clock = wall_clock
        self.sleep = sleep
        self.identity = config.node_name
        # What this process knows about the node (None: not yet determined since start).
        self.provisioned_ok = False
        self.installed: bool | None = None
        self.failures = 0
        self.next_retry: float | None = None
        self.next_drift: float | None = None
        self.api_failures = 0
        self.stopping = False
        self.final_deadline: float | None = None  # set while finishing after SIGTERM
        self._critical = 0
        self.node: JSON = {}
        self.leases = RestartLeases(
            api,
            namespace=config.namespace,
            identity=self.identity,
            log=self.log,
            delay=config.backoff.delay,
            count=config.max_parallel_restarts,
            duration=config.lease_duration,
            wall_clock=wall_clock,
            sleep=sleep,
            check_stop=self._check_stop,
        )

    # -- stopping

    def request_stop(self) -> None:
        """SIGTERM: stop now, or as soon as the engine call in flight finished. Takes nothing;
        raises AgentStopped when no critical section runs."""
        self.stopping = True
        if self._critical == 0:
            raise AgentStopped

    def _check_stop(self) -> None:
        if self.final_deadline is not None:  # finishing: wait for a Lease until the deadline
            if time.monotonic() > self.final_deadline:
                raise AgentStopped
            return
        if self.stopping:
            raise AgentStopped

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section SIGTERM must not cut short (an engine run and the patch that records it).
        Raises AgentStopped on leaving it when a stop was requested meanwhile."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self.stopping and self._critical == 0 and self.final_deadline is None:
            raise AgentStopped

    # -- main loop

    def run(self) -> int:
        """Watch the node until stopped; returns the process exit code (0). API errors are
        logged and retried with backoff; nothing else is expected to escape."""
        name = self.cfg.node_name
        self.log("start", namespace=self.cfg.namespace, max_parallel=self.cfg.max_parallel_restarts)
        rv = ""
        try:
            while not self.stopping:
                try:
                    if not rv:
                        node = self.api.get_node(name)
                        rv = str(node["metadata"].get("resourceVersion", ""))
                        self.reconcile(node)
                    wait = self._until_timer()
                    if wait is not None and wait < 1.0:
                        self.sleep(max(0.0, wait))
                        self.tick()
                        continue
                    timeout = self.cfg.watch_timeout
                    if wait is not None:
                        timeout = max(1, min(timeout, math.ceil(wait)))
                    rv = self._watch(rv, timeout)
                    self.tick()
                    self.api_failures = 0
                except KubeError as ex:
                    if ex.status == 410:
                        self.log("relist", reason="watch resourceVersion too old (410)")
                        rv = ""
                        continue
                    self.api_failures += 1
                    delay = self.cfg.backoff.delay(self.api_failures)
                    self.log(
                        "api_error",
                        level="warning",
                        error=ex.message,
                        status=ex.status,
                        retry_in=f"{delay:.2f}s",
                    )
                    rv = ""
                    self.sleep(delay)
        except AgentStopped:
            pass
        safeguards.finish(self)
        self.log("stop")
        return 0

    def _watch(self, rv: str, timeout: int) -> str:
        started = time.monotonic()
        seen = 0
        for event in self.api.watch_node(self.cfg.node_name, resource_version=rv, timeout_seconds=timeout):
            obj = event.get("object") or {}
            new_rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
            rv = new_rv or rv
            seen += 1
            kind = event.get("type")
            if kind == "BOOKMARK":
                continue
            if kind == "DELETED":
                self.log("node_deleted", level="warning")
                continue
            self.reconcile(obj)
            if self._until_timer() is not None and (self._until_timer() or 0) <= 0:
                break
        if seen == 0 and time.monotonic() - started < 0.5 and timeout >= 1:
            # The stream ended at once without events: do not spin on a misbehaving server.
            self.api_failures += 1
            self.sleep(self.cfg.backoff.delay(self.api_failures))
        return rv

    def _until_timer(self) -> float | None:
        now = time.monotonic()
        timers = [t for t in (self.next_retry, self.next_drift) if t is not None]
        return min(timers) - now if timers else None

    def tick(self) -> None:
        """Run the timers that are due: a provisioning retry or a drift check. Raises KubeError
        when reading the Node fails (the watch loop retries)."""
        now = time.monotonic()
        if self.next_retry is not None and now >= self.next_retry:
            self.reconcile(self.api.get_node(self.cfg.node_name))
        if self.next_drift is not None and now >= self.next_drift:
            self.check_drift()

    # -- reconcile

    def reconcile(self, node: JSON) -> None:
        """Takes the Node object; installs or uninstalls to match its opt-in (unless already
        done or a retry is not yet due). Raises KubeError when recording on the Node fails."""
        self.node = node
        if nodeview.opted_in(node):
            if self.provisioned_ok and nodeview.provisioned(node):
                untaint.remove_startup_taint(self.api, self.cfg.node_name, node, log=self.log)
                return
            due = self.next_retry is None or time.monotonic() >= self.next_retry
            if not due and not safeguards.retry_requested(self, node):
                return
            self.provision(node)
        else:
            self.next_retry = None
            self.next_drift = None
            if self.installed is None:
                self.installed = self.engine_says_installed()
            if self.installed or nodeview.provisioned(node) or nodeview.status_of(node):
                self.unprovision(node)

    def engine_says_installed(self) -> bool:
        """Takes nothing; returns whether the engine's status says something is installed
        (True when the engine cannot tell: uninstall is idempotent)."""
        try:
            return self.engine.status().installed
        except EngineFailed as ex:
            self.log("status_failed", level="warning", step=ex.step, error=ex.error)
            return True  # unknown: uninstall is idempotent, so err on cleaning up

    def provision(self, node: JSON, *, repair: bool = False) -> None:
        """Takes the Node (and whether this repairs drift); installs, then labels the Node and
        records the runtimes, or records the failure and schedules a retry. Raises KubeError
        when the label patch fails (the watch loop retries, the engine run is idempotent)."""
        with self.critical():
            self.provisioned_ok = False
            if not safeguards.attempt_allowed(self, node):
                return
            try:
                result = self._install(repair=repair)
            except EngineFailed as ex:
                self._failed(node, "ProvisionFailed", ex)
                return
            safeguards.no_restart(self, restarted=result.restarted)
            now = micro_time(self.wall_clock())
            self.api.patch_node(
                self.cfg.node_name,
                {
                    "metadata": {
                        "labels": nodeview.label_patch(node, [r.handler for r in result.runtimes]),
                        "annotations": {
                            STATUS_ANNOTATION: nodeview.provisioned_status(result.runtimes, now=now)
                        },
                    }
                },
            )
            safeguards.forget_attempts(self)
            runtimes = ",".join(f"{r.handler}@{r.sha256[:12]}" for r in result.runtimes)
            reason = "Repaired" if repair else "Provisioned"
            self.emit(
                reason,
                f"runtimes {runtimes} verified by containerd"
                f" (changed={result.changed}, restarted={result.restarted})",
            )
            self.log(
                reason.lower(),
                runtimes=runtimes,
                changed=result.changed,
                restarted=result.restarted,
            )
            self.provisioned_ok = True
            self.failures = 0
            self.next_retry = None
            self.next_drift = time.monotonic() + self.cfg.drift_interval
            untaint.remove_startup_taint(self.api, self.cfg.node_name, node, log=self.log)

    def _install(self, *, repair: bool) -> EngineResult:
        with self.leases.slot():
            self.log("install_start", repair=repair or None)
            result = self.engine.install()
        self.installed = True
        if not result.verified:
            raise EngineFailed("verify", "containerd did not report the runtime")
        return result

    def _failed(self, node: JSON, reason: str, ex: EngineFailed) -> None:
        self.failures += 1
        delay = self.cfg.backoff.delay(self.failures)
        self.next_retry = time.monotonic() + delay
        self.next_drift = None
        now = micro_time(self.wall_clock())
        labels = nodeview.unlabel_patch(node)
        self.api.patch_node(
            self.cfg.node_name,
            {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        STATUS_ANNOTATION: nodeview.failed_status(step=ex.step, reason=ex.error, now=now)
                    },
                }
            },
        )
        self.emit(reason, f"{ex.step}: {ex.error}", warning=True)
        self.log(
            reason.lower() if reason != "ProvisionFailed" else "provision_failed",
            level="warning",
            step=ex.step,
            error=ex.error,
            retry_in=f"{delay:.2f}s",
        )

    def unprovision(self, node: JSON) -> None:
        """Takes the Node; uninstalls what the engine recorded and removes label and status, or
        records the failure and schedules a retry. Raises KubeError when the patch fails."""
        with self.critical():
            self.provisioned_ok = False
            if self.installed:
                if not safeguards.attempt_allowed(self, node, verb="uninstall"):
                    return
                try:
                    with self.leases.slot():
                        self.log("uninstall_start")
                        self.engine.uninstall()
                except EngineFailed as ex:
                    self._failed(node, "UnprovisionFailed", ex)
                    return
                self.installed = False
            self.api.patch_node(
                self.cfg.node_name,
                {
                    "metadata": {
                        "labels": {PROVISIONED_LABEL: None, **nodeview.unlabel_patch(node)},
                        "annotations": {STATUS_ANNOTATION: None},
                    }
                },
            )
            self.failures = 0
            self.next_retry = None
            safeguards.forget_attempts(self)
            self.emit("Unprovisioned", "kwasm runtimes removed from containerd")
            self.log("unprovisioned")

    def check_drift(self) -> None:
        """Asks the engine for drift; repairs (or reconciles an opt-out) when it reports any.
        Returns nothing; raises KubeError when reading or patching the Node fails."""
        self.next_drift = time.monotonic() + self.cfg.drift_interval
        try:
            status = self.engine.status()
        except EngineFailed as ex:
            self.log("status_failed", level="warning", step=ex.step, error=ex.error)
            return
        if status.installed and not status.drift:
            return
        self.log(
            "drift",
            level="warning",
            drift=";".join(status.drift) or "not installed",
            installed=status.installed,
        )
        node = self.api.get_node(self.cfg.node_name)
        if nodeview.opted_in(node):
            self.provision(node, repair=True)
        else:
            self.reconcile(node)

    # -- events

    def emit(self, reason: str, message: str, *, warning: bool = False) -> None:
        """Takes the reason, message and whether it is a Warning; creates a core/v1 Event on the
        Node. Best effort: a lost Event is logged, nothing is raised."""
        meta = self.node.get("metadata") or {}
        event = node_event(
            node_name=self.cfg.node_name,
            node_uid=str(meta.get("uid", self.cfg.node_name)),
            namespace=self.cfg.event_namespace,
            reason=reason,
            message=message,
            warning=warning,
            now=self.wall_clock(),
        )
        try:
            self.api.create_event(self.cfg.event_namespace, event)
        except KubeError as ex:
            self.log("event_lost", level="warning", reason=reason, error=ex.message)
