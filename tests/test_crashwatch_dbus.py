"""CrashWatch for `dbus:UNIT` restarts: the unit's NRestarts / ActiveState / SubState read over
D-Bus (here a fake reader standing in for SystemdBus.unit_state), with the systemctl path's
semantics: automatic restarts since the baseline, plus one pending in auto-restart, and a
failed unit at once."""

from __future__ import annotations

import pytest

from kwasm_py.errors import RestartError
from kwasm_py.model import RestartMethod, RestartSpec
from kwasm_py.node import restart

SPEC = RestartSpec(RestartMethod.DBUS, "containerd")


class FakeBus:
    """Answers the property reads from a script of states; records the units asked for."""

    def __init__(self, *states: dict[str, str]) -> None:
        self.states, self.asked = list(states), []  # type: list[dict[str, str]], list[str]

    def __call__(self, unit: str) -> dict[str, str]:
        self.asked.append(unit)
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def _state(n: int, sub: str = "running", active: str = "active") -> dict[str, str]:
    return {"NRestarts": str(n), "SubState": sub, "ActiveState": active}


@pytest.fixture(autouse=True)
def _no_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restart, "_WATCH_EVERY", 0.0)


def test_crash_loop_counted_from_nrestarts_and_auto_restart() -> None:
    bus = FakeBus(_state(5), _state(5, "auto-restart", "activating"), _state(6), _state(7, "auto-restart"))
    watch = restart.CrashWatch(SPEC, pid=1, limit=3, unit_reader=bus)
    watch.check()  # baseline NRestarts=5
    watch.check()
    assert watch.exits == 1
    watch.check()
    assert watch.exits == 1  # the pending exit became restart number 6: still one
    with pytest.raises(RestartError, match=r"containerd exited 3 times .*unit containerd"):
        watch.check()
    assert set(bus.asked) == {"containerd"}


def test_failed_unit_raises_at_once() -> None:
    bus = FakeBus(_state(0), _state(2, "failed", "failed"))
    watch = restart.CrashWatch(SPEC, pid=1, limit=5, unit_reader=bus)
    watch.check()
    with pytest.raises(RestartError, match=r"unit containerd is failed \(failed\).*exited 3 time"):
        watch.check()


def test_healthy_unit_and_unreadable_bus_count_nothing() -> None:
    def broken(unit: str) -> dict[str, str]:
        raise RestartError(f"systemd did not answer Get for {unit}")

    for reader in (FakeBus(_state(3)), broken):
        watch = restart.CrashWatch(SPEC, pid=1, limit=1, unit_reader=reader)
        for _ in range(5):
            watch.check()
        assert watch.exits == 0


def test_baseline_in_auto_restart_counts_one() -> None:
    watch = restart.CrashWatch(SPEC, pid=1, limit=2, unit_reader=FakeBus(_state(1, "auto-restart")))
    watch.check()
    assert watch.exits == 1
