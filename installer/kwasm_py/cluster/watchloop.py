"""EFFECTS: the one list-then-watch loop behind the agent's watches (its Node, the slot Leases).

Starting from a resourceVersion, it streams watch events to a handler until asked to stop. A
410 (history compacted) reads the current state again; other API errors are reported and retried
with backoff; a stream that ends at once without events backs off too (a misbehaving server must
not make the thread spin).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from kwasm_py.errors import KubeError
from kwasm_py.model import JSON

#: Floor of the pause after a watch stream that ended at once without events (seconds).
EMPTY_STREAM_PAUSE = 0.1


def follow(
    rv: str,
    *,
    read: Callable[[], str],
    stream: Callable[[str], Iterable[JSON]],
    handle: Callable[[JSON], None],
    stop: threading.Event,
    delay: Callable[[int], float],
    on_error: Callable[[KubeError, float], None],
    on_relist: Callable[[], None] = lambda: None,
) -> None:
    """Watch from `rv` ("" : `read` the current state first) until `stop` is set.

    `read()` takes in the current state and returns its resourceVersion; `stream(rv)` opens a
    watch from there; `handle(event)` gets every event (bookmarks included); `on_error(ex,
    pause)` hears of a failed request before the pause of `delay(failures in a row)` seconds;
    `on_relist()` of a 410. Returns once `stop` is set; raises nothing.
    """
    failures = 0
    while not stop.is_set():
        try:
            if not rv:
                rv = read()
            rv, seen = _once(rv, stream, handle, stop, delay)
            if seen:
                failures = 0
        except KubeError as ex:
            rv = ""
            if ex.status == 410:
                on_relist()
                continue
            failures += 1
            pause = delay(failures)
            on_error(ex, pause)
            stop.wait(pause)


def _once(
    rv: str,
    stream: Callable[[str], Iterable[JSON]],
    handle: Callable[[JSON], None],
    stop: threading.Event,
    delay: Callable[[int], float],
) -> tuple[str, int]:
    started = time.monotonic()
    seen = 0
    for event in stream(rv):
        if stop.is_set():
            break
        obj = event.get("object") or {}
        rv = str((obj.get("metadata") or {}).get("resourceVersion", "")) or rv
        seen += 1
        handle(event)
    if seen == 0 and time.monotonic() - started < 0.5:
        stop.wait(max(EMPTY_STREAM_PAUSE, delay(1)))
    return rv, seen
