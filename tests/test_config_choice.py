"""`--config` must name the file containerd reads, and, once kwasm-py installed, the file it
installed into (real private containerd 1.6 and 2.x).

Found by a new-user trial: `node install --config OTHER.toml` on an installed node was verified
against the first install's table (still in the file containerd reads), reported success and
moved the state file to OTHER, so the first install could no longer be uninstalled.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.cli import run_kwasm
from tests.harness.containerd import PrivateContainerd, fake_shim
from tests.harness.noderoot import tree_diff, tree_hash

pytestmark = [pytest.mark.containerd, pytest.mark.root]
#: Files a running private containerd rewrites by itself (paths relative to PrivateContainerd.dir).
CONTAINERD_WRITES = {"lib/io.containerd.metadata.v1.bolt/meta.db", "containerd.log", "containerd.pid"}


def _args(ctd: PrivateContainerd, config: Path) -> list[str]:
    args = ctd.node_args()
    args[args.index("--config") + 1] = str(config)
    return args


def _error_and_hint(stderr: str) -> tuple[str, str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 2, stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), stderr
    return lines[0], lines[1]


def _unchanged(ctd: PrivateContainerd, before: dict[str, object]) -> None:
    changed = set(tree_diff(before, tree_hash(ctd.dir)))  # type: ignore[arg-type]
    assert changed <= CONTAINERD_WRITES, changed


def test_another_config_on_an_installed_node_is_refused(ctd: PrivateContainerd) -> None:
    """plan and install with a --config other than the one installed into:
    exit 2, one line naming both files, a hint with the way to move; nothing on the node changes,
    containerd is not restarted, and the first install still uninstalls cleanly."""
    original = ctd.config.read_bytes()
    shim = fake_shim(ctd.dir / "src")
    r = run_kwasm("node", "install", *ctd.node_args(), "--shim", str(shim), "-o", "json")
    assert r.returncode == 0, r.stderr + ctd.log_tail()
    other = ctd.dir / "other.toml"
    other.write_bytes(original)
    before, running = tree_hash(ctd.dir), ctd.daemon()
    for command in ("plan", "install"):
        extra = ["--shim", str(shim)] if command in ("plan", "install") else []
        r = run_kwasm("node", command, *_args(ctd, other), *extra)
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        error, hint = _error_and_hint(r.stderr)
        assert f"kwasm-py installed into {ctd.config}" in error and f"--config {other} is another" in error
        assert "kwasm-py node uninstall" in hint, hint
    _unchanged(ctd, before)
    assert ctd.daemon() == running
    args = [a for a in ctd.node_args() if a not in ("--config", str(ctd.config))]
    r = run_kwasm("node", "uninstall", *args, "-o", "json")
    assert r.returncode == 0, r.stderr
    assert ctd.config.read_bytes() == original
    assert "spin" not in ctd.cri_status().runtimes


def test_a_config_containerd_does_not_read_is_refused_before_writing(ctd: PrivateContainerd) -> None:
    """A fresh node, `--config` naming a file the running containerd does not read: pre-flight
    refuses (plan shows it), install exits non-zero naming the file containerd reads, and nothing
    is written or restarted."""
    other = ctd.dir / "other.toml"
    other.write_bytes(ctd.config.read_bytes())
    shim = fake_shim(ctd.dir / "src")
    before, running = tree_hash(ctd.dir), ctd.daemon()
    r = run_kwasm("node", "plan", *_args(ctd, other), "--shim", str(shim), "-o", "json")
    assert r.returncode == 1, r.stderr  # a plan pre-flight refuses
    verdict = json.loads(r.stdout)["preflight"]
    assert verdict.startswith("REFUSED") and f"reads {ctd.config}, not {other}" in verdict, verdict
    r = run_kwasm("node", "install", *_args(ctd, other), "--shim", str(shim))
    assert r.returncode != 0
    error, hint = _error_and_hint(r.stderr)
    assert f"reads {ctd.config}, not {other}" in error, error
    assert f"--config {ctd.config}" in hint and "nothing was written" in hint, hint
    _unchanged(ctd, before)
    assert ctd.daemon() == running
    assert "spin" not in ctd.cri_status().runtimes
