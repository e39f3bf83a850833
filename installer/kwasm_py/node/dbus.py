"""systemd over D-Bus: restart units and read what they run, with no hostPID and no nsenter.

The minimal installer pod has the node's system bus socket (``/run/dbus/system_bus_socket``) or
systemd's private socket (``/run/systemd/private``, peer to peer, no bus daemon) under its host
root. Through it this module asks systemd's Manager API (org.freedesktop.systemd1(5)) which units
exist and what they run (``ExecStart``), and restarts a unit: ``ResetFailedUnit`` (a unit that hit
its start limit refuses to start until reset), ``RestartUnit(unit, "replace")``, then the job's
``JobRemoved`` signal, whose result says whether the restart worked. The client is jeepney (pure
Python, no libdbus).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from kwasm_py.errors import RestartError
from kwasm_py.model import Layout, RestartMethod, RestartSpec
from kwasm_py.node import layout as lay

SYSTEM_BUS = PurePosixPath("/run/dbus/system_bus_socket")
SYSTEMD_PRIVATE = PurePosixPath("/run/systemd/private")
_SYSTEMD = "org.freedesktop.systemd1"
_MANAGER_PATH = "/org/freedesktop/systemd1"
_MANAGER = "org.freedesktop.systemd1.Manager"
_UNIT = "org.freedesktop.systemd1.Unit"
_SERVICE = "org.freedesktop.systemd1.Service"
_UNIT_SUFFIXES = (".service", ".socket", ".target", ".scope", ".mount", ".timer", ".slice")
_RUNNING = ("active", "activating", "reloading")
#: What each unit's containerd reads, when the unit runs containerd as a child (k3s, rke2, k0s,
#: microk8s start it with these `--config` files; /proc shows the same argv on such nodes).
_CHILD_CONFIGS = {
    "k3s": lay.K3S_DIR / "config.toml",
    "k3s-agent": lay.K3S_DIR / "config.toml",
    "rke2-server": lay.RKE2_DIR / "config.toml",
    "rke2-agent": lay.RKE2_DIR / "config.toml",
    "k0sworker": lay.K0S_CONFIG,
    "k0scontroller": lay.K0S_CONFIG,
    "snap.microk8s.daemon-containerd": lay.MICROK8S_ARGS / "containerd.toml",
}


def unit_name(name: str) -> str:
    """`name` as a full unit name: `containerd` -> `containerd.service` (suffixed names kept)."""
    return name if name.endswith(_UNIT_SUFFIXES) else f"{name}.service"


@dataclass(frozen=True)
class UnitInfo:
    """One unit as systemd reports it: LoadState, ActiveState and the argv of each ExecStart."""

    name: str  # as layout.UNITS names it (no .service)
    load_state: str
    active_state: str
    exec_start: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class UnitFacts:
    """What systemd said about the units that may run containerd (layout.UNITS)."""

    units: tuple[UnitInfo, ...] = ()

    @property
    def loaded(self) -> frozenset[str]:
        """Units that exist (a unit file was found), whatever their state."""
        return frozenset(u.name for u in self.units if u.load_state not in ("not-found", ""))

    def running_configs(self) -> tuple[PurePosixPath, ...]:
        """The config file of each running unit's containerd (node paths), as /proc would show.

        A unit whose ExecStart is containerd itself reads its `--config` (default
        /etc/containerd/config.toml); k3s, rke2, k0s and microk8s units read their own file.
        """
        from kwasm_py.node.procfs import config_from_argv

        configs: list[PurePosixPath] = []
        for unit in self.units:
            if unit.active_state not in _RUNNING:
                continue
            for argv in unit.exec_start:
                if argv and PurePosixPath(argv[0]).name == "containerd":
                    configs.append(config_from_argv(list(argv[1:])))
            if unit.name in _CHILD_CONFIGS:
                configs.append(_CHILD_CONFIGS[unit.name])
        return tuple(dict.fromkeys(configs))


def over_bus(layout: Layout) -> Layout:
    """`layout` with its systemd restart done over D-Bus (`dbus:UNIT`); other methods unchanged."""
    if layout.restart.method is not RestartMethod.SYSTEMD:
        return layout
    return replace(layout, restart=RestartSpec(RestartMethod.DBUS, layout.restart.target))


def describe(spec: RestartSpec, bus: PurePosixPath) -> str:
    """The D-Bus restart in words (for `plan`): the calls made and the node socket used."""
    unit = unit_name(spec.target)
    return f"D-Bus {bus}: ResetFailedUnit {unit}, RestartUnit {unit} replace, wait for the job"


class SystemdBus:
    """A connection to systemd's Manager over the unix socket `socket` (a host path).

    `direct` says the socket is systemd's private one (no bus daemon: no Hello, no AddMatch);
    None guesses it from the name (`.../systemd/private`). Raises RestartError when the socket
    cannot be reached or refuses us.
    """

    def __init__(self, socket: Path, *, direct: bool | None = None, timeout: float = 5.0) -> None:
        from jeepney.io.blocking import DBusConnection, prep_socket

        self.socket = Path(socket)
        self.direct = self.socket.name == "private" if direct is None else direct
        self.timeout = timeout
        self._subscribed = False
        try:
            sock = prep_socket(str(self.socket), timeout=timeout)
        except (OSError, TimeoutError, ValueError) as err:
            raise RestartError(
                f"cannot reach systemd over D-Bus at {self.socket}: {err}",
                hint="mount the node's /run/dbus/system_bus_socket (or /run/systemd/private) "
                "into the pod, or use the privileged manifest (hostPID)",
            ) from err
        except Exception as err:  # jeepney.auth.AuthenticationError is not an OSError
            raise RestartError(
                f"systemd's D-Bus at {self.socket} refused us: {err}",
                hint="the agent must run as root (uid 0) to manage units",
            ) from err
        try:
            if self.direct:
                self.conn = _direct_connection(sock)
                self._ping_until_answered()
            else:
                self.conn = DBusConnection(sock)
        except (OSError, TimeoutError, ValueError) as err:
            sock.close()
            raise RestartError(f"D-Bus at {self.socket} closed the connection: {err}") from err

    def _ping_until_answered(self) -> None:
        """Ping systemd on a fresh private connection until it answers (within the timeout).

        systemd (seen with 252) drops a message that reaches its private socket right after the
        auth exchange; a second one is answered. Peer.Ping is harmless to lose, so it goes first
        and nothing that changes state can be the one dropped. Raises TimeoutError.
        """
        from jeepney import DBusAddress, new_method_call

        ping = new_method_call(
            DBusAddress(_MANAGER_PATH, bus_name=_SYSTEMD, interface="org.freedesktop.DBus.Peer"), "Ping"
        )
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.conn.send_and_get_reply(ping, timeout=min(0.1, max(deadline - time.monotonic(), 0.01)))
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> SystemdBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ---------------------------------------------------------------------------------

    def call(
        self, path: str, interface: str, method: str, signature: str = "", *args: Any
    ) -> tuple[Any, ...]:
        """Call `method` of systemd; return the reply body. Raises RestartError on an error
        reply (its D-Bus error name in the message) or when no reply comes within the timeout."""
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg

        address = DBusAddress(path, bus_name=_SYSTEMD, interface=interface)
        message = new_method_call(address, method, signature or None, args)
        try:
            reply = self.conn.send_and_get_reply(message, timeout=self.timeout)
            return tuple(unwrap_msg(reply))
        except DBusErrorResponse as err:
            raise RestartError(
                f"systemd: {method} failed: {err.name}: {' '.join(map(str, err.data))}"
            ) from err
        except (OSError, TimeoutError) as err:
            raise RestartError(f"systemd did not answer {method} over {self.socket}: {err}") from err

    def prop(self, path: str, interface: str, name: str) -> Any:
        """Property `name` of object `path` (its value, unwrapped from the variant)."""
        (_, value) = self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", interface, name)[0]
        return value

    def unit_state(self, name: str) -> dict[str, str]:
        """NRestarts, ActiveState and SubState of unit `name`, as strings (the keys and values
        `systemctl show` prints; NRestarts only for a service). Raises RestartError."""
        (path,) = self.call(_MANAGER_PATH, _MANAGER, "LoadUnit", "s", unit_name(name))
        state = {k: str(self.prop(path, _UNIT, k)) for k in ("ActiveState", "SubState")}
        if unit_name(name).endswith(".service"):
            state["NRestarts"] = str(self.prop(path, _SERVICE, "NRestarts"))
        return state

    def unit(self, name: str) -> UnitInfo:
        """LoadState, ActiveState and ExecStart argvs of unit `name` (loaded if need be)."""
        (path,) = self.call(_MANAGER_PATH, _MANAGER, "LoadUnit", "s", unit_name(name))
        load = str(self.prop(path, _UNIT, "LoadState"))
        active = str(self.prop(path, _UNIT, "ActiveState"))
        argvs: tuple[tuple[str, ...], ...] = ()
        if load == "loaded" and unit_name(name).endswith(".service"):
            # ExecStart is a(sasbttttuii): (path, argv, ignore-failure, timestamps, pid, code, status).
            argvs = tuple(tuple(entry[1]) for entry in self.prop(path, _SERVICE, "ExecStart"))
        return UnitInfo(name, load, active, argvs)

    def facts(self, names: Iterable[str] = lay.UNITS) -> UnitFacts:
        """UnitInfo of every unit in `names` (default: every unit that may run containerd)."""
        return UnitFacts(tuple(self.unit(n) for n in names))

    def restart(self, name: str, *, timeout: float, started: Callable[[], None] = lambda: None) -> None:
        """Reset-failed then restart unit `name`; return once systemd's job for it is done.

        Calls `started` once systemd accepted the job. Raises RestartError when systemd refuses
        the restart, the job ends with any result but `done` (failed, timeout, dependency,
        canceled; the unit's own Result is named), or no result comes within `timeout` seconds.
        """
        from jeepney import MatchRule

        unit = unit_name(name)
        with contextlib.suppress(RestartError):  # NoSuchUnit: not loaded, so not failed either
            self.call(_MANAGER_PATH, _MANAGER, "ResetFailedUnit", "s", unit)
        # Locally a signal's sender is systemd's unique name (:1.N), so the local filter names
        # no sender; the bus daemon's match (AddMatch) resolves the well-known name itself.
        rule = MatchRule(type="signal", interface=_MANAGER, member="JobRemoved", path=_MANAGER_PATH)
        if not self._subscribed:  # once per connection: a second Subscribe is AlreadySubscribed
            self.call(_MANAGER_PATH, _MANAGER, "Subscribe")
            if not self.direct:
                bus_rule = MatchRule(
                    type="signal",
                    sender=_SYSTEMD,
                    interface=_MANAGER,
                    member="JobRemoved",
                    path=_MANAGER_PATH,
                )
                self.call_bus("AddMatch", "s", bus_rule.serialise())
            self._subscribed = True
        with self.conn.filter(rule, queue=deque()) as removed:
            (job,) = self.call(_MANAGER_PATH, _MANAGER, "RestartUnit", "ss", unit, "replace")
            started()
            result = self._job_result(removed, job, timeout=timeout, unit=unit)
        if result != "done":
            raise RestartError(
                f"systemd's restart job for {unit} ended `{result}` ({self._unit_result(unit)})",
                hint=f"see `journalctl -u {unit}` on the node",
            )

    def call_bus(self, method: str, signature: str, *args: Any) -> None:
        """Call `method` of the bus daemon itself (org.freedesktop.DBus: AddMatch)."""
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg

        bus = DBusAddress(
            "/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.freedesktop.DBus"
        )
        try:
            unwrap_msg(
                self.conn.send_and_get_reply(
                    new_method_call(bus, method, signature, args), timeout=self.timeout
                )
            )
        except (DBusErrorResponse, OSError, TimeoutError) as err:
            raise RestartError(f"D-Bus {method} failed at {self.socket}: {err}") from err

    def _job_result(self, removed: deque[Any], job: str, *, timeout: float, unit: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            while removed:
                _id, path, _unit, result = removed.popleft().body
                if path == job:
                    return str(result)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RestartError(f"systemd's restart job for {unit} did not finish within {timeout:.0f} s")
            try:
                self.conn.recv_messages(timeout=left)
            except TimeoutError:
                continue
            except OSError as err:
                raise RestartError(f"D-Bus at {self.socket} went away during the restart of {unit}") from err

    def _unit_result(self, unit: str) -> str:
        try:
            (path,) = self.call(_MANAGER_PATH, _MANAGER, "GetUnit", "s", unit)
            active = self.prop(path, _UNIT, "ActiveState")
            result = self.prop(path, _SERVICE, "Result") if unit.endswith(".service") else "?"
        except RestartError as err:
            return f"state unknown: {err.message}"
        return f"unit {active}, result {result}"


def _direct_connection(sock: Any) -> Any:
    """A jeepney blocking connection on an authenticated peer-to-peer socket (no Hello: the
    private socket is systemd itself, not a bus daemon)."""
    from jeepney.io.blocking import DBusConnection, DBusConnectionBase
    from jeepney.io.common import MessageFilters

    conn = DBusConnection.__new__(DBusConnection)
    DBusConnectionBase.__init__(conn, sock)
    conn._filters = MessageFilters()
    return conn


@contextlib.contextmanager
def connect(socket: Path, *, timeout: float = 5.0) -> Iterator[SystemdBus]:
    """A SystemdBus on `socket` (a host path), closed on exit; raises RestartError (see it)."""
    bus = SystemdBus(socket, timeout=timeout)
    try:
        yield bus
    finally:
        bus.close()


def restart(
    spec: RestartSpec, *, bus: Path, timeout: float, started: Callable[[], None] = lambda: None
) -> None:
    """Restart unit `spec.target` over the D-Bus socket `bus` (host path); see SystemdBus.restart."""
    with connect(bus, timeout=min(timeout, 10.0)) as conn:
        conn.restart(spec.target, timeout=timeout, started=started)


def read_facts(bus: Path, *, timeout: float = 5.0) -> UnitFacts:
    """UnitFacts of layout.UNITS over the D-Bus socket `bus`; raises RestartError when systemd
    cannot be reached or does not answer."""
    with connect(bus, timeout=timeout) as conn:
        return conn.facts()
