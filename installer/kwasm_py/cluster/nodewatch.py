"""EFFECTS: the agent's Node watch, in a thread of its own, so that timers never wait for it.

The thread reads the Node (GET), watches it from that resourceVersion and hands every Node
object it sees to the agent through a queue. The agent's loop waits on the queue no longer
than its next timer (a retry, a drift check, the kubelet deadline) is due, so a timer fires on
time whether the watch is idle for its whole term, stuck on a dead connection, or busy. The
loop itself (410: a fresh GET; other errors: backoff) is :func:`~kwasm_py.cluster.watchloop.follow`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from kwasm_py.cluster.agentlog import Logger
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.cluster.watchloop import follow
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON


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

    def _run(self) -> None:
        def read() -> str:
            node = self.api.get_node(self.name)
            self._queue.put(node)
            return str((node.get("metadata") or {}).get("resourceVersion", ""))

        def stream(rv: str) -> Iterator[JSON]:
            return self.api.watch_node(self.name, resource_version=rv, timeout_seconds=self.timeout_seconds)

        def on_error(ex: KubeError, pause: float) -> None:
            self.log(
                "api_error", level="warning", error=ex.message, status=ex.status, retry_in=f"{pause:.2f}s"
            )

        follow(
            "",
            read=read,
            stream=stream,
            handle=self._handle,
            stop=self._stop,
            delay=self.delay,
            on_error=on_error,
            on_relist=lambda: self.log("relist", reason="watch resourceVersion too old (410)"),
        )

    def _handle(self, event: JSON) -> None:
        kind = event.get("type")
        if kind == "BOOKMARK":
            return
        if kind == "DELETED":
            self.log("node_deleted", level="warning")
            return
        self._queue.put(event.get("object") or {})
