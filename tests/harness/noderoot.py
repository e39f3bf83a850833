"""Node roots as directory trees: build one from a dict, hash it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


def tree_hash(root: Path) -> dict[str, tuple[str, int]]:
    """Content and mode of every file under root (sockets and mount contents left out)."""
    out: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.startswith(("lib", "run", "opt")) or path.is_socket() or path.name.endswith(".log"):
            continue
        if path.is_symlink():
            out[rel] = ("link:" + os.readlink(path), 0)
        elif path.is_file():
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
        elif path.is_dir():
            out[rel] = ("dir", path.stat().st_mode)
    return out
