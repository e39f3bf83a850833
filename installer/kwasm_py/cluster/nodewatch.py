"""EFFECTS: the agent's Node watch, in a thread of its own, so that timers never wait for it.

The thread reads the Node (GET), watches it from that resourceVersion and hands every Node
object it sees to the agent through a queue. The agent's loop waits on the queue no longer
than its next timer (a retry, a drift check, the kubelet deadline) is due, so a timer fires on
time whether the watch is idle for its whole term, stuck on a dead connection, or busy. A 410
(history compacted) starts again from a fresh GET; other API errors are logged and retried
with backoff; a stream that ends at once without events backs off too (a misbehaving server
must not make the thread spin).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from kwasm_py.cluster.agentlog import Logger
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON

#: Floor of the pause after a watch stream that ended at once without events (seconds).
EMPTY_STREAM_PAUSE = 0.1


class NodeWatch:
    """Watches Node ``name`` through ``api`` in a daemon thread; :meth:`next` hands out what it saw.

    Takes the API port, the node name, the server-side watch term (seconds), the log and the
    backoff (``delay(attempt)`` seconds after the attempt-th failure in a row).
    """

    def __init__(
        self,
        api: AgentApi,
        name: str,
        *,
        timeout_seconds: int,
        log: Logger,
        delay: Callable[[int], float],
    ) -> None:
        self.api = api
        self.name = name
        self.timeout_seconds = timeout_seconds
        self.log = log
        self.delay = delay
        self._queue: queue.Queue[JSON | None] = queue.Queue()  # None: wake the reader up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Takes nothing; starts the watch thread. Returns at once."""
        self._thread = threading.Thread(target=self._run, name="node-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Takes nothing; asks the thread to end (it does at its next event, failure or term;
        being a daemon thread it never holds up the process's exit)."""
        self._stop.set()

    def wake(self) -> None:
        """Takes nothing; makes a `next` waiting in another thread return (None) at once, so
        the agent's loop sees a stop request without waiting for the next Node event."""
        self._queue.put(None)

    def next(self, timeout: float | None) -> JSON | None:
        """Takes the longest wait in seconds (None: until something arrives); returns the newest
        Node object seen since the last call (older ones queued behind it are superseded), or
        None when nothing arrived in time or `wake` was called."""
        try:
            node = self._queue.get(timeout=None if timeout is None else max(0.0, timeout))
        except queue.Empty:
            return None
        while True:
            try:
                newer = self._queue.get_nowait()
            except queue.Empty:
                return node
            node = newer if newer is not None else node

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _run(self) -> None:
        rv = ""
        failures = 0
        while not self._stop.is_set():
            try:
                if not rv:
                    node = self.api.get_node(self.name)
                    rv = str((node.get("metadata") or {}).get("resourceVersion", ""))
                    self._queue.put(node)
                rv, seen = self._watch_once(rv)
                if seen:
                    failures = 0
            except KubeError as ex:
                if ex.status == 410:
                    self.log("relist", reason="watch resourceVersion too old (410)")
                    rv = ""
                    continue
                failures += 1
                delay = self.delay(failures)
                self.log(
                    "api_error", level="warning", error=ex.message, status=ex.status, retry_in=f"{delay:.2f}s"
                )
                rv = ""
                self._pause(delay)

    def _watch_once(self, rv: str) -> tuple[str, int]:
        started = time.monotonic()
        seen = 0
        events = self.api.watch_node(self.name, resource_version=rv, timeout_seconds=self.timeout_seconds)
        for event in events:
            if self._stop.is_set():
                break
            obj = event.get("object") or {}
            rv = str((obj.get("metadata") or {}).get("resourceVersion", "")) or rv
            seen += 1
            kind = event.get("type")
            if kind == "BOOKMARK":
                continue
            if kind == "DELETED":
                self.log("node_deleted", level="warning")
                continue
            self._queue.put(obj)
        if seen == 0 and time.monotonic() - started < 0.5:
            self._pause(max(EMPTY_STREAM_PAUSE, self.delay(1)))
        return rv, seen
