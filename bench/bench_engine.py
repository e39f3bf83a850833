"""Node engine figures, each against a floor measured in the same run.

- config plan + edit on the largest real config  vs  tomlkit parse + dump of the same file
- `node install` start -> containerd reports the runtime (private containerd 1.6 and 2.x)
      vs  a bare containerd restart + readiness, plus a plain copy of the shim
- a no-op re-run on a provisioned node  vs  process start of `kwasm-py --help`
- CLI start-up `kwasm-py --help`  vs  `python -c pass`

    python bench/bench_engine.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tomlkit

from kwasm_py import containerd_config as cc
from kwasm_py import cri
from tests.containerd_node import PrivateContainerd, available, fake_shim

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "containerd-configs"
CLI = [sys.executable, "-m", "kwasm_py"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "installer")}


def _stats(samples: list[float]) -> tuple[float, float]:
    """Median and spread (max - min) in the samples' unit."""
    return statistics.median(samples), max(samples) - min(samples)


def _row(
    figure: str,
    value: list[float],
    floor: list[float],
    unit: str,
    target: str,
    *,
    scale: float = 1e3,
    kind: str = "ratio",
) -> dict[str, object]:
    v, v_spread = _stats(value)
    f, f_spread = _stats(floor)
    row: dict[str, object] = {
        "figure": figure,
        "value": round(v * scale, 2),
        "spread": round(v_spread * scale, 2),
        "floor": round(f * scale, 2),
        "floor_spread": round(f_spread * scale, 2),
        "unit": unit,
        "target": target,
        "rounds": len(value),
    }
    if kind == "ratio":
        row["ratio"] = round(v / f, 2) if f else None
    else:
        row["overhead"] = round((v - f) * scale, 2)
    return row


def _time(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def largest_config() -> tuple[str, str]:
    candidates = sorted(SHARED.glob("*.toml"), key=lambda p: p.stat().st_size) if SHARED.is_dir() else []
    if candidates:
        return candidates[-1].name, candidates[-1].read_text()
    path = REPO / "tests" / "data" / "configs" / "imports-and-multiline.toml"
    return path.name, path.read_text()


def bench_config(quick: bool) -> dict[str, object]:
    name, text = largest_config()
    rounds = 20 if quick else 200

    def edit() -> None:
        doc = cc.load(text, source=name)
        choice = cc.choose_schema(doc.data)
        entry = cc.RuntimeEntry(
            "spin", "/opt/kwasm/bin/containerd-shim-spin-v2", cc.runc_systemd_cgroup(doc.data, choice.schema)
        )
        cc.add_runtime(doc, entry, schema=choice.schema)

    def floor() -> None:
        tomlkit.dumps(tomlkit.parse(text))

    edit()
    return _row(
        f"config plan + edit ({name}, {len(text)} B)",
        _time(edit, rounds),
        _time(floor, rounds),
        "ms",
        "<= 30 ms",
        kind="ratio",
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _ready(ctd: PrivateContainerd) -> bool:
    try:
        return cri.status(str(ctd.socket), timeout=1).runtime_ready
    except Exception:  # not up yet
        return False


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, check=False)


def bench_install(generation: str, quick: bool) -> list[dict[str, object]]:
    reason = available(generation)
    if reason:
        return [{"figure": f"node install -> registered (containerd {generation})", "skipped": reason}]
    rounds = 2 if quick else 5
    ctd = PrivateContainerd(generation).start()
    try:
        shim = fake_shim(ctd.dir / "src")
        args = [*ctd.node_args(), "--shim", str(shim)]
        uninstall_args = [a for a in ctd.node_args() if a not in ("--config", str(ctd.config))]
        installs, floors, noops = [], [], []
        for i in range(rounds):
            t = time.perf_counter()
            r = _run("node", "install", *args)
            installs.append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr
            t = time.perf_counter()
            r = _run("node", "install", *args)
            noops.append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr
            assert _run("node", "uninstall", *uninstall_args).returncode == 0
            # floor: copy the shim + bare restart + wait until CRI answers ready
            t = time.perf_counter()
            shutil.copy(shim, ctd.dir / f"copy-{i}")
            pid = ctd.daemon().pid
            os.kill(pid, signal.SIGTERM)
            while _alive(pid):
                time.sleep(0.002)
            while not _ready(ctd):
                time.sleep(0.005)
            floors.append(time.perf_counter() - t)
        help_start = _time(lambda: _run("--help"), rounds * 2)
    finally:
        ctd.cleanup()
    return [
        _row(
            f"node install -> containerd reports runtime (containerd {generation})",
            installs,
            floors,
            "ms",
            "overhead <= 200 ms",
            kind="overhead",
        ),
        _row(
            f"no-op re-run, provisioned node (containerd {generation})",
            noops,
            help_start,
            "ms",
            "0 restarts, <= 50 ms beyond start-up",
            kind="overhead",
        ),
    ]


def bench_startup(quick: bool) -> dict[str, object]:
    rounds = 5 if quick else 15
    python = _time(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), rounds)
    helps = _time(lambda: _run("--help"), rounds)
    return _row("CLI start-up: kwasm-py --help", helps, python, "ms", "<= 300 ms", kind="overhead")


def run(quick: bool) -> list[dict[str, object]]:
    rows = [bench_config(quick), bench_startup(quick)]
    for generation in ("1.6", "2.x"):
        rows.extend(bench_install(generation, quick))
    return rows


if __name__ == "__main__":
    for row in run("--quick" in sys.argv):
        print(row)
