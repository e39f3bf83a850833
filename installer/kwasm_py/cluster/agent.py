"""ORCHESTRATION: the resident node agent behind `kwasm-py agent` (the DaemonSet's entrypoint).

It watches its own Node and converges the node to the opt-in the Node carries:

* opted in (annotation or label ``kwasm.sh/kwasm-node=true``): run the node engine's install in a
  subprocess; only once the engine reports containerd verified the runtime, label the node
  ``kwasm.sh/kwasm-provisioned=true``, write the status annotation and an Event ``Provisioned``.
  A failure removes the label, records the reason, emits a Warning ``ProvisionFailed`` and
  retries with backoff.
* not opted in: uninstall what the engine recorded, remove label and status, Event
  ``Unprovisioned``.
* provisioned: every ``drift_interval`` ask the engine for drift; repair and emit ``Repaired``.

Installs and uninstalls may restart containerd, so each one holds one of N restart Leases
(``kwasm-restart-0..N-1`` in the installer namespace) for its duration. The engine runs as a
child process (``python -m kwasm_py node install --output json``), which keeps this resident
process small: it never imports the engine, grpc, tomlkit or the kubernetes client.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from kwasm_py.cluster import nodeview
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.errors import KubeError, UsageError
from kwasm_py.model import JSON, PROVISIONED_LABEL, STATUS_ANNOTATION

LEASE_PREFIX = "kwasm-restart-"


class AgentStopped(BaseException):
    """Raised (from the SIGTERM handler or after a critical section) to end the agent."""


class EngineFailed(Exception):
    """The node engine reported a failure (its JSON ``step``/``error``/``hint``)."""

    def __init__(self, step: str, error: str, hint: str = "") -> None:
        super().__init__(f"{step}: {error}")
        self.step = step
        self.error = error
        self.hint = hint


class Engine(Protocol):
    def install(self) -> JSON: ...

    def uninstall(self) -> JSON: ...

    def status(self) -> JSON: ...


# ---------------------------------------------------------------------------- engine


def default_node_command() -> list[str]:
    """How to run `kwasm-py node`: KWASM_NODE_COMMAND (shell words) or this interpreter."""
    override = os.environ.get("KWASM_NODE_COMMAND", "").strip()
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "kwasm_py", "node"]


@dataclass
class SubprocessEngine:
    """Runs `kwasm-py node VERB ... --output json` and parses the JSON contract."""

    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)  # KWASM_* options for the child
    timeout: float = 600.0

    def _run(self, verb: str, *extra: str) -> JSON:
        argv = [*self.command, verb, *extra, "--output", "json"]
        env = {**os.environ, **self.env}
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired as ex:
            raise EngineFailed(verb, f"node {verb} did not finish in {self.timeout:.0f}s") from ex
        except OSError as ex:
            raise EngineFailed(verb, f"cannot run {argv[0]}: {ex.strerror}") from ex
        doc: Any = None
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        for candidate in (proc.stdout, lines[-1] if lines else ""):
            try:
                doc = json.loads(candidate)
                break
            except ValueError:
                continue
        if not isinstance(doc, dict):
            err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise EngineFailed(verb, f"node {verb} gave no JSON (exit {proc.returncode}): {err}")
        if proc.returncode != 0 or doc.get("ok") is False:
            raise EngineFailed(
                str(doc.get("step") or verb),
                str(doc.get("error") or f"exit {proc.returncode}"),
                str(doc.get("hint") or ""),
            )
        return doc

    def install(self) -> JSON:
        # The label promises containerd has the runtime: ask it even when nothing changes.
        return self._run("install", "--verify")

    def uninstall(self) -> JSON:
        return self._run("uninstall")

    def status(self) -> JSON:
        return self._run("status")


def agent_shims(source: str, *, shim_dir: str | None, host_root: str | None) -> tuple[list[str], list[str]]:
    """Shim paths and handlers for `--shim-source image|fetch|dir` (when no --shim is given).

    - image: baked into the installer image for this node's architecture (images/Dockerfile);
    - fetch: downloaded and verified now, into the node's /var/lib/kwasm-py/shims/<arch> so a
      restarted pod finds them again;
    - dir: a directory on the node (a node path, read through the host root).
    """
    from pathlib import Path

    from kwasm_py.shims import source as shim_source

    root = Path(host_root or "/")
    arch = shim_source.resolve_arch("auto")
    directory: Path | None = None
    if source == "image" and shim_dir:
        directory = Path(shim_dir) / arch
    elif source == "fetch":
        directory = root / "var/lib/kwasm-py/shims" / arch
    elif source == "dir":
        if not shim_dir:
            raise UsageError("--shim-source dir needs --shim-dir (a directory on the node)")
        directory = root / shim_dir.lstrip("/")
    resolved = shim_source.resolve_shims(source, directory=directory)  # type: ignore[arg-type]
    return [str(s.path) for s in resolved], [s.handler for s in resolved]


# ---------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter; ``scale=0`` turns waiting off (tests)."""

    initial: float = 2.0
    factor: float = 2.0
    maximum: float = 300.0
    scale: float = 1.0

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return base * self.scale * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto


def micro_time(ts: float) -> str:
    """Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float | None:
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return None


def _fmt(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class Logger:
    """One line per event: ``ts=... level=... event=... key=value ...``."""

    def __init__(self, stream: TextIO | None = None, **common: object) -> None:
        self.stream = stream or sys.stderr
        self.common = common
        self.lock = threading.Lock()

    def __call__(self, event: str, level: str = "info", **fields: object) -> None:
        parts = {"ts": micro_time(time.time()), "level": level, "event": event}
        line = " ".join(
            f"{k}={_fmt(v)}" for k, v in {**parts, **self.common, **fields}.items() if v is not None
        )
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    namespace: str  # the installer namespace: restart Leases live here
    event_namespace: str = "default"
    max_parallel_restarts: int = 1
    lease_duration: int = 60
    drift_interval: float = 300.0
    watch_timeout: int = 300
    backoff: Backoff = Backoff()


# ---------------------------------------------------------------------------- the agent


class Agent:
    def __init__(
        self,
        api: AgentApi,
        engine: Engine,
        config: AgentConfig,
        *,
        log: Logger | None = None,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api = api
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
        self._critical = 0
        self.node: JSON = {}

    # -- stopping

    def request_stop(self) -> None:
        """SIGTERM: stop now, or as soon as the engine call in flight finished."""
        self.stopping = True
        if self._critical == 0:
            raise AgentStopped

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section SIGTERM must not cut short (an engine run and the patch that records it)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self.stopping and self._critical == 0:
            raise AgentStopped

    # -- main loop

    def run(self) -> int:
        """Watch the node until stopped; returns the process exit code."""
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
        """Run the timers that are due: a provisioning retry or a drift check."""
        now = time.monotonic()
        if self.next_retry is not None and now >= self.next_retry:
            self.reconcile(self.api.get_node(self.cfg.node_name))
        if self.next_drift is not None and now >= self.next_drift:
            self.check_drift()

    # -- reconcile

    def reconcile(self, node: JSON) -> None:
        self.node = node
        if nodeview.opted_in(node):
            if self.provisioned_ok and nodeview.provisioned(node):
                return
            if self.next_retry is not None and time.monotonic() < self.next_retry:
                return
            self.provision(node)
        else:
            self.next_retry = None
            self.next_drift = None
            if self.installed is None:
                self.installed = self._engine_says_installed()
            if self.installed or nodeview.provisioned(node) or nodeview.status_of(node):
                self.unprovision(node)

    def _engine_says_installed(self) -> bool:
        try:
            return bool(self.engine.status().get("installed"))
        except EngineFailed as ex:
            self.log("status_failed", level="warning", step=ex.step, error=ex.error)
            return True  # unknown: uninstall is idempotent, so err on cleaning up

    def provision(self, node: JSON, *, repair: bool = False) -> None:
        with self.critical():
            self.provisioned_ok = False
            try:
                result = self._install(repair=repair)
            except EngineFailed as ex:
                self._failed(node, "ProvisionFailed", ex)
                return
            now = micro_time(self.wall_clock())
            self.api.patch_node(
                self.cfg.node_name,
                {
                    "metadata": {
                        "labels": {PROVISIONED_LABEL: "true"},
                        "annotations": {STATUS_ANNOTATION: nodeview.provisioned_status(result, now=now)},
                    }
                },
            )
            runtimes = ",".join(
                f"{r.get('handler')}@{str(r.get('sha256', ''))[:12]}" for r in result.get("runtimes") or []
            )
            reason = "Repaired" if repair else "Provisioned"
            self.emit(
                reason,
                f"runtimes {runtimes} verified by containerd"
                f" (changed={result.get('changed')}, restarted={result.get('restarted')})",
            )
            self.log(
                reason.lower(),
                runtimes=runtimes,
                changed=result.get("changed"),
                restarted=result.get("restarted"),
            )
            self.provisioned_ok = True
            self.failures = 0
            self.next_retry = None
            self.next_drift = time.monotonic() + self.cfg.drift_interval

    def _install(self, *, repair: bool) -> JSON:
        with self.restart_slot():
            self.log("install_start", repair=repair or None)
            result = self.engine.install()
        self.installed = True
        if not result.get("verified"):
            raise EngineFailed("verify", "containerd did not report the runtime")
        return result

    def _failed(self, node: JSON, reason: str, ex: EngineFailed) -> None:
        self.failures += 1
        delay = self.cfg.backoff.delay(self.failures)
        self.next_retry = time.monotonic() + delay
        self.next_drift = None
        now = micro_time(self.wall_clock())
        labels = {PROVISIONED_LABEL: None} if nodeview.provisioned(node) else {}
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
        with self.critical():
            self.provisioned_ok = False
            if self.installed:
                try:
                    with self.restart_slot():
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
                        "labels": {PROVISIONED_LABEL: None},
                        "annotations": {STATUS_ANNOTATION: None},
                    }
                },
            )
            self.failures = 0
            self.next_retry = None
            self.emit("Unprovisioned", "kwasm runtimes removed from containerd")
            self.log("unprovisioned")

    def check_drift(self) -> None:
        self.next_drift = time.monotonic() + self.cfg.drift_interval
        try:
            status = self.engine.status()
        except EngineFailed as ex:
            self.log("status_failed", level="warning", step=ex.step, error=ex.error)
            return
        drift = [str(d) for d in status.get("drift") or []]
        if status.get("installed") and not drift:
            return
        self.log(
            "drift",
            level="warning",
            drift=";".join(drift) or "not installed",
            installed=status.get("installed"),
        )
        node = self.api.get_node(self.cfg.node_name)
        if nodeview.opted_in(node):
            self.provision(node, repair=True)
        else:
            self.reconcile(node)

    # -- events

    def emit(self, reason: str, message: str, *, warning: bool = False) -> None:
        """A core/v1 Event on the Node (best effort: a lost event is logged, not fatal)."""
        now = self.wall_clock()
        meta = self.node.get("metadata") or {}
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{self.cfg.node_name}.kwasm.{uuid.uuid4().hex[:12]}",
                "namespace": self.cfg.event_namespace,
            },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Node",
                "name": self.cfg.node_name,
                "uid": meta.get("uid", self.cfg.node_name),
            },
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": "kwasm-py-agent", "host": self.cfg.node_name},
            "firstTimestamp": micro_time(now)[:19] + "Z",
            "lastTimestamp": micro_time(now)[:19] + "Z",
            "count": 1,
            "reportingComponent": "kwasm.sh/kwasm-py-agent",
            "reportingInstance": self.cfg.node_name,
        }
        try:
            self.api.create_event(self.cfg.event_namespace, event)
        except KubeError as ex:
            self.log("event_lost", level="warning", reason=reason, error=ex.message)

    # -- restart leases

    @contextlib.contextmanager
    def restart_slot(self) -> Iterator[str]:
        """Hold one of the N restart Leases while the body runs (renewed in the background)."""
        name = self.acquire_lease()
        done = threading.Event()
        renewer = threading.Thread(
            target=self._renew_loop, args=(name, done), name="lease-renew", daemon=True
        )
        renewer.start()
        try:
            yield name
        finally:
            done.set()
            renewer.join(timeout=10)
            self.release_lease(name)

    def acquire_lease(self) -> str:
        attempt = 0
        while True:
            for i in range(max(1, self.cfg.max_parallel_restarts)):
                name = f"{LEASE_PREFIX}{i}"
                try:
                    if self._try_lease(name):
                        self.log("lease_acquired", lease=name, waited=attempt or None)
                        return name
                except KubeError as ex:
                    self.log("lease_error", level="warning", lease=name, error=ex.message)
            attempt += 1
            if attempt == 1:
                self.log("lease_wait", leases=self.cfg.max_parallel_restarts)
            if self.stopping:
                raise AgentStopped
            # Poll no faster than every 50 ms, no slower than a third of a lease term.
            delay = min(self.cfg.lease_duration / 3, self.cfg.backoff.delay(attempt))
            self.sleep(max(0.05, delay))

    def _lease_expired(self, spec: JSON, now: float) -> bool:
        renewed = parse_time(str(spec.get("renewTime") or spec.get("acquireTime") or ""))
        duration = float(spec.get("leaseDurationSeconds") or self.cfg.lease_duration)
        return renewed is None or renewed + duration < now

    def _try_lease(self, name: str) -> bool:
        ns = self.cfg.namespace
        now = self.wall_clock()
        lease = self.api.get_lease(ns, name)
        spec_new = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.cfg.lease_duration,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
        }
        try:
            if lease is None:
                self.api.create_lease(
                    ns,
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": name, "namespace": ns},
                        "spec": {**spec_new, "leaseTransitions": 0},
                    },
                )
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            if holder and holder != self.identity and not self._lease_expired(spec, now):
                return False
            if holder and holder != self.identity:
                self.log("lease_expired", lease=name, holder=holder)
            transitions = int(spec.get("leaseTransitions") or 0) + (holder != self.identity)
            lease["spec"] = {**spec, **spec_new, "leaseTransitions": transitions}
            self.api.replace_lease(ns, lease)
        except KubeError as ex:
            if ex.status == 409:  # another node got there first
                return False
            raise
        return True

    def _renew_loop(self, name: str, done: threading.Event) -> None:
        while not done.wait(max(0.05, self.cfg.lease_duration / 3)):
            try:
                lease = self.api.get_lease(self.cfg.namespace, name)
                if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                    self.log("lease_lost", level="warning", lease=name)
                    return
                lease["spec"]["renewTime"] = micro_time(self.wall_clock())
                self.api.replace_lease(self.cfg.namespace, lease)
            except KubeError as ex:
                self.log("lease_renew_failed", level="warning", lease=name, error=ex.message)

    def release_lease(self, name: str) -> None:
        for _ in range(3):
            try:
                lease = self.api.get_lease(self.cfg.namespace, name)
                if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                    return
                spec = dict(lease.get("spec") or {})
                for key in ("holderIdentity", "acquireTime", "renewTime"):
                    spec.pop(key, None)
                lease["spec"] = spec
                self.api.replace_lease(self.cfg.namespace, lease)
            except KubeError as ex:
                if ex.status != 409:
                    self.log("lease_release_failed", level="warning", lease=name, error=ex.message)
                    return  # it expires on its own
            else:
                self.log("lease_released", lease=name)
                return
