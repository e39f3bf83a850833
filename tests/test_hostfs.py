"""hostfs: the node engine's one atomic-write helper, against planted symlinks, failures and
any umask."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from kwasm_py.errors import HostIOError
from kwasm_py.node.hostfs import HostFS, make_dirs, write_atomic
from tests.harness.cli import KWASM_ARGV, child_env
from tests.harness.containerd import fake_shim
from tests.harness.noderoot import SYSTEMD, UNIT, V2, tree


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


@pytest.fixture(params=[0o077, 0o000], ids=["umask-077", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """This process runs the test under a strict (077) or an open (000) umask; restored after."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_created_directories_get_0755_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """makedirs and a write into missing directories give every directory they create 0755
    (not 0700 under umask 077, not 0777 under 000); directories that existed keep their mode."""
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt").chmod(0o711)
    fs = HostFS(tmp_path)
    fs.makedirs(PurePosixPath("/opt/kwasm/bin"))
    fs.atomic_write(PurePosixPath("/var/lib/kwasm/backup/config.toml"), b"x", mode=0o600, keep_metadata=False)
    assert mode_of(tmp_path / "opt") == 0o711
    for d in ("opt/kwasm", "opt/kwasm/bin", "var", "var/lib", "var/lib/kwasm", "var/lib/kwasm/backup"):
        assert mode_of(tmp_path / d) == 0o755, d
    assert mode_of(tmp_path / "var/lib/kwasm/backup/config.toml") == 0o600


def test_makedirs_refuses_a_file_or_dangling_link_in_the_way(tmp_path: Path) -> None:
    """A file (or a symlink to nothing) where a directory must go is an error naming the node
    path, not a directory made elsewhere."""
    (tmp_path / "opt").write_text("not a dir")
    with pytest.raises(HostIOError, match="cannot create directory /opt/kwasm"):
        HostFS(tmp_path).makedirs(PurePosixPath("/opt/kwasm"))
    make_dirs(tmp_path / "d")
    (tmp_path / "d/link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError):
        make_dirs(tmp_path / "d/link")
    assert not (tmp_path / "nowhere").exists()


def test_a_symlink_at_the_target_name_of_an_owned_file_is_replaced(tmp_path: Path) -> None:
    """A file kwasm-py owns (state, shim binary, backup: keep_metadata=False) is written by
    rename over the name itself: a symlink planted there, even one pointing inside the root, is
    replaced and its target keeps its bytes."""
    root = tmp_path / "root"
    (root / "opt/kwasm/bin").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/containerd").write_bytes(b"the real containerd\n")
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious\n")
    (root / "opt/kwasm/bin/containerd-shim-spin-v2").symlink_to("/usr/bin/containerd")
    (root / "opt/kwasm/kwasm-state.json").symlink_to(outside)
    fs = HostFS(root)
    shim = tmp_path / "shim"
    shim.write_bytes(b"#!/bin/sh\n")
    fs.copy_in(shim, PurePosixPath("/opt/kwasm/bin/containerd-shim-spin-v2"))
    fs.atomic_write(PurePosixPath("/opt/kwasm/kwasm-state.json"), b"{}", mode=0o600, keep_metadata=False)
    assert (root / "usr/bin/containerd").read_bytes() == b"the real containerd\n"
    assert outside.read_bytes() == b"precious\n"
    for name, data in (("bin/containerd-shim-spin-v2", b"#!/bin/sh\n"), ("kwasm-state.json", b"{}")):
        placed = root / "opt/kwasm" / name
        assert not placed.is_symlink() and placed.read_bytes() == data


def test_a_symlinked_config_is_edited_where_containerd_reads_it(tmp_path: Path) -> None:
    """containerd's config (keep_metadata=True) is followed as the node follows it, inside the
    root only: the link stays, its in-root target gets the bytes, nothing outside changes."""
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "srv").mkdir()
    (root / "srv/real.toml").write_bytes(b"old\n")
    (root / "etc/containerd/config.toml").symlink_to("/srv/real.toml")
    HostFS(root).atomic_write(PurePosixPath("/etc/containerd/config.toml"), b"version = 2\n")
    assert (root / "etc/containerd/config.toml").is_symlink()
    assert (root / "srv/real.toml").read_bytes() == b"version = 2\n"


@pytest.mark.parametrize("mask", ["077", "000"])
def test_node_install_under_any_umask_gives_fixed_modes(tmp_path: Path, mask: str) -> None:
    """`kwasm-py node install` run under umask 077 or 000 creates /opt/kwasm and its bin
    directory 0755, the shim 0755, the state file 0600, and keeps the config's 0644."""
    root = tree(
        tmp_path / "root",
        {
            **SYSTEMD,
            "/etc/containerd/config.toml": V2,
            "/usr/bin/containerd": "",
            "/lib/systemd/system/containerd.service": UNIT,
        },
    )
    (root / "etc/containerd/config.toml").chmod(0o644)
    shim = fake_shim(tmp_path / "shims")
    argv = [
        *KWASM_ARGV,
        "node",
        "install",
        "--host-root",
        str(root),
        "--shim",
        str(shim),
        "--restart",
        "none",
    ]
    proc = subprocess.run(
        ["sh", "-c", f'umask {mask} && exec "$@"', "sh", *argv],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert mode_of(root / "opt/kwasm") == 0o755 and mode_of(root / "opt/kwasm/bin") == 0o755
    assert mode_of(root / "opt/kwasm/bin/containerd-shim-spin-v2") == 0o755
    assert mode_of(root / "opt/kwasm/kwasm-state.json") == 0o600
    assert mode_of(root / "etc/containerd/config.toml") == 0o644
