"""The one exception tree kwasm-py raises on purpose.

Every error carries a one-line ``message`` naming the file or step, and a ``hint`` saying what to
do. The CLI renders them once; anything else escaping is a bug and shows a traceback.
"""

from __future__ import annotations

import copy
from typing import Self


class KwasmError(Exception):
    """Root of every expected failure. ``step`` names where a multi-step operation failed
    when that is known (the engine's ``binary``, ``config``, ``restart``, ``verify``, ...)."""

    exit_code = 1
    step = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def amended(self, message: str, *, step: str | None = None) -> Self:
        """A new error of the same kind (same hint and fields) saying `message`, and `step`
        when given; the caller raises it ``from`` this one, which stays as it was raised."""
        new = copy.copy(self)
        new.message = message
        new.args = (message,)
        if step is not None:
            new.step = step
        return new


class UsageError(KwasmError):
    """The command line or its inputs cannot work as given."""

    exit_code = 2


class ConfigError(KwasmError):
    """A containerd config (or template) cannot be parsed or edited safely."""


class PreflightError(ConfigError):
    """The node's own containerd refuses (or misreads) the config we would make it load."""


class LayoutError(KwasmError):
    """The node's containerd layout could not be determined."""


class ManagedNode(LayoutError):
    """The node's OS generates containerd's config on a read-only root (Talos): kwasm-py edits
    nothing there, whatever --config or a state file says."""


class ConflictError(KwasmError):
    """Something we did not add is in the way (use --force to take it over)."""


class VersionMismatch(ConfigError):
    """The config's schema does not match the containerd the node runs."""


class HostIOError(KwasmError):
    """Reading or writing the node's filesystem failed."""


class ChecksumError(KwasmError):
    """A binary does not have the sha256 it was promised to have."""


class LockHeld(KwasmError):
    """Another kwasm-py run holds the node lock."""


class RestartError(KwasmError):
    """containerd could not be restarted, or did not come back healthy."""


class VerifyError(KwasmError):
    """containerd runs but does not report the runtime we configured."""


class ContractError(KwasmError):
    """A document across the agent/engine process boundary is malformed or of a newer version."""


class KubeError(KwasmError):
    """The Kubernetes API refused or failed a request."""

    def __init__(self, message: str, *, hint: str = "", status: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class FetchError(KwasmError):
    """Downloading or unpacking a shim failed."""


class SandboxError(KwasmError):
    """A local test node could not be built, booted or stopped."""


class CatalogError(KwasmError):
    """The shim catalog (images/shims.toml) is malformed or asked for something it lacks."""

    exit_code = 2
