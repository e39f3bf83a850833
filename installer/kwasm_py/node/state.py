"""The state file: exactly what kwasm-py added to a node, so it can remove that and nothing else.

It is written *before* the config changes (status ``pending``) and again after containerd
confirmed the runtime (``installed``). A run that finds ``pending`` knows the tables and files
named there are its own, finishes the job, and restarts containerd at most once.
Pure: dict <-> dataclasses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from kwasm_py.errors import HostIOError

SCHEMA = 1
PENDING = "pending"
INSTALLED = "installed"


@dataclass(frozen=True)
class RuntimeRecord:
    """One runtime kwasm-py added: its table, its binary, and what it took over."""

    handler: str
    name: str  # shim name (containerd-shim-NAME-v2)
    runtime_type: str
    shim: str  # node path of the installed binary
    sha256: str
    table: dict[str, Any]  # the exact table written under runtimes.<handler>
    replaced: str | None = None  # a foreign table --force took over (put back on uninstall)
    previous_binary: str | None = None  # what was at `shim` before us, if anything (backup path)
    # Quick check, as make and rsync do: (size, mtime_ns, inode) of the files whose sha256 we
    # recorded. Equal fingerprints skip re-hashing on a no-op run; `node status` always hashes.
    source: str | None = None
    source_stat: list[int] | None = None
    shim_stat: list[int] | None = None


@dataclass(frozen=True)
class ConfigRecord:
    """The config file kwasm-py edits: where, what it was, what kwasm-py last wrote."""

    path: str  # node path of the edited file
    kind: str  # config | template | drop-in
    created: bool  # the file did not exist before kwasm-py
    original_sha256: str | None  # of the file before kwasm-py first touched it
    written_sha256: str  # of the file as kwasm-py last wrote it
    backup: str | None  # node path of the original's copy
    schema: str  # plugin ID the runtimes live under
    version_added: bool = False
    # Drop-in installs: the main config that imports our file, and the `imports` entry we added
    # to it (None: it already imported our directory), removed again on uninstall.
    main: str | None = None
    imports_added: str | None = None


@dataclass(frozen=True)
class State:
    """The whole state file."""

    status: str
    layout: str
    config: ConfigRecord
    runtimes: tuple[RuntimeRecord, ...]
    containerd: str = ""
    restart: str = ""
    socket: str = ""
    updated: str = ""
    companion: dict[str, Any] | None = None  # {"handler", "table"}: a default runtime we added
    created_dirs: tuple[str, ...] = ()  # directories kwasm-py created (removed when empty again)
    schema: int = field(default=SCHEMA)

    def runtime(self, handler: str) -> RuntimeRecord | None:
        """The record of `handler`, None when kwasm-py did not add it."""
        return next((r for r in self.runtimes if r.handler == handler), None)

    def to_json(self) -> bytes:
        """The state file's bytes (sorted, indented JSON)."""
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()


def from_json(raw: bytes, *, source: str) -> State:
    """Parse a state file's bytes (`source` names it in errors).

    Raises HostIOError when it is not a state file or has a schema this version does not read.
    """
    try:
        data = json.loads(raw)
        if data.get("schema") != SCHEMA:
            raise HostIOError(
                f"{source} has state schema {data.get('schema')!r}; this kwasm-py reads {SCHEMA}",
                hint="use the kwasm-py version that wrote it to uninstall",
            )
        config = ConfigRecord(**data["config"])
        runtimes = tuple(RuntimeRecord(**r) for r in data["runtimes"])
        rest = {k: v for k, v in data.items() if k not in ("config", "runtimes")}
        rest["created_dirs"] = tuple(rest.get("created_dirs") or ())
        return State(config=config, runtimes=runtimes, **rest)
    except (ValueError, KeyError, TypeError) as err:
        raise HostIOError(
            f"{source} is not a kwasm-py state file ({err})",
            hint="move it away if it is stale; kwasm-py then treats the node as fresh",
        ) from err
