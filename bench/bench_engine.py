"""Node engine figures, each against a floor measured in the same run.

- config plan + edit on the largest real config  vs  tomlkit parse + dump of the same file
- `node install` start -> containerd reports the runtime (private containerd 1.6 and 2.x)
      vs  a plain copy of the shim + a bare containerd restart + readiness
- a no-op re-run on a provisioned node  vs  process start of `kwasm-py --help`
  (and it must neither restart containerd nor write a file)
- CLI start-up `kwasm-py --help`  vs  `python -c pass`

    python -m bench --only engine [--quick]
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import tomlkit

from bench._common import KWASM, PYTHON, REPO, Goal, child_env, row, run_quiet, skipped, timed, wait_for
from kwasm_py.containerd import config as cc
from kwasm_py.node import cri
from tests.harness.containerd import SHARED_CONFIGS, PrivateContainerd, available, fake_shim

SHARED = SHARED_CONFIGS  # beside the checkout or beside the folder of worktrees
ENV = child_env()


def largest_config() -> tuple[str, str]:
    candidates = sorted(SHARED.glob("*.toml"), key=lambda p: p.stat().st_size) if SHARED.is_dir() else []
    if candidates:
        return candidates[-1].name, candidates[-1].read_text()
    path = REPO / "tests" / "data" / "configs" / "imports-and-multiline.toml"
    return path.name, path.read_text()


def bench_config(quick: bool) -> dict[str, object]:
    name, text = largest_config()
    rounds = 30 if quick else 300

    def edit() -> None:
        doc = cc.load(text, source=name)
        choice = cc.choose_schema(doc.data)
        entry = cc.RuntimeEntry(
            "spin", "/opt/kwasm/bin/containerd-shim-spin-v2", cc.runc_systemd_cgroup(doc.data, choice.schema)
        )
        cc.add_runtime(doc, entry, schema=choice.schema)

    def floor() -> None:
        tomlkit.dumps(tomlkit.parse(text))

    edit()  # warm: first-call imports and caches are start-up, not editing
    floor()
    values, floors = [], []
    for _ in range(rounds):  # interleaved, so drift hits both alike
        values += timed(edit, 1)
        floors += timed(floor, 1)
    return row(
        f"config plan + edit ({name}, {len(text)} B)",
        values,
        floors,
        unit="ms",
        scale=1e3,
        digits=2,
        floor_name="tomlkit parse + dump of the same file",
        compare="ratio",
        goal=Goal("value", "<=", 30, "<= 30 ms"),
    )


def _help() -> None:
    r = run_quiet([*KWASM, "--help"], ENV)
    assert r.returncode == 0, r.stderr


def _pass() -> None:
    run_quiet([PYTHON, "-c", "pass"])


def bench_startup(quick: bool) -> dict[str, object]:
    rounds = 5 if quick else 15
    _help()
    helps, floors = [], []
    for _ in range(rounds):
        floors += timed(_pass, 1)
        helps += timed(_help, 1)
    return row(
        "CLI start-up: kwasm-py --help",
        helps,
        floors,
        unit="ms",
        scale=1e3,
        floor_name="python -c pass",
        goal=Goal("value", "<=", 300, "--help <= 300 ms"),
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


def _mtimes(paths: list[Path]) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


def bench_install(generation: str, quick: bool) -> list[dict[str, object]]:
    figure = f"node install -> containerd reports runtime (containerd {generation})"
    reason = available(generation)
    if reason:
        return [skipped(figure, reason)]
    rounds = 2 if quick else 7
    ctd = PrivateContainerd(generation).start()
    try:
        shim = fake_shim(ctd.dir / "src")
        args = ["node", "install", *ctd.node_args(), "--shim", str(shim)]
        uninstall = [
            "node",
            "uninstall",
            *[a for a in ctd.node_args() if a not in ("--config", str(ctd.config))],
        ]
        installed = [ctd.config, ctd.dir / "kwasm" / "kwasm-state.json", ctd.dir / "kwasm/bin" / shim.name]
        installs: list[float] = []
        floors: list[float] = []
        noops: list[float] = []
        helps: list[float] = []
        restarts = writes = 0
        _help()
        # The install measured runs pre-flight (the private daemon's own binary, chrooted into /).
        plan = run_quiet([*KWASM, "node", "plan", *args[2:]], ENV)
        verdict = next((ln for ln in plan.stdout.splitlines() if ln.startswith("preflight:")), "")
        assert plan.returncode == 0 and verdict.split()[1:2] == ["ok:"], plan.stdout + plan.stderr
        for i in range(rounds):
            t = time.perf_counter()
            r = run_quiet([*KWASM, *args], ENV)
            installs.append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr
            before, daemon = _mtimes(installed), ctd.daemon()
            helps += timed(_help, 1)
            t = time.perf_counter()
            r = run_quiet([*KWASM, *args], ENV)
            noops.append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr
            restarts += ctd.daemon() != daemon
            writes += _mtimes(installed) != before
            r = run_quiet([*KWASM, *uninstall], ENV)
            assert r.returncode == 0, r.stderr
            wait_for(lambda: _ready(ctd), 20, "containerd after uninstall")
            # floor: copy the shim + bare restart + wait until CRI answers ready
            t = time.perf_counter()
            shutil.copy(shim, ctd.dir / f"copy-{i}")
            pid = ctd.daemon().pid
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda p=pid: not _alive(p), 20, "containerd to exit")
            wait_for(lambda: _ready(ctd), 20, "containerd ready")
            floors.append(time.perf_counter() - t)
    finally:
        ctd.cleanup()
    noop = row(
        f"no-op re-run, provisioned node (containerd {generation})",
        noops,
        helps,
        unit="ms",
        scale=1e3,
        floor_name="kwasm-py --help process",
        goal=Goal("overhead", "<=", 50, "0 restarts, 0 writes, <= 50 ms beyond start-up"),
        note=f"{restarts} restarts, {writes} rounds with writes",
    )
    noop["met"] = bool(noop["met"]) and restarts == 0 and writes == 0
    return [
        row(
            figure,
            installs,
            floors,
            unit="ms",
            scale=1e3,
            floor_name="copy the shim + bare containerd restart + CRI ready",
            goal=Goal("overhead", "<=", 200, "overhead <= 200 ms, pre-flight included"),
            note="pre-flight ran: two chrooted `config dump`s per install",
        ),
        noop,
    ]


def run(quick: bool) -> list[dict[str, object]]:
    rows = [bench_config(quick), bench_startup(quick)]
    for generation in ("1.6", "2.x"):
        rows.extend(bench_install(generation, quick))
    return rows
