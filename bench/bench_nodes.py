"""Install and no-op timings on real sandbox nodes (bookworm: containerd 1.6, sid: 2.x).

Per suite, one freshly booted node, in the same run:
- `node install` (CLI process start -> the node's containerd lists the runtime over CRI)
  against a bare `systemctl restart containerd` + CRI readiness on the same node (floor);
- a no-op re-run as a CLI process against `python -m kwasm_py --help` (interpreter + CLI floor);
- a no-op re-run in-process (`engine.install`) against reading the config and hashing the two
  shim files (the least work that can decide "nothing to do").

Both nodes get `containerd config default` as their config (a config that declares runc).

    PYTHONPATH=installer:. python bench/bench_nodes.py [--quick]     (root)
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import Goal, row
from kwasm_py import sandbox
from kwasm_py.model import ShimSpec
from kwasm_py.node import engine
from tests.nodes.nodekit import REPO, cri_runtimes

SHIM = "#!/bin/sh\necho bench shim >&2\nexit 3\n"


def _poll(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError("condition not met in time")
        time.sleep(0.005)  # polling with a deadline


def _answers(node: sandbox.Node) -> bool:
    try:
        cri_runtimes(node.host_socket)
    except Exception:
        return False
    return True


def _has_spin(node: sandbox.Node) -> bool:
    try:
        return "spin" in cri_runtimes(node.host_socket)
    except Exception:
        return False


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kwasm_py", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "installer"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        check=False,
    )


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _suite_rows(suite: str, state: Path, shim: Path, rounds: int) -> list[dict]:
    node = sandbox.up(suite=suite, name=f"bench-{suite}", state=state)
    try:
        sandbox.node_run(
            node, "sh", "-c", "containerd config default > /etc/containerd/config.toml", check=True
        )
        sandbox.node_run(node, "systemctl", "restart", "containerd", check=True)
        _poll(lambda: _answers(node))
        where = ("--host-root", node.root, "--pid", str(node.pid))
        restart, install, noop_cli, help_cli, noop_engine, floor_engine = [], [], [], [], [], []
        opts = engine.NodeOptions(
            host_root=Path(node.root),
            shims=(ShimSpec(source=str(shim), name="spin", handler="spin"),),
            pid=node.pid,
        )
        config = Path(node.root) / "etc/containerd/config.toml"
        installed = Path(node.root) / "opt/kwasm/bin/containerd-shim-spin-v2"
        for _ in range(rounds):
            # systemd allows 5 starts per 10 s; this bench restarts faster than any node should.
            sandbox.node_run(node, "systemctl", "reset-failed", "containerd", check=True)

            def bare() -> None:
                sandbox.node_run(node, "systemctl", "restart", "containerd", check=True)
                _poll(lambda: _answers(node))

            restart.append(_timed(bare))
            sandbox.node_run(node, "systemctl", "reset-failed", "containerd", check=True)

            def inst() -> None:
                proc = _cli("node", "install", *where, "--shim", str(shim))
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr)
                _poll(lambda: _has_spin(node))

            install.append(_timed(inst))
            before = sandbox.containerd_process(node)
            noop_cli.append(_timed(lambda: _cli("node", "install", *where, "--shim", str(shim))))
            help_cli.append(_timed(lambda: _cli("--help")))
            noop_engine.append(_timed(lambda: engine.install(opts)))

            def least() -> None:
                config.read_bytes()
                hashlib.sha256(shim.read_bytes()).hexdigest()
                hashlib.sha256(installed.read_bytes()).hexdigest()

            floor_engine.append(_timed(least))
            if sandbox.containerd_process(node) != before:
                raise RuntimeError("a no-op re-run restarted containerd")
            proc = _cli("node", "uninstall", *where)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr)
    finally:
        sandbox.down(node.name, state=state)

    return [
        row(
            f"{suite} node: install -> containerd reports runtime",
            install,
            restart,
            unit="ms",
            scale=1000,
            floor_name="systemctl restart containerd + CRI ready, same node",
            goal=Goal("overhead", "<=", 200, "overhead <= 200 ms"),
        ),
        row(
            f"{suite} node: no-op re-run, CLI process (0 restarts)",
            noop_cli,
            help_cli,
            unit="ms",
            scale=1000,
            floor_name="kwasm-py --help",
            goal=Goal("overhead", "<=", 50, "0 restarts, <= 50 ms beyond start-up"),
        ),
        row(
            f"{suite} node: no-op re-run, engine.install in-process",
            noop_engine,
            floor_engine,
            unit="ms",
            scale=1000,
            digits=2,
            floor_name="read the config + hash both shims",
        ),
    ]


def run(quick: bool) -> list[dict]:
    """Rows {figure, value, floor, ratio, unit} for a bookworm and a sid node."""
    sandbox.check_prerequisites()
    rounds = 3 if quick else 7
    state = sandbox.scratch_state("bench-nodes-")
    work = Path(tempfile.mkdtemp(prefix="bench-nodes-shim-"))
    shim = work / "containerd-shim-spin-v2"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    rows: list[dict] = []
    try:
        for suite in sandbox.SUITES:
            sandbox.ensure_root(suite)
            rows += _suite_rows(suite, state, shim, rounds)
    finally:
        sandbox.down_all(state=state)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for r in run("--quick" in sys.argv):
        print(r)
