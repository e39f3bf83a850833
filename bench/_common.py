"""Shared by the bench modules: timing over rounds, medians and spreads, one row shape.

Every row a bench module returns has these keys (the aggregator, `python -m bench`, relies on them):

    figure        what was measured
    value         median over `rounds` (in `unit`)
    spread        max - min over the rounds
    floor         median of the floor / peer measured in the same run (None when there is none)
    floor_spread  its max - min
    floor_name    what the floor is
    unit          ms, s, MiB, MB/s ...
    ratio         value / floor            (rows compared by ratio)
    overhead      value - floor            (rows compared by difference)
    target        the goal in words ("overhead <= 200 ms"), "" when the row only informs
    met           True / False against the target, None without one
    rounds        how many samples the medians are over

A row that could not run has `figure` and `skipped` (the reason) only.
"""

from __future__ import annotations

import operator
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The keys of every row that ran (see the module docstring); `python -m bench` checks them.
ROW_KEYS = (
    "figure",
    "value",
    "spread",
    "floor",
    "floor_spread",
    "floor_name",
    "unit",
    "target",
    "met",
    "rounds",
)
PYTHON = sys.executable
KWASM = [PYTHON, "-m", "kwasm_py"]


def compile_tree(root: Path = REPO / "installer") -> None:
    """Byte-compile `root` (this tree's `installer/`) once, so children start as an installed package does.

    pip byte-compiles what it installs (pip docs: `--no-compile` turns it off); a checkout run
    with PYTHONDONTWRITEBYTECODE=1 (this machine sets it) would recompile every module in every
    child, about 140 ms per `kwasm-py` start here, and time the compiler instead of kwasm-py.
    """
    import compileall

    if not compileall.compile_dir(root, quiet=2):
        raise RuntimeError(f"cannot byte-compile {root}")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a `python -m kwasm_py` child running this tree's code (no KWASM_* leaks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KWASM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "installer"), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def stats(samples: list[float]) -> tuple[float, float]:
    """Median and spread (max - min)."""
    return statistics.median(samples), max(samples) - min(samples)


def timed(fn: Callable[[], object], rounds: int) -> list[float]:
    """Wall time in seconds of `rounds` calls of fn."""
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_quiet(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)


@dataclass(frozen=True)
class Goal:
    """A target: `measure` (value, overhead or ratio) `op` (<= or >=) `limit`, and its words."""

    measure: str
    op: str
    limit: float
    words: str

    def met(self, row: dict[str, object]) -> bool | None:
        got = row.get(self.measure)
        if not isinstance(got, int | float):
            return None
        return {"<=": operator.le, ">=": operator.ge}[self.op](got, self.limit)


def row(
    figure: str,
    value: list[float],
    floor: list[float] | None,
    *,
    unit: str,
    floor_name: str,
    compare: str = "overhead",
    goal: Goal | None = None,
    scale: float = 1.0,
    digits: int = 1,
    note: str = "",
) -> dict[str, object]:
    """One figure: medians and spreads of value and floor (scaled into `unit`), compared."""
    v, v_spread = stats(value)
    out: dict[str, object] = {
        "figure": figure,
        "value": round(v * scale, digits),
        "spread": round(v_spread * scale, digits),
        "floor": None,
        "floor_spread": None,
        "floor_name": floor_name,
        "unit": unit,
    }
    if floor:
        f, f_spread = stats(floor)
        out["floor"] = round(f * scale, digits)
        out["floor_spread"] = round(f_spread * scale, digits)
        if compare == "ratio":
            out["ratio"] = round(v / f, 3) if f else None
        else:
            out["overhead"] = round((v - f) * scale, digits)
    out["target"] = goal.words if goal else ""
    out["met"] = goal.met(out) if goal else None
    out["rounds"] = len(value)
    if note:
        out["note"] = note
    return out


def skipped(figure: str, reason: str) -> dict[str, object]:
    return {"figure": figure, "skipped": reason}


def rss_started_mib(code: str, env: dict[str, str] | None = None) -> float:
    """Resident set (MiB) of `python -c CODE` once CODE ran (the process then waits on stdin)."""
    program = f"{code}\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()"
    proc = subprocess.Popen(
        [PYTHON, "-c", program], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return rss_mib(proc.pid)
    finally:
        proc.communicate("")


def rss_mib(pid: int) -> float:
    """Current resident set (VmRSS) of a running process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.002) -> None:
    """Poll a condition with a bounded deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: timed out waiting for {what}")
        time.sleep(step)
