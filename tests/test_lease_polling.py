"""How an agent waiting for a restart Lease paces its polls (kwasm_py.cluster.leases)."""

from __future__ import annotations

import io
import time

import pytest

from kwasm_py.cluster.agent import Backoff
from kwasm_py.cluster.agentlog import Logger, micro_time
from kwasm_py.cluster.leases import RestartLeases


class Held(Exception):
    """Ends the wait after the polls a test wants."""


class BusyLeases:
    """AgentApi for Leases only: every Lease is held by another node, renewed just now."""

    def __init__(self) -> None:
        self.gets = 0

    def get_lease(self, namespace: str, name: str) -> dict:
        self.gets += 1
        now = micro_time(time.time())
        spec = {"holderIdentity": "other", "leaseDurationSeconds": 60, "renewTime": now}
        return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def waits_of(polls: int, *, count: int = 1) -> tuple[list[float], BusyLeases]:
    """The pauses of one waiter that finds every Lease busy `polls` times, and its API."""
    api = BusyLeases()
    pauses: list[float] = []

    def check_stop() -> None:
        if len(pauses) == polls:
            raise Held

    leases = RestartLeases(
        api,  # type: ignore[arg-type]  # only get_lease is reached while every Lease is held
        namespace="kwasm-system",
        identity="n1",
        log=Logger(io.StringIO()),
        delay=Backoff().delay,
        count=count,
        duration=60,
        sleep=pauses.append,
        check_stop=check_stop,
    )
    with pytest.raises(Held):
        leases.acquire()
    return pauses, api


def test_polls_back_off_then_stay_jittered_below_a_third_of_the_term():
    """Backoff 2, 4, 8, 16 s (+-20%), then every pause between a sixth and a third of the
    60 s term, and not all the same: waiters that opted in together must not poll in lockstep
    (a fixed 20 s left the Lease free most of each period, bench_rollout)."""
    pauses, _ = waits_of(40)
    for got, base in zip(pauses[:4], (2, 4, 8, 16), strict=True):
        assert 0.8 * base <= got <= 1.2 * base
    capped = pauses[5:]
    assert all(10 <= p <= 20 for p in capped), capped
    assert max(capped) - min(capped) > 2, capped


def test_one_poll_reads_each_lease_once():
    """A poll that finds all N Leases held reads each once, then pauses once (the last
    scan is the one the stop request ends)."""
    pauses, api = waits_of(3, count=4)
    assert len(pauses) == 3 and api.gets == 4 * (3 + 1)
