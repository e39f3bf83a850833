"""PURE: the restart slots' rules read off a copy of the namespace's Leases (cluster/leases.py).

Who holds a slot and until when, and who waits in which order. Takes Lease objects as the API
serves them (coordination.k8s.io/v1: ``spec.holderIdentity``, ``renewTime``/``acquireTime``
MicroTime, ``leaseDurationSeconds``) and wall-clock seconds; no I/O.
"""

from __future__ import annotations

import hashlib

from kwasm_py.cluster.agentlog import parse_time
from kwasm_py.model import JSON, QUEUE_LEASE_PREFIX


def wait_lease_name(identity: str) -> str:
    """Takes a node name; returns its queue Lease's name (``kwasm-wait-<node>``; a hash when
    that would pass the 253 characters of a Lease name)."""
    name = f"{QUEUE_LEASE_PREFIX}{identity}"
    if len(name) <= 253:
        return name
    return f"{QUEUE_LEASE_PREFIX}{hashlib.sha256(identity.encode()).hexdigest()[:32]}"


def spec_of(lease: JSON | None) -> JSON:
    """A Lease's spec ({} for None or no spec)."""
    return (lease or {}).get("spec") or {}


def holder_of(lease: JSON | None, now: float, default_term: int) -> str | None:
    """Takes a Lease (or None), the wall-clock time and the term to assume when the Lease has
    none; returns its holder while the term runs, None when it is free or expired (no readable
    renew or acquire time counts as expired)."""
    who = spec_of(lease).get("holderIdentity")
    if not who:
        return None
    ends = expiry_of(lease, default_term)
    return str(who) if ends is not None and ends >= now else None


def expiry_of(lease: JSON | None, default_term: int) -> float | None:
    """Takes a held Lease; returns the wall-clock time its term runs out (None: no time)."""
    spec = spec_of(lease)
    renewed = parse_time(str(spec.get("renewTime") or spec.get("acquireTime") or ""))
    return None if renewed is None else renewed + float(spec.get("leaseDurationSeconds") or default_term)


def queue_of(leases: dict[str, JSON], slots: list[str], now: float, default_term: int) -> list[str]:
    """Takes the namespace's Leases by name, the slot names, the time and the term; returns the
    nodes queued for a slot, first first: every queue Lease's holder by ``acquireTime`` (then
    name), leaving out nodes that hold (or were handed) a slot already."""
    serving = {holder_of(leases.get(s), now, default_term) for s in slots}
    waiting = []
    for name, lease in leases.items():
        who = spec_of(lease).get("holderIdentity")
        if name.startswith(QUEUE_LEASE_PREFIX) and who and who not in serving:
            waiting.append((str(spec_of(lease).get("acquireTime") or ""), name, str(who)))
    return [who for _, _, who in sorted(waiting)]


def successor(order: list[str], slots: list[str], slot: str) -> str | None:
    """Takes the waiting nodes (first first, the releasing node left out), the slot names and
    the slot being released; returns the node to hand it to, None when nobody waits. Slot k goes
    to the k-th waiter (mod the queue's length), not every slot to the first: holders releasing
    at the same moment, each before seeing the others' hand-offs, would otherwise all name the
    same node, which can take only one."""
    if not order:
        return None
    return order[slots.index(slot) % len(order)] if slot in slots else order[0]


def released_spec(spec: JSON, nxt: str | None, *, now: str, term: int, full_term: int) -> JSON:
    """Takes a held slot's spec, the node it goes to (None: nobody waits), the MicroTime now and
    the hand-off and full terms (seconds); returns the spec of the release write: the next node
    as holder for the short term, or no holder at all."""
    out = dict(spec)
    if nxt is not None:
        out.update(
            holderIdentity=nxt,
            leaseDurationSeconds=term,
            acquireTime=now,
            renewTime=now,
            leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1,
        )
        return out
    for key in ("holderIdentity", "acquireTime", "renewTime"):
        out.pop(key, None)
    out["leaseDurationSeconds"] = full_term
    return out
