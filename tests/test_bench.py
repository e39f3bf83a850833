"""`python -m bench --quick` runs and writes results.json in the documented shape (numbers unchecked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench._common import ROW_KEYS, compile_tree
from tests.harness.containerd import available

REPO = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, *only: str) -> dict:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", *only, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kwasm-py benchmarks" in proc.stdout
    return json.loads(out.read_text())


def check_shape(doc: dict, module: str) -> list[dict]:
    assert doc["quick"] is True and doc["modules"] == [module]
    for key in ("date", "cpu", "cores", "memory_gib", "kernel", "python", "containerd"):
        assert key in doc["machine"], key
    rows = [r for r in doc["results"] if r["module"] == module]
    assert rows
    for r in rows:
        assert "skipped" in r or r.keys() >= set(ROW_KEYS), r
        if "skipped" not in r:
            assert ("ratio" in r) != ("overhead" in r) or r["floor"] is None, r
            assert r["rounds"] >= 1 and r["spread"] >= 0
    return rows


def test_compile_tree_writes_bytecode_despite_dontwritebytecode(tmp_path, monkeypatch):
    """Children must read bytecode as an installed wheel does, whatever PYTHONDONTWRITEBYTECODE says."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("X = 1\n")
    compile_tree(tmp_path)
    assert [p.name.split(".")[0] for p in (tmp_path / "pkg" / "__pycache__").glob("*.pyc")] == ["mod"]
    (tmp_path / "pkg" / "bad.py").write_text("def (:\n")
    with pytest.raises(RuntimeError, match="cannot byte-compile"):
        compile_tree(tmp_path)


def test_bench_quick_shims(tmp_path):
    """The shims module's quick run: one measured row against its floor, written to --out."""
    (row,) = check_shape(run_bench(tmp_path, "shims"), "shims")
    assert row["floor"] > 0 and row["ratio"] > 0


@pytest.mark.root
@pytest.mark.containerd
def test_bench_quick_engine(tmp_path):
    """The engine module's quick run on private containerds: every figure measured, none skipped."""
    for generation in ("1.6", "2.x"):
        reason = available(generation)
        if reason:
            pytest.skip(reason)
    rows = check_shape(run_bench(tmp_path, "engine"), "engine")
    assert not [r for r in rows if "skipped" in r]
    assert {r["figure"].split(" (")[0] for r in rows} >= {
        "node install -> containerd reports runtime",
        "no-op re-run, provisioned node",
        "CLI start-up: kwasm-py --help",
    }
    assert all(isinstance(r["met"], bool) for r in rows)


def test_bench_quick_rollout(tmp_path):
    """The rollout module's quick run: both parallelisms, the idle rate and the agent's RSS
    measured (none skipped), every figure against its target, restarts never above P."""
    rows = check_shape(run_bench(tmp_path, "rollout"), "rollout")
    assert not [r for r in rows if "skipped" in r]
    figures = [r["figure"] for r in rows]
    for parallel in (1, 10):
        assert any(f"P={parallel}, restart" in f for f in figures), figures
        assert any(f"P={parallel}: API requests per node" in f for f in figures), figures
    assert any(f.startswith("idle API requests per node per hour") for f in figures), figures
    assert any(f.startswith("agent RSS idle") for f in figures), figures
    assert all(isinstance(r["met"], bool) for r in rows)
    for r in rows:
        if "restart" in r["figure"] and "P=" in r["figure"]:
            parallel = int(r["figure"].split("P=")[1].split(",")[0])
            most = int(r["note"].split("at most ")[1].split()[0])
            assert 1 <= most <= parallel, r
            assert r["value"] >= r["floor"] > 0, r  # never faster than P restarts at once allow


@pytest.mark.root
@pytest.mark.containerd
def test_bench_quick_preflight(tmp_path):
    """The pre-flight module's quick run: one row per containerd generation, each against one
    `config dump` of the same (largest real) file, with a verdict on its target."""
    for generation in ("1.6", "2.x"):
        reason = available(generation)
        if reason:
            pytest.skip(reason)
    rows = check_shape(run_bench(tmp_path, "preflight"), "preflight")
    assert [r["figure"].rsplit("containerd ", 1)[-1] for r in rows] == ["1.6)", "2.x)"]
    assert all(r["floor"] > 0 and r["ratio"] > 0 and isinstance(r["met"], bool) for r in rows)
