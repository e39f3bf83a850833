"""PURE: the one contract across the agent/engine process boundary. No I/O.

The node agent runs the engine as a child process (``kwasm-py node VERB ... --output json``) so
the resident agent never imports it. Both directions are defined here, once:

* :class:`EngineRequest` is what the agent asks: every option a command line argument of its
  own (each shim its own ``--shim``, each handler its own ``--handler``), never a
  comma-joined string to be split again on the other side;
* :class:`EngineResult` is what the engine answers on stdout, one JSON object carrying
  ``version`` (:data:`CONTRACT_VERSION`) and ``command``. ``node install|uninstall|status -o
  json`` print it, the agent reads it with :meth:`EngineResult.loads`, and the tests' fake
  engine speaks it too.

Within one version keys are only ever added: a reader ignores keys it does not know, refuses a
document whose ``version`` is newer than its own, and refuses one that lacks a key or has a
value of the wrong type (:class:`~kwasm_py.errors.ContractError`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args

from kwasm_py.errors import ContractError

CONTRACT_VERSION = 1

T = TypeVar("T")

Command = Literal["install", "uninstall", "status"]
COMMANDS: tuple[Command, ...] = get_args(Command)

_HINT = "run the same kwasm-py version as agent and engine (KWASM_NODE_COMMAND)"


@dataclass(frozen=True)
class Runtime:
    """One runtime kwasm-py added: its handler, containerd ``runtime_type``, shim path and sha256."""

    handler: str
    runtime_type: str
    shim: str
    sha256: str

    def to_json(self) -> dict[str, str]:
        """Takes nothing; returns the runtime as a JSON object of four strings."""
        return {
            "handler": self.handler,
            "runtime_type": self.runtime_type,
            "shim": self.shim,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, doc: object, *, where: str = "runtime") -> Runtime:
        """Takes a decoded JSON value; returns the Runtime; raises ContractError when it is not
        an object with the four string keys."""
        obj = _object(doc, where)
        return cls(
            handler=_get(obj, "handler", str, where),
            runtime_type=_get(obj, "runtime_type", str, where),
            shim=_get(obj, "shim", str, where),
            sha256=_get(obj, "sha256", str, where),
        )


@dataclass(frozen=True)
class ContainerdView:
    """What the node's containerd said over CRI in ``node status`` (``error`` when it did not
    answer): readiness, version and its runtimes (handler -> runtime_type)."""

    ready: bool
    version: str = ""
    runtimes: Mapping[str, str] = field(default_factory=dict)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """Takes nothing; returns ``{ready, version, runtimes}``, or ``{ready, error}``."""
        if self.error:
            return {"ready": self.ready, "error": self.error}
        return {"ready": self.ready, "version": self.version, "runtimes": dict(self.runtimes)}

    @classmethod
    def from_json(cls, doc: object) -> ContainerdView:
        """Takes a decoded JSON value; returns the view; raises ContractError when malformed."""
        obj = _object(doc, "containerd")
        ready = _get(obj, "ready", bool, "containerd")
        if "error" in obj:
            return cls(ready=ready, error=_get(obj, "error", str, "containerd"))
        runtimes = _object(obj.get("runtimes"), "containerd.runtimes")
        if not all(isinstance(v, str) for v in runtimes.values()):
            raise ContractError("engine result containerd.runtimes must map handlers to strings", hint=_HINT)
        return cls(
            ready=ready,
            version=_get(obj, "version", str, "containerd"),
            runtimes=cast(dict[str, str], runtimes),
        )


@dataclass(frozen=True)
class EngineResult:
    """The answer of one ``kwasm-py node install|uninstall|status --output json``.

    Every result has ``version``, ``command`` and ``ok``. A failure (``ok`` false) has the
    ``step`` that failed, the one-line ``error`` and its ``hint``. A successful install or
    uninstall has ``changed``, ``restarted``, ``verified`` (containerd itself reported the
    runtimes), ``layout``, ``config``, ``runtimes`` (added, or removed) and ``notes``. A status
    has ``installed``, ``status`` (the state file's: installed, pending or absent), ``layout``,
    ``config``, ``runtimes``, ``drift`` and ``containerd`` (null unless asked).
    """

    command: Command
    ok: bool = True
    version: int = CONTRACT_VERSION
    layout: str = ""
    config: str = ""
    runtimes: tuple[Runtime, ...] = ()
    notes: tuple[str, ...] = ()
    changed: bool = False
    restarted: bool = False
    verified: bool = False
    installed: bool = False
    status: str = ""
    drift: tuple[str, ...] = ()
    containerd: ContainerdView | None = None
    step: str = ""
    error: str = ""
    hint: str = ""

    @classmethod
    def failed(cls, command: Command, *, step: str, error: str, hint: str = "") -> EngineResult:
        """Takes the command, the step that failed, its one-line error and hint; returns the
        failure result."""
        return cls(command=command, ok=False, step=step or command, error=error, hint=hint)

    def to_json(self) -> dict[str, Any]:
        """Takes nothing; returns the JSON object for this result's kind (failure, change or
        status), as documented on the class."""
        head: dict[str, Any] = {"version": self.version, "command": self.command, "ok": self.ok}
        if not self.ok:
            return {**head, "step": self.step, "error": self.error, "hint": self.hint}
        runtimes = [r.to_json() for r in self.runtimes]
        if self.command == "status":
            return {
                **head,
                "installed": self.installed,
                "status": self.status,
                "layout": self.layout,
                "config": self.config,
                "runtimes": runtimes,
                "drift": list(self.drift),
                "containerd": None if self.containerd is None else self.containerd.to_json(),
            }
        return {
            **head,
            "changed": self.changed,
            "restarted": self.restarted,
            "verified": self.verified,
            "layout": self.layout,
            "config": self.config,
            "runtimes": runtimes,
            "notes": list(self.notes),
        }

    def dumps(self) -> str:
        """Takes nothing; returns :meth:`to_json` as indented JSON text (no trailing newline)."""
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, doc: object, *, command: Command | None = None) -> EngineResult:
        """Takes a decoded JSON value and, optionally, the command it must answer; returns the
        result; raises ContractError when it is not a result of this contract version (newer
        version, other command, missing key, wrong type)."""
        obj = _object(doc, "")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ContractError(f"engine result has no valid version (got {version!r})", hint=_HINT)
        if version > CONTRACT_VERSION:
            raise ContractError(
                f"engine result is contract version {version}; this kwasm-py reads up to {CONTRACT_VERSION}",
                hint=_HINT,
            )
        got = obj.get("command")
        if got not in COMMANDS:
            raise ContractError(f"engine result names no known command (got {got!r})", hint=_HINT)
        if command is not None and got != command:
            raise ContractError(f"engine result answers {got!r}, not {command!r}", hint=_HINT)
        cmd = cast(Command, got)
        ok = _get(obj, "ok", bool, "")
        if not ok:
            return cls(
                command=cmd,
                ok=False,
                version=version,
                step=_get(obj, "step", str, ""),
                error=_get(obj, "error", str, ""),
                hint=_get(obj, "hint", str, ""),
            )
        common: dict[str, Any] = {
            "command": cmd,
            "version": version,
            "layout": _get(obj, "layout", str, ""),
            "config": _get(obj, "config", str, ""),
            "runtimes": tuple(
                Runtime.from_json(r, where=f"runtimes[{i}]")
                for i, r in enumerate(_get(obj, "runtimes", list, ""))
            ),
        }
        if cmd == "status":
            raw_ctd = obj.get("containerd")
            return cls(
                **common,
                installed=_get(obj, "installed", bool, ""),
                status=_get(obj, "status", str, ""),
                drift=_strings(obj, "drift"),
                containerd=None if raw_ctd is None else ContainerdView.from_json(raw_ctd),
            )
        return cls(
            **common,
            changed=_get(obj, "changed", bool, ""),
            restarted=_get(obj, "restarted", bool, ""),
            verified=_get(obj, "verified", bool, ""),
            notes=_strings(obj, "notes"),
        )

    @classmethod
    def loads(cls, text: str, *, command: Command | None = None) -> EngineResult:
        """Takes JSON text (and optionally the command it must answer); returns the result;
        raises ContractError when the text is not JSON or not a valid result."""
        try:
            doc = json.loads(text)
        except ValueError as ex:
            raise ContractError(f"engine result is not JSON: {ex}", hint=_HINT) from ex
        return cls.from_json(doc, command=command)


@dataclass(frozen=True)
class EngineRequest:
    """What the agent asks the engine for: the node options that it passes as arguments.

    ``shims`` are the shim binaries (paths as the engine sees them), ``handlers`` their runtime
    handlers (empty: each shim's name). Options left ``None`` are not passed, so the engine's
    own default (or its ``KWASM_*`` variable) applies.
    """

    host_root: str | None = None
    pid: int | None = None
    restart: str | None = None
    install_dir: str | None = None
    shims: tuple[str, ...] = ()
    handlers: tuple[str, ...] = ()

    def argv(self, command: Command) -> list[str]:
        """Takes the command; returns its arguments after ``kwasm-py node``, ending in
        ``--output json``, each value its own argument: install gets the shims, handlers and
        ``--verify``, uninstall (everything the engine recorded) and status only what they take.
        Raises ContractError when handlers are given but not one per shim."""
        if self.handlers and len(self.handlers) != len(self.shims):
            raise ContractError(
                f"{len(self.handlers)} handlers for {len(self.shims)} shims",
                hint="give one handler per shim, or none",
            )
        args: list[str] = [command]
        if self.host_root is not None:
            args += ["--host-root", self.host_root]
        if self.pid is not None:
            args += ["--pid", str(self.pid)]
        if self.install_dir is not None:
            args += ["--install-dir", self.install_dir]
        if command != "status" and self.restart is not None:
            args += ["--restart", self.restart]
        if command == "install":
            for shim in self.shims:
                args += ["--shim", shim]
            for handler in self.handlers:
                args += ["--handler", handler]
            # The label promises containerd has the runtime: ask it even when nothing changes.
            args.append("--verify")
        return [*args, "--output", "json"]


def _object(doc: object, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ContractError(f"engine result{' ' + where if where else ''} must be a JSON object", hint=_HINT)
    return cast(dict[str, Any], doc)


def _get(obj: Mapping[str, Any], key: str, kind: type[T], where: str) -> T:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ContractError(
            f"engine result{' ' + where if where else ''} needs {key!r} as {kind.__name__},"
            f" got {type(value).__name__}",
            hint=_HINT,
        )
    return value


def _strings(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    values = _get(obj, key, list, "")
    if not all(isinstance(v, str) for v in values):
        raise ContractError(f"engine result {key!r} must hold only strings", hint=_HINT)
    return tuple(values)
