"""Helpers for the cluster-side tests: agent subprocesses on fake nodes, bounded polling."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.cli import KWASM_ARGV, child_env

#: The stand-in for `kwasm-py node` that agents run in these tests (see fake_node.py).
FAKE_NODE = Path(__file__).resolve().parent / "fake_node.py"
NAMESPACE = "kwasm-system"


@dataclass
class AgentProc:
    """A `kwasm-py agent` subprocess for one node, its log in a file."""

    node: str
    root: Path
    log: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def events(self, name: str) -> list[str]:
        return [ln for ln in self.lines() if f"event={name} " in ln + " "]

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def calls(self) -> list[dict[str, Any]]:
        """The fake node's record of engine calls (install/uninstall/status)."""
        f = self.root / "calls.log"
        return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


class AgentFactory:
    def __init__(self, kubeconfig: Path, tmp_path: Path) -> None:
        self.kubeconfig = kubeconfig
        self.tmp_path = tmp_path
        self.started: list[AgentProc] = []

    def __call__(self, node: str, *, root: Path | None = None, **env: str) -> AgentProc:
        root = root or self.tmp_path / f"node-{node}"
        root.mkdir(exist_ok=True)
        log = self.tmp_path / f"agent-{node}-{len(self.started)}.log"
        settings = {
            "KUBECONFIG": str(self.kubeconfig),
            "NODE_NAME": node,
            "KWASM_HOST_ROOT": str(root),
            "KWASM_NAMESPACE": NAMESPACE,
            "KWASM_NODE_COMMAND": f"{sys.executable} {FAKE_NODE}",
            "KWASM_BACKOFF_SCALE": "0.01",
            "KWASM_WATCH_TIMEOUT": "30",
            "KWASM_LEASE_DURATION": "30",
        }
        full_env = child_env({**settings, **env})
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*KWASM_ARGV, "agent"],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmp_path,
            )
        agent = AgentProc(node, root, log, proc, full_env)
        self.started.append(agent)
        return agent

    def cleanup(self) -> None:
        for agent in self.started:
            agent.kill()


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll a condition with a bounded deadline (for state outside the stand-in, e.g. log files)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
