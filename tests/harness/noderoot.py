"""Node roots as directory trees: build one from a dict, hash the whole of it, diff two hashes.

`tree_hash` is the one way tests prove "nothing else changed": it covers every entry under the
root (the root included) with no directory left out, so litter in /opt, /run or /var and stale
binaries are seen. Where a run legitimately changes something, assert that exact difference
with `tree_diff` instead of leaving a directory out.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import NamedTuple

V2 = (
    'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
    '  runtime_type = "io.containerd.runc.v2"\n'
)
UNIT = "[Service]\nExecStart=/usr/bin/containerd\n"
SYSTEMD = {"/lib/systemd/systemd": ""}


def tree(root: Path, files: dict[str, str]) -> Path:
    """Create `files` under `root` and return root.

    Takes node paths mapped to text; a path ending in `/` makes an (empty) directory. Parent
    directories are created as needed; existing files are overwritten.
    """
    for rel, text in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text(text)
    return root


class Entry(NamedTuple):
    """One entry of a tree: its type, permission bits, owner, and content digest or link target."""

    kind: str  # file, dir, link, fifo, socket, char, block
    mode: int  # permission bits (with setuid/setgid/sticky)
    uid: int
    gid: int
    content: str  # sha256 of a file, target of a link, "" otherwise


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "link"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
    ):
        if test(mode):
            return name
    return f"unknown:{stat.S_IFMT(mode):o}"


def _entry(path: Path) -> Entry:
    st = path.lstat()
    kind = _kind(st.st_mode)
    if kind == "file":
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        content = digest.hexdigest()
    elif kind == "link":
        content = os.readlink(path)
    else:
        content = ""
    return Entry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content)


def tree_hash(root: Path) -> dict[str, Entry]:
    """Every file, directory, symlink and special file under `root`, by path relative to it.

    Takes a directory (symlinks are recorded, never followed; mounted filesystems under it are
    walked like any directory). Returns {relative path: Entry}, the root itself as ".". Raises
    OSError when an entry cannot be read.
    """
    out = {".": _entry(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in (*dirnames, *filenames):
            path = base / name
            out[str(path.relative_to(root))] = _entry(path)
    return out


def tree_diff(
    before: dict[str, Entry], after: dict[str, Entry]
) -> dict[str, tuple[Entry | None, Entry | None]]:
    """What changed between two `tree_hash` results: {path: (before or None, after or None)}.

    Takes two results of `tree_hash`. Returns only paths added, removed or changed, sorted.
    """
    return {
        path: (before.get(path), after.get(path))
        for path in sorted(before.keys() | after.keys())
        if before.get(path) != after.get(path)
    }


def added(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    """The paths present in `after` only (sorted): what a run left behind."""
    return sorted(after.keys() - before.keys())
