"""ORCHESTRATION: the resident node agent behind `kwasm-py agent` (the DaemonSet's entrypoint).

It watches its own Node and converges the node to the opt-in the Node carries:

* opted in (annotation or label ``kwasm.sh/kwasm-node=true``): run the node engine's install
  (at most ``max_attempts`` attempts for unchanged inputs, then held:
  :mod:`~kwasm_py.cluster.safeguards`); only once the engine reports containerd verified the
  runtime and, where the Node reports ``status.runtimeHandlers``, the kubelet lists it too
  (waiting at most ``kubelet_timeout``), label the node ``kwasm.sh/kwasm-provisioned=true`` and
  ``kwasm.sh/runtime-<handler>=true``, write the status annotation, the ``KwasmProvisioned``
  condition and an Event ``Provisioned``, and remove the startup taint. Phases, labels,
  condition and taint are written by :mod:`~kwasm_py.cluster.progress`. A failure (including
  an engine answer outside the contract) removes the labels, records the step and reason,
  emits a Warning ``ProvisionFailed`` and retries with backoff.
* not opted in: uninstall what the engine recorded, remove labels and status, Event
  ``Unprovisioned``; on SIGTERM after an opt-out, uninstall before exiting.
* provisioned: every ``drift_interval`` ask the engine for drift; repair and emit ``Repaired``.

Its parts: this loop of timers and Node objects, the watch itself in a thread of its own
(:mod:`~kwasm_py.cluster.nodewatch`), so retries, drift checks and the kubelet deadline fire
when due; :mod:`~kwasm_py.cluster.leases` (each install or uninstall holds one of N restart
Leases); :mod:`~kwasm_py.cluster.engine_proc` (the engine as a child process, through
:mod:`kwasm_py.contract`: this resident process never imports the engine, grpc, tomlkit or the
kubernetes client); :mod:`~kwasm_py.cluster.agentlog` (log lines and Events).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kwasm_py.cluster import disruption, kubelet, nodeview, safeguards
from kwasm_py.cluster.agentlog import Logger, node_event, send_event
from kwasm_py.cluster.disruption import Backoff
from kwasm_py.cluster.engine_proc import Engine, EngineFailed
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.cluster.kubelet import KubeletGate
from kwasm_py.cluster.leases import RestartLeases
from kwasm_py.cluster.nodewatch import NodeWatch
from kwasm_py.cluster.progress import Progress
from kwasm_py.cluster.safeguards import AgentStopped
from kwasm_py.contract import EngineResult
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON


@dataclass(frozen=True)
class AgentConfig:
    """The agent's settings: its node, the Lease and Event namespaces, restart parallelism,
    Lease term, drift interval and watch timeout (seconds), the retry backoff, how long to
    wait for the kubelet to list a new handler (:mod:`~kwasm_py.cluster.kubelet`), and the
    shim versions (handler -> version) to record."""

    node_name: str
    namespace: str  # the installer namespace: restart Leases live here
    event_namespace: str = "default"
    max_parallel_restarts: int = 1
    lease_duration: int = 60
    drift_interval: float = 300.0
    watch_timeout: int = 300
    backoff: Backoff = field(default_factory=Backoff)
    kubelet_timeout: float = kubelet.DEFAULT_TIMEOUT
    shim_versions: Mapping[str, str] = field(default_factory=dict)
    max_attempts: int = disruption.DEFAULT_MAX_ATTEMPTS  # install attempts per unchanged inputs
    stop_lease_wait: float = 60.0  # on SIGTERM, wait this long for a restart Lease to uninstall


class Agent:
    """One node's agent: watches the Node through ``api``, drives ``engine``, records on the Node.

    Takes the API port, the engine port, the settings and (for tests) the log, wall clock,
    sleep and the monotonic clock timers run on. ``run`` is the whole life; the other public
    methods are its steps.
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
        clock: Callable[[], float] = time.monotonic,
        inputs: Callable[[JSON], str] | None = None,
        store: disruption.AttemptStore | None = None,
    ) -> None:
        self.api = api
        self.inputs = inputs or disruption.retry_inputs  # what an install depends on (cluster/inputs.py)
        self.attempts: disruption.Attempts | None = None  # this process's last recorded attempt
        self.held: str | None = None  # the inputs digest the agent gave up on
        self.held_retry = ""  # the retry annotation when it gave up
        self.store = store or disruption.MemoryStore()
        self.engine = engine
        self.cfg = config
        self.log = log or Logger(node=config.node_name)
        self.wall_clock = wall_clock
        self.sleep = sleep
        self.clock = clock
        self.identity = config.node_name
        # What this process knows about the node (None: not yet determined since start).
        self.provisioned_ok = False
        self.installed: bool | None = None
        self.failures = 0
        self.next_retry: float | None = None
        self.next_drift: float | None = None
        self.kubelet = KubeletGate(config.kubelet_timeout, clock)
        self.api_failures = 0
        self.stopping = False
        self._watch: NodeWatch | None = None  # the running loop's Node watch (`request_stop` wakes it)
        self.final_deadline: float | None = None  # set while finishing after SIGTERM
        self.critical_depth = 0  # critical sections running (SIGTERM waits for them)
        self.node: JSON = {}
        self.progress = Progress(
            api, config.node_name, self.log, versions=config.shim_versions, wall_clock=wall_clock
        )
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
            check_stop=lambda: safeguards.check_stop(self),
            on_wait=lambda: self.progress.try_phase("waiting"),  # every slot held by others
            watch_timeout=config.watch_timeout,
        )

    # -- stopping

    def request_stop(self) -> None:
        """SIGTERM: stop now, or as soon as the engine call in flight finished. Takes nothing;
        raises AgentStopped when no critical section runs."""
        self.stopping = True
        if self._watch is not None:
            self._watch.wake()  # a loop waiting for the next Node event sees the stop now
        self.leases.wake()  # so does a wait for a restart slot
        if self.critical_depth == 0:
            raise AgentStopped

    def critical(self) -> contextlib.AbstractContextManager[None]:
        """A section SIGTERM must not cut short (:func:`~kwasm_py.cluster.safeguards.critical`)."""
        return safeguards.critical(self)

    # -- main loop

    def run(self) -> int:
        """Watch the node until stopped; returns the process exit code (0). API errors are
        logged and retried with backoff (a retry timer); nothing else is expected to escape."""
        self.log("start", namespace=self.cfg.namespace, max_parallel=self.cfg.max_parallel_restarts)
        watch = NodeWatch(
            self.api,
            self.cfg.node_name,
            timeout_seconds=self.cfg.watch_timeout,
            log=self.log,
            delay=self.cfg.backoff.delay,
        )
        self._watch = watch
        watch.start()
        try:
            while not self.stopping:
                node = watch.next(self._until_timer())
                try:
                    if node is not None:
                        self.reconcile(node)
                    self.tick()
                    self.api_failures = 0
                except KubeError as ex:
                    self._api_failed(ex)
        except AgentStopped:
            pass
        finally:
            watch.stop()
        safeguards.finish(self)
        self.log("stop")
        return 0

    def _api_failed(self, ex: KubeError) -> None:
        """A request of a reconcile or timer failed: retry the whole step when the backoff is due."""
        self.api_failures += 1
        delay = self.cfg.backoff.delay(self.api_failures)
        self.log("api_error", level="warning", error=ex.message, status=ex.status, retry_in=f"{delay:.2f}s")
        self.next_retry = self.clock() + delay

    def _until_timer(self) -> float | None:
        """Seconds until the next timer is due (0 when overdue), None when none is set. A retry
        after an API error comes before the kubelet deadline (whose handling reads the Node)."""
        first = self.next_retry if self.next_retry is not None else self.kubelet.deadline
        timers = [t for t in (first, self.next_drift) if t is not None]
        return max(0.0, min(timers) - self.clock()) if timers else None

    def tick(self) -> None:
        """Run the timers that are due: a retry, the kubelet deadline or a drift check. Raises
        KubeError when reading or patching the Node fails (the loop retries)."""
        now = self.clock()
        if self.next_retry is not None and now >= self.next_retry:
            self.next_retry = None
            self.reconcile(self.api.get_node(self.cfg.node_name))
        if self.next_retry is None and self.kubelet.due():
            self._kubelet_timed_out()
        if self.next_drift is not None and now >= self.next_drift:
            self.check_drift()

    # -- reconcile

    def reconcile(self, node: JSON) -> None:
        """Takes the Node object; installs or uninstalls to match its opt-in (unless already
        done or a retry is not yet due). Raises KubeError when recording on the Node fails."""
        if self.progress.stale(node):
            return  # an update our own earlier patch caused; a newer one is on its way
        self.node = node
        self.progress.seen(node)
        if nodeview.opted_in(node):
            if self.kubelet.waiting is not None:
                self._kubelet_update(node)
                return
            if self.provisioned_ok and nodeview.provisioned(node):
                self.progress.untaint(node)  # a startup taint added after the label
                return
            due = self.next_retry is None or self.clock() >= self.next_retry
            if not due and not safeguards.retry_requested(self, node):
                return
            self.provision(node)
        else:
            self.next_retry = None
            self.next_drift = None
            self.kubelet.cancel()
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
            self._confirm(node, result, repair=repair)

    def _labelled(self, node: JSON, result: EngineResult, *, repair: bool, check: nodeview.Check) -> None:
        """Verified (and confirmed by the kubelet where it reports handlers): label and record."""
        self.kubelet.cancel()
        self.progress.provisioned(node, result.runtimes, check=check)
        safeguards.forget_attempts(self)
        runtimes = ",".join(f"{r.handler}@{r.sha256[:12]}" for r in result.runtimes)
        reason = "Repaired" if repair else "Provisioned"
        by = "containerd and the kubelet" if check == "kubelet" else "containerd"
        self.emit(
            reason,
            f"runtimes {runtimes} verified by {by} (changed={result.changed}, restarted={result.restarted})",
        )
        self.log(
            reason.lower(), runtimes=runtimes, changed=result.changed, restarted=result.restarted, check=check
        )
        self.provisioned_ok = True
        self.failures = 0
        self.next_retry = None
        self.next_drift = self.clock() + self.cfg.drift_interval

    # -- the kubelet's confirmation (status.runtimeHandlers)

    def _confirm(self, node: JSON, result: EngineResult, *, repair: bool) -> None:
        """After a verified install: label now when CRI decides or the kubelet already lists
        the handlers; otherwise record phase verifying and wait (the watch delivers the
        kubelet's status updates; the deadline is a timer)."""
        check = self.kubelet.start(node, result, repair=repair)
        if check is not None:
            self._labelled(node, result, repair=repair, check=check)
            return
        self.log("kubelet_wait", timeout=f"{self.cfg.kubelet_timeout:g}s")
        self.progress.phase("verifying")

    def _kubelet_update(self, node: JSON) -> None:
        """A Node update while waiting for the kubelet: label once it lists every handler."""
        done = self.kubelet.update(node)
        if done is not None:
            with self.critical():
                self._labelled(node, done[0].result, repair=done[0].repair, check=done[1])

    def _kubelet_timed_out(self) -> None:
        """The kubelet deadline passed: a failure at step kubelet (no label), retried later."""
        node = self.api.get_node(self.cfg.node_name)
        done = self.kubelet.update(node)
        if done is not None:  # it arrived with the last update
            self._labelled(node, done[0].result, repair=done[0].repair, check=done[1])
            return
        waiting = self.kubelet.cancel()
        if waiting is not None:
            self._failed(
                node, "ProvisionFailed", EngineFailed("kubelet", self.kubelet.failure(node, waiting))
            )

    def _install(self, *, repair: bool) -> EngineResult:
        with self.leases.slot():
            self.log("install_start", repair=repair or None)
            written = self.progress.phase_beside("installing")
            try:
                result = self.engine.install()
            finally:
                written()
        self.installed = True
        if not result.verified:
            raise EngineFailed("verify", "containerd did not report the runtime")
        return result

    def _failed(self, node: JSON, reason: str, ex: EngineFailed) -> None:
        self.failures += 1
        delay = self.cfg.backoff.delay(self.failures)
        self.next_retry = self.clock() + delay
        self.next_drift = None
        self.kubelet.cancel()
        self.progress.failed(node, step=ex.step, reason=ex.error)
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
                        self.progress.try_phase("removing")
                        self.engine.uninstall()
                except EngineFailed as ex:
                    self._failed(node, "UnprovisionFailed", ex)
                    return
                self.installed = False
            self.progress.removed(node)
            self.failures = 0
            self.next_retry = None
            safeguards.forget_attempts(self)
            self.emit("Unprovisioned", "kwasm runtimes removed from containerd")
            self.log("unprovisioned")

    def check_drift(self) -> None:
        """Asks the engine for drift; repairs (or reconciles an opt-out) when it reports any.
        Returns nothing; raises KubeError when reading or patching the Node fails."""
        self.next_drift = self.clock() + self.cfg.drift_interval
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
        uid = str((self.node.get("metadata") or {}).get("uid", self.cfg.node_name))
        event = node_event(
            node_name=self.cfg.node_name,
            node_uid=uid,
            namespace=self.cfg.event_namespace,
            reason=reason,
            message=message,
            warning=warning,
            now=self.wall_clock(),
        )
        send_event(self.api, event, log=self.log)
