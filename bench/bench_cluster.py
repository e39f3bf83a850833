"""Cluster-side figures against the in-process stand-in API (tests/kube_standin.py).

* `kwasm-py annotate-node --all` on 100 (quick) / 1000 nodes vs `kubectl annotate node --all`
  on the same stand-in in the same run (floor = kubectl's wall time).
* resident `kwasm-py agent` RSS: idle, and after 2,000 (quick) / 10,000 watch events of its own
  Node; floor = a bare `python` process.

    python bench/bench_cluster.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL
from tests.cluster_helpers import FAKE_NODE, child_env
from tests.kube_standin import StandIn


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("bench condition not reached")
        time.sleep(0.05)


def bench_annotate(n: int, work: Path) -> list[dict]:
    rows = []
    times: dict[str, float] = {}
    for tool in ("kubectl", "kwasm-py"):
        if tool == "kubectl" and shutil.which("kubectl") is None:
            continue
        with StandIn() as api:
            for i in range(n):
                api.add_node(f"node-{i:04}")
            kc = api.kubeconfig(work / f"kc-{tool}")
            env = child_env(KUBECONFIG=str(kc), HOME=str(work))
            if tool == "kubectl":
                argv = ["kubectl", "annotate", "node", "--all", f"{OPT_IN_KEY}=true"]
            else:
                argv = [sys.executable, "-m", "kwasm_py", "annotate-node", "--all"]
            t = time.perf_counter()
            subprocess.run(argv, env=env, check=True, capture_output=True)
            times[tool] = time.perf_counter() - t
            assert all(
                (api.node(f"node-{i:04}")["metadata"]["annotations"] or {}).get(OPT_IN_KEY) == "true"
                for i in range(n)
            )
    floor = times.get("kubectl", float("nan"))
    rows.append(
        {
            "figure": f"annotate-node --all, {n} nodes (floor: kubectl annotate node --all)",
            "value": round(times["kwasm-py"], 3),
            "floor": round(floor, 3),
            "ratio": round(times["kwasm-py"] / floor, 3) if floor == floor else None,
            "unit": "s",
        }
    )
    return rows


def bench_agent_rss(events: int, work: Path) -> list[dict]:
    bare = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        _wait(lambda: Path(f"/proc/{bare.pid}/status").exists())
        time.sleep(0.3)
        floor = _rss_mib(bare.pid)
    finally:
        bare.communicate(b"")
    with StandIn() as api:
        api.add_node("n1")
        kc = api.kubeconfig(work / "kc-agent", namespace="kwasm-system")
        root = work / "node-n1"
        root.mkdir()
        env = child_env(
            KUBECONFIG=str(kc),
            NODE_NAME="n1",
            KWASM_HOST_ROOT=str(root),
            KWASM_NAMESPACE="kwasm-system",
            KWASM_NODE_COMMAND=f"{sys.executable} {FAKE_NODE}",
            KWASM_BACKOFF_SCALE="0.01",
            KWASM_SHIM="/nonexistent/containerd-shim-spin-v2",
        )
        agent = subprocess.Popen(
            [sys.executable, "-m", "kwasm_py", "agent"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(lambda: any(r.query.get("watch") for r in api.recorded("GET", "nodes")))
            time.sleep(0.5)
            idle = _rss_mib(agent.pid)
            for i in range(events):
                api.patch_node("n1", {"metadata": {"labels": {"bench/seq": str(i)}}})
            # Events arrive in order: once the opt-in is acted on, all earlier ones were consumed.
            api.patch_node("n1", {"metadata": {"annotations": {OPT_IN_KEY: "true"}}})
            _wait(lambda: api.node("n1")["metadata"]["labels"].get(PROVISIONED_LABEL) == "true", 300)
            after = _rss_mib(agent.pid)
        finally:
            agent.terminate()
            agent.wait(30)
    return [
        {
            "figure": "agent RSS idle (floor: bare python)",
            "value": round(idle, 1),
            "floor": round(floor, 1),
            "ratio": round(idle / floor, 2),
            "unit": "MiB",
        },
        {
            "figure": f"agent RSS after {events} watch events (floor: bare python)",
            "value": round(after, 1),
            "floor": round(floor, 1),
            "ratio": round(after / floor, 2),
            "unit": "MiB",
        },
    ]


def run(quick: bool) -> list[dict]:
    """Rows {figure, value, floor, ratio, unit}."""
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        return bench_annotate(100 if quick else 1000, work) + bench_agent_rss(
            2_000 if quick else 10_000, work
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "installer"))
    for row in run("--quick" in sys.argv):
        print(f"{row['figure']}: {row['value']} {row['unit']} (floor {row['floor']}, ratio {row['ratio']})")
    os._exit(0)
