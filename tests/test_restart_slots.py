"""Restart slots (kwasm_py.cluster.leases) against the stand-in API with the agent's own client:
a free slot is taken, a released one goes to the first waiter in the same write, a vanished
waiter or holder does not block the queue, a stop leaves it, and never more than P hold."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from kwasm_py.cluster.agentlog import Logger, micro_time
from kwasm_py.cluster.kube import Endpoint
from kwasm_py.cluster.lean import LeanKube
from kwasm_py.cluster.leases import RestartLeases
from kwasm_py.cluster.slotrules import wait_lease_name
from kwasm_py.retry import Backoff
from tests.harness.kube_standin import StandIn

NS = "kwasm-system"


class Stopped(Exception):
    """What the test's check_stop raises."""


@pytest.fixture
def api() -> Iterator[StandIn]:
    with StandIn() as standin:
        yield standin


def _slots(api: StandIn, identity: str, **kw: object) -> RestartLeases:
    client = LeanKube(Endpoint(server=api.url, token="standin-token", namespace=NS))
    return RestartLeases(
        client,
        namespace=NS,
        identity=identity,
        log=Logger(io.StringIO(), node=identity),
        delay=Backoff().delay,
        **kw,  # type: ignore[arg-type]
    )


def _lease(api: StandIn, name: str) -> dict:
    return next(x for x in api.leases() if x["metadata"]["name"] == name)


def _names(api: StandIn) -> set[str]:
    return {x["metadata"]["name"] for x in api.leases()}


def _lease_reads(api: StandIn) -> int:
    """GETs of single Leases (polls); the LIST and the watches are not counted."""
    return sum(
        1
        for r in api.recorded("GET", "leases")
        if not r.query.get("watch") and not r.path.endswith("/leases")
    )


def _sees_queued(holder: RestartLeases, *waiters: str) -> bool:
    """Whether the holder's watched copy has the waiters' queue Leases (it hands to those only)."""
    view = holder._view
    return view is not None and all(wait_lease_name(w) in view.snapshot() for w in waiters)


def _waiter(slots: RestartLeases, got: list[str], done: threading.Event) -> threading.Thread:
    def run() -> None:
        try:
            got.append(slots.acquire())
        except Stopped:
            got.append("stopped")
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_free_slot_is_taken_and_given_back(api: StandIn) -> None:
    slots = _slots(api, "n1")
    with slots.slot() as name:
        assert name == "kwasm-restart-0"
        assert _lease(api, name)["spec"]["holderIdentity"] == "n1"
    spec = _lease(api, name)["spec"]
    assert "holderIdentity" not in spec and spec["leaseDurationSeconds"] == 60
    assert _names(api) == {"kwasm-restart-0"}, "no queue Lease when nobody waited"
    assert not [r for r in api.recorded("POST", "leases") if "kwasm-wait" in str(r.body)], "none written"
    assert _lease_reads(api) == 0


def test_a_released_slot_goes_to_the_first_waiter_in_the_same_write(api: StandIn) -> None:
    """A holds; B, then C queue; A's release names B as holder, B's names C: nobody polls."""
    a, b, c = _slots(api, "a"), _slots(api, "b"), _slots(api, "c")
    name = a.acquire()
    got_b: list[str] = []
    got_c: list[str] = []
    b_done, c_done = threading.Event(), threading.Event()
    _waiter(b, got_b, b_done)
    api.wait_for(lambda: wait_lease_name("b") in _names(api), 10, "b queued")
    _waiter(c, got_c, c_done)
    api.wait_for(lambda: wait_lease_name("c") in _names(api), 10, "c queued")
    assert not b_done.is_set() and not c_done.is_set()
    api.wait_for(lambda: _sees_queued(a, "b", "c"), 10, "a's copy to show the queue")

    a.release(name)
    assert b_done.wait(10) and got_b == [name]
    handed = [
        r
        for r in api.recorded("PUT", "leases")
        if (r.body or {}).get("spec", {}).get("holderIdentity") == "b"
    ]
    assert handed and handed[0].body["spec"]["leaseDurationSeconds"] == 10, "handed with the short term"
    assert len(handed) == 1, "b starts on the hand-off itself: no write of the slot before it restarts"
    assert _lease(api, name)["spec"]["holderIdentity"] == "b"
    api.wait_for(lambda: wait_lease_name("b") not in _names(api), 10, "b out of the queue")
    assert not c_done.is_set()
    api.wait_for(lambda: _sees_queued(b, "c"), 10, "b's copy to show c queued")

    b.release(name)
    assert c_done.wait(10) and got_c == [name]
    c.release(name)
    assert "holderIdentity" not in _lease(api, name)["spec"]
    api.wait_for(lambda: _names(api) == {name}, 10, "the queue empty")
    assert _lease_reads(api) == 0, "waiters learn of hand-offs through the watch, not by polling"


def test_a_handed_slot_is_renewed_to_the_full_term_a_third_of_the_way_in(api: StandIn) -> None:
    """B holds a handed slot (short term) through a long install: its first renewal comes a
    third of the way into the short term, before anyone may take the slot as expired, and
    gives it the full term; the renewal writes from the watched copy, without a read."""
    a, b = _slots(api, "a"), _slots(api, "b", handoff_term=3)
    name = a.acquire()
    got: list[str] = []
    done = threading.Event()
    b.handoff_term = a.handoff_term = 3
    _waiter(b, got, done)
    api.wait_for(lambda: _sees_queued(a, "b"), 10, "b queued, in a's copy")
    a.release(name)
    assert done.wait(10) and got == [name]
    assert _lease(api, name)["spec"]["leaseDurationSeconds"] == 3
    renewed = threading.Event()
    renewer = threading.Thread(target=b._renew_loop, args=(name, renewed), daemon=True)
    handed_at = time.monotonic()
    renewer.start()
    try:
        api.wait_for(
            lambda: _lease(api, name)["spec"]["leaseDurationSeconds"] == 60, 3, "the full-term renewal"
        )
        assert time.monotonic() - handed_at < 2.0, "renewed well inside the 3 s handed term"
        assert _lease(api, name)["spec"]["holderIdentity"] == "b"
    finally:
        renewed.set()
        b.wake()
        renewer.join(5)
    assert _lease_reads(api) == 0, "renewed from the watched copy"
    b.release(name)


def test_a_handed_slot_seen_late_is_renewed_at_once(api: StandIn) -> None:
    """B sees its hand-off when more than a third of the short term is gone (its clock runs
    1.2 s ahead of the 3 s term): it renews at once, not a full renewal period later."""
    a = _slots(api, "a", handoff_term=3)
    b = _slots(api, "b", handoff_term=3, wall_clock=lambda: time.time() + 1.2)
    name = a.acquire()
    got: list[str] = []
    done = threading.Event()
    _waiter(b, got, done)
    api.wait_for(lambda: _sees_queued(a, "b"), 10, "b queued, in a's copy")
    a.release(name)
    assert done.wait(10) and got == [name]
    stop = threading.Event()
    renewer = threading.Thread(target=b._renew_loop, args=(name, stop), daemon=True)
    began = time.monotonic()
    renewer.start()
    try:
        api.wait_for(lambda: _lease(api, name)["spec"]["leaseDurationSeconds"] == 60, 3, "the renewal")
        assert time.monotonic() - began < 0.5, "renewed at once"
    finally:
        stop.set()
        b.wake()
        renewer.join(5)
    b.release(name)


def test_a_vanished_waiter_is_dropped_after_the_handoff_term(api: StandIn) -> None:
    """A queue Lease whose agent is gone: the slot handed to it is not confirmed, and the next
    waiter takes it once the short term ran out and removes the dead entry."""
    ghost = _slots(api, "ghost")
    ghost.api.create_lease(
        NS,
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": wait_lease_name("ghost"), "namespace": NS},
            "spec": {
                "holderIdentity": "ghost",
                "acquireTime": micro_time(time.time() - 100),
                "leaseDurationSeconds": 60,
            },
        },
    )
    a, c = _slots(api, "a", handoff_term=1), _slots(api, "c", handoff_term=1)
    name = a.acquire()
    got: list[str] = []
    done = threading.Event()
    _waiter(c, got, done)
    api.wait_for(lambda: wait_lease_name("c") in _names(api), 10, "c queued")
    a.release(name)
    assert _lease(api, name)["spec"]["holderIdentity"] in ("ghost", "c")  # ghost first in line
    assert done.wait(10) and got == [name]
    assert _lease(api, name)["spec"]["holderIdentity"] == "c"
    assert wait_lease_name("ghost") not in _names(api)


def test_an_expired_holder_does_not_block(api: StandIn) -> None:
    dead = _slots(api, "dead")
    dead.api.create_lease(
        NS,
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "kwasm-restart-0", "namespace": NS},
            "spec": {
                "holderIdentity": "dead",
                "renewTime": micro_time(time.time() - 61),
                "leaseDurationSeconds": 60,
            },
        },
    )
    slots = _slots(api, "n1")
    assert slots.acquire() == "kwasm-restart-0"
    assert _lease(api, "kwasm-restart-0")["spec"]["holderIdentity"] == "n1"


def test_a_stop_while_waiting_leaves_the_queue(api: StandIn) -> None:
    a = _slots(api, "a")
    a.acquire()
    stop = threading.Event()

    def check_stop() -> None:
        if stop.is_set():
            raise Stopped

    b = _slots(api, "b", check_stop=check_stop)
    got: list[str] = []
    done = threading.Event()
    _waiter(b, got, done)
    api.wait_for(lambda: wait_lease_name("b") in _names(api), 10, "b queued")
    stop.set()
    b.wake()
    assert done.wait(10) and got == ["stopped"]
    assert wait_lease_name("b") not in _names(api)


def test_at_most_p_hold_and_each_node_costs_a_few_requests() -> None:
    """16 nodes at once, P = 3, 5 ms per request: never more than 3 in a slot, all served, and
    per node a handful of requests (list, watch, queue create/delete, take or confirm, give)."""
    api = StandIn(latency=0.005).start()
    try:
        lock = threading.Lock()
        inside, most, served = [0], [0], []

        def node(i: int) -> None:
            slots = _slots(api, f"n{i:02}", count=3)
            with slots.slot():
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.02)  # the restart's duration, not synchronisation
                with lock:
                    inside[0] -= 1
                    served.append(i)

        threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(served) == list(range(16)) and most[0] <= 3
        kinds = Counter(
            f"{r.method}{' watch' if r.query.get('watch') else ''}" for r in api.recorded(plural="leases")
        )
        assert sum(kinds.values()) / 16 <= 8, kinds
        assert _names(api) == {f"kwasm-restart-{i}" for i in range(3)}, "every queue Lease removed"
    finally:
        api.stop()


def test_slot_k_goes_to_the_kth_waiter(api: StandIn) -> None:
    """P = 2, both held, w1 then w2 queued: slot 1 released first goes to w2, the second in
    line, not to w1 (holders releasing together would otherwise all name w1); slot 0 then
    goes to w1."""
    a, b = _slots(api, "a", count=2), _slots(api, "b", count=2)
    first = a.acquire()
    api.wait_for(lambda: len(api.leases()) == 1, 10, "a's slot")
    second = b.acquire()
    assert {first, second} == {"kwasm-restart-0", "kwasm-restart-1"}
    holders = {first: a, second: b}
    got: dict[str, list[str]] = {"w1": [], "w2": []}
    done = {"w1": threading.Event(), "w2": threading.Event()}
    for w in ("w1", "w2"):
        _waiter(_slots(api, w, count=2), got[w], done[w])
        api.wait_for(lambda w=w: wait_lease_name(w) in _names(api), 10, f"{w} queued")
    releaser = holders["kwasm-restart-1"]
    queued = {wait_lease_name("w1"), wait_lease_name("w2")}
    view = releaser._view
    assert view is not None
    api.wait_for(lambda: queued <= set(view.snapshot()), 10, "the releaser's watch to show both waiters")
    releaser.release("kwasm-restart-1")
    assert done["w2"].wait(10) and got["w2"] == ["kwasm-restart-1"]
    assert not done["w1"].is_set()
    holders["kwasm-restart-0"].release("kwasm-restart-0")
    assert done["w1"].wait(10) and got["w1"] == ["kwasm-restart-0"]


def test_release_rules_hand_slot_k_to_the_kth_waiter_or_clear_it() -> None:
    """The pure release rules: slot k to the k-th waiter (mod the queue), the hand-off with the
    short term and a new transition, and with nobody waiting no holder at all."""
    from kwasm_py.cluster.slotrules import released_spec, successor

    slots = ["kwasm-restart-0", "kwasm-restart-1", "kwasm-restart-2"]
    assert successor(["x", "y"], slots, "kwasm-restart-0") == "x"
    assert successor(["x", "y"], slots, "kwasm-restart-1") == "y"
    assert successor(["x", "y"], slots, "kwasm-restart-2") == "x"
    assert successor([], slots, "kwasm-restart-1") is None
    held = {"holderIdentity": "a", "leaseDurationSeconds": 60, "renewTime": "t0", "leaseTransitions": 4}
    handed = released_spec(held, "x", now="t1", term=10, full_term=60)
    assert handed == {
        "holderIdentity": "x",
        "leaseDurationSeconds": 10,
        "acquireTime": "t1",
        "renewTime": "t1",
        "leaseTransitions": 5,
    }
    assert released_spec(held, None, now="t1", term=10, full_term=60) == {
        "leaseDurationSeconds": 60,
        "leaseTransitions": 4,
    }
    assert held["holderIdentity"] == "a", "the copy it was given is left alone"
