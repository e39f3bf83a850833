"""`python -m bench [--quick] [--only NAME ...] [--out FILE]`: every benchmark, side by side.

Runs each `bench/bench_NAME.py` module's `run(quick)` (modules are found on disk, so a new one is
picked up without registering it), prints one table of figures against their floors and targets,
and writes them with a description of the machine to bench/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench._common import ROW_KEYS, compile_tree

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for extra in (REPO / "installer", REPO):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def modules() -> list[str]:
    """Names of the bench modules present: bench/bench_NAME.py -> NAME."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else ""


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    from tests.harness.containerd import BINARIES

    containerd = {
        gen: _first_line([str(path / "containerd"), "--version"]) if (path / "containerd").exists() else ""
        for gen, path in BINARIES.items()
    }
    versions = {}
    for dist in ("typer", "kubernetes", "grpcio", "tomlkit"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # not installed
            versions[dist] = ""
    try:
        import typer  # the import path wins over the installed metadata

        versions["typer"] = typer.__version__
    except ImportError:
        pass
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(_first_line(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]))
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "containerd": containerd,
        "kubectl": _first_line(["kubectl", "version", "--client"]),
        "packages": versions,
        "commit": commit + ("+dirty" if dirty else ""),
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _fmt(x: object, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:g}{(' ' + unit) if unit else ''}" if isinstance(x, int | float) else str(x)


def _compared(r: dict[str, Any]) -> str:
    if "ratio" in r and r["ratio"] is not None:
        ratio = r["ratio"]
        faster = f" ({1 / ratio:.1f}x faster)" if r.get("unit") == "s" and ratio and ratio < 1 else ""
        return f"{ratio:g}x{faster}"
    if "overhead" in r:
        return f"{r['overhead']:+g} {r['unit']}"
    return "-"


def render(results: list[dict[str, Any]], info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kwasm-py benchmarks", show_lines=False)
    for col, just in (
        ("module", "left"),
        ("figure", "left"),
        ("value ± spread", "right"),
        ("floor / peer ± spread", "right"),
        ("ratio / overhead", "right"),
        ("target", "left"),
        ("", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results:
        if "skipped" in r:
            table.add_row(r["module"], r["figure"], "-", "-", "-", "", f"[yellow]skipped: {r['skipped']}")
            continue
        unit = r["unit"]
        floor = "-" if r["floor"] is None else f"{_fmt(r['floor'])} ± {_fmt(r['floor_spread'])} {unit}"
        verdict = {True: "[green]met", False: "[red]missed", None: ""}[r["met"]]
        table.add_row(
            r["module"],
            f"{r['figure']}\n[dim]floor: {r['floor_name']}; {r['rounds']} rounds"
            + (f"; {r['note']}" if r.get("note") else ""),
            f"{_fmt(r['value'])} ± {_fmt(r['spread'])} {unit}",
            floor,
            _compared(r),
            r["target"],
            verdict,
        )
    console = Console(width=None if sys.stdout.isatty() else 180)
    console.print(table)
    console.print(
        f"[dim]{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}, {info['date']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small rounds (CI: only checks it runs)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=modules(), help="run these modules")
    parser.add_argument("--out", type=Path, default=HERE / "results.json", help="results file")
    args = parser.parse_args(argv)
    names = args.only or modules()
    info = machine()
    compile_tree()  # children read bytecode, as from an installed wheel
    results: list[dict[str, Any]] = []
    failed = []
    started = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        print(f"bench {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        try:
            mod = importlib.import_module(f"bench.bench_{name}")
            rows = mod.run(args.quick)
        except Exception as ex:
            traceback.print_exc()
            failed.append(name)
            rows = [{"figure": f"bench_{name}", "skipped": f"failed: {type(ex).__name__}: {ex}"}]
        for raw in rows:
            missing = [] if "skipped" in raw else [k for k in ROW_KEYS if k not in raw]
            if missing:  # a module that does not speak the row shape of bench/_common.py
                failed.append(name)
                figure = str(raw.get("figure", f"bench_{name}"))
                results.append({"module": name, "figure": figure, "skipped": f"row lacks {missing}"})
            else:
                results.append({"module": name, **raw})
        print(f"bench {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    doc = {
        "quick": args.quick,
        "modules": names,
        "machine": info,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    render(results, info)
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
