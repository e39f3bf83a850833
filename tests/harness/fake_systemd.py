"""A fake systemd Manager on a unix socket, speaking real D-Bus (jeepney's wire format).

It answers one client at a time, as systemd's private socket does (peer to peer; it also
answers Hello and AddMatch, so a client may treat it as a bus). It records every method call
(`calls`), knows a few units (`units`: name -> (load, active, argv list)), and finishes each
RestartUnit job with the result in `results` (default `done`), or never (`hang`). The real thing
is exercised by tests/nodes/test_node_dbus.py; this one makes the client's branches testable
without root.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jeepney import DBusAddress, new_error, new_method_return, new_signal
from jeepney.low_level import HeaderFields, MessageType, Parser

MANAGER = "org.freedesktop.systemd1.Manager"
MANAGER_PATH = "/org/freedesktop/systemd1"


def _object(unit: str) -> str:
    return "/org/freedesktop/systemd1/unit/" + unit.replace(".", "_2e").replace("-", "_2d")


@dataclass
class FakeSystemd:
    """The fake: start it with `serve(path)` (a context manager); then inspect `calls`."""

    units: dict[str, tuple[str, str, list[list[str]]]] = field(default_factory=dict)
    results: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    failed: set[str] = field(default_factory=set)  # units that refuse to start until reset
    drop_first_ping: bool = False
    #: per unit: [NRestarts, SubState] (tests change it between reads; default 0, "running")
    state: dict[str, list[Any]] = field(default_factory=dict)
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    _jobs: itertools.count = field(default_factory=lambda: itertools.count(1))
    _serials: itertools.count = field(default_factory=lambda: itertools.count(1))

    @contextlib.contextmanager
    def serve(self, path: Path) -> Any:
        """Listen on `path` in a thread until the block ends."""
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen(4)
        listener.settimeout(0.05)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    self._session(conn, stop)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)
            listener.close()
            path.unlink(missing_ok=True)

    def _session(self, conn: socket.socket, stop: threading.Event) -> None:
        conn.settimeout(0.05)
        data = b""
        while b"BEGIN\r\n" not in data and not stop.is_set():  # the SASL exchange, line by line
            with contextlib.suppress(TimeoutError):
                chunk = conn.recv(1024)
                if not chunk:
                    return
                data += chunk
                if b"AUTH" in chunk:
                    conn.sendall(b"OK 0123456789abcdef0123456789abcdef\r\n")
        parser = Parser()
        pending = parser.feed(data.split(b"BEGIN\r\n", 1)[1])  # the first call may ride along
        while not stop.is_set():
            for msg in pending:
                for out in self._answer(msg):
                    conn.sendall(out.serialise(serial=next(self._serials)))
            pending = []
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            pending = parser.feed(chunk)

    def _answer(self, msg: Any) -> list[Any]:
        if msg.header.message_type is not MessageType.method_call:
            return []
        member = msg.header.fields[HeaderFields.member]
        self.calls.append((member, tuple(msg.body)))
        if member == "Ping":
            if self.drop_first_ping and not any(c[0] == "Ping" for c in self.calls[:-1]):
                return []  # as systemd's private socket drops the first message
            return [new_method_return(msg)]
        if member == "Hello":
            return [new_method_return(msg, "s", (":1.42",))]
        if member in ("AddMatch", "Subscribe"):
            return [new_method_return(msg)]
        if member == "LoadUnit":
            return [new_method_return(msg, "o", (_object(msg.body[0]),))]
        if member == "Get":
            return [self._property(msg)]
        if member == "ResetFailedUnit":
            unit = msg.body[0]
            if unit.removesuffix(".service") not in self.units:
                return [
                    new_error(msg, "org.freedesktop.systemd1.NoSuchUnit", "s", (f"Unit {unit} not loaded.",))
                ]
            self.failed.discard(unit)
            return [new_method_return(msg)]
        if member == "GetUnit":
            return [new_method_return(msg, "o", (_object(msg.body[0]),))]
        if member == "RestartUnit":
            unit = msg.body[0]
            if unit in self.failed:
                return [new_error(msg, "org.freedesktop.systemd1.UnitStartLimitHit", "s", ("start limit",))]
            job_id = next(self._jobs)
            job = f"/org/freedesktop/systemd1/job/{job_id}"
            out = [new_method_return(msg, "o", (job,))]
            if not self.hang:
                manager = DBusAddress(MANAGER_PATH, interface=MANAGER)
                other = new_signal(manager, "JobRemoved", "uoss", (job_id + 500, "/x/job/0", "other", "done"))
                ours = new_signal(
                    manager, "JobRemoved", "uoss", (job_id, job, unit, self.results.get(unit, "done"))
                )
                out += [other, ours]
            return out
        return [new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (member,))]

    def _property(self, msg: Any) -> Any:
        path = msg.header.fields[HeaderFields.path]
        _iface, name = msg.body
        by_path = {_object(f"{unit}.service"): facts for unit, facts in self.units.items()}
        load, active, argvs = by_path.get(path, ("not-found", "inactive", []))
        unit = next((u for u in self.units if _object(f"{u}.service") == path), "")
        restarts, sub = self.state.get(unit, [0, "running"])
        values: dict[str, tuple[str, Any]] = {
            "LoadState": ("s", load),
            "ActiveState": ("s", "failed" if self.results else active),
            "Result": ("s", "exit-code"),
            "SubState": ("s", sub),
            "NRestarts": ("u", restarts),
            "ExecStart": (
                "a(sasbttttuii)",
                [(argv[0], argv, False, 0, 0, 0, 0, 0, 0, 0) for argv in argvs],
            ),
        }
        return new_method_return(msg, "v", (values[name],))
