"""Failures cost little (issue 11 item 7), on real bookworm nodes under systemd.

Debian's containerd.service sets no start limit, so systemd's default (5 starts in 10 s) applies:
install/uninstall cycles back to back used to end in `failed (start-limit-hit)`. A restart that
fails must leave containerd running on the old config; a noexec install directory is refused.
"""

from __future__ import annotations

import time

import pytest
from nodekit import json_out
from test_node_engine import install, uninstall

from kwasm_py.errors import RestartError
from kwasm_py.model import RestartMethod, RestartSpec
from kwasm_py.node import restart


def _active(node) -> str:
    return node.run("systemctl", "is-active", "containerd").stdout.strip()


def _journal(node) -> str:
    """containerd's last log lines on the node, for a failure message."""
    return node.run("journalctl", "-u", "containerd", "-n", "25", "-o", "cat", "--no-pager").stdout


def test_install_uninstall_rounds_back_to_back_all_succeed(bookworm_node, test_shim):
    """Four install/uninstall rounds (8 restarts within seconds): each succeeds, containerd is
    active after each, and the unit's start limit is systemd's default (the case that failed)."""
    node, shim = bookworm_node, test_shim()
    limits = node.run(
        "systemctl", "show", "containerd", "-p", "StartLimitBurst", "-p", "StartLimitIntervalUSec"
    )
    assert "StartLimitBurst=5" in limits.stdout and "StartLimitIntervalUSec=10s" in limits.stdout, (
        limits.stdout
    )
    node.wait_ready()
    for round_ in range(1, 5):
        i = install(node, shim)
        assert i.returncode == 0, f"round {round_} install: {i.stdout}{i.stderr}{_journal(node)}"
        assert json_out(i)["restarted"] is True
        u = uninstall(node)
        assert u.returncode == 0, f"round {round_} uninstall: {u.stdout}{u.stderr}{_journal(node)}"
        assert json_out(u)["restarted"] is True
        assert _active(node) == "active", f"round {round_}"
    assert "spin" not in node.runtimes()
    assert node.run("systemctl", "show", "containerd", "-p", "Result", "--value").stdout.strip() == "success"


REFUSE = """[Service]
ExecStartPre=/bin/sh -c '! grep -q containerd-shim-spin-v2 /etc/containerd/config.toml'
"""


def test_a_failed_restart_leaves_containerd_running_on_the_old_config(bookworm_node, test_shim):
    """The unit refuses to start with our runtime in the file (an ExecStartPre check): the
    install fails, the old config is back and containerd is active again before it reports."""
    node, shim = bookworm_node, test_shim()
    dropin = node.path("/etc/systemd/system/containerd.service.d/kwasm-test-refuse.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(REFUSE)
    node.run("systemctl", "daemon-reload", check=True)
    node.wait_ready()
    before = node.snapshot(node.config)
    r = install(node, shim)
    assert r.returncode == 1, r.stdout + r.stderr
    error = json_out(r)["error"]
    assert error.startswith("restart:") and "rolled back" in error, error
    assert "containerd runs again with the previous config" in error, error
    assert _active(node) == "active"
    assert node.snapshot(node.config) == before
    assert "spin" not in node.runtimes()
    assert not node.path("/opt/kwasm/kwasm-state.json").exists()


def test_noexec_install_dir_seen_only_inside_the_node_is_refused(bookworm_node, test_shim):
    """/opt/kwasm on a noexec tmpfs mounted inside the node's own mount namespace (invisible
    under --host-root from here): found through the node's mountinfo, refused before anything
    changes, containerd not restarted."""
    node, shim = bookworm_node, test_shim()
    node.run("mkdir", "-p", "/opt/kwasm", check=True)
    node.run("mount", "-t", "tmpfs", "-o", "noexec,size=1m", "tmpfs", "/opt/kwasm", check=True)
    running = node.wait_ready()
    before = node.snapshot(node.config)
    r = install(node, shim)
    assert r.returncode == 1, r.stdout + r.stderr
    out = json_out(r)
    assert "noexec" in out["error"] and "/proc/" in out["error"], out
    assert "--install-dir" in out["hint"], out
    assert node.snapshot(node.config) == before and node.containerd() == running
    assert node.run("ls", "-A", "/opt/kwasm").stdout == ""


def test_crash_watch_reads_a_crash_looping_systemd_unit(bookworm_node):
    """A real unit that exits a moment after every start (Restart=always, RestartSec=1): the
    watch, built once the unit runs, reports the loop from systemd's NRestarts / auto-restart
    within seconds; a healthy unit over the same time is not reported."""
    node = bookworm_node
    for unit, body in (("kwasm-test-crash", "sleep 0.3; exit 1"), ("kwasm-test-fine", "exec sleep 600")):
        node.run(
            "systemd-run", f"--unit={unit}", "-p", "Restart=always", "-p", "RestartSec=1",
            "/bin/sh", "-c", body, check=True,
        )  # fmt: skip
    crash = restart.CrashWatch(RestartSpec(RestartMethod.SYSTEMD, "kwasm-test-crash"), pid=node.pid)
    fine = restart.CrashWatch(RestartSpec(RestartMethod.SYSTEMD, "kwasm-test-fine"), pid=node.pid)
    started = time.monotonic()
    with pytest.raises(RestartError, match=r"unit kwasm-test-crash"):
        while time.monotonic() - started < 30:  # bounded polling of the condition under test
            crash.check()
            fine.check()
            time.sleep(0.05)
    assert crash.exits >= 2 or "failed" in node.run("systemctl", "is-active", "kwasm-test-crash").stdout
    assert time.monotonic() - started < 15
    fine.check()
    assert fine.exits == 0
    node.run("systemctl", "stop", "kwasm-test-crash", "kwasm-test-fine")


CRASH_LOOP_START = """#!/bin/sh
# test: with our runtime in the file, containerd comes up on a copy of the old file (so the
# runtime never shows) and is killed 2 s later, at every start
if grep -q containerd-shim-spin-v2 /etc/containerd/config.toml; then
  (sleep 2; kill -9 $$) &
  exec /usr/bin/containerd --config /etc/containerd/kwasm-test-old.toml
fi
exec /usr/bin/containerd
"""
CRASH_LOOP = """[Service]
# Debian's unit keeps Restart=always, RestartSec=5
ExecStart=
ExecStart=/usr/local/sbin/kwasm-test-containerd
"""


def test_a_crash_loop_under_systemd_rolls_back_long_before_the_timeout(bookworm_node, test_shim):
    """containerd keeps dying after a restart that succeeded: the install stops waiting after two
    exits (NRestarts / auto-restart), not after KWASM_VERIFY_TIMEOUT=120, and containerd is
    active on the old config when it reports."""
    node, shim = bookworm_node, test_shim()
    node.path("/etc/containerd/kwasm-test-old.toml").write_bytes(node.path(node.config).read_bytes())
    start = node.path("/usr/local/sbin/kwasm-test-containerd")
    start.parent.mkdir(parents=True, exist_ok=True)
    start.write_text(CRASH_LOOP_START)
    start.chmod(0o755)
    dropin = node.path("/etc/systemd/system/containerd.service.d/kwasm-test-crash.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(CRASH_LOOP)
    node.run("systemctl", "daemon-reload", check=True)
    node.run("systemctl", "restart", "containerd", check=True)
    node.wait_ready()
    before = node.snapshot(node.config)
    started = time.monotonic()
    # not install(): it passes --timeout 20; the DaemonSet's way is the environment variable
    r = node.kwasm(
        "node", "install", "--shim", str(shim), "--output", "json",
        env={"KWASM_VERIFY_TIMEOUT": "120"}, timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    error = json_out(r)["error"]
    assert "crash-loops" in error and "unit containerd" in error, error
    assert "containerd runs again with the previous config" in error, error
    assert elapsed < 60, f"{elapsed:.0f} s: it waited for the timeout"
    assert _active(node) == "active"
    assert node.snapshot(node.config) == before
    assert "spin" not in node.runtimes()
