"""A failed `systemctl restart` says why systemd failed the start (kwasm_py.node.restart).

The flaky rounds on loaded machines failed with systemd's generic "control process exited with
error code"; the unit's own record said `status=219/CGROUP` (systemd could not put containerd
into its cgroup, so containerd never ran). Checked with fake `nsenter` / `systemctl` /
`rc-service` commands on PATH that log how they were called.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kwasm_py.errors import RestartError
from kwasm_py.model import RestartMethod, RestartSpec
from kwasm_py.node import restart

SYSTEMD = RestartSpec(RestartMethod.SYSTEMD, "containerd")
JOB_FAILED = "Job for containerd.service failed because the control process exited with error code."


@pytest.mark.parametrize(
    ("show", "phrase"),
    [
        (
            "Result=exit-code\nExecMainCode=1\nExecMainStatus=219\n",
            "unit result exit-code, main process status=219/CGROUP: "
            "systemd could not set it up, it never ran",
        ),
        (
            "Result=exit-code\nExecMainCode=1\nExecMainStatus=1\n",
            "unit result exit-code, main process exited, status 1",
        ),
        (
            "Result=signal\nExecMainCode=2\nExecMainStatus=9\n",
            "unit result signal, main process killed, signal 9",
        ),
        ("Result=timeout\nExecMainCode=0\nExecMainStatus=0\n", "unit result timeout"),
        ("Result=success\nExecMainCode=0\nExecMainStatus=0\n", ""),
        ("", ""),
    ],
    ids=["cgroup", "exit-1", "killed", "timeout", "nothing", "empty"],
)
def test_unit_failure_names_what_systemd_recorded(show: str, phrase: str) -> None:
    """Result and the main process's end, in words; systemd's own statuses by their name."""
    assert restart.unit_failure(show) == phrase


def _fake_node_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, restart_exit: int) -> Path:
    """nsenter runs what follows `--`; systemctl / rc-service log argv and act as told."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    scripts = {
        "nsenter": 'while [ "$1" != -- ]; do shift; done; shift; exec "$@"',
        "systemctl": (
            f'echo "systemctl $*" >> {log}\n'
            'case "$1" in\n'
            f"  restart) echo '{JOB_FAILED}' >&2; exit {restart_exit};;\n"
            "  show) printf 'Result=exit-code\\nExecMainCode=1\\nExecMainStatus=219\\n';;\n"
            "esac"
        ),
        "rc-service": (
            f'echo "rc-service $*" >> {log}\necho " * ERROR: containerd failed to start" >&2; exit 1'
        ),
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return log


def test_failed_systemd_restart_reports_the_units_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reset-failed, restart (fails), then the unit's record is read, before anything else can
    restart it; the error keeps systemctl's line, adds systemd's reason and points at the log."""
    log = _fake_node_commands(tmp_path, monkeypatch, restart_exit=1)
    with pytest.raises(RestartError) as info:
        restart.restart(SYSTEMD, pid=1, timeout=10)
    assert info.value.message == (
        f"`systemctl restart containerd` failed in the node (exit 1): {JOB_FAILED} (unit result "
        "exit-code, main process status=219/CGROUP: systemd could not set it up, it never ran)"
    )
    assert info.value.hint == "see the node's log of it: journalctl -u containerd"
    assert log.read_text().splitlines() == [
        "systemctl reset-failed containerd",
        "systemctl restart containerd",
        "systemctl show --property=Result,ExecMainCode,ExecMainStatus containerd",
    ]


def test_successful_restart_reads_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart that succeeds costs no extra systemctl call."""
    log = _fake_node_commands(tmp_path, monkeypatch, restart_exit=0)
    restart.restart(SYSTEMD, pid=1, timeout=10)
    assert log.read_text().splitlines() == [
        "systemctl reset-failed containerd",
        "systemctl restart containerd",
    ]


def test_failed_openrc_restart_asks_no_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenRC: the error is rc-service's line alone; systemctl is never called."""
    log = _fake_node_commands(tmp_path, monkeypatch, restart_exit=1)
    with pytest.raises(RestartError) as info:
        restart.restart(RestartSpec(RestartMethod.OPENRC, "containerd"), pid=1, timeout=10)
    assert info.value.message == (
        "`rc-service containerd restart` failed in the node (exit 1): * ERROR: containerd failed to start"
    )
    assert info.value.hint == ""
    assert log.read_text().splitlines() == ["rc-service containerd restart"]
