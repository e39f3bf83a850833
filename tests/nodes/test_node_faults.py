"""Faults on real nodes: a killed installer, a containerd that does not come back, two agents at
once, a busy shim binary, a read-only install dir, and several candidate configs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest
from nodekit import KINDS, json_out
from test_node_engine import install, runtime_table

from kwasm_py import sandbox
from tests.harness.cli import start_kwasm

pytestmark = [pytest.mark.root, pytest.mark.nspawn]

STEPS = ("backup", "binary", "config", "restart", "state")
BASE_LINE = re.compile(r"^\s*\{\{-?\s*template\s+\"base\"\s+\.\s*-?\}\}\s*$", re.MULTILINE)


def _parse(data: bytes | None) -> dict:
    """A config or k3s template as TOML ({} when absent; the base-template line dropped)."""
    if data is None:
        return {}
    return tomllib.loads(BASE_LINE.sub("", data.decode()))


def _prune(value):
    """VALUE without empty tables (what is left after removing a runtime table)."""
    if isinstance(value, dict):
        pruned = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v != {}}
    return value


def _without_spin(doc: dict) -> dict:
    for plugin in ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"):
        doc.get("plugins", {}).get(plugin, {}).get("containerd", {}).get("runtimes", {}).pop("spin", None)
    return _prune(doc)


def assert_old_or_complete_new(now: bytes | None, old: bytes | None) -> str:
    """NOW is OLD, or a whole new config: parses, has spin, and is OLD plus that table only."""
    if now == old:
        return "old"
    assert now, f"config is empty or gone (was {len(old or b'')} bytes)"
    doc = _parse(now)  # a partial write would not parse
    runtime_table(doc, "spin")
    assert _without_spin(doc) == _prune(_parse(old))
    return "new"


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("kind", ["sid", "k3s"])
def test_sigkill_at_each_step_then_the_next_run_converges(make_node, test_shim, kind, step):
    """SIGKILL at STEP: config is old or new, never partial; the next run converges, <=1 restart."""
    node, shim = make_node(*KINDS[kind]), test_shim()
    path = node.edited_config
    old = node.snapshot(path)[path]
    killed = install(node, shim, env={"KWASM_TEST_KILL_AT": step})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_old_or_complete_new(node.snapshot(path)[path], old)
    node.wait_ready()
    starts = node.containerd_starts()
    rerun = install(node, shim)
    assert rerun.returncode == 0, rerun.stderr
    out = json_out(rerun)
    assert out["verified"] is True
    assert node.containerd_starts() - starts <= 1
    assert node.containerd_starts() - starts == int(out["restarted"])
    assert assert_old_or_complete_new(node.snapshot(path)[path], old) == "new"
    assert node.runtimes()["spin"] == out["runtimes"][0]["runtime_type"]
    # Converged: a third run is a no-op.
    third = json_out(install(node, shim))
    assert (third["changed"], third["restarted"]) == (False, False)


FAIL_IF_SPIN = """[Service]
# test fault: containerd does not come back once the config names the spin runtime
ExecStartPre=/bin/sh -c '! grep -qs spin {path}'
"""


@pytest.mark.parametrize("kind", ["sid", "k3s"])
def test_containerd_not_coming_back_rolls_back(make_node, test_shim, kind):
    """containerd fails with the new config: previous config and binary are back, it runs, exit 1."""
    suite, flavor = KINDS[kind]
    fl = sandbox.flavor(flavor)

    def prepare(root):
        probe = fl.config
        if flavor != "containerd":
            probe = f"{sandbox.K3S_CONFIG_DIR}/config-v3.toml.tmpl"
        dropin = root / f"etc/systemd/system/{fl.unit}.d/kwasm-test-fault.conf"
        dropin.parent.mkdir(parents=True)
        dropin.write_text(FAIL_IF_SPIN.format(path=probe))

    node, shim = make_node(suite, flavor, prepare=prepare), test_shim()
    files = sorted({node.config, node.edited_config, node.installed_shim})
    before = node.snapshot(*files)
    proc = install(node, shim)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = json_out(proc)
    assert out["ok"] is False
    assert out["error"]
    assert "Traceback" not in proc.stderr
    node.wait_ready()
    assert node.snapshot(*files) == before
    assert "spin" not in node.runtimes()
    status = json_out(node.kwasm("node", "status", "--output", "json"))
    assert status["installed"] is False


SLOW_START = """[Service]
# test: containerd takes a second to start, so a concurrent install surely overlaps the restart
ExecStartPre=/bin/sleep 1
"""


def test_two_installs_at_once_are_serialised(make_node, test_shim):
    """Two agents at once: one waits for the other; one runtime table, one restart."""

    def prepare(root):
        dropin = root / "etc/systemd/system/containerd.service.d/kwasm-test-slow.conf"
        dropin.parent.mkdir(parents=True)
        dropin.write_text(SLOW_START)

    node, shim = make_node("sid", "containerd", prepare=prepare), test_shim()
    node.wait_ready()
    starts = node.containerd_starts()
    argv = [
        "node", "install", "--host-root", str(node.root), "--pid", str(node.pid),
        "--shim", str(shim), "--output", "json",
    ]  # fmt: skip
    procs = [start_kwasm(*argv) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json_out(subprocess.CompletedProcess(p.args, 0, out, err)))
    assert sorted(r["changed"] for r in results) == [False, True]
    text = node.path(node.config).read_text()
    doc = tomllib.loads(text)  # duplicated tables would not parse
    runtime_table(doc, "spin")
    assert len(re.findall(r"runtimes\.['\"]?spin['\"]?\]", text)) == 1
    assert node.containerd_starts() == starts + 1
    assert "spin" in node.runtimes()


def _elf_shim(tmp_path, tag: str) -> Path:
    """An ELF executable named containerd-shim-spin-v2 (a copy of sleep, tagged by TAG)."""
    d = tmp_path / f"elf-{tag}"
    d.mkdir()
    shim = d / "containerd-shim-spin-v2"
    shim.write_bytes(Path("/bin/sleep").read_bytes() + f"\n# {tag}\n".encode())
    shim.chmod(0o755)
    return shim


def test_upgrade_while_the_old_shim_runs(make_node, tmp_path):
    """The installed shim is running; installing a new build replaces it (no text file busy)."""
    node = make_node("sid", "containerd")
    v1, v2 = _elf_shim(tmp_path, "v1"), _elf_shim(tmp_path, "v2")
    assert install(node, v1).returncode == 0
    installed = node.path(node.installed_shim)
    running = subprocess.Popen([str(installed), "600"])
    try:
        assert os.readlink(f"/proc/{running.pid}/exe") == str(installed)
        proc = install(node, v2)
        assert proc.returncode == 0, proc.stderr
        assert "text file busy" not in proc.stderr.lower()
        assert installed.read_bytes() == v2.read_bytes()
        assert running.poll() is None
        assert os.readlink(f"/proc/{running.pid}/exe").endswith("(deleted)")
        assert json_out(node.kwasm("node", "status", "--output", "json"))["drift"] == []
    finally:
        running.kill()
        running.wait()


def test_read_only_install_dir_fails_cleanly_and_another_dir_works(make_node, test_shim):
    """A read-only /opt (GKE COS-like): clear error, nothing changed; --install-dir works."""
    node, shim = make_node("sid", "containerd"), test_shim()
    opt = node.path("/opt")
    subprocess.run(["mount", "--bind", str(opt), str(opt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(opt)], check=True)
        before = node.snapshot(node.config)
        running = node.wait_ready()
        proc = install(node, shim)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert json_out(proc)["error"]
        assert node.snapshot(node.config) == before
        assert node.containerd() == running
        assert not node.path("/opt/kwasm").exists()
        ok = install(node, shim, "--install-dir", "/var/lib/kwasm")
        assert ok.returncode == 0, ok.stderr
        out = json_out(ok)
        assert out["runtimes"][0]["shim"] == "/var/lib/kwasm/bin/containerd-shim-spin-v2"
        assert node.path("/var/lib/kwasm/bin/containerd-shim-spin-v2").is_file()
        assert node.runtimes()["spin"] == out["runtimes"][0]["runtime_type"]
    finally:
        subprocess.run(["umount", str(opt)], check=True)


def test_k3s_node_with_a_leftover_etc_containerd_config(make_node, node_roots, test_shim):
    """k3s node with a stale /etc/containerd/config.toml: the template is edited, plan says why."""
    leftover = (node_roots("sid") / "etc/containerd/config.toml").read_bytes()

    def prepare(root):
        target = root / "etc/containerd/config.toml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(leftover)

    node, shim = make_node("sid", "k3s", prepare=prepare), test_shim()
    plan = node.kwasm("node", "plan", "--shim", str(shim))
    assert plan.returncode == 0, plan.stderr
    said = plan.stdout + plan.stderr
    assert node.edited_config in said
    assert "/etc/containerd/config.toml" in said  # the candidate it did not pick, and why
    proc = install(node, shim)
    assert proc.returncode == 0, proc.stderr
    assert json_out(proc)["config"] == node.edited_config
    assert node.path("/etc/containerd/config.toml").read_bytes() == leftover
    assert "spin" in node.runtimes()


def test_containerd_node_with_leftover_k3s_files(make_node, test_shim):
    """A plain containerd node with an old k3s template lying around: /etc/containerd is edited."""
    stale = '{{ template "base" . }}\n'

    def prepare(root):
        d = root / sandbox.K3S_CONFIG_DIR.lstrip("/")
        d.mkdir(parents=True)
        (d / "config.toml.tmpl").write_text(stale)

    node, shim = make_node("sid", "containerd", prepare=prepare), test_shim()
    plan = node.kwasm("node", "plan", "--shim", str(shim))
    assert plan.returncode == 0, plan.stderr
    assert "/etc/containerd/config.toml" in plan.stdout
    proc = install(node, shim)
    assert proc.returncode == 0, proc.stderr
    assert json_out(proc)["config"] == "/etc/containerd/config.toml"
    assert node.path(f"{sandbox.K3S_CONFIG_DIR}/config.toml.tmpl").read_text() == stale
    assert "spin" in node.runtimes()
