"""What the agent records: one structured log line per event, and the Node Events it emits.

Log lines are ``ts=... level=... event=... key=value ...`` on stderr (values with spaces,
quotes or ``=`` JSON-quoted), so ``kubectl logs`` stays greppable. Times are Kubernetes
MicroTime (RFC 3339 with microseconds, UTC).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import TextIO

from kwasm_py.cluster.kube import AgentApi
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON


def micro_time(ts: float) -> str:
    """Takes a POSIX timestamp; returns it as Kubernetes MicroTime (``...T12:00:00.000000Z``)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.lru_cache(maxsize=4096)
def parse_time(text: str) -> float | None:
    """Takes a MicroTime or RFC 3339 ``...Z`` time; returns its POSIX timestamp, None when it
    is neither. Cached: the restart slots read the same few Lease times on every watch event,
    and ``strptime`` was most of a waiting agent's CPU time."""
    if len(text) < 20 or text[10] != "T" or not text.endswith("Z"):
        return None
    try:  # Python 3.11's fromisoformat reads both forms (and "Z"), ~10x faster than strptime
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _fmt(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class Logger:
    """One line per event: ``ts=... level=... event=... key=value ...`` (thread-safe)."""

    def __init__(self, stream: TextIO | None = None, **common: object) -> None:
        """Takes the stream (default stderr) and fields added to every line (e.g. node=NAME)."""
        self.stream = stream or sys.stderr
        self.common = common
        self.lock = threading.Lock()

    def __call__(self, event: str, level: str = "info", **fields: object) -> None:
        """Takes the event name, its level and fields (None values are left out); writes one
        line and flushes. Returns nothing; raises only what writing the stream raises."""
        parts = {"ts": micro_time(time.time()), "level": level, "event": event}
        line = " ".join(
            f"{k}={_fmt(v)}" for k, v in {**parts, **self.common, **fields}.items() if v is not None
        )
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def node_event(
    *,
    node_name: str,
    node_uid: str,
    namespace: str,
    reason: str,
    message: str,
    warning: bool,
    now: float,
) -> JSON:
    """Takes the Node's name and uid, the Event namespace, reason, message, whether it is a
    Warning and the time; returns a core/v1 Event about the Node (a fresh unique name)."""
    stamp = micro_time(now)[:19] + "Z"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{node_name}.kwasm.{uuid.uuid4().hex[:12]}", "namespace": namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid},
        "reason": reason,
        "message": message,
        "type": "Warning" if warning else "Normal",
        "source": {"component": "kwasm-py-agent", "host": node_name},
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
        "reportingComponent": "kwasm.sh/kwasm-py-agent",
        "reportingInstance": node_name,
    }


def send_event(api: AgentApi, event: JSON, *, log: Logger) -> None:
    """Takes the API port, an Event (:func:`node_event`) and the log; creates the Event in its
    namespace. Best effort: a lost Event is logged, nothing is raised."""
    try:
        api.create_event(str(event["metadata"]["namespace"]), event)
    except KubeError as ex:
        log("event_lost", level="warning", reason=event.get("reason"), error=ex.message)
