"""EFFECTS: the restart Leases that keep at most N nodes restarting containerd at once.

There are N coordination.k8s.io/v1 Leases ``kwasm-restart-0..N-1`` in the installer namespace.
An agent holds one for the duration of an install or uninstall (each may restart containerd),
renews it every third of its term in a background thread, and gives it back by clearing its
holder. A Lease whose holder stopped renewing it is free once ``renewTime`` plus its duration
has passed (a killed agent does not block the others for longer than one term).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kwasm_py.cluster.agentlog import Logger, micro_time, parse_time
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON

LEASE_PREFIX = "kwasm-restart-"


def _no_stop() -> None:
    return None


@dataclass
class RestartLeases:
    """N restart Leases for one agent (``identity``, its node name) in ``namespace``.

    ``delay(attempt)`` is the backoff between polls for a free Lease; ``check_stop`` is called
    before each poll and raises to abandon the wait (the agent's stop request); ``on_wait`` is
    called once when every Lease is held by others (the agent records phase waiting).
    """

    api: AgentApi
    namespace: str
    identity: str
    log: Logger
    delay: Callable[[int], float]
    count: int = 1
    duration: int = 60
    wall_clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    check_stop: Callable[[], None] = _no_stop
    on_wait: Callable[[], None] = _no_stop

    @contextlib.contextmanager
    def slot(self) -> Iterator[str]:
        """Holds one Lease while the body runs (renewed in the background); yields its name.
        Raises what ``check_stop`` raises while waiting; API errors while waiting are logged."""
        name = self.acquire()
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
            self.release(name)

    def acquire(self) -> str:
        """Takes nothing; returns the name of the Lease now held, polling until one is free.
        Raises what ``check_stop`` raises; API errors are logged and the poll goes on."""
        attempt = 0
        while True:
            for i in range(max(1, self.count)):
                name = f"{LEASE_PREFIX}{i}"
                try:
                    if self._try(name):
                        self.log("lease_acquired", lease=name, waited=attempt or None)
                        return name
                except KubeError as ex:
                    self.log("lease_error", level="warning", lease=name, error=ex.message)
            attempt += 1
            if attempt == 1:
                self.log("lease_wait", leases=self.count)
                self.on_wait()
            self.check_stop()
            self.sleep(self.poll_delay(attempt))

    def poll_delay(self, attempt: int) -> float:
        """Takes the poll attempt (1 for the first retry); returns the seconds until the next
        poll: the backoff, no faster than 50 ms, and once the backoff passes a third of a Lease
        term, a random time between a sixth and a third of it. The cap must keep a jitter:
        with a fixed one, nodes opted in together poll in lockstep and a released Lease stays
        free for most of each period (bench/bench_rollout.py measured the restart slots 14%
        busy with 200 waiting nodes)."""
        cap = self.duration / 3
        wait = self.delay(attempt)
        if wait > cap:
            wait = cap * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto
        return max(0.05, wait)

    def expired(self, spec: JSON, now: float) -> bool:
        """Takes a Lease's spec and the time; returns whether its holder's term has run out
        (no readable renew/acquire time counts as expired)."""
        renewed = parse_time(str(spec.get("renewTime") or spec.get("acquireTime") or ""))
        duration = float(spec.get("leaseDurationSeconds") or self.duration)
        return renewed is None or renewed + duration < now

    def _try(self, name: str) -> bool:
        now = self.wall_clock()
        lease = self.api.get_lease(self.namespace, name)
        spec_new = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
        }
        try:
            if lease is None:
                self.api.create_lease(
                    self.namespace,
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": name, "namespace": self.namespace},
                        "spec": {**spec_new, "leaseTransitions": 0},
                    },
                )
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            if holder and holder != self.identity and not self.expired(spec, now):
                return False
            if holder and holder != self.identity:
                self.log("lease_expired", lease=name, holder=holder)
            transitions = int(spec.get("leaseTransitions") or 0) + (holder != self.identity)
            lease["spec"] = {**spec, **spec_new, "leaseTransitions": transitions}
            self.api.replace_lease(self.namespace, lease)
        except KubeError as ex:
            if ex.status == 409:  # another node got there first
                return False
            raise
        return True

    def _renew_loop(self, name: str, done: threading.Event) -> None:
        while not done.wait(max(0.05, self.duration / 3)):
            try:
                lease = self.api.get_lease(self.namespace, name)
                if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                    self.log("lease_lost", level="warning", lease=name)
                    return
                lease["spec"]["renewTime"] = micro_time(self.wall_clock())
                self.api.replace_lease(self.namespace, lease)
            except KubeError as ex:
                self.log("lease_renew_failed", level="warning", lease=name, error=ex.message)

    def release(self, name: str) -> None:
        """Takes a Lease name; clears our holder from it (three tries on conflicts). Returns
        nothing and raises nothing: a Lease not given back expires on its own."""
        for _ in range(3):
            try:
                lease = self.api.get_lease(self.namespace, name)
                if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                    return
                spec = dict(lease.get("spec") or {})
                for key in ("holderIdentity", "acquireTime", "renewTime"):
                    spec.pop(key, None)
                lease["spec"] = spec
                self.api.replace_lease(self.namespace, lease)
            except KubeError as ex:
                if ex.status != 409:
                    self.log("lease_release_failed", level="warning", lease=name, error=ex.message)
                    return  # it expires on its own
            else:
                self.log("lease_released", lease=name)
                return
