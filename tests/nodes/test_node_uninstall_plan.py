"""`kwasm-py node plan --uninstall` on real nodes: it changes nothing, and says what uninstall does."""

from __future__ import annotations

import pytest
from nodekit import json_out
from test_node_engine import STATE_FILE, install, uninstall, watched_files

pytestmark = [pytest.mark.root, pytest.mark.nspawn]


def kwasm_files(node) -> dict[str, bytes | None]:
    """Every file under the node's /opt/kwasm, by node path."""
    base = node.path("/opt/kwasm")
    return {
        "/" + str(p.relative_to(node.root)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()
    }


def test_plan_uninstall_changes_nothing_and_matches_uninstall(any_node, test_shim):
    """After an install, plan --uninstall leaves every watched file, /opt/kwasm and the running
    containerd as they were; the uninstall that follows removes exactly the files it listed and
    leaves the config as it said (restored or removed)."""
    node, shim = any_node, test_shim()
    original = node.snapshot(*watched_files(node))
    done = install(node, shim)
    assert done.returncode == 0, done.stderr
    files, ours, ctd = node.snapshot(*watched_files(node)), kwasm_files(node), node.containerd()
    planned = node.kwasm("node", "plan", "--uninstall", "-o", "json", *node.restart_args)
    assert planned.returncode == 0, planned.stderr
    data = json_out(planned)
    assert node.snapshot(*watched_files(node)) == files and kwasm_files(node) == ours
    assert node.containerd() == ctd, "planning restarted nothing"
    assert data["remove"] == ["spin"] and data["config"] == node.edited_config
    assert node.installed_shim in data["files_removed"] and STATE_FILE in data["files_removed"]
    assert data["restart"] != "none needed" and data["diff"]
    text = node.kwasm("node", "plan", "--uninstall", *node.restart_args)
    assert text.returncode == 0 and f"delete:     {node.installed_shim}" in text.stdout
    removed = uninstall(node)
    assert removed.returncode == 0, removed.stderr
    assert json_out(removed)["restarted"] is True
    assert all(not node.path(p).exists() for p in data["files_removed"])
    after = node.snapshot(node.edited_config)[node.edited_config]
    if data["config_action"] == "removed":
        assert after is None and original[node.edited_config] is None
    else:
        assert data["config_action"] == "restored byte for byte from its backup"
        assert after == original[node.edited_config]
