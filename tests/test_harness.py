"""The harness itself: the tree hash sees every kind of change, the CLI helpers are hermetic."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.harness.cli import child_env, invoke, run_kwasm
from tests.harness.noderoot import V2, tree, tree_diff, tree_hash


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tree(tmp_path / "root", {"/etc/containerd/config.toml": V2, "/opt/": "", "/run/": "", "/lib/": ""})
    (r / "usr/bin").mkdir(parents=True)
    (r / "usr/bin/containerd").write_text("#!/bin/sh\n")
    (r / "usr/bin/ctr").symlink_to("containerd")
    return r


def _bind(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


CHANGES = {
    "litter in /opt": lambda r: (r / "opt/kwasm").mkdir(),
    "a file in /run": lambda r: (r / "run/kwasm.lock").write_text(""),
    "a log file": lambda r: (r / "lib/x.log").write_text("x"),
    "content": lambda r: (r / "etc/containerd/config.toml").write_text(V2 + "\n"),
    "mode": lambda r: (r / "usr/bin/containerd").chmod(0o755),
    "link target": lambda r: ((r / "usr/bin/ctr").unlink(), (r / "usr/bin/ctr").symlink_to("/bin/true")),
    "root mode": lambda r: r.chmod(0o700),
    "a socket": lambda r: _bind(r / "run/s.sock"),
    "a fifo": lambda r: os.mkfifo(r / "run/fifo"),
    "a removed dir": lambda r: (r / "lib").rmdir(),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_tree_hash_sees_every_change(root: Path, change: str) -> None:
    """Nothing under the root is left out: /opt, /run, lib, logs, sockets, modes, links."""
    before = tree_hash(root)
    assert tree_hash(root) == before
    CHANGES[change](root)
    diff = tree_diff(before, tree_hash(root))
    assert len(diff) == 1, diff


def test_tree_hash_does_not_follow_links(root: Path, tmp_path: Path) -> None:
    """A symlink to a directory outside the root is recorded as a link, not walked."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "data").symlink_to(outside)
    before = tree_hash(root)
    (outside / "f").write_text("x")
    assert tree_hash(root) == before and before["data"].kind == "link"


def test_child_env_drops_the_callers_kwasm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's KWASM_HOST_ROOT never reaches a test's child; KWASM_CACHE and `env` do."""
    monkeypatch.setenv("KWASM_HOST_ROOT", "/")
    monkeypatch.setenv("KWASM_CACHE", "/var/cache/x")
    env = child_env({"KWASM_PID": "7"})
    assert "KWASM_HOST_ROOT" not in env
    assert (env["KWASM_CACHE"], env["KWASM_PID"]) == ("/var/cache/x", "7")
    assert "127.0.0.1" in env["no_proxy"].split(",")


def test_run_kwasm_and_invoke_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The subprocess and the in-process runner give the same exit code and error lines, and
    neither sees the caller's KWASM_* variables."""
    monkeypatch.setenv("KWASM_HOST_ROOT", str(tmp_path / "not-this"))
    args = ("node", "status", "--host-root", str(tmp_path / "missing"), "--no-containerd")
    sub, inproc = run_kwasm(*args), invoke(*args)
    assert (sub.returncode, inproc.code) == (2, 2)
    assert sub.stderr == inproc.err and sub.stderr.startswith("error: --host-root")
    assert "not-this" not in sub.stderr + inproc.err
