"""EFFECTS: the restart slots that keep at most N nodes restarting containerd at once.

A slot is a coordination.k8s.io/v1 Lease ``kwasm-restart-0..N-1`` in the installer namespace.
An agent holds one for the duration of an install or uninstall (each may restart containerd),
renews it every third of its term, and gives it back when done. Nodes that find every slot held
queue for one, and the slot goes from hand to hand without polling:

* a waiting node writes a Lease of its own, ``kwasm-wait-<node>``, whose ``acquireTime`` is its
  place in the queue (a create never conflicts with another node's), and watches the
  namespace's Leases (:class:`~kwasm_py.cluster.leaseview.LeaseView`);
* a holder that is done does not just clear the slot: it names the first waiter as the new
  holder in the same write, with a short term (:data:`HANDOFF_TERM`). The waiter sees that
  through its watch, starts at once and deletes its queue Lease; its first renewal, a third of
  the short term later, extends the slot to the full term (a write that conflicts with anyone
  else's). An install shorter than that never writes the slot between hand-off and release,
  and the handed term bounds how long a waiter that died meanwhile keeps it;
* a slot that is free (nobody was queued, or its holder stopped renewing and the term ran out,
  or a handed slot was not confirmed in time: that waiter is gone) is taken by the first waiter
  at once and by the k-th after k * :data:`QUEUE_STEP` seconds if still free, so a freed slot
  does not bring every waiter's write at once.

A hand-off costs one write and one watch event, whatever the number of nodes waiting.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kwasm_py.cluster.agentlog import Logger, micro_time
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.cluster.leaseview import LeaseView
from kwasm_py.cluster.slotrules import (
    expiry_of,
    holder_of,
    queue_of,
    released_spec,
    spec_of,
    successor,
    wait_lease_name,
)
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON, SLOT_LEASE_PREFIX

HANDOFF_TERM = 10  # seconds a handed slot stays reserved for its waiter until it confirms
QUEUE_STEP = 0.05  # seconds between the tries of two consecutive waiters at a free slot
_MOST_WAIT = 1.0  # seconds: a waiter re-checks its stop request and the clock at least this often
_HOLD_OFF = 0.5  # seconds a waiter leaves a slot alone after losing a race for it (the watch tells)
_RENEW_RETRY = 1.0  # seconds between renewal tries after an API error (well inside a handed term)


def _no_stop() -> None:
    return None


@dataclass
class RestartLeases:
    """N restart slots for one agent (``identity``, its node name) in ``namespace``.

    ``delay(attempt)`` is the backoff after API failures; ``check_stop`` is called whenever a
    waiter looks again and raises to abandon the wait (the agent's stop request); ``on_wait``
    is called once when every slot is held by others (the agent records phase waiting).
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
    watch_timeout: int = 300
    handoff_term: int = HANDOFF_TERM
    _view: LeaseView | None = field(default=None, init=False, repr=False)
    _first_renew: float | None = field(default=None, init=False, repr=False)  # s after acquire
    _dequeued: threading.Thread | None = field(default=None, init=False, repr=False)

    @property
    def slots(self) -> list[str]:
        """The slot Lease names, ``kwasm-restart-0`` .. ``-(count-1)``."""
        return [f"{SLOT_LEASE_PREFIX}{i}" for i in range(max(1, self.count))]

    @contextlib.contextmanager
    def slot(self) -> Iterator[str]:
        """Holds one slot while the body runs (renewed in the background); yields its name.
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
            self.wake()
            renewer.join(timeout=10)
            if self._dequeued is not None:  # out of the queue before the slot goes: a holder
                self._dequeued.join(timeout=10)  # that still saw us queued would hand it back to us
                self._dequeued = None
            view = self._view
            if view is not None:
                self._pass_on(view, name)  # handed a second slot too late for the renewal loop
            self.release(name)

    def wake(self) -> None:
        """Takes nothing; makes a wait for a slot look again at once (the agent's stop request)."""
        if self._view is not None:
            self._view.wake()

    # -- acquire

    def _open_view(self) -> LeaseView:
        attempt = 0
        while True:
            view = LeaseView(
                self.api,
                self.namespace,
                timeout_seconds=self.watch_timeout,
                log=self.log,
                delay=self.delay,
                wake_on=SLOT_LEASE_PREFIX,
            )
            try:
                view.start()
                self._view = view
                return view
            except KubeError as ex:
                attempt += 1
                self.log("lease_error", level="warning", error=ex.message)
                self.check_stop()
                self.sleep(self.delay(attempt))

    def acquire(self) -> str:
        """Takes nothing; returns the name of the slot now held, waiting in the queue until one
        is free or handed to us. Raises what ``check_stop`` raises (leaving the queue); API
        errors are logged and the wait goes on."""
        view = self._view or self._open_view()
        queued = False
        free_since: dict[str, float] = {}
        ok = False
        try:
            while True:
                self.check_stop()
                generation = view.generation
                leases, now = view.snapshot(), self.wall_clock()
                got = self._look(view, leases, now, queued, free_since)
                if got is not None:
                    ok = True
                    return got
                if not queued:
                    queued = self._enqueue(view)
                    if queued:
                        self.log("lease_wait", leases=self.count)
                        self.on_wait()
                        continue
                view.wait(generation, self._next_look(view.snapshot(), self.wall_clock(), free_since))
        finally:
            if queued and ok:  # served: leave the queue without holding up the restart
                self._dequeued = threading.Thread(
                    target=self._dequeue, args=(view,), name="lease-dequeue", daemon=True
                )
                self._dequeued.start()
            elif queued:
                self._dequeue(view)
            if not ok:
                self._close_view()

    def _look(
        self, view: LeaseView, leases: dict[str, JSON], now: float, queued: bool, free_since: dict[str, float]
    ) -> str | None:
        """One decision on the current copy: a slot handed to us (confirm it), or a free one
        that is our turn (take it); None to go on waiting."""
        mine = [s for s in self.slots if holder_of(leases.get(s), now, self.duration) == self.identity]
        for name in mine:
            if self._accept(view, name, leases[name], now):
                for extra in mine:
                    if extra != name:  # handed two at once by two holders: pass one on
                        self.release(extra)
                return name
        free = [s for s in self.slots if holder_of(leases.get(s), now, self.duration) is None]
        for s in list(free_since):
            if s not in free:
                del free_since[s]
        for s in free:
            free_since.setdefault(s, now)
        if not free:
            return None
        order = queue_of(leases, self.slots, now, self.duration)
        if not queued and order:
            return None  # others wait already: join the queue behind them
        place = order.index(self.identity) if self.identity in order else 0
        ready = [s for s in free if now >= free_since[s] + place * QUEUE_STEP]
        if not ready:
            return None
        name = random.choice(ready)  # noqa: S311 - spreads a burst of newcomers over the slots
        if self._take(view, name, leases.get(name)):
            return name
        free_since[name] = now + _HOLD_OFF  # lost the race: the watch shows the winner shortly
        return None

    def _next_look(self, leases: dict[str, JSON], now: float, free_since: dict[str, float]) -> float:
        """Seconds until the copy may say something new without an event: a held slot's term
        running out, or our turn at a free slot; at most _MOST_WAIT."""
        due = [now + _MOST_WAIT]
        place: int | None = None  # the queue is sorted only when a slot is free (rare)
        for s in self.slots:
            if holder_of(leases.get(s), now, self.duration) is None:
                if place is None:
                    order = queue_of(leases, self.slots, now, self.duration)
                    place = order.index(self.identity) if self.identity in order else 0
                due.append(free_since.get(s, now) + place * QUEUE_STEP)
            else:
                ends = expiry_of(leases.get(s), self.duration)
                if ends is not None:
                    due.append(ends + 0.01)
        return max(0.0, min(due) - now)

    def _write(
        self, view: LeaseView, name: str, lease: JSON | None, spec: JSON, *, refresh: bool = False
    ) -> bool:
        """Create or replace slot `name` with `spec` (from the copy `lease`); True when it took,
        False on a conflict (with `refresh`, the copy is then read again). Logs other API
        errors (False)."""
        try:
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": self.namespace},
                    "spec": spec,
                }
                view.put(self.api.create_lease(self.namespace, body))
            else:
                view.put(self.api.replace_lease(self.namespace, {**lease, "spec": spec}))
            return True
        except KubeError as ex:
            if ex.status != 409:
                self.log("lease_error", level="warning", lease=name, error=ex.message)
                return False
        if not refresh:
            return False
        with contextlib.suppress(KubeError):  # someone else got there first: look again
            fresh = self.api.get_lease(self.namespace, name)
            if fresh is not None:
                view.put(fresh)
        return False

    def _take(self, view: LeaseView, name: str, lease: JSON | None) -> bool:
        now = self.wall_clock()
        spec = spec_of(lease)
        before = spec.get("holderIdentity")
        handed = before and int(spec.get("leaseDurationSeconds") or 0) == self.handoff_term
        new = {
            **spec,
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
            "leaseTransitions": int(spec.get("leaseTransitions") or 0)
            + (lease is not None and before != self.identity),
        }
        if not self._write(view, name, lease, new):
            return False
        self._first_renew = self.duration / 3
        if before and before != self.identity:
            self.log("lease_expired", lease=name, holder=before)
            if handed:  # handed to a waiter that never confirmed: it is gone, take it out of the queue
                with contextlib.suppress(KubeError):
                    if self.api.delete_lease(self.namespace, wait_lease_name(str(before))):
                        self.log("lease_waiter_dropped", lease=name, waiter=before)
        self.log("lease_acquired", lease=name)
        return True

    def _accept(self, view: LeaseView, name: str, lease: JSON, now: float) -> bool:
        """A slot whose holder is us: handed over (short term) or left from an earlier run of
        this agent. Ours as it stands while a good part of its term is left (the renewal loop
        extends it to the full term a third of the way in); with less left, renewed now, and
        False when that meets a conflict."""
        spec = spec_of(lease)
        term = float(spec.get("leaseDurationSeconds") or self.duration)
        left = (expiry_of(lease, self.duration) or now) - now
        handed = True if spec.get("leaseDurationSeconds") == self.handoff_term else None
        if left >= term / 2:
            self._first_renew = max(0.0, left - term * 2 / 3)
            self.log("lease_acquired", lease=name, handed=handed)
            return True
        new = {**spec, "leaseDurationSeconds": self.duration, "renewTime": micro_time(self.wall_clock())}
        if not self._write(view, name, lease, new, refresh=True):
            return False
        self._first_renew = self.duration / 3
        self.log("lease_acquired", lease=name, handed=handed)
        return True

    def _enqueue(self, view: LeaseView) -> bool:
        """Write our queue Lease (kept as it is when an earlier run of this agent left one: our
        place stays ours); True once it is there."""
        now = micro_time(self.wall_clock())
        name = wait_lease_name(self.identity)
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": self.namespace, "labels": {"kwasm.sh/queue": "restart"}},
            "spec": {
                "holderIdentity": self.identity,
                "acquireTime": now,
                "leaseDurationSeconds": self.duration,
            },
        }
        try:
            view.put(self.api.create_lease(self.namespace, body))
        except KubeError as ex:
            if ex.status != 409:
                self.log("lease_error", level="warning", lease=name, error=ex.message)
                return False
        return True

    def _dequeue(self, view: LeaseView) -> None:
        name = wait_lease_name(self.identity)
        try:
            self.api.delete_lease(self.namespace, name)
        except KubeError as ex:
            self.log("lease_error", level="warning", lease=name, error=ex.message)
        view.forget(name)

    def _close_view(self) -> None:
        if self._view is not None:
            self._view.stop()
            self._view = None

    # -- hold and give back

    def _renew_loop(self, name: str, done: threading.Event) -> None:
        """While we hold `name`: renew it every third of its term, and pass on at once any
        other slot handed to us meanwhile (two holders that released at the same moment may
        both have named us; unconfirmed, that slot would stand idle for a hand-off term)."""
        view = self._view
        every = max(0.05, self.duration / 3)
        first = every if self._first_renew is None else min(every, self._first_renew)
        next_renew = time.monotonic() + first
        generation = view.generation if view is not None else 0
        while not done.is_set():
            left = max(0.0, next_renew - time.monotonic())
            if view is not None:
                generation = view.wait(generation, left)
                if done.is_set():
                    return
                self._pass_on(view, name)
            elif done.wait(left):
                return
            if time.monotonic() < next_renew:
                continue
            outcome = self._renew(name)
            if outcome == "lost":
                return
            next_renew = time.monotonic() + (every if outcome == "renewed" else _RENEW_RETRY)

    def _pass_on(self, view: LeaseView, held: str) -> None:
        now = self.wall_clock()
        leases = view.snapshot()
        for s in self.slots:
            if s != held and holder_of(leases.get(s), now, self.duration) == self.identity:
                self.release(s)

    def _renew(self, name: str) -> str:
        """Renew slot `name` to the full term, from the watched copy (read again on a conflict);
        returns "renewed", "lost" (no longer ours: stop renewing) or "error" (try again soon)."""
        view = self._view
        lease = view.snapshot().get(name) if view is not None else None
        try:
            for _ in range(2):
                if lease is None:
                    lease = self.api.get_lease(self.namespace, name)
                if lease is None or spec_of(lease).get("holderIdentity") != self.identity:
                    self.log("lease_lost", level="warning", lease=name)
                    return "lost"
                spec = {
                    **spec_of(lease),
                    "leaseDurationSeconds": self.duration,
                    "renewTime": micro_time(self.wall_clock()),
                }
                try:
                    answer = self.api.replace_lease(self.namespace, {**lease, "spec": spec})
                except KubeError as ex:
                    if ex.status != 409:
                        raise
                    lease = None  # our copy was stale: read it and look again
                    continue
                if view is not None:
                    view.put(answer)
                return "renewed"
        except KubeError as ex:
            self.log("lease_renew_failed", level="warning", lease=name, error=ex.message)
        return "error"

    def release(self, name: str) -> None:
        """Takes a slot name; hands it to the first node in the queue, or clears our holder
        when nobody waits (three tries on conflicts). Returns nothing and raises nothing: a slot
        not given back expires on its own."""
        view = self._view
        lease = (view.snapshot() if view else {}).get(name)
        try:
            for _ in range(3):
                if lease is None or view is None:
                    lease = self.api.get_lease(self.namespace, name)
                if lease is None or spec_of(lease).get("holderIdentity") != self.identity:
                    return
                now = self.wall_clock()
                leases = view.snapshot() if view else {}
                order = [w for w in queue_of(leases, self.slots, now, self.duration) if w != self.identity]
                nxt = successor(order, self.slots, name)
                spec = released_spec(
                    spec_of(lease), nxt, now=micro_time(now), term=self.handoff_term, full_term=self.duration
                )
                try:
                    answer = self.api.replace_lease(self.namespace, {**lease, "spec": spec})
                except KubeError as ex:
                    if ex.status != 409:
                        self.log("lease_release_failed", level="warning", lease=name, error=ex.message)
                        return  # it expires on its own
                    lease = None
                    continue
                if view is not None:
                    view.put(answer)
                self.log("lease_released", lease=name, to=nxt)
                return
        except KubeError as ex:
            self.log("lease_release_failed", level="warning", lease=name, error=ex.message)
        finally:
            if view is not None and not any(
                holder_of(view.snapshot().get(s), self.wall_clock(), self.duration) == self.identity
                for s in self.slots
            ):
                self._close_view()
