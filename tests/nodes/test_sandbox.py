"""The sandbox nodes themselves: they boot, their containerd answers, they stop cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from nodekit import KINDS, REPO, SPIN_RUNTIME_TYPE

from kwasm_py import sandbox
from kwasm_py.errors import SandboxError
from kwasm_py.sandbox import host
from tests.harness.cli import KWASM_ARGV, run_kwasm

pytestmark = [pytest.mark.root, pytest.mark.nspawn]

SPIN_V2 = f"""
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."spin"]
  runtime_type = "{SPIN_RUNTIME_TYPE}"
"""
SPIN_V3 = f"""
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'spin']
  runtime_type = "{SPIN_RUNTIME_TYPE}"
"""


def _wait_new_containerd(node, old_pid: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        proc = node.containerd()
        if proc and proc[0] != old_pid and sandbox.ready(node.node):
            return proc[0]
        assert time.monotonic() < deadline, f"containerd on {node} did not come back"
        time.sleep(0.05)  # polling a condition with a deadline


def test_every_kind_boots_with_a_working_containerd(any_node):
    """Each node kind boots; its own containerd answers CRI status with the runc runtime."""
    pid, _ = any_node.wait_ready()
    assert any_node.runtimes().get("runc") == "io.containerd.runc.v2"
    # The node's containerd runs inside the node's PID namespace, not this machine's.
    assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{any_node.pid}/ns/pid")
    assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    # The config containerd reads is the one the flavour says, and containerd accepts it.
    assert any_node.path(any_node.config).is_file()
    assert any_node.config_dump().returncode == 0


@pytest.mark.parametrize(
    ("suite", "major", "version"), [("bookworm", 1, "version = 2"), ("sid", 2, "version = 3")]
)
def test_suites_give_both_containerd_generations(make_node, suite, major, version):
    """bookworm runs containerd 1.x, sid runs 2.x (whose default config is version 3)."""
    node = make_node(suite, "containerd")
    assert node.containerd_major() == major
    assert version in node.run("containerd", "config", "default", check=True).stdout


def test_down_stops_exactly_its_processes_and_removes_the_copy(node_state, node_roots):
    """down ends the nspawn process and node PID 1 it recorded, unmounts and deletes the copy."""
    node_roots("bookworm")
    node = sandbox.up(suite="bookworm", name="t-down", state=node_state)
    other = sandbox.up(suite="bookworm", name="t-other", state=node_state)
    try:
        assert {n.name for n, alive in sandbox.list_nodes(state=node_state) if alive} >= {
            "t-down",
            "t-other",
        }
        sandbox.down("t-down", state=node_state)
        for pid, start in ((node.nspawn_pid, node.nspawn_start), (node.pid, node.pid_start)):
            assert sandbox.proc_start_time(pid) != start
        assert not os.path.exists(node.dir)
        with open("/proc/self/mountinfo") as fh:
            assert node.dir not in fh.read()
        # The other node was left alone.
        assert sandbox.ready(other)
    finally:
        sandbox.down("t-other", state=node_state)


def _unit_cgroup(node: sandbox.Node) -> str:
    """The cgroup2 path of NODE's containerd as this machine sees it (/proc/PID/cgroup `0::`)."""
    proc = sandbox.containerd_process(node)
    assert proc is not None, f"no containerd on {node.name}"
    lines = Path(f"/proc/{proc[0]}/cgroup").read_text().splitlines()
    return next(line[3:] for line in lines if line.startswith("0::"))


def test_nodes_do_not_share_a_cgroup_tree(node_state, node_roots):
    """Two nodes' containerd units live in different cgroups (one shared tree let one node's
    systemd prune the other's containerd.service cgroup mid-start: status=219/CGROUP), each
    below the node's own cgroups, which down removes."""
    node_roots("bookworm")
    node_roots("sid")
    a = sandbox.up(suite="bookworm", name="t-cg-a", state=node_state)
    b = sandbox.up(suite="sid", name="t-cg-b", state=node_state)
    try:
        ours = {n.name: host.node_cgroups(Path(n.dir)) for n in (a, b)}
        where = {n.name: _unit_cgroup(n) for n in (a, b)}
        assert where["t-cg-a"] != where["t-cg-b"], where
        for name, path in where.items():
            assert path.endswith("/system.slice/containerd.service"), path
            unified = next(c for c in ours[name] if c.parent.parent.name != "systemd")
            assert (unified.parent.parent / path.lstrip("/")).is_dir(), (unified, path)
            assert path.startswith(f"/kwasm-sandbox/{unified.name}/"), (unified, path)
        sandbox.down("t-cg-a", state=node_state)
        assert ours["t-cg-a"] and not any(c.exists() for c in ours["t-cg-a"])
        assert all(c.is_dir() for c in ours["t-cg-b"]) and sandbox.ready(b)
    finally:
        with contextlib.suppress(SandboxError):
            sandbox.down("t-cg-a", state=node_state)
        sandbox.down("t-cg-b", state=node_state)


def test_node_root_is_what_the_node_sees(bookworm_node):
    """A file written under the host root is seen by the node, and the other way round."""
    bookworm_node.path("/etc/kwasm-probe").write_text("from host\n")
    assert bookworm_node.run("cat", "/etc/kwasm-probe", check=True).stdout == "from host\n"
    bookworm_node.run("sh", "-c", "echo from node > /etc/kwasm-probe2", check=True)
    assert bookworm_node.path("/etc/kwasm-probe2").read_text() == "from node\n"


def test_restart_through_nsenter_replaces_containerd(bookworm_node):
    """`systemctl restart containerd` through nsenter gives a new containerd process."""
    old, _ = bookworm_node.wait_ready()
    bookworm_node.run("systemctl", "restart", "containerd", check=True)
    assert _wait_new_containerd(bookworm_node, old) != old


@pytest.mark.parametrize(
    ("kind", "template", "fragment"),
    [("k3s", "config-v3.toml.tmpl", SPIN_V3), ("k3s-agent", "config.toml.tmpl", SPIN_V2)],
)
def test_k3s_standin_renders_the_template_like_k3s(make_node, kind, template, fragment):
    """The k3s stand-in renders config.toml from the template, expanding the base config."""
    node = make_node(*KINDS[kind])
    rendered = node.path(node.config)
    base = rendered.read_text()
    assert base.startswith("# File generated by k3s. DO NOT EDIT.")
    assert "spin" not in node.runtimes()
    tmpl = node.path(f"{sandbox.K3S_CONFIG_DIR}/{template}")
    tmpl.write_text('{{ template "base" . }}\n' + fragment)
    old, _ = node.wait_ready()
    node.run("systemctl", "restart", sandbox.flavor(node.flavor).unit, check=True)
    _wait_new_containerd(node, old)
    assert rendered.read_text() == base + "\n" + fragment  # Go keeps the newline after the action
    assert node.runtimes()["spin"] == SPIN_RUNTIME_TYPE


def test_k3s_standin_refuses_template_actions_it_does_not_know(make_node):
    """A Go template action other than the base expansion stops the stand-in, loudly."""
    node = make_node("sid", "k3s")
    before = node.path(node.config).read_bytes()
    tmpl = node.path(f"{sandbox.K3S_CONFIG_DIR}/config-v3.toml.tmpl")
    tmpl.write_text('{{ template "base" . }}\n{{ printf "%d" 1 }}\n')
    node.run("systemctl", "restart", "k3s", check=False)
    journal = node.run("journalctl", "-u", "k3s", "--no-pager", check=True).stdout
    assert "unsupported template action" in journal
    assert node.path(node.config).read_bytes() == before


def test_k3s_standin_renders_a_stock_template_copy_and_finds_spin_on_path(make_node):
    """A whole copy of the stock template (Go actions, range over .ExtraRuntimes) renders, and
    a containerd-shim-spin-v2 on the PATH adds k3s's own `spin` runtime, as k3s does."""
    node = make_node(*KINDS["k3s-agent"])
    stock = (REPO / "tests/data/templates/rke2-stock-copy.toml.tmpl").read_text()
    node.path(f"{sandbox.K3S_CONFIG_DIR}/config.toml.tmpl").write_text(stock)
    shim = node.path("/usr/local/bin/containerd-shim-spin-v2")
    shim.write_text("#!/bin/sh\nexit 1\n")
    shim.chmod(0o755)
    old, _ = node.wait_ready()
    node.run("systemctl", "restart", sandbox.flavor(node.flavor).unit, check=True)
    _wait_new_containerd(node, old)
    rendered = node.path(node.config).read_text()
    assert "{{" not in rendered and 'snapshotter = "overlayfs"' in rendered
    assert rendered.count('runtimes."spin"]') == 1  # from the template's range over .ExtraRuntimes
    assert node.runtimes()["spin"] == "io.containerd.spin.v2"


def test_k3d_like_node_restarts_containerd_when_signalled(make_node):
    """On the k3d-like node PID 1 is not systemd and starts containerd again after SIGTERM."""
    node = make_node("bookworm", "k3d")
    with open(f"/proc/{node.pid}/comm") as fh:
        assert fh.read().strip() != "systemd"
    old, _ = node.wait_ready()
    children = Path(f"/proc/{node.pid}/task/{node.pid}/children").read_text().split()
    assert str(old) in children
    os.kill(old, signal.SIGTERM)
    new = _wait_new_containerd(node, old)
    assert new != old


def test_cli_up_list_down(node_state, node_roots):
    """`kwasm-py sandbox up/list/down` through the CLI: JSON out, listed, then gone."""
    node_roots("bookworm")
    env = {"KWASM_SANDBOXES": str(node_state)}
    if os.environ.get("KWASM_CACHE"):
        env["KWASM_CACHE"] = os.environ["KWASM_CACHE"]
    up = run_kwasm("sandbox", "up", "--name", "t-cli", "--output", "json", env=env)
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    try:
        assert info["pid"] > 1
        assert os.path.exists(info["host_socket"])
        listed = run_kwasm("sandbox", "list", "--output", "json", env=env)
        assert [n["name"] for n in json.loads(listed.stdout) if n["running"]] == ["t-cli"]
        again = run_kwasm("sandbox", "up", "--name", "t-cli", env=env)
        assert again.returncode == 1
        assert "exists already" in again.stderr
    finally:
        down = run_kwasm("sandbox", "down", "t-cli", env=env)
    assert down.returncode == 0, down.stderr
    assert sandbox.proc_start_time(info["nspawn_pid"]) != info["nspawn_start"]
    assert json.loads(run_kwasm("sandbox", "list", "--output", "json", env=env).stdout) == []


def test_cli_refuses_without_root_and_with_bad_input():
    """Not root: one clear error, exit 1; an unknown suite: exit 2; nothing is started."""
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *KWASM_ARGV,
         "sandbox", "up"],
        capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "installer"),
                                             "PATH": os.environ["PATH"]}, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: sandbox nodes need root")
    assert "Traceback" not in proc.stderr
    bad = run_kwasm("sandbox", "up", "--suite", "jessie")
    assert bad.returncode == 2
    assert "unknown suite 'jessie'" in bad.stderr
