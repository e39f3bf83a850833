"""Cluster-side figures against the in-process stand-in API (tests/kube_standin.py).

* `kwasm-py annotate-node --all` on 100 and 1000 nodes vs `kubectl annotate node --all` on the
  same stand-in, once as served (~0 ms per request: measures the client's start-up and the
  stand-in's own throughput) and once with 5 ms per request, a real API server's PATCH round trip.
* `kwasm-py status` on 100 nodes vs `python -c pass`.
* the agent: opt-in annotation -> provisioned label, with the real engine on a private
  containerd, vs `kwasm-py node install` alone on the same containerd.
* resident `kwasm-py agent` RSS idle (vs `python -c pass` and `python -c "import kubernetes"`)
  and after 2,000 (quick) / 10,000 watch events of its own Node (vs its own idle RSS).

    python -m bench --only cluster [--quick]
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench._common import (
    KWASM,
    PYTHON,
    Goal,
    child_env,
    row,
    rss_mib,
    rss_started_mib,
    run_quiet,
    skipped,
    timed,
    wait_for,
)
from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL
from tests.harness.cluster import FAKE_NODE
from tests.harness.containerd import PrivateContainerd, available, fake_shim
from tests.harness.kube_standin import StandIn

LATENCY = 0.005  # a real API server's PATCH: network round trip + admission + etcd write


def _populated(n: int, latency: float = 0.0) -> StandIn:
    api = StandIn(latency=latency).start()
    for i in range(n):
        api.add_node(f"node-{i:04}")
    return api


def bench_annotate(n: int, latency: float, rounds: int, work: Path) -> dict[str, object]:
    where = f"{latency * 1e3:.0f} ms per request" if latency else "as served"
    figure = f"annotate-node --all, {n} nodes, stand-in {where}"
    if shutil.which("kubectl") is None:
        return skipped(figure, "kubectl not installed")
    argv = {
        "kubectl": ["kubectl", "annotate", "node", "--all", f"{OPT_IN_KEY}=true"],
        "kwasm-py": [*KWASM, "annotate-node", "--all"],
    }
    times: dict[str, list[float]] = {"kubectl": [], "kwasm-py": []}
    for i in range(rounds):
        for tool in ("kubectl", "kwasm-py") if i % 2 == 0 else ("kwasm-py", "kubectl"):
            api = _populated(n)
            try:
                kc = api.kubeconfig(work / f"kc-{tool}")
                env = child_env(KUBECONFIG=str(kc), HOME=str(work))
                api.latency = latency
                t = time.perf_counter()
                r = run_quiet(argv[tool], env)
                times[tool].append(time.perf_counter() - t)
                assert r.returncode == 0, r.stderr
                api.latency = 0.0
                assert all(
                    (api.node(f"node-{k:04}")["metadata"]["annotations"] or {}).get(OPT_IN_KEY) == "true"
                    for k in range(n)
                )
            finally:
                api.stop()
    return row(
        figure,
        times["kwasm-py"],
        times["kubectl"],
        unit="s",
        digits=3,
        floor_name="kubectl annotate node --all, same stand-in",
        compare="ratio",
        goal=Goal("ratio", "<=", 1 / 3, ">= 3x faster (ratio <= 0.33)"),
    )


def bench_status(n: int, rounds: int, work: Path) -> dict[str, object]:
    api = _populated(n)
    try:
        kc = api.kubeconfig(work / "kc-status")
        env = child_env(KUBECONFIG=str(kc), HOME=str(work))
        status, floor = [], []
        for _ in range(rounds):
            floor += timed(lambda: run_quiet([PYTHON, "-c", "pass"]), 1)
            t = time.perf_counter()
            r = run_quiet([*KWASM, "status"], env)
            status.append(time.perf_counter() - t)
            assert r.returncode == 0 and "node-0000" in r.stdout, r.stderr
    finally:
        api.stop()
    return row(
        f"CLI start-up: kwasm-py status, {n} nodes",
        status,
        floor,
        unit="ms",
        scale=1e3,
        floor_name="python -c pass",
    )


def _agent(api: StandIn, work: Path, name: str, **env: str) -> subprocess.Popen[bytes]:
    kc = api.kubeconfig(work / f"kc-agent-{name}", namespace="kwasm-system")
    settings = {
        "KUBECONFIG": str(kc),
        "NODE_NAME": "n1",
        "KWASM_NAMESPACE": "kwasm-system",
        "KWASM_BACKOFF_SCALE": "0.01",
        **env,
    }
    return subprocess.Popen(
        [*KWASM, "agent"],
        env=child_env(**settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _labelled(api: StandIn) -> bool:
    return api.node("n1")["metadata"]["labels"].get(PROVISIONED_LABEL) == "true"


def _watching(api: StandIn) -> bool:
    return any(r.query.get("watch") for r in api.recorded("GET", "nodes"))


def bench_agent_rss(events: int, rounds: int, work: Path) -> list[dict[str, object]]:
    bare = [rss_started_mib("pass") for _ in range(rounds)]
    kube = [rss_started_mib("import kubernetes") for _ in range(rounds)]
    core = [rss_started_mib("from kubernetes import client; client.CoreV1Api()") for _ in range(rounds)]
    idle, after = [], []
    for i in range(rounds):
        root = work / f"node-rss-{i}"
        root.mkdir()
        with StandIn() as api:
            api.add_node("n1")
            agent = _agent(
                api,
                work,
                f"rss-{i}",
                KWASM_HOST_ROOT=str(root),
                KWASM_NODE_COMMAND=f"{PYTHON} {FAKE_NODE}",
                KWASM_SHIM="/nonexistent/containerd-shim-spin-v2",
            )
            try:
                wait_for(lambda a=api: _watching(a), 60, "the agent's watch", step=0.05)
                time.sleep(0.5)  # let start-up allocations settle before sampling
                idle.append(rss_mib(agent.pid))
                for k in range(events):
                    api.patch_node("n1", {"metadata": {"labels": {"bench/seq": str(k)}}})
                # Events arrive in order: once the opt-in is acted on, all earlier ones were consumed.
                api.patch_node("n1", {"metadata": {"annotations": {OPT_IN_KEY: "true"}}})
                wait_for(lambda a=api: _labelled(a), 300, "the agent to label n1", step=0.05)
                after.append(rss_mib(agent.pid))
            finally:
                _stop(agent)
    return [
        row(
            "agent RSS idle",
            idle,
            bare,
            unit="MiB",
            floor_name="python -c pass",
            compare="ratio",
            goal=Goal("value", "<=", 50, "<= 50 MiB"),
        ),
        row(
            "agent RSS idle, peer: import kubernetes",
            idle,
            kube,
            unit="MiB",
            floor_name='python -c "import kubernetes"',
            compare="ratio",
        ),
        row(
            "agent RSS idle, peer: kubernetes CoreV1Api()",
            idle,
            core,
            unit="MiB",
            floor_name="python: from kubernetes import client; client.CoreV1Api()",
            compare="ratio",
        ),
        row(
            f"agent RSS after {events} watch events",
            after,
            idle,
            unit="MiB",
            floor_name="the same agent idle",
            goal=Goal("overhead", "<=", 1.0, "<= 50 MiB, growth <= 1 MiB"),
        ),
    ]


def bench_agent_provision(rounds: int, work: Path) -> dict[str, object]:
    figure = "agent: opt-in annotation -> provisioned label (containerd 1.6)"
    reason = available("1.6")
    if reason:
        return skipped(figure, reason)
    ctd = PrivateContainerd("1.6").start()
    shim = fake_shim(ctd.dir / "src")
    engine = ctd.engine_env(shim)
    node = [*KWASM, "node"]
    state = ctd.dir / "kwasm" / "kwasm-state.json"
    api = StandIn().start()
    agent = None
    try:
        api.add_node("n1")
        agent = _agent(api, work, "provision", **engine)
        wait_for(lambda: _watching(api), 60, "the agent's watch", step=0.05)
        labels, installs = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            api.patch_node("n1", {"metadata": {"annotations": {OPT_IN_KEY: "true"}}})
            wait_for(lambda: _labelled(api), 60, "the provisioned label")
            labels.append(time.perf_counter() - t)
            api.patch_node("n1", {"metadata": {"annotations": {OPT_IN_KEY: None}}})
            wait_for(lambda: not _labelled(api) and not state.exists(), 60, "the agent to uninstall")
            wait_for(lambda: "spin" not in ctd.cri_status().runtimes, 60, "containerd without spin")
            # floor: the node engine alone, exactly as the agent runs it
            env = child_env(**engine)
            t = time.perf_counter()
            r = run_quiet([*node, "install", "--output", "json"], env)
            installs.append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr
            r = run_quiet([*node, "uninstall", "--output", "json"], env)
            assert r.returncode == 0, r.stderr
    finally:
        if agent is not None:
            _stop(agent)
        api.stop()
        ctd.cleanup()
    return row(
        figure,
        labels,
        installs,
        unit="ms",
        scale=1e3,
        floor_name="kwasm-py node install alone, same containerd",
        goal=Goal("overhead", "<=", 300, "overhead <= 300 ms"),
    )


def run(quick: bool) -> list[dict[str, object]]:
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        rows = []
        sizes = [(100, 3)] if quick else [(100, 5), (1000, 3)]
        for n, rounds in sizes:
            for latency in (0.0, LATENCY):
                rows.append(bench_annotate(n, latency, rounds, work))
        rows.append(bench_status(100, 3 if quick else 10, work))
        rows.append(bench_agent_provision(2 if quick else 5, work))
        rows.extend(bench_agent_rss(2_000 if quick else 10_000, 1 if quick else 3, work))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
