"""The minimal pod's way to a node: systemd over D-Bus, no hostPID, no nsenter, no /proc.

Each test talks to a real booted node the way installer-minimal.yaml's pod does: the node's `/`
(with its own mounts: /run holds the bus and containerd sockets) is the host root, reached as
/proc/PID/root of the node's PID 1, the same tree a hostPath of `/` shows a pod; the engine is
given `--bus /run/dbus/system_bus_socket` and no node PID. `nsenter`, `systemctl` and
`rc-service` on the engine's PATH are stand-ins that record any call and fail, so a run that
reaches for them fails and says so.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nodekit import KINDS, json_out

from kwasm_py.cluster import minimal
from kwasm_py.errors import RestartError
from kwasm_py.model import RestartMethod, RestartSpec
from kwasm_py.node import dbus, restart
from tests.harness.noderoot import tree_diff, tree_hash

pytestmark = [pytest.mark.root, pytest.mark.nspawn]

BUS = "/run/dbus/system_bus_socket"
# Where an installer could write (not containerd's own state dirs, which containerd writes).
WATCHED = ("etc", "opt", "usr/local", "var/lib/rancher/k3s/agent/etc")
POISONED = ("nsenter", "systemctl", "rc-service", "kill")


@pytest.fixture
def no_host_tools(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An env whose PATH starts with failing stand-ins of the hostPID tools; and their call log."""
    bindir, log = tmp_path / "poisoned-bin", tmp_path / "poisoned.log"
    bindir.mkdir()
    for name in POISONED:
        tool = bindir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit 97\n')
        tool.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}, log


def _tree(path: Path) -> dict:
    """tree_hash of `path`, {} when it does not exist."""
    return tree_hash(path) if path.exists() else {}


def pod_root(node) -> str:
    """The node's / with its own mounts, as a hostPath of `/` shows it to a pod (from here)."""
    return f"/proc/{node.pid}/root"


#: The capabilities installer-minimal.yaml leaves the agent (uid 0, everything else dropped).
POD_CAPS = "-all,+chown,+dac_override,+fowner"
#: Where the pod-like child finds the node's /: an inherited directory fd (its hostPath mount),
#: since /proc/PID/root of another process needs CAP_SYS_PTRACE, which the pod does not have.
POD_ROOT = "/proc/self/fd/{fd}"


def in_pod(node, argv, env):
    """Run ARGV (this tree's code) as installer-minimal's pod runs: in a child PID namespace of
    the node's (systemd sees a real peer PID; its private socket refuses peers it cannot see; no
    node process is visible by PID from there), uid 0 with only CHOWN, DAC_OVERRIDE and FOWNER
    and no_new_privs, the node's / at POD_ROOT. `{root}` in ARGV is replaced by that path."""
    from tests.harness.cli import child_env

    pod = ["/usr/bin/nsenter", f"--target={node.pid}", "--pid", "--", "/usr/bin/unshare", "--pid", "--fork"]
    caps = ["/usr/bin/setpriv", "--nnp", f"--bounding-set={POD_CAPS}", f"--inh-caps={POD_CAPS}"]
    fd = os.open(pod_root(node), os.O_RDONLY | os.O_DIRECTORY)
    try:
        root = POD_ROOT.format(fd=fd)
        return subprocess.run(
            [*pod, "--kill-child", "--", *caps, "--", *(a.replace("{root}", root) for a in argv)],
            capture_output=True, text=True, env=child_env(env), timeout=120, check=False, pass_fds=(fd,),
        )  # fmt: skip
    finally:
        os.close(fd)


def pod_kwasm(node, env, *args, bus=BUS):
    """`kwasm-py node ARGS` as the minimal pod runs it: host root, --bus, no node PID."""
    from tests.harness.cli import KWASM_ARGV

    return in_pod(node, [*KWASM_ARGV, *args, "--host-root", "{root}", "--bus", bus], env)


@pytest.mark.parametrize("kind", ["bookworm", "sid", "k3s"])
def test_install_and_uninstall_over_dbus_restart_containerd_for_real(
    make_node, test_shim, no_host_tools, kind
):
    """install over D-Bus: containerd restarted (new PID), CRI lists spin; uninstall: gone again,
    restarted again, the edited file back byte for byte; no hostPID tool was ever run."""
    node, shim = make_node(*KINDS[kind]), test_shim()
    env, log = no_host_tools
    first_pid, _ = node.wait_ready()
    before = {d: _tree(node.root / d) for d in WATCHED}
    original = node.snapshot(node.edited_config)
    assert "spin" not in node.runtimes()

    proc = pod_kwasm(node, env, "node", "install", "--shim", str(shim), "-o", "json", "--timeout", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json_out(proc)
    assert (out["changed"], out["restarted"], out["verified"]) == (True, True, True)
    assert out["config"] == node.edited_config
    assert "method=dbus:" in proc.stderr
    installed_pid, _ = node.wait_ready()
    assert installed_pid != first_pid
    assert node.runtimes()["spin"] == out["runtimes"][0]["runtime_type"]
    # It wrote only where installer-minimal.yaml mounts the node read-write for this layout.
    writable = (minimal.INSTALL_DIR, minimal.LAYOUTS["k3s" if kind == "k3s" else "containerd"].config_dir)
    for d in WATCHED:
        for path in tree_diff(before[d], _tree(node.root / d)):
            node_path = f"/{d}/{path}".removesuffix("/.")
            assert node_path.startswith(writable), f"wrote {node_path}, outside {writable}"
    removed = pod_kwasm(node, env, "node", "uninstall", "--handler", "spin", "-o", "json")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert json_out(removed)["restarted"] is True
    final_pid, _ = node.wait_ready()
    assert final_pid != installed_pid
    assert "spin" not in node.runtimes()
    assert node.snapshot(node.edited_config) == original
    assert not log.exists(), log.read_text()


def test_plan_and_status_over_dbus_name_the_unit_and_ask_containerd(bookworm_node, test_shim, no_host_tools):
    """plan says the restart goes over D-Bus; status reaches containerd's socket under the root."""
    node, env = bookworm_node, no_host_tools[0]
    node.wait_ready()
    plan = pod_kwasm(node, env, "node", "plan", "--shim", str(test_shim()))
    assert plan.returncode == 0, plan.stderr
    assert "D-Bus /run/dbus/system_bus_socket: ResetFailedUnit containerd.service" in plan.stdout
    private = pod_kwasm(node, env, "node", "plan", "--shim", str(test_shim()), bus="/run/systemd/private")
    assert private.returncode == 0, private.stderr
    assert "D-Bus /run/systemd/private: ResetFailedUnit containerd.service" in private.stdout
    status = pod_kwasm(node, env, "node", "status", "-o", "json")
    assert status.returncode == 0, status.stderr
    doc = json_out(status)
    assert doc["layout"] == "containerd"
    assert doc["containerd"]["ready"] is True
    assert doc["containerd"]["runtimes"]["runc"] == "io.containerd.runc.v2"


def test_unit_facts_come_from_systemd(sid_node):
    """LoadUnit/ExecStart over the bus: containerd's unit is loaded and active and runs
    /usr/bin/containerd (so it reads the default config); k3s's unit does not exist here."""
    node = sid_node
    node.wait_ready()
    with dbus.connect(Path(pod_root(node) + BUS)) as bus:
        facts = bus.facts()
    by_name = {u.name: u for u in facts.units}
    assert by_name["containerd"].load_state == "loaded"
    assert by_name["containerd"].active_state == "active"
    assert by_name["containerd"].exec_start[0][0] == "/usr/bin/containerd"
    assert by_name["k3s"].load_state == "not-found"
    assert facts.loaded == {"containerd"}
    assert [str(p) for p in facts.running_configs()] == ["/etc/containerd/config.toml"]


UNIT_LIMITED = """[Unit]
Description=kwasm-py test: may start once per hour
StartLimitIntervalSec=3600
StartLimitBurst=1

[Service]
ExecStart=/bin/sleep infinity
"""

UNIT_FAILING = """[Unit]
Description=kwasm-py test: always fails

[Service]
Type=oneshot
ExecStart=/bin/false
"""


def _add_units(node) -> None:
    for name, text in (("kwasm-limited", UNIT_LIMITED), ("kwasm-failing", UNIT_FAILING)):
        node.path(f"/etc/systemd/system/{name}.service").write_text(text)
    node.run("systemctl", "daemon-reload", check=True)


RESTART_THRICE = """
import sys
from pathlib import Path
from kwasm_py.node import dbus
with dbus.connect(Path(sys.argv[1])) as bus:
    for _ in range(3):
        bus.restart(sys.argv[2], timeout=20)
print("restarted 3 times")
"""


@pytest.mark.parametrize("socket", [BUS, "/run/systemd/private"])
@pytest.mark.parametrize("suite", ["bookworm", "sid"])  # systemd 252 and 26x
def test_reset_failed_lets_a_rate_limited_unit_restart_again(make_node, suite, socket, no_host_tools):
    """A unit past its start limit restarts again over D-Bus (ResetFailedUnit first), from a pod's
    PID namespace, on the bus and on systemd's private socket; `systemctl restart` is refused."""
    node = make_node(*KINDS[suite])
    node.wait_ready()
    _add_units(node)
    assert stat.S_ISSOCK(Path(pod_root(node) + socket).stat().st_mode)
    node.run("systemctl", "start", "kwasm-limited", check=True)
    refused = node.run("systemctl", "restart", "kwasm-limited")
    assert refused.returncode != 0  # start limit hit: systemd refuses until reset-failed
    proc = in_pod(
        node, [sys.executable, "-c", RESTART_THRICE, "{root}" + socket, "kwasm-limited"], no_host_tools[0]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "restarted 3 times"
    active = node.run("systemctl", "is-active", "kwasm-limited")
    assert active.stdout.strip() == "active"


def test_a_failing_restart_job_is_reported_with_the_unit_result(bookworm_node):
    """A restart job that ends `failed` raises RestartError naming the result and the unit state."""
    node = bookworm_node
    node.wait_ready()
    _add_units(node)
    with dbus.connect(Path(pod_root(node) + BUS)) as bus, pytest.raises(RestartError) as err:
        bus.restart("kwasm-failing", timeout=20)
    assert "kwasm-failing.service ended `failed`" in err.value.message
    assert "result exit-code" in err.value.message


def test_engine_without_a_bus_fails_cleanly_and_changes_nothing(bookworm_node, test_shim, tmp_path):
    """--bus naming a socket that is not there: one-line error, exit 1, nothing written."""
    from tests.harness.cli import KWASM_ARGV

    node = bookworm_node
    node.wait_ready()
    before = [tree_hash(node.root / d) for d in ("etc", "opt")]
    proc = pod_kwasm(node, {}, "node", "install", "--shim", str(test_shim()), bus="/run/nope.sock")
    assert proc.returncode == 1
    assert "cannot reach systemd over D-Bus" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [tree_hash(node.root / d) for d in ("etc", "opt")] == before
    # /proc/PID/root of the node needs CAP_SYS_PTRACE, which the pod lacks: a usage error.
    ptrace = in_pod(node, [*KWASM_ARGV, "node", "status", "--host-root", pod_root(node), "--bus", BUS], {})
    assert ptrace.returncode == 2
    assert f"--host-root {pod_root(node)} cannot be read: Permission denied" in ptrace.stderr
    assert "Traceback" not in ptrace.stderr


def test_agent_with_the_minimal_env_provisions_a_real_node_over_dbus(
    bookworm_node, test_shim, no_host_tools, standin, kubeconfig, agents
):
    """installer-minimal.yaml's env (KWASM_BUS, no KWASM_PID) on `kwasm-py agent` with the real
    engine: opt-in -> containerd restarted over D-Bus and listing spin -> label; opt-out -> gone.
    (The agent runs with this test's privileges and /proc/PID/root as its host root; the pod's
    restrictions are exercised on the engine by the tests above.)"""
    from kwasm_py.model import PROVISIONED_LABEL
    from tests.harness.cli import invoke

    node, shim = bookworm_node, test_shim()
    env, log = no_host_tools
    first_pid, _ = node.wait_ready()
    [pod_env] = [
        e for o in minimal.minimal_objects() if o["kind"] == "DaemonSet"
        for e in o["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "KWASM_BUS"
    ]  # fmt: skip
    standin.add_node("n1")
    agents(
        "n1",
        root=Path(pod_root(node)),
        KWASM_BUS=pod_env["value"],
        KWASM_SHIM=str(shim),
        KWASM_NODE_COMMAND=f"{sys.executable} -m kwasm_py node",
        **env,
    )

    def labelled() -> bool:
        return standin.node("n1")["metadata"]["labels"].get(PROVISIONED_LABEL) == "true"

    assert invoke("annotate-node", "n1", "--kubeconfig", str(kubeconfig)).code == 0
    standin.wait_for(labelled, 60, "n1 labelled")
    assert node.runtimes()["spin"].endswith("containerd-shim-spin-v2")
    assert node.containerd_pid() != first_pid
    assert invoke("annotate-node", "n1", "--remove", "--kubeconfig", str(kubeconfig)).code == 0
    standin.wait_for(lambda: not labelled(), 60, "n1 unlabelled")
    node.wait_ready()
    assert "spin" not in node.runtimes()
    assert not log.exists(), log.read_text()


UNIT_CRASHLOOP = """[Unit]
Description=kwasm-py test: a containerd that cannot load its config, restarted by systemd
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/bin/containerd --config /etc/kwasm-broken.toml
Restart=always
RestartSec=100ms
"""


def test_crash_watch_over_dbus_sees_a_crash_looping_containerd(bookworm_node):
    """A real unit whose containerd refuses its config: CrashWatch for dbus:UNIT, reading the
    unit over the node's bus only (no node PID), stops the wait with the exit count long before
    its timeout."""
    node = bookworm_node
    node.wait_ready()
    node.path("/etc/kwasm-broken.toml").write_text("version = 2\n[plugins\n")
    node.path("/etc/systemd/system/kwasm-crashloop.service").write_text(UNIT_CRASHLOOP)
    node.run("systemctl", "daemon-reload", check=True)
    spec = RestartSpec(RestartMethod.DBUS, "kwasm-crashloop")
    try:
        node.run("systemctl", "start", "kwasm-crashloop", check=True)
        watch = restart.CrashWatch(spec, pid=0, limit=3, bus=Path(pod_root(node) + BUS))
        began = time.monotonic()
        with pytest.raises(RestartError, match=r"containerd exited [3-9] times .*\(unit kwasm-crashloop\)"):
            restart.wait_until(lambda: None, lambda _s: False, timeout=60, what="never", watch=watch)
        assert time.monotonic() - began < 30
    finally:
        node.run("systemctl", "stop", "kwasm-crashloop")
