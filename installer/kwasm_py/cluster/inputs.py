"""EFFECTS: the digest of what an install depends on, for the disruption budget (issue 13.3).

Reads the shim binaries the agent passes to the engine and the containerd configuration files a
node may carry (under the host root), and combines them with the engine's options and the Node's
retry annotation into one digest (:func:`kwasm_py.cluster.disruption.fingerprint`). The agent
never imports the engine, so the candidate files are listed here: every file the layouts of the
README's table edit or read (containerd, k3s/rke2 templates and rendered files, microk8s, k0s).
A missing file counts as "absent", so creating one is a change too.

:class:`FileStore` keeps the attempt record on the node (``/var/lib/kwasm-py/agent-attempts.json``
under the host root), so a new pod of the agent continues the count.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kwasm_py.cluster import disruption
from kwasm_py.model import JSON

# Node paths (source: README "Which file, which table" and node/layout.py's presets).
CONFIG_FILES = (
    "/etc/containerd/config.toml",
    "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
    "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
    "/var/lib/rancher/k3s/agent/etc/containerd/config-v3.toml.tmpl",
    "/var/lib/rancher/rke2/agent/etc/containerd/config.toml",
    "/var/lib/rancher/rke2/agent/etc/containerd/config.toml.tmpl",
    "/var/lib/rancher/rke2/agent/etc/containerd/config-v3.toml.tmpl",
    "/var/snap/microk8s/current/args/containerd-template.toml",
    "/var/snap/microk8s/current/args/containerd.toml",
    "/etc/k0s/containerd.toml",
)
CONFIG_DIRS = ("/etc/k0s/containerd.d", "/etc/containerd/conf.d")


def file_digest(path: Path) -> str:
    """Takes a path; returns the sha256 of its content, "absent" when it cannot be read."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return "absent"
    return h.hexdigest()


@dataclass(frozen=True)
class NodeInputs:
    """The inputs of one agent's installs: its shims (paths in the agent's filesystem), the host
    root and the engine options. Calling it with a Node object returns the current digest."""

    shims: Sequence[str]
    host_root: str | None
    options: Sequence[str] = ()

    def configs(self) -> dict[str, str]:
        """Takes nothing; returns node path -> digest for every candidate config file (and each
        file of the drop-in directories)."""
        root = Path(self.host_root or "/")
        found = {p: file_digest(root / p.lstrip("/")) for p in CONFIG_FILES}
        for directory in CONFIG_DIRS:
            base = root / directory.lstrip("/")
            try:
                names = sorted(e.name for e in base.iterdir() if e.is_file())
            except OSError:
                continue
            for name in names:
                found[f"{directory}/{name}"] = file_digest(base / name)
        return found

    def __call__(self, node: JSON) -> str:
        """Takes the Node object (for its retry annotation); returns the inputs' digest."""
        return disruption.fingerprint(
            shims={s: file_digest(Path(s)) for s in self.shims},
            configs=self.configs(),
            options=self.options,
            retry=disruption.retry_token(node),
        )


ATTEMPTS_FILE = "/var/lib/kwasm-py/agent-attempts.json"


@dataclass(frozen=True)
class FileStore:
    """The attempt record in a file on the node: ``node_path`` (default :data:`ATTEMPTS_FILE`)
    under ``host_root``."""

    host_root: str | None
    node_path: str = ATTEMPTS_FILE

    @property
    def path(self) -> Path:
        """Takes nothing; returns the record file's path in this process's filesystem."""
        return Path(self.host_root or "/") / self.node_path.lstrip("/")

    def load(self) -> disruption.Attempts | None:
        """Takes nothing; returns the stored record, None when absent or unreadable."""
        try:
            return disruption.parse(self.path.read_text())
        except (OSError, UnicodeDecodeError):
            return None

    def save(self, record: disruption.Attempts | None) -> None:
        """Takes the record (None removes the file); writes it atomically (temp file in the
        same directory, fsync, rename). Raises OSError when the node path is not writable."""
        if record is None:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # leave no empty directory of ours behind
                self.path.parent.rmdir()
            return
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".agent-attempts.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(record.dumps() + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
