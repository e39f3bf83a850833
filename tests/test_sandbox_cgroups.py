"""Each sandbox node gets its own cgroups (kwasm_py.sandbox.host), checked on fake cgroup trees.

Nodes booted from one cgroup shared one tree, and one node's systemd pruned the cgroup another
node's containerd was being started into (status=219/CGROUP); tests/nodes/test_sandbox.py checks
the real thing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kwasm_py.errors import SandboxError
from kwasm_py.sandbox import host


def _hierarchy(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "cgroup.procs").write_text("")
    return path


def test_hybrid_host_gives_a_cgroup_in_unified_and_name_systemd(tmp_path):
    """Hybrid layout (cgroup2 at unified/, v1 name=systemd at systemd/): one cgroup in each, named
    after the node's directory plus a hash of its path, and nothing is created."""
    fs = tmp_path / "cgroup"
    _hierarchy(fs / "unified")
    _hierarchy(fs / "systemd")
    _hierarchy(fs / "memory")
    groups = host.node_cgroups(tmp_path / "state" / "n1", fs=fs)
    assert [g.parent for g in groups] == [fs / "unified" / "kwasm-sandbox", fs / "systemd" / "kwasm-sandbox"]
    assert groups[0].name == groups[1].name and groups[0].name.startswith("n1-")
    assert not any(g.exists() for g in groups)


def test_same_name_in_another_state_folder_is_another_cgroup(tmp_path):
    """Two registries may both hold a node `n1`: their cgroups differ."""
    fs = tmp_path / "cgroup"
    _hierarchy(fs / "unified")
    one = host.node_cgroups(tmp_path / "a" / "n1", fs=fs)
    two = host.node_cgroups(tmp_path / "b" / "n1", fs=fs)
    assert one != two and one == host.node_cgroups(tmp_path / "a" / "n1", fs=fs)


def test_pure_cgroup2_host_gives_one_cgroup_at_the_root(tmp_path):
    """cgroup2 mounted at FS itself (cgroup.controllers there): one cgroup, under FS."""
    fs = _hierarchy(tmp_path / "cgroup")
    (fs / "cgroup.controllers").write_text("cpu memory pids\n")
    assert [g.parent for g in host.node_cgroups(tmp_path / "n1", fs=fs)] == [fs / "kwasm-sandbox"]


def test_no_cgroup_hierarchy_gives_none(tmp_path):
    """Nothing mounted: no cgroups, and the command is only wrapped (no move)."""
    assert host.node_cgroups(tmp_path / "n1", fs=tmp_path / "none") == []
    done = subprocess.run(host.in_cgroups(["echo", "ok"], []), capture_output=True, text=True, check=True)
    assert done.stdout == "ok\n"


def test_wrapped_command_moves_itself_then_execs_keeping_its_pid(tmp_path):
    """The wrapper creates the cgroups, writes its own PID into each cgroup.procs and execs the
    command, which runs as that same PID (Popen's PID is the command's, as nodes.py needs)."""
    groups = [tmp_path / "u" / "kwasm-sandbox" / "n1", tmp_path / "s" / "kwasm-sandbox" / "n1"]
    argv = host.in_cgroups(["sh", "-c", 'echo "$$ $0 $1"', "arg0", "x y"], groups)
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    assert out == f"{child.pid} arg0 x y\n"
    assert [(g / "cgroup.procs").read_text() for g in groups] == [f"{child.pid}\n"] * 2


def test_a_cgroup_that_cannot_be_joined_stops_the_command(tmp_path):
    """A cgroup.procs that refuses the write (here: a directory) ends the wrapper with 125 before
    the command runs."""
    group = tmp_path / "kwasm-sandbox" / "n1"
    argv = host.in_cgroups(["sh", "-c", "echo ran"], [group])
    (group / "cgroup.procs").mkdir()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 125 and "ran" not in done.stdout


def test_a_cgroup_that_cannot_be_created_is_a_sandbox_error(tmp_path):
    """mkdir refused (a file where the parent should be): SandboxError naming the cgroup."""
    (tmp_path / "kwasm-sandbox").write_text("")
    group = tmp_path / "kwasm-sandbox" / "n1"
    with pytest.raises(SandboxError, match=r"cannot create cgroup .*n1") as info:
        host.in_cgroups(["true"], [group])
    assert isinstance(info.value.__cause__, OSError)


def test_remove_takes_the_tree_deepest_first_and_leaves_busy_ones(tmp_path):
    """Empty cgroups below the node's go, then the node's own; one that cannot be removed
    (here: not empty, as a cgroup with processes refuses) stays with its parents."""
    group = tmp_path / "kwasm-sandbox" / "n1"
    (group / "payload" / "system.slice" / "containerd.service").mkdir(parents=True)
    (group / "supervisor").mkdir()
    other = tmp_path / "kwasm-sandbox" / "n2" / "payload"
    other.mkdir(parents=True)
    (other / "busy").write_text("")
    host.remove_cgroups([group, other.parent, tmp_path / "absent"])
    assert not group.exists()
    assert (other / "busy").exists()
