"""EFFECTS: a live copy of the Leases in the installer namespace (list, then watch, in a thread).

The restart slots (:mod:`~kwasm_py.cluster.leases`) decide from this copy: which slot is free,
who waits in the queue and in which order, whether a slot was handed to us. One LIST gives the
start and its resourceVersion; a watch from there keeps the copy current, so a waiting node
learns of a released or handed-over slot within one event delivery instead of at its next poll.
A 410 (history compacted) lists again; other API errors are logged and retried with backoff
(:func:`~kwasm_py.cluster.watchloop.follow`).
Our own writes are applied at once from their answers (:meth:`LeaseView.put`), so a decision
never waits for the echo of our own write.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from kwasm_py.cluster.agentlog import Logger
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.cluster.watchloop import follow
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON


def _name(obj: JSON) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _version(obj: JSON) -> int:
    """The object's resourceVersion as a number for "which copy is newer" (-1 when not one;
    etcd's revisions are, and the stand-in's too; when not, the newest copy seen wins)."""
    rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
    return int(rv) if rv.isdigit() else -1


class LeaseView:
    """The Leases of ``namespace`` as last seen, kept current by a daemon thread.

    Takes the API port, the namespace, the server-side watch term (seconds), the log and the
    backoff (``delay(attempt)`` seconds after the attempt-th failure in a row). ``wake_on`` is
    the name prefix of the Leases whose changes end a :meth:`wait` (the restart slots: a
    waiter has nothing to decide when another node joins or leaves the queue, and in a rollout
    those are most of the events); every change is recorded in the copy all the same.
    """

    def __init__(
        self,
        api: AgentApi,
        namespace: str,
        *,
        timeout_seconds: int,
        log: Logger,
        delay: Callable[[int], float],
        wake_on: str = "",
    ) -> None:
        self.api = api
        self.wake_on = wake_on
        self.namespace = namespace
        self.timeout_seconds = timeout_seconds
        self.log = log
        self.delay = delay
        self._leases: dict[str, JSON] = {}
        self._changed = threading.Condition()
        self._generation = 0  # bumped on every change, so `wait` knows whether one came
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Takes nothing; lists the Leases (raises KubeError when that fails) and starts the
        watch thread from the list's resourceVersion. Returns once the first copy is in."""
        rv = self._read()
        self._thread = threading.Thread(target=self._run, args=(rv,), name="lease-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Takes nothing; asks the thread to end (at its next event, failure or watch term)."""
        self._stop.set()
        self.wake()

    def snapshot(self) -> dict[str, JSON]:
        """Takes nothing; returns the Leases by name as last seen (a shallow copy of the map;
        the objects are shared: do not change them)."""
        with self._changed:
            return dict(self._leases)

    def put(self, obj: JSON) -> None:
        """Takes a Lease as the API server answered our write; records it unless a newer copy
        came through the watch already."""
        self._apply("MODIFIED", obj)

    def forget(self, name: str) -> None:
        """Takes a Lease name we deleted; drops it from the copy."""
        with self._changed:
            if self._leases.pop(name, None) is not None:
                self._changed_one(name)

    def wake(self) -> None:
        """Takes nothing; makes a `wait` in another thread return at once."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def wait(self, generation: int, timeout: float) -> int:
        """Takes the generation a caller last decided on and the longest wait (seconds);
        returns the current generation once it differs (something changed, or `wake`) or the
        timeout passed."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != generation, timeout=max(0.0, timeout))
            return self._generation

    @property
    def generation(self) -> int:
        """The number of changes seen so far of Leases named ``wake_on...``, plus the wakes
        (pass it to `wait`)."""
        with self._changed:
            return self._generation

    def _apply(self, kind: str, obj: JSON) -> None:
        name = _name(obj)
        if not name:
            return
        with self._changed:
            old = self._leases.get(name)
            if kind == "DELETED":
                if old is None or _version(old) <= _version(obj) or _version(obj) < 0:
                    self._leases.pop(name, None)
            elif old is None or _version(obj) < 0 or _version(old) <= _version(obj):
                self._leases[name] = obj
            else:
                return
            self._changed_one(name)

    def _changed_one(self, name: str) -> None:
        """Lease `name` changed in the copy (lock held): wake the waits if it is one they want."""
        if name.startswith(self.wake_on):
            self._generation += 1
            self._changed.notify_all()

    def _read(self) -> str:
        items, rv = self.api.list_leases(self.namespace)
        with self._changed:
            self._leases = {_name(i): i for i in items if _name(i)}
            self._generation += 1
            self._changed.notify_all()
        return rv

    def _run(self, rv: str) -> None:
        def stream(since: str) -> Iterator[JSON]:
            return self.api.watch_leases(
                self.namespace, resource_version=since, timeout_seconds=self.timeout_seconds
            )

        def on_error(ex: KubeError, pause: float) -> None:
            self.log("lease_watch_error", level="warning", error=ex.message, retry_in=f"{pause:.2f}s")

        follow(
            rv,
            read=self._read,
            stream=stream,
            handle=self._handle,
            stop=self._stop,
            delay=self.delay,
            on_error=on_error,
        )

    def _handle(self, event: JSON) -> None:
        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
            self._apply(str(event["type"]), event.get("object") or {})
