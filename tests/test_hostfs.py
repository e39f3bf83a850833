"""hostfs: the node engine's one atomic-write helper, against planted symlinks and failures."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from kwasm_py.errors import HostIOError
from kwasm_py.node.hostfs import HostFS, write_atomic


def test_a_symlink_planted_at_the_old_temp_name_is_not_followed(tmp_path: Path) -> None:
    """A symlink at `.NAME.kwasm-tmp-PID` (the old predictable temp name) is neither followed
    nor replaced: the outside file keeps its bytes and the target gets the new ones."""
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious\n")
    planted = root / f"etc/containerd/.config.toml.kwasm-tmp-{os.getpid()}"
    planted.symlink_to(outside)
    HostFS(root).atomic_write(PurePosixPath("/etc/containerd/config.toml"), b"version = 2\n")
    assert outside.read_bytes() == b"precious\n"
    assert (root / "etc/containerd/config.toml").read_bytes() == b"version = 2\n"
    assert planted.is_symlink() and os.readlink(planted) == str(outside)
    assert sorted(p.name for p in (root / "etc/containerd").iterdir()) == [planted.name, "config.toml"]


def test_mode_and_owner_are_kept_and_the_inode_is_new(tmp_path: Path) -> None:
    """Rewriting keeps the file's mode (and owner), and replaces it by rename (a new inode)."""
    target = tmp_path / "config.toml"
    target.write_bytes(b"old\n")
    target.chmod(0o640)
    before = target.stat()
    HostFS(tmp_path).atomic_write(PurePosixPath("/config.toml"), b"new\n", mode=0o600)
    after = target.stat()
    assert target.read_bytes() == b"new\n"
    assert after.st_mode & 0o7777 == 0o640 and (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino


def test_explicit_mode_for_a_new_file(tmp_path: Path) -> None:
    """A new file gets the mode asked for, not mkstemp's 0600."""
    write_atomic(tmp_path / "shim", b"#!/bin/sh\n", mode=0o755, owner=None, label="/opt/kwasm/bin/shim")
    assert (tmp_path / "shim").stat().st_mode & 0o7777 == 0o755


def test_a_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    """When the rename fails (the target is a non-empty directory) the error names the node
    path, and no temp file is left beside it."""
    (tmp_path / "config.toml").mkdir()
    (tmp_path / "config.toml" / "keep").write_text("x")
    with pytest.raises(HostIOError, match=r"cannot write /etc/containerd/config\.toml"):
        write_atomic(
            tmp_path / "config.toml", b"data", mode=0o644, owner=None, label="/etc/containerd/config.toml"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
