"""Plain data shared by every layer: constants, value objects and enums. No behaviour, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeAlias

# A JSON object as ``json.loads`` returns it (Kubernetes objects, engine results, manifests).
JSON: TypeAlias = dict[str, Any]

# Kubernetes keys (kept compatible with the KWasm operator so existing habits keep working).
OPT_IN_KEY = "kwasm.sh/kwasm-node"
PROVISIONED_LABEL = "kwasm.sh/kwasm-provisioned"
STATUS_ANNOTATION = "kwasm.sh/kwasm-status"
SLOT_LEASE_PREFIX = "kwasm-restart-"  # + 0..N-1: the restart slot Leases in the installer namespace
QUEUE_LEASE_PREFIX = "kwasm-wait-"  # + node: a node's place in the queue for a slot
RUNTIME_LABEL_PREFIX = "kwasm.sh/runtime-"  # + handler: set once containerd verified that handler

# Where things live on the node, as node paths (inside the host root).
DEFAULT_INSTALL_DIR = PurePosixPath("/opt/kwasm")
STATE_FILE_NAME = "kwasm-state.json"
BACKUP_DIR_NAME = "backup"
BIN_DIR_NAME = "bin"
CATALOG_ENV = "KWASM_SHIM_CATALOG"  # a shim catalog TOML replacing the shipped one


class InstallMode(enum.StrEnum):
    """How the runtime reaches containerd (``--mode`` of ``node plan|install``).

    ``auto``: a drop-in file of our own where containerd merges imports deeply and the main
    config already imports a directory, else an edit of the main config; ``dropin``: always a
    drop-in (adding an ``imports`` entry when needed); ``edit``: always the main config.
    """

    AUTO = "auto"
    DROPIN = "dropin"
    EDIT = "edit"


class OutputFormat(enum.StrEnum):
    """What ``--output``/``-o`` prints on stdout: lines for people, or one JSON document."""

    TEXT = "text"
    JSON = "json"


class CriSchema(enum.Enum):
    """Where a containerd config keeps CRI runtimes."""

    V1 = "cri"  # no `version` line: plugins.cri (old k3s templates)
    V2 = "io.containerd.grpc.v1.cri"  # version = 2 (containerd 1.x, also read by 2.x)
    V3 = "io.containerd.cri.v1.runtime"  # version = 3/4 (containerd 2.x)

    @property
    def plugin_id(self) -> str:
        return self.value

    def runtimes_path(self) -> tuple[str, ...]:
        return ("plugins", self.value, "containerd", "runtimes")


@dataclass(frozen=True, order=True)
class ContainerdVersion:
    major: int
    minor: int
    patch: int = 0
    raw: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.raw or f"{self.major}.{self.minor}.{self.patch}"


class RestartMethod(enum.Enum):
    NONE = "none"
    SYSTEMD = "systemd"  # systemctl restart UNIT (containerd, k3s, rke2-server, snap.microk8s...)
    OPENRC = "openrc"  # rc-service SERVICE restart
    SIGNAL = "signal"  # SIGTERM the containerd child of the target PID; its supervisor restarts it
    DBUS = "dbus"  # systemd's RestartUnit over the node's D-Bus socket (no hostPID, no nsenter)


@dataclass(frozen=True)
class RestartSpec:
    method: RestartMethod
    target: str = ""  # unit / service name, or process name for SIGNAL

    def __str__(self) -> str:
        return self.method.value + (f":{self.target}" if self.target else "")


class ConfigKind(enum.Enum):
    """How the file we edit relates to what containerd reads."""

    CONFIG = "config"  # containerd reads this file directly
    TEMPLATE = "template"  # a distro renders containerd's config from it (k3s, rke2, microk8s)
    DROP_IN = "drop-in"  # containerd (or the distro) imports it next to the main config (k0s)


@dataclass(frozen=True)
class Layout:
    """One way a node runs containerd: which file to edit and how to restart."""

    name: str
    config_path: PurePosixPath  # the file kwasm-py edits (node path)
    kind: ConfigKind
    restart: RestartSpec
    socket: PurePosixPath  # containerd's socket (node path)
    rendered_path: PurePosixPath | None = None  # for templates/drop-ins: what containerd reads
    evidence: tuple[str, ...] = ()  # what detection found, in words


@dataclass(frozen=True)
class ShimSpec:
    """A shim binary to install and the runtime handler it serves."""

    source: str  # host path of the binary to copy
    name: str  # e.g. "spin" from containerd-shim-spin-v2
    handler: str
    sha256: str | None = None
    shim_version: str = "v2"  # the -vN suffix: containerd-shim-wasmtime-v1 -> "v1"

    @property
    def binary_name(self) -> str:
        return f"containerd-shim-{self.name}-{self.shim_version}"
