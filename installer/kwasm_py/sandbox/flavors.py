"""What runs containerd on a sandbox node, and how a node root is shaped for it before boot.

- ``containerd``: the Debian ``containerd.service`` (bookworm: containerd 1.6, sid: 2.x).
- ``k3s`` / ``k3s-agent``: a ``k3s.service`` / ``k3s-agent.service`` running a *stand-in* for
  k3s (``data/sandbox-k3s-standin.sh``): it renders containerd's config from
  ``config.toml.tmpl`` / ``config-v3.toml.tmpl`` the way k3s does (``{{ template "base" . }}``
  and the other actions k3s's templates use, with the stand-in's values; a spin shim on its PATH
  adds a ``spin`` runtime, as k3s does) and runs containerd with k3s's paths. It is not k3s.
- ``k3d``: no systemd. PID 1 is a small init (``data/sandbox-k3d-init.sh``) that runs the same
  k3s stand-in and starts it again when it exits: restart with ``signal:containerd``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kwasm_py.errors import UsageError

FLAVORS = ("containerd", "k3s", "k3s-agent", "k3d")
K3S_CONFIG_DIR = "/var/lib/rancher/k3s/agent/etc/containerd"
K3S_SOCKET = "/run/k3s/containerd/containerd.sock"
DEFAULT_SOCKET = "/run/containerd/containerd.sock"


@dataclass(frozen=True)
class Flavor:
    """How a node flavour runs containerd."""

    name: str
    unit: str | None  # systemd unit that owns containerd; None: no systemd (k3d-like)
    socket: str  # containerd's socket (node path)
    config: str  # the config file containerd reads (node path)
    restart: str  # the --restart value that fits this node

    @property
    def boots_systemd(self) -> bool:
        """Whether the node boots systemd as PID 1 (all but k3d)."""
        return self.unit is not None


_FLAVORS = {
    "containerd": Flavor(
        "containerd",
        "containerd.service",
        DEFAULT_SOCKET,
        "/etc/containerd/config.toml",
        "systemd:containerd",
    ),
    "k3s": Flavor("k3s", "k3s.service", K3S_SOCKET, f"{K3S_CONFIG_DIR}/config.toml", "systemd:k3s"),
    "k3s-agent": Flavor(
        "k3s-agent",
        "k3s-agent.service",
        K3S_SOCKET,
        f"{K3S_CONFIG_DIR}/config.toml",
        "systemd:k3s-agent",
    ),
    "k3d": Flavor("k3d", None, K3S_SOCKET, f"{K3S_CONFIG_DIR}/config.toml", "signal:containerd"),
}

_K3S_UNIT = """\
# kwasm-py sandbox: a k3s-shaped node. ExecStart is a STAND-IN for k3s (see the script's
# header): it renders containerd's config from the k3s templates and runs containerd. Not k3s.
[Unit]
Description=k3s stand-in ({mode}): renders containerd's config like k3s and runs containerd
After=network.target

[Service]
Type=notify
ExecStart=/usr/local/bin/k3s {mode}
KillMode=process
Delegate=yes
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def flavor(name: str) -> Flavor:
    """The flavour called NAME, or a usage error listing the known ones."""
    try:
        return _FLAVORS[name]
    except KeyError as ex:
        raise UsageError(f"unknown sandbox flavour {name!r}", hint=f"one of: {', '.join(FLAVORS)}") from ex


def _data(name: str) -> bytes:
    return (resources.files("kwasm_py.sandbox") / "data" / name).read_bytes()


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def prepare_flavor(root: Path, name: str, fl: Flavor) -> None:
    """Shape the node root ROOT (before boot) as node NAME of flavour FL: hostname, and for
    k3s-shaped flavours the stand-in, its base templates and its unit (or the k3d init)."""
    _write(root / "etc/hostname", f"{name}\n".encode())
    if fl.name == "containerd":
        return
    # k3s-shaped: containerd is k3s's business; no containerd.service, no /etc/containerd.
    for p in (
        root / "etc/systemd/system/multi-user.target.wants/containerd.service",
        root / "lib/systemd/system/containerd.service",
        root / "usr/lib/systemd/system/containerd.service",
    ):
        if p.is_symlink() or p.exists():
            p.unlink()
    shutil.rmtree(root / "etc/containerd", ignore_errors=True)
    share = root / "usr/local/share/kwasm-sandbox"
    _write(root / "usr/local/bin/k3s", _data("sandbox-k3s-standin.sh"), 0o755)
    _write(share / "k3s-base-v2.toml", _data("sandbox-k3s-base-v2.toml"))
    _write(share / "k3s-base-v3.toml", _data("sandbox-k3s-base-v3.toml"))
    _write(share / "k3s-render.awk", _data("sandbox-k3s-render.awk"))
    (root / K3S_CONFIG_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if fl.unit is None:
        _write(root / "usr/local/sbin/k3d-init", _data("sandbox-k3d-init.sh"), 0o755)
        return
    mode = "agent" if fl.name == "k3s-agent" else "server"
    unit = root / "etc/systemd/system" / fl.unit
    _write(unit, _K3S_UNIT.format(mode=mode).encode())
    wants = root / "etc/systemd/system/multi-user.target.wants" / fl.unit
    wants.parent.mkdir(parents=True, exist_ok=True)
    wants.symlink_to(f"/etc/systemd/system/{fl.unit}")
