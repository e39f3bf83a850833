"""`kwasm-py node install|uninstall|status` on real nodes, through the CLI, with real restarts.

Node kinds: bookworm (containerd 1.6 unit), sid (containerd 2.x unit), k3s-shaped (k3s.service
stand-in on containerd 2.x), k3s-agent (on containerd 1.6), k3d-like (no systemd). The running
containerd is asked directly (CRI status over its socket) whether the runtime is registered.
"""

from __future__ import annotations

import tomllib

import pytest
from nodekit import KINDS, REPO, SPIN_RUNTIME_TYPE, json_out, sha256

pytestmark = [pytest.mark.root, pytest.mark.nspawn]

STATE_FILE = "/opt/kwasm/kwasm-state.json"


def install(node, shim, *extra, env=None):
    """Run `node install` on NODE with SHIM; return the finished process."""
    return node.kwasm(
        "node", "install", "--shim", str(shim), "--output", "json", "--timeout", "20",
        *node.restart_args, *extra,
        env=env,
    )  # fmt: skip


def uninstall(node, *extra, env=None):
    return node.kwasm(
        "node", "uninstall", "--handler", "spin", "--output", "json", *node.restart_args, *extra,
        env=env,
    )  # fmt: skip


def runtime_table(doc: dict, handler: str) -> dict:
    """The CRI runtime table HANDLER in a parsed containerd config (v2 or v3 layout)."""
    plugins = doc.get("plugins", {})
    for plugin in ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"):
        runtimes = plugins.get(plugin, {}).get("containerd", {}).get("runtimes", {})
        if handler in runtimes:
            return runtimes[handler]
    raise AssertionError(f"no runtime {handler!r} in {doc}")


def watched_files(node) -> list[str]:
    """The node files an install may touch (config, template, rendered config)."""
    return sorted({node.config, node.edited_config})


def assert_installed(node, out, shim):
    """The JSON says installed+verified, the file is there, and containerd itself reports it."""
    assert out["ok"] is True
    assert out["verified"] is True
    [rt] = [r for r in out["runtimes"] if r["handler"] == "spin"]
    assert rt["sha256"] == sha256(shim)
    installed = node.path(rt["shim"])
    assert installed.read_bytes() == shim.read_bytes()
    assert installed.stat().st_mode & 0o111
    # The running containerd (CRI status over the node's own socket) lists the runtime.
    assert node.runtimes().get("spin") == rt["runtime_type"]
    assert rt["runtime_type"] == SPIN_RUNTIME_TYPE or rt["runtime_type"].endswith("containerd-shim-spin-v2")
    # And containerd, asked inside the node, accepts the config it reads.
    dump = node.config_dump()
    assert dump.returncode == 0, dump.stderr
    assert "spin" in dump.stdout
    return rt


def test_install_registers_the_runtime_with_a_real_restart(any_node, test_shim):
    """install edits the right file, restarts containerd for real, and containerd lists spin."""
    node, shim = any_node, test_shim()
    before_pid, _ = node.wait_ready()
    starts = node.containerd_starts()
    assert "spin" not in node.runtimes()
    proc = install(node, shim)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert out["changed"] is True
    assert out["restarted"] is True
    assert_installed(node, out, shim)
    assert node.containerd_pid() != before_pid
    assert node.containerd_starts() == starts + 1
    # The file edited is the one this kind of node wants edited (the template on k3s).
    assert out["config"] == node.edited_config
    # containerd's own config file (rendered from the template on k3s) has the runtime table.
    table = runtime_table(tomllib.loads(node.path(node.config).read_text()), "spin")
    assert table["runtime_type"] == out["runtimes"][0]["runtime_type"]
    status = json_out(node.kwasm("node", "status", "--output", "json"))
    assert status["installed"] is True
    assert [r["handler"] for r in status["runtimes"]] == ["spin"]
    assert status["drift"] == []


def test_rerun_changes_nothing(any_node, test_shim):
    """A second identical install: no restart (same containerd PID and start), no file touched."""
    node, shim = any_node, test_shim()
    first = install(node, shim)
    assert first.returncode == 0, first.stderr
    proc_before = node.wait_ready()
    stats = {p: node.path(p).stat().st_mtime_ns for p in watched_files(node)}
    stats[node.installed_shim] = node.path(node.installed_shim).stat().st_mtime_ns
    content = node.snapshot(*watched_files(node), node.installed_shim)
    starts = node.containerd_starts()
    again = install(node, shim)
    assert again.returncode == 0, again.stderr
    out = json_out(again)
    assert out["changed"] is False
    assert out["restarted"] is False
    assert node.containerd() == proc_before
    assert node.containerd_starts() == starts
    assert {p: node.path(p).stat().st_mtime_ns for p in stats} == stats
    assert node.snapshot(*watched_files(node), node.installed_shim) == content
    assert node.runtimes()["spin"] == out["runtimes"][0]["runtime_type"]


def test_uninstall_restores_the_original_files_byte_for_byte(any_node, test_shim):
    """uninstall puts back every file as it was (absent stays absent); containerd still runs."""
    node, shim = any_node, test_shim()
    original = node.snapshot(*watched_files(node), node.installed_shim)
    assert original[node.installed_shim] is None
    proc = install(node, shim)
    assert proc.returncode == 0, proc.stderr
    assert node.snapshot(*watched_files(node)) != {p: original[p] for p in watched_files(node)}
    removed = uninstall(node)
    assert removed.returncode == 0, removed.stderr
    out = json_out(removed)
    assert out["ok"] is True
    assert out["changed"] is True
    node.wait_ready()
    assert node.snapshot(*watched_files(node), node.installed_shim) == original
    assert "spin" not in node.runtimes()
    assert node.runtimes().get("runc") == "io.containerd.runc.v2"
    # Uninstalling again changes nothing.
    again = uninstall(node)
    assert again.returncode == 0, again.stderr
    assert json_out(again)["changed"] is False


def test_install_then_upgrade_the_shim_in_place(bookworm_node, test_shim):
    """A new shim build replaces the binary; the config table stays one table."""
    node = bookworm_node
    v1, v2 = test_shim("v1"), test_shim("v2")
    assert install(node, v1).returncode == 0
    proc = install(node, v2)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert out["changed"] is True
    assert_installed(node, out, v2)
    text = node.path(node.config).read_text()
    assert text.count("runtimes.spin]") + text.count('runtimes."spin"]') == 1


def test_plan_changes_nothing_and_names_the_layout(any_node, test_shim):
    """plan prints what install would do and touches nothing on the node."""
    node, shim = any_node, test_shim()
    before = node.snapshot(*watched_files(node), node.installed_shim, STATE_FILE)
    proc_before = node.wait_ready()
    proc = node.kwasm("node", "plan", "--shim", str(shim), *node.restart_args)
    assert proc.returncode == 0, proc.stderr
    assert node.edited_config in proc.stdout
    assert node.snapshot(*watched_files(node), node.installed_shim, STATE_FILE) == before
    assert node.containerd() == proc_before


def test_full_cycle_on_containerd_16_with_its_default_config(bookworm_node, test_shim):
    """containerd 1.6 with `containerd config default` as its config: install, no-op, uninstall."""
    node, shim = bookworm_node, test_shim()
    node.run("sh", "-c", f"containerd config default > {node.config}", check=True)
    old, _ = node.wait_ready()
    node.run("systemctl", "restart", "containerd", check=True)  # returns once it is ready
    assert node.wait_ready()[0] != old
    original = node.snapshot(node.config, node.installed_shim)
    proc = install(node, shim)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert out["restarted"] is True
    assert_installed(node, out, shim)
    running = node.containerd()
    again = json_out(install(node, shim))
    assert (again["changed"], again["restarted"]) == (False, False)
    assert node.containerd() == running
    removed = uninstall(node)
    assert removed.returncode == 0, removed.stderr
    node.wait_ready()
    assert node.snapshot(node.config, node.installed_shim) == original
    assert "spin" not in node.runtimes()


def test_k3s_stock_template_copy_installs_after_its_last_action(make_node, test_shim):
    """A whole copy of the stock template on a k3s node (containerd 1.6): install keeps every
    template byte, pre-flight passes on the node's own containerd, k3s's next render has spin."""
    node, shim = make_node(*KINDS["k3s-agent"]), test_shim()
    stock = (REPO / "tests/data/templates/rke2-stock-copy.toml.tmpl").read_text()
    template = node.path(node.edited_config)
    assert template.name == "config.toml.tmpl"
    template.write_text(stock)
    node.run("systemctl", "restart", "k3s-agent", check=True)
    node.wait_ready()
    proc = install(node, shim)
    assert proc.returncode == 0, proc.stderr
    out = json_out(proc)
    assert any(n.startswith("pre-flight ok: /usr/bin/containerd") for n in out["notes"]), out["notes"]
    assert template.read_text().startswith(stock)
    assert_installed(node, out, shim)


def test_k3s_own_spin_is_refused_before_writing(make_node, test_shim):
    """k3s renders its own `spin` (a different shim on its PATH): install refuses before
    writing anything, naming the binary k3s found, and containerd keeps running untouched."""
    node, shim = make_node(*KINDS["k3s"]), test_shim()
    other = node.path("/usr/local/bin/containerd-shim-spin-v2")
    other.write_text("#!/bin/sh\nexit 2\n")
    other.chmod(0o755)
    node.run("systemctl", "restart", "k3s", check=True)
    before_pid, _ = node.wait_ready()
    assert node.runtimes().get("spin") == "io.containerd.spin.v2"
    files = {p: node.path(p).read_bytes() if node.path(p).exists() else None for p in watched_files(node)}
    proc = install(node, shim)
    assert proc.returncode == 1
    assert "/usr/local/bin/containerd-shim-spin-v2" in proc.stderr and "PATH" in proc.stderr
    assert {
        p: node.path(p).read_bytes() if node.path(p).exists() else None for p in watched_files(node)
    } == files
    assert not node.path(node.installed_shim).exists()
    assert node.wait_ready()[0] == before_pid
