"""PURE: the agent's bounded-disruption budget (issue 13.3), its Node keys and the retry
backoff. No I/O.

Every install attempt may restart containerd (and, when verification fails, restart it again to
roll back). For the same inputs (shim digests, node config files, engine options and the retry
annotation) the agent makes at most ``limit`` attempts, then holds: the node stays unlabelled
with a ``failed`` status until an input changes or someone bumps the retry annotation
(``kwasm-py annotate-node --retry NODE``). The count is kept on the node itself (an
:class:`AttemptStore`, a small file under the host root, see cluster/inputs.py) and written
*before* each attempt, so an agent killed by the restart it caused (k3s restarts the kubelet and
with it the pod) still counts that attempt, and no API request is spent on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kwasm_py import retry
from kwasm_py.cluster.policy import KEY_PREFIX
from kwasm_py.model import JSON

RETRY_ANNOTATION = f"{KEY_PREFIX}kwasm-retry"
DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Backoff(retry.Backoff):
    """The agent's pacing of retries: the one policy (:mod:`kwasm_py.retry`) with the agent's
    defaults, 2 s doubling to 5 min with +-20% jitter. ``retries`` is not used here: the attempt
    budget (:mod:`kwasm_py.cluster.safeguards`) bounds containerd restarts, and API calls are
    retried as long as the agent runs. ``scale=0`` turns waiting off (tests)."""

    initial: float = 2.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: tuple[float, float] = (0.8, 1.2)


@dataclass(frozen=True)
class Attempts:
    """How many install attempts were made for the inputs with digest ``inputs``."""

    inputs: str
    count: int

    def dumps(self) -> str:
        """Takes nothing; returns the record as compact JSON (what the store keeps)."""
        return json.dumps({"inputs": self.inputs, "count": self.count}, sort_keys=True)


class AttemptStore(Protocol):
    """Where the agent keeps its attempt record across pod restarts."""

    def load(self) -> Attempts | None:
        """Takes nothing; returns the record, None when there is none or it is unreadable."""
        ...

    def save(self, record: Attempts | None) -> None:
        """Takes the record (None: forget it); stores it. Raises OSError when it cannot."""
        ...


class MemoryStore:
    """An AttemptStore in memory (tests, and agents without a host root)."""

    def __init__(self) -> None:
        self.record: Attempts | None = None

    def load(self) -> Attempts | None:
        """Takes nothing; returns the record kept."""
        return self.record

    def save(self, record: Attempts | None) -> None:
        """Takes the record; keeps it."""
        self.record = record


def _annotations(node: JSON) -> dict[str, Any]:
    value = (node.get("metadata") or {}).get("annotations") or {}
    return value if isinstance(value, dict) else {}


def parse(raw: str) -> Attempts | None:
    """Takes a stored record's text; returns the record, None when empty or unreadable."""
    if not raw.strip():
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    inputs, count = doc.get("inputs"), doc.get("count")
    if not isinstance(inputs, str) or not isinstance(count, int) or isinstance(count, bool):
        return None
    return Attempts(inputs=inputs, count=max(0, count))


def retry_token(node: JSON) -> str:
    """Takes a Node object; returns the value of its retry annotation ("" when absent)."""
    return str(_annotations(node).get(RETRY_ANNOTATION) or "")


def fingerprint(
    *,
    shims: Mapping[str, str] | None = None,
    configs: Mapping[str, str] | None = None,
    options: Sequence[str] = (),
    retry: str = "",
) -> str:
    """Takes the shim digests (path -> sha256 or "absent"), the node config files' digests (node
    path -> sha256 or "absent"), the engine's options (argv words) and the retry token; returns
    one sha256 hex digest of all of them (order of the mappings does not matter)."""
    doc = {
        "shims": sorted((shims or {}).items()),
        "configs": sorted((configs or {}).items()),
        "options": list(options),
        "retry": retry,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def retry_inputs(node: JSON) -> str:
    """Takes a Node; returns the inputs digest of an agent that knows no files: only the retry
    annotation (so a bump still re-arms the budget)."""
    return fingerprint(retry=retry_token(node))


def exhausted(record: Attempts | None, inputs: str, *, limit: int) -> bool:
    """Takes the recorded attempts, the current inputs' digest and the limit; returns whether
    ``limit`` attempts were already made for exactly these inputs."""
    return record is not None and record.inputs == inputs and record.count >= limit


def next_attempt(record: Attempts | None, inputs: str) -> Attempts:
    """Takes the recorded attempts and the current inputs' digest; returns the record of one
    more attempt (counting from 1 again when the inputs changed)."""
    if record is not None and record.inputs == inputs:
        return Attempts(inputs=inputs, count=record.count + 1)
    return Attempts(inputs=inputs, count=1)


def held_reason(*, limit: int, verb: str = "install") -> str:
    """Takes the limit and the engine verb (install or uninstall); returns the one-line reason
    for the status."""
    return (
        f"gave up after {limit} {verb} attempts with unchanged inputs (shims, node config,"
        " options); change them or run `kwasm-py annotate-node --retry NODE`"
    )
