"""EFFECTS: run the node engine as a child process for the agent, through the process contract.

The agent never imports the engine (nor grpc, tomlkit or the kubernetes client): it runs
``kwasm-py node VERB ... --output json`` with the arguments of a
:class:`~kwasm_py.contract.EngineRequest` and reads the child's stdout as one
:class:`~kwasm_py.contract.EngineResult`. Anything else (no JSON, a malformed or newer result,
a non-zero exit, a timeout) becomes an :class:`EngineFailed` the agent reports on the Node.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kwasm_py.contract import Command, EngineRequest, EngineResult
from kwasm_py.errors import ContractError, KwasmError, UsageError

# Options the agent passes as arguments, one value each: an inherited variable must not
# carry a second, comma-joined copy of them into the engine.
SCRUBBED_ENV = ("KWASM_SHIM", "KWASM_HANDLER")
CONTRACT_HINT = "run the same kwasm-py version as agent and engine (KWASM_NODE_COMMAND)"


class EngineFailed(KwasmError):
    """The node engine failed, or answered outside the contract: ``step`` is where, ``error``
    the one-line reason, ``hint`` what to do."""

    def __init__(self, step: str, error: str, hint: str = "") -> None:
        super().__init__(f"{step}: {error}", hint=hint)
        self.step = step
        self.error = error


class Engine(Protocol):
    """The node engine as the agent uses it (a child process, or a fake in tests)."""

    def install(self) -> EngineResult:
        """Install and verify the shims; returns the result; raises EngineFailed."""
        ...

    def uninstall(self) -> EngineResult:
        """Remove everything kwasm-py recorded; returns the result; raises EngineFailed."""
        ...

    def status(self) -> EngineResult:
        """What is installed and whether it drifted; returns the result; raises EngineFailed."""
        ...


def default_node_command(environ: Mapping[str, str] | None = None) -> list[str]:
    """Takes the environment (default: this process's); returns how to run ``kwasm-py node``:
    ``KWASM_NODE_COMMAND`` split as shell words, else this interpreter's ``-m kwasm_py node``."""
    override = (os.environ if environ is None else environ).get("KWASM_NODE_COMMAND", "").strip()
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "kwasm_py", "node"]


def parse_output(verb: Command, stdout: str, stderr: str, returncode: int) -> EngineResult:
    """Takes what a ``node VERB --output json`` child printed and its exit code; returns its
    successful result; raises EngineFailed for a reported failure, for output that is not one
    contract document (no JSON, malformed, newer version, another command) and for a non-zero
    exit that claims success."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    candidates = [stdout] if stdout.strip() else []
    if len(lines) > 1:  # tolerate a wrapper that prints before the document
        candidates.append(lines[-1])
    if not candidates:
        err = (stderr.strip().splitlines() or [f"exit {returncode}"])[-1]
        raise EngineFailed(verb, f"node {verb} gave no JSON (exit {returncode}): {err}")
    result: EngineResult | None = None
    problem: ContractError | None = None
    for text in candidates:
        try:
            result = EngineResult.loads(text, command=verb)
            break
        except ContractError as ex:
            problem = problem or ex
    if result is None:
        message = problem.message if problem else "no result"
        raise EngineFailed(
            "contract", f"node {verb} answered outside the contract: {message}", CONTRACT_HINT
        ) from problem
    if not result.ok:
        raise EngineFailed(result.step or verb, result.error or f"exit {returncode}", result.hint)
    if returncode != 0:
        raise EngineFailed(verb, f"node {verb} exited {returncode} but reported success", CONTRACT_HINT)
    return result


@dataclass
class SubprocessEngine:
    """Runs ``COMMAND VERB ARGS... --output json`` (see :meth:`EngineRequest.argv`) and parses
    the answer; ``env`` is added to this process's environment minus :data:`SCRUBBED_ENV`."""

    command: Sequence[str]
    request: EngineRequest = field(default_factory=EngineRequest)
    env: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 600.0

    def argv(self, verb: Command) -> list[str]:
        """Takes the verb; returns the child's full argv. Raises ContractError (bad request)."""
        return [*self.command, *self.request.argv(verb)]

    def run(self, verb: Command) -> EngineResult:
        """Takes the verb; runs the child and returns its successful result; raises EngineFailed
        (the child could not run, timed out, failed, or answered outside the contract)."""
        try:
            argv = self.argv(verb)
        except ContractError as ex:
            raise EngineFailed(verb, ex.message, ex.hint) from ex
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        env.update(self.env)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired as ex:
            raise EngineFailed(verb, f"node {verb} did not finish in {self.timeout:.0f}s") from ex
        except OSError as ex:
            raise EngineFailed(verb, f"cannot run {argv[0]}: {ex.strerror}") from ex
        return parse_output(verb, proc.stdout, proc.stderr, proc.returncode)

    def install(self) -> EngineResult:
        """``node install --verify``: returns the result; raises EngineFailed."""
        return self.run("install")

    def uninstall(self) -> EngineResult:
        """``node uninstall`` (everything recorded): returns the result; raises EngineFailed."""
        return self.run("uninstall")

    def status(self) -> EngineResult:
        """``node status``: returns the result; raises EngineFailed."""
        return self.run("status")


def agent_shims(source: str, *, shim_dir: str | None, host_root: str | None) -> tuple[list[str], list[str]]:
    """Takes what :func:`agent_shim_versions` takes; returns the shim paths and their
    handlers, in catalog order (the same errors)."""
    found = agent_shim_versions(source, shim_dir=shim_dir, host_root=host_root)
    return [p for p, _, _ in found], [h for _, h, _ in found]


def agent_shim_versions(
    source: str, *, shim_dir: str | None, host_root: str | None
) -> list[tuple[str, str, str]]:
    """Takes ``--shim-source`` (image, fetch or dir), ``--shim-dir`` and the host root; returns
    per shim its path, handler and version (the catalog's, or the fetch record's), in catalog
    order; raises UsageError (dir without
    --shim-dir) and the shim source's KwasmErrors (nothing found, a failed download).

    - image: baked into the installer image for this node's architecture (images/Dockerfile);
    - fetch: downloaded and verified now, into the node's /var/lib/kwasm-py/shims/<arch> so a
      restarted pod finds them again;
    - dir: a directory on the node (a node path, read through the host root).
    """
    from kwasm_py.shims import source as shim_source

    root = Path(host_root or "/")
    arch = shim_source.resolve_arch("auto")
    directory: Path | None = None
    if source == "image" and shim_dir:
        directory = Path(shim_dir) / arch
    elif source == "fetch":
        directory = root / "var/lib/kwasm-py/shims" / arch
    elif source == "dir":
        if not shim_dir:
            raise UsageError("--shim-source dir needs --shim-dir (a directory on the node)")
        directory = root / shim_dir.lstrip("/")
    resolved = shim_source.resolve_shims(source, directory=directory)  # type: ignore[arg-type]
    return [(str(s.path), s.handler, s.version) for s in resolved]
