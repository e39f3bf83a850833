"""Rollouts at scale: N node agents against one in-process stand-in API (issue 13).

Each node's agent is the real :class:`kwasm_py.cluster.agent.Agent` loop in a thread, with its
own lean API client (:class:`kwasm_py.cluster.lean.LeanKube`) against one stand-in API server
(tests/harness/kube_standin.py) that waits `LATENCY` before serving each request (a real API
server's round trip: network, admission, etcd write). The stand-in runs in this process and the
agents in `WORKERS` other processes: in a cluster the API server and every agent have CPUs of
their own, and with all of them under one interpreter lock the figure was that lock's. The engine port is a
fake whose install restarts "containerd" by sleeping `RESTART` seconds and counts how many
restart at once (more than P would mean the restart Leases do not work). The agents keep their
production settings (Lease term, backoff, watch timeout, drift interval) except where said.

* rollout: every node opted in at once (as `kwasm-py annotate-node --all` does), for
  max-parallel-restarts P = 1 and 10: time until the last node is labelled, against the ideal
  ceil(N/P) * RESTART;
* API requests per node for that one provisioning (all requests from the opt-in until every
  agent finished, divided by N; the note breaks them down);
* idle API requests per node per hour: the same fleet, provisioned, left alone with the watch
  timeout and drift interval scaled down `TIMER_SCALE` times (300 s -> 3 s), counted over a
  short period and scaled back to an hour;
* RSS of one `kwasm-py agent` process (fake engine), idle after provisioning its node.

    python -m bench --only rollout [--quick]
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import KWASM, PYTHON, Goal, child_env, row, rss_mib, rss_started_mib, skipped, wait_for
from kwasm_py.cluster.agent import Agent, AgentConfig, AgentStopped, Backoff
from kwasm_py.cluster.agentlog import Logger
from kwasm_py.cluster.kube import Endpoint
from kwasm_py.cluster.lean import LeanKube
from kwasm_py.contract import EngineResult, Runtime
from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL
from tests.harness.cluster import FAKE_NODE
from tests.harness.kube_standin import Request, StandIn

LATENCY = 0.005  # per request, as bench_cluster: a real API server's write round trip
RESTART = 0.2  # seconds one containerd restart takes in the fake engine
TIMER_SCALE = 100  # idle phase: 300 s watch timeout / drift interval -> 3 s
WORKERS = 2  # agent processes (the stand-in API has this one)
NAMESPACE = "kwasm-system"
RUNTIME = Runtime(
    "spin", "/opt/kwasm/bin/containerd-shim-spin-v2", "/opt/kwasm/bin/containerd-shim-spin-v2", "5a" * 32
)


class Restarts:
    """What the fake engines of one fleet did, shared by its processes: restarts in flight
    now, the most at once, and the seconds spent restarting (summed over nodes)."""

    def __init__(self, ctx: Any) -> None:
        self.lock = ctx.Lock()
        self._running = ctx.Value("i", 0, lock=False)
        self._most = ctx.Value("i", 0, lock=False)
        self._busy = ctx.Value("d", 0.0, lock=False)

    @property
    def most(self) -> int:
        return int(self._most.value)

    @property
    def busy(self) -> float:
        return float(self._busy.value)

    def begin(self) -> float:
        with self.lock:
            self._running.value += 1
            self._most.value = max(self._most.value, self._running.value)
        return time.perf_counter()

    def end(self, began: float) -> None:
        with self.lock:
            self._running.value -= 1
            self._busy.value += time.perf_counter() - began


@dataclass
class FakeEngine:
    """The agent's engine port: the first install restarts (sleeps `restart` s), later ones are
    no-ops; status reports the runtime installed and no drift. No API requests of its own."""

    restarts: Restarts
    restart: float
    installed: bool = False

    def install(self) -> EngineResult:
        changed = not self.installed
        if changed:
            began = self.restarts.begin()
            try:
                time.sleep(self.restart)
            finally:
                self.restarts.end(began)
        self.installed = True
        return EngineResult(
            command="install",
            changed=changed,
            restarted=changed,
            verified=True,
            layout="fake",
            runtimes=(RUNTIME,),
        )

    def uninstall(self) -> EngineResult:
        self.installed = False
        return EngineResult(command="uninstall", changed=True, restarted=True, verified=True, layout="fake")

    def status(self) -> EngineResult:
        return EngineResult(
            command="status",
            installed=self.installed,
            status="installed" if self.installed else "absent",
            layout="fake",
            runtimes=(RUNTIME,) if self.installed else (),
        )


class Fleet:
    """N agents in threads, one per stand-in Node, each with its own LeanKube client."""

    def __init__(
        self, url: str, names: list[str], restarts: Restarts, *, parallel: int, restart: float, **timers: Any
    ) -> None:
        self.restarts = restarts
        self.log = io.StringIO()  # every agent's log lines, for a look when a figure is off
        self.stopped = threading.Event()
        self.clients: list[LeanKube] = []
        self.agents: list[Agent] = []
        for name in names:
            client = LeanKube(Endpoint(server=url, token="standin-token", namespace=NAMESPACE))
            config = AgentConfig(
                node_name=name, namespace=NAMESPACE, max_parallel_restarts=parallel, **timers
            )
            engine = FakeEngine(self.restarts, restart)
            log = Logger(self.log, node=name)
            self.clients.append(client)
            self.agents.append(Agent(client, engine, config, log=log, sleep=self._sleep))
        self.threads = [
            threading.Thread(target=a.run, name=f"agent-{a.cfg.node_name}", daemon=True) for a in self.agents
        ]

    def _sleep(self, seconds: float) -> None:
        self.stopped.wait(seconds)  # the agent's own sleeps, cut short when the fleet stops

    def start(self) -> Fleet:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        for agent in self.agents:
            # request_stop raises AgentStopped here, in the caller, when no engine run is in flight
            with contextlib.suppress(AgentStopped):
                agent.request_stop()
        self.stopped.set()
        for t in self.threads:
            t.join(10)
        for client in self.clients:
            client.close()


def _fleet_process(
    url: str,
    names: list[str],
    restarts: Restarts,
    settings: dict[str, Any],
    stop: multiprocessing.synchronize.Event,
) -> None:
    """A worker process: `names`' agents in threads until `stop` is set."""
    fleet = Fleet(url, names, restarts, **settings).start()
    stop.wait()
    fleet.stop()


class Fleets:
    """The agents of `names` spread over `workers` processes (`spawn`: no threads forked)."""

    def __init__(self, api: StandIn, names: list[str], *, workers: int = WORKERS, **settings: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.restarts = Restarts(ctx)
        self.stop_event = ctx.Event()
        share = [names[i::workers] for i in range(workers)]
        self.procs = [
            ctx.Process(
                target=_fleet_process,
                args=(api.url, part, self.restarts, settings, self.stop_event),
                daemon=True,
            )
            for part in share
            if part
        ]

    def start(self) -> Fleets:
        for proc in self.procs:
            proc.start()
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the agent processes used so far (/proc/PID/stat)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for proc in self.procs:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return total / tick

    def stop(self) -> None:
        self.stop_event.set()
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)


def _kind(r: Request) -> str:
    plural = next((p for p in ("leases", "events", "nodes") if f"/{p}" in r.path), r.path)
    if r.method == "GET" and r.query.get("watch"):
        return f"{plural} watch"
    return f"{plural} {r.method}"


def _watches(api: StandIn) -> int:
    return sum(1 for r in api.recorded("GET", "nodes") if r.query.get("watch"))


def _cluster(n: int, latency: float) -> tuple[StandIn, list[str]]:
    api = StandIn(latency=latency).start()
    names = [f"node-{i:04}" for i in range(n)]
    for name in names:
        api.add_node(name)
    return api, names


@dataclass(frozen=True)
class Rollout:
    seconds: float  # opt-in of all nodes -> the last provisioned label written
    requests: Counter[str]  # by kind, from the opt-in until every agent finished
    most_restarting: int
    slots_busy: float  # restart seconds / (P * seconds): how much of the P slots was used
    cpu: float  # CPU seconds of the agents and of the stand-in, over the rollout


def rollout(n: int, parallel: int, restart: float, latency: float, backoff: Backoff) -> Rollout:
    """Opt every node in at once; returns when the last was labelled and what it cost."""
    api, names = _cluster(n, latency)
    labelled: dict[str, float] = {}
    finished: set[str] = set()  # nodes whose agent sent its Provisioned event: done writing

    def on_write(res: Any, kind: str, obj: dict[str, Any]) -> None:  # lock held: keep it cheap
        meta = obj.get("metadata") or {}
        if res.plural == "nodes" and (meta.get("labels") or {}).get(PROVISIONED_LABEL) == "true":
            labelled.setdefault(meta["name"], time.perf_counter())
        elif res.plural == "events" and obj.get("reason") == "Provisioned":
            finished.add(str((obj.get("involvedObject") or obj.get("regarding") or {}).get("name")))

    fleet = Fleets(api, names, parallel=parallel, restart=restart, backoff=backoff).start()
    try:
        wait_for(lambda: _watches(api) >= n, 120, "every agent's watch", step=0.05)
        api.on_write = on_write
        mark = len(api.recorded())
        cpu_before = fleet.cpu_seconds() + time.process_time()
        started = time.perf_counter()
        for name in names:
            api.patch_node(name, {"metadata": {"annotations": {OPT_IN_KEY: "true"}}})
        ideal = math.ceil(n / parallel) * restart
        wait_for(lambda: len(labelled) == n, 10 * ideal + 120, "every node provisioned", step=0.05)
        wait_for(lambda: len(finished) == n, 60, "every agent finished", step=0.05)
        requests = Counter(_kind(r) for r in api.recorded()[mark:])
        assert len(labelled) == n, f"{n - len(labelled)} nodes never labelled"
        seconds = max(labelled.values()) - started
        busy = fleet.restarts.busy / (parallel * seconds)
        cpu = fleet.cpu_seconds() + time.process_time() - cpu_before
        return Rollout(seconds, requests, fleet.restarts.most, busy, cpu)
    finally:
        api.drop_watches()
        fleet.stop()
        api.stop()


def idle(n: int, seconds: float, latency: float) -> tuple[float, Counter[str]]:
    """Provision a fleet with timers scaled down TIMER_SCALE times, leave it alone `seconds`;
    returns its API requests per node per (real) hour and their kinds per node per hour."""
    api, names = _cluster(n, latency)
    for name in names:
        api.patch_node(name, {"metadata": {"annotations": {OPT_IN_KEY: "true"}}})
    timers = {"watch_timeout": 300 // TIMER_SCALE, "drift_interval": 300.0 / TIMER_SCALE}
    fleet = Fleets(api, names, parallel=n, restart=0.0, **timers).start()
    try:
        wait_for(lambda: len(api.events("Provisioned")) == n, 120, "every node provisioned", step=0.05)
        mark = len(api.recorded())
        time.sleep(seconds)  # the measurement window itself, not synchronisation
        requests = Counter(_kind(r) for r in api.recorded()[mark:])
    finally:
        api.drop_watches()
        fleet.stop()
        api.stop()
    per_hour = 3600 / (seconds * TIMER_SCALE) / n
    return sum(requests.values()) * per_hour, Counter({k: v * per_hour for k, v in requests.items()})


def agent_rss(rounds: int, work: Path) -> list[float]:
    """RSS (MiB) of one `kwasm-py agent` process with the fake engine, idle after it
    provisioned its node; one sample per round."""
    out = []
    for i in range(rounds):
        root = work / f"node-{i}"
        root.mkdir()
        with StandIn() as api:
            api.add_node("n1", annotations={OPT_IN_KEY: "true"})
            env = child_env(
                KUBECONFIG=str(api.kubeconfig(work / f"kc-{i}", namespace=NAMESPACE)),
                NODE_NAME="n1",
                KWASM_NAMESPACE=NAMESPACE,
                KWASM_HOST_ROOT=str(root),
                KWASM_NODE_COMMAND=f"{PYTHON} {FAKE_NODE}",
                KWASM_SHIM="/nonexistent/containerd-shim-spin-v2",
            )
            proc = subprocess.Popen(
                [*KWASM, "agent"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                api.wait_for(
                    lambda a=api: a.node("n1")["metadata"]["labels"].get(PROVISIONED_LABEL) == "true",
                    60,
                    "the agent to label n1",
                )
                api.wait_for(lambda a=api: a.events("Provisioned"), 60, "the Provisioned event")
                time.sleep(0.5)  # let the last allocations settle before sampling
                out.append(rss_mib(proc.pid))
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    return out


def _breakdown(requests: Counter[str], n: int) -> str:
    return ", ".join(f"{k} {v / n:.2g}" for k, v in sorted(requests.items(), key=lambda kv: -kv[1]))


def run(quick: bool) -> list[dict[str, object]]:
    # quick (CI: only checks it runs): 20 nodes, 50 ms restarts and every backoff 20x shorter,
    # since the agent's Lease polls (2 s, 4 s, ... 20 s) would otherwise take minutes.
    n, restart, rounds, scale = (20, 0.05, 1, 0.05) if quick else (200, RESTART, 3, 1.0)
    idle_seconds = 3.0 if quick else 12.0
    rows: list[dict[str, object]] = []
    for parallel in (1, 10):
        runs = [
            rollout(n, parallel, restart, LATENCY, Backoff(scale=scale))
            for _ in range(1 if parallel == 1 else rounds)
        ]
        for r in runs:
            assert r.most_restarting <= parallel, f"{r.most_restarting} restarts at once with P={parallel}"
        ideal = math.ceil(n / parallel) * restart
        rows.append(
            row(
                f"rollout, {n} nodes, P={parallel}, restart {restart:g} s: opt-in -> all provisioned",
                [r.seconds for r in runs],
                [ideal] * len(runs),
                unit="s",
                digits=2,
                floor_name=f"ideal ceil(N/P) * restart = {ideal:g} s",
                compare="ratio",
                goal=Goal("ratio", "<=", 1.1, "<= 1.1x ideal"),
                note=f"restart slots busy {statistics.median(r.slots_busy for r in runs):.0%}; "
                f"agents + stand-in used {statistics.median(r.cpu / r.seconds for r in runs):.2f} of "
                f"{os.cpu_count()} CPUs (in a cluster each node has its own); "
                f"at most {max(r.most_restarting for r in runs)} restarting at once"
                + (f"; backoff x{scale:g}" if scale != 1 else ""),
            )
        )
        per_node = [sum(r.requests.values()) / n for r in runs]
        rows.append(
            row(
                f"rollout, {n} nodes, P={parallel}: API requests per node, one provisioning",
                per_node,
                None,
                unit="requests",
                floor_name="-",
                goal=Goal("value", "<=", 10, "<= 10"),
                note=_breakdown(runs[-1].requests, n),
            )
        )
    samples = [idle(n, idle_seconds, LATENCY) for _ in range(1 if quick else 2)]
    rows.append(
        row(
            f"idle API requests per node per hour, {n} provisioned nodes",
            [s[0] for s in samples],
            None,
            unit="requests/h",
            floor_name="-",
            goal=Goal("value", "<=", 15, "<= 15"),
            note=f"timers scaled 1/{TIMER_SCALE}, {idle_seconds:g} s measured = "
            f"{idle_seconds * TIMER_SCALE / 60:g} min, scaled to 1 h; {_breakdown(samples[-1][1], 1)}",
        )
    )
    figure = "agent RSS idle, one process, after provisioning its node"
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    try:
        rss = agent_rss(1 if quick else 3, work)
    except (OSError, AssertionError, TimeoutError) as ex:
        rss = []
        rows.append(skipped(figure, f"{type(ex).__name__}: {ex}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rss:
        bare = [rss_started_mib("pass") for _ in rss]
        rows.append(
            row(
                figure,
                rss,
                bare,
                unit="MiB",
                floor_name="python -c pass",
                goal=Goal("value", "<=", 30, "<= 30 MiB"),
            )
        )
    return rows
