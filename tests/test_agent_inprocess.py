"""The agent in process, with fakes for its two ports (the API and the engine): what it records
on the Node for each kind of engine result, and the order of its effects."""

from __future__ import annotations

import copy
import io
import json
import queue
import threading
from collections.abc import Iterator

from kwasm_py.cluster.agent import Agent, AgentConfig, Backoff
from kwasm_py.cluster.agentlog import Logger
from kwasm_py.cluster.engine_proc import EngineFailed
from kwasm_py.contract import EngineResult, Runtime
from kwasm_py.errors import KubeError
from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL, STATUS_ANNOTATION
from tests.harness.kube_standin import strategic_node_patch

SPIN = Runtime(
    "spin", "/opt/kwasm/bin/containerd-shim-spin-v2", "/opt/kwasm/bin/containerd-shim-spin-v2", "cd" * 32
)
GOOD = EngineResult(command="install", changed=True, restarted=True, verified=True, runtimes=(SPIN,))


class FakeApi:
    """AgentApi in memory: one Node, Leases by name, Events; every call appended to ``calls``."""

    def __init__(self, node: dict) -> None:
        self.node = node
        self.leases: dict[str, dict] = {}
        self.lease_events: queue.Queue[dict | None] = queue.Queue()  # what the Lease watch sees
        self.events: list[dict] = []
        self.calls: list[str] = []

    def get_node(self, name: str) -> dict:
        self.calls.append("get_node")
        return copy.deepcopy(self.node)

    def patch_node(self, name: str, patch: dict) -> None:
        self.calls.append("patch_node")
        meta = self.node.setdefault("metadata", {})
        for part, values in patch.get("metadata", {}).items():
            if not isinstance(values, dict):  # resourceVersion (a precondition here)
                continue
            target = meta.setdefault(part, {})
            for key, value in values.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        for key, value in patch.get("spec", {}).items():  # taints: a merge patch replaces lists
            spec = self.node.setdefault("spec", {})
            if value is None:
                spec.pop(key, None)
            else:
                spec[key] = value

    def patch_node_status(self, name: str, patch: dict) -> None:
        self.calls.append("patch_status")
        self.node = strategic_node_patch(self.node, patch)

    def watch_node(self, name: str, *, resource_version: str, timeout_seconds: int) -> Iterator[dict]:
        return iter(())

    def create_event(self, namespace: str, event: dict) -> None:
        self.calls.append(f"event:{event['reason']}")
        self.events.append(event)

    def get_lease(self, namespace: str, name: str) -> dict | None:
        return copy.deepcopy(self.leases.get(name))

    def create_lease(self, namespace: str, lease: dict) -> dict:
        self.calls.append(f"lease:{lease['spec'].get('holderIdentity')}")
        self.leases[lease["metadata"]["name"]] = lease
        return lease

    def replace_lease(self, namespace: str, lease: dict) -> dict:
        self.calls.append(f"lease:{lease['spec'].get('holderIdentity')}")
        self.leases[lease["metadata"]["name"]] = lease
        return lease

    def list_leases(self, namespace: str) -> tuple[list[dict], str]:
        return copy.deepcopy(list(self.leases.values())), "1"

    def watch_leases(self, namespace: str, *, resource_version: str, timeout_seconds: int) -> Iterator[dict]:
        while (event := self.lease_events.get(timeout=timeout_seconds)) is not None:
            yield event

    def delete_lease(self, namespace: str, name: str) -> bool:
        return self.leases.pop(name, None) is not None


class FakeEngine:
    """The Engine port: answers install with ``result`` (or raises it), records calls in ``api``."""

    def __init__(self, api: FakeApi, result: EngineResult | EngineFailed) -> None:
        self.api = api
        self.result = result

    def _answer(self, verb: str) -> EngineResult:
        self.api.calls.append(f"engine:{verb}")
        if isinstance(self.result, EngineFailed):
            raise self.result
        return self.result

    def install(self) -> EngineResult:
        return self._answer("install")

    def uninstall(self) -> EngineResult:
        return self._answer("uninstall")

    def status(self) -> EngineResult:
        return self._answer("status")


def _agent(result: EngineResult | EngineFailed, *, labels: dict | None = None) -> tuple[Agent, FakeApi]:
    node = {
        "metadata": {"name": "n1", "uid": "u1", "annotations": {OPT_IN_KEY: "true"}, "labels": labels or {}}
    }
    api = FakeApi(node)
    config = AgentConfig(node_name="n1", namespace="kwasm-system", backoff=Backoff(scale=0))
    agent = Agent(api, FakeEngine(api, result), config, log=Logger(io.StringIO()), sleep=lambda s: None)
    return agent, api


def _status(api: FakeApi) -> dict:
    return json.loads(api.node["metadata"]["annotations"][STATUS_ANNOTATION])


def test_verified_install_is_labelled_after_the_engine_inside_the_lease():
    """Lease taken, engine install, Lease given back, then label + status + Provisioned event,
    the runtimes in status and event coming from the typed result."""
    agent, api = _agent(GOOD)
    agent.reconcile(api.get_node("n1"))
    assert api.calls[1:] == [
        "lease:n1",
        "patch_node",  # phase installing
        "engine:install",
        "lease:None",
        "patch_status",  # label + phase provisioned + condition KwasmProvisioned=True: one write
        "event:Provisioned",
    ]
    assert api.node["metadata"]["labels"][PROVISIONED_LABEL] == "true"
    assert _status(api)["runtimes"] == [SPIN.to_json()]
    assert api.events[0]["message"] == (
        f"runtimes spin@{'cd' * 6} verified by containerd (changed=True, restarted=True)"
    )


def test_unverified_install_is_a_failure_without_label():
    """An install containerd did not confirm (verified false) fails at step verify: no label."""
    agent, api = _agent(EngineResult(command="install", changed=True, runtimes=(SPIN,)))
    agent.reconcile(api.get_node("n1"))
    assert PROVISIONED_LABEL not in api.node["metadata"]["labels"]
    st = _status(api)
    assert st["ok"] is False and st["step"] == "verify"
    assert [e["reason"] for e in api.events] == ["ProvisionFailed"] and agent.next_retry is not None


def test_contract_failure_takes_an_existing_label_away():
    """An engine answer outside the contract on a labelled node removes the label and records
    the contract problem; the agent keeps running (reconcile returns)."""
    failure = EngineFailed("contract", "node install answered outside the contract: version 9")
    agent, api = _agent(failure, labels={PROVISIONED_LABEL: "true"})
    agent.reconcile(api.get_node("n1"))
    assert PROVISIONED_LABEL not in api.node["metadata"]["labels"]
    st = _status(api)
    assert st["step"] == "contract" and "version 9" in st["reason"]
    assert api.events[0]["type"] == "Warning" and api.events[0]["message"].startswith("contract: ")


# -- the kubelet's confirmation (status.runtimeHandlers), phases, the condition


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _with_handlers(node: dict, *handlers: str) -> dict:
    node = copy.deepcopy(node)
    node.setdefault("status", {})["runtimeHandlers"] = [{"name": h, "features": {}} for h in handlers]
    return node


def _clocked(result: EngineResult | EngineFailed, **cfg: object) -> tuple[Agent, FakeApi, Clock]:
    agent, api = _agent(result)
    clock = Clock()
    settings: dict = {"backoff": Backoff(scale=0), **cfg}
    config = AgentConfig(node_name="n1", namespace="kwasm-system", **settings)
    agent = Agent(api, agent.engine, config, log=Logger(io.StringIO()), sleep=lambda s: None, clock=clock)
    return agent, api, clock


def _condition(api: FakeApi) -> dict | None:
    conds = [c for c in api.node.get("status", {}).get("conditions", []) if c["type"] == "KwasmProvisioned"]
    return conds[0] if conds else None


def test_kubelet_must_list_the_handler_before_the_label():
    """A Node that reports runtime handlers without ours: verified by containerd, but no label
    (phase verifying, timer set) until a Node update lists spin; then the label, check kubelet,
    condition True."""
    agent, api, clock = _clocked(GOOD, kubelet_timeout=120.0)
    api.node = _with_handlers(api.node, "", "runc")
    agent.reconcile(api.get_node("n1"))
    assert PROVISIONED_LABEL not in api.node["metadata"]["labels"]
    assert _status(api)["phase"] == "verifying" and agent._until_timer() == 120.0
    assert _condition(api) is None and not api.events
    clock.now += 60
    agent.reconcile(api.get_node("n1"))  # an unrelated update: still not listed
    agent.tick()
    assert PROVISIONED_LABEL not in api.node["metadata"]["labels"]
    api.node = _with_handlers(api.node, "", "runc", "spin")
    agent.reconcile(api.get_node("n1"))
    assert api.node["metadata"]["labels"][PROVISIONED_LABEL] == "true"
    st = _status(api)
    assert st["phase"] == "provisioned" and st["check"] == "kubelet" and st["ok"] is True
    assert set(st["phases"]) == {"installing", "verifying", "provisioned"}
    cond = _condition(api)
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "Provisioned"
    assert [c for c in api.calls if c == "engine:install"] == ["engine:install"]  # no second install
    assert "containerd and the kubelet" in api.events[-1]["message"]


def test_kubelet_that_never_lists_the_handler_fails_at_step_kubelet():
    """The field is present and the handler never shows up: at the deadline (and not before)
    the node fails at step kubelet, without a label, condition False, and a retry is due."""
    agent, api, clock = _clocked(GOOD, kubelet_timeout=120.0)
    api.node = _with_handlers(api.node, "runc")
    agent.reconcile(api.get_node("n1"))
    clock.now += 119.9
    agent.tick()
    assert _status(api)["phase"] == "verifying"
    clock.now += 0.2
    agent.tick()
    st = _status(api)
    assert st["phase"] == "failed" and st["step"] == "kubelet" and st["ok"] is False
    assert "spin" in st["reason"] and "reports runc" in st["reason"]
    assert PROVISIONED_LABEL not in api.node["metadata"]["labels"]
    cond = _condition(api)
    assert cond is not None and cond["status"] == "False" and cond["message"].startswith("kubelet: ")
    assert [e["reason"] for e in api.events] == ["ProvisionFailed"] and agent.next_retry is not None


def test_absent_field_lets_cri_decide_and_says_so():
    """Without status.runtimeHandlers (older kubelet or containerd) CRI verification alone
    decides: labelled at once, check cri, the shim version recorded."""
    agent, api = _agent(GOOD)
    agent.progress.versions = {"spin": "v0.15.1"}
    agent.reconcile(api.get_node("n1"))
    st = _status(api)
    assert api.node["metadata"]["labels"][PROVISIONED_LABEL] == "true"
    assert st["check"] == "cri" and st["shims"] == [
        {"handler": "spin", "version": "v0.15.1", "sha256": "cd" * 32}
    ]
    assert "verified by containerd (" in api.events[0]["message"]


def test_unverified_install_is_not_labelled_even_when_the_kubelet_lists_the_handler():
    """The kubelet listing spin (from an earlier install) does not stand in for containerd's
    verification: an unverified install fails at verify and takes an existing label away."""
    agent, api = _agent(
        EngineResult(command="install", changed=True, runtimes=(SPIN,)), labels={PROVISIONED_LABEL: "true"}
    )
    api.node = _with_handlers(api.node, "runc", "spin")
    agent.reconcile(api.get_node("n1"))
    assert PROVISIONED_LABEL not in api.node["metadata"]["labels"]
    assert _status(api)["step"] == "verify"
    cond = _condition(api)
    assert cond is not None and cond["status"] == "False"


def test_later_failure_takes_the_label_and_condition_away():
    """Provisioned, then the drift repair fails: label removed, condition turns False with a
    new transition time, phase failed naming the engine's step."""
    agent, api = _agent(GOOD)
    agent.reconcile(api.get_node("n1"))
    assert _condition(api)["status"] == "True"  # type: ignore[index]
    agent.engine.result = EngineFailed("restart", "containerd did not come back")  # type: ignore[attr-defined]
    agent.wall_clock = lambda: 2_000_000_000.0
    agent.progress.wall_clock = agent.wall_clock
    agent.provision(api.get_node("n1"), repair=True)
    assert PROVISIONED_LABEL not in api.node["metadata"]["labels"]
    st = _status(api)
    assert (
        st["phase"] == "failed" and st["step"] == "restart" and st["reason"] == "containerd did not come back"
    )
    cond = _condition(api)
    assert (
        cond is not None
        and cond["status"] == "False"
        and cond["lastTransitionTime"] == "2033-05-18T03:33:20Z"
    )


def test_opt_out_removes_the_condition():
    """Opting out uninstalls and removes label, status annotation and the condition."""
    agent, api = _agent(GOOD)
    agent.reconcile(api.get_node("n1"))
    api.node["metadata"]["annotations"].pop(OPT_IN_KEY)
    agent.reconcile(api.get_node("n1"))
    assert _condition(api) is None and STATUS_ANNOTATION not in api.node["metadata"]["annotations"]
    assert "engine:uninstall" in api.calls


def test_waiting_for_a_restart_slot_is_a_phase():
    """Every restart Lease held by another live node: phase waiting is recorded while the agent
    waits in the queue, and it installs once the Lease watch shows the slot handed to it."""
    agent, api = _agent(GOOD)
    far = "2999-01-01T00:00:00.000000Z"
    api.leases["kwasm-restart-0"] = {
        "metadata": {"name": "kwasm-restart-0"},
        "spec": {"holderIdentity": "other", "leaseDurationSeconds": 60, "renewTime": far},
    }
    phases: list[str] = []
    queued = agent.leases.on_wait

    def hand_over() -> None:  # the other node finishes and hands the slot to us
        queued()
        phases.append(_status(api)["phase"])
        assert "kwasm-wait-n1" in api.leases
        lease = api.leases["kwasm-restart-0"]
        lease["spec"].update(holderIdentity="n1", leaseDurationSeconds=10)
        api.lease_events.put({"type": "MODIFIED", "object": copy.deepcopy(lease)})

    agent.leases.on_wait = hand_over
    agent.reconcile(api.get_node("n1"))
    api.lease_events.put(None)
    assert phases == ["waiting"]
    st = _status(api)
    assert st["phase"] == "provisioned" and list(st["phases"]) == ["installing", "provisioned", "waiting"]
    assert "kwasm-wait-n1" not in api.leases  # served: out of the queue
    assert api.leases["kwasm-restart-0"]["spec"].get("holderIdentity") is None  # given back


# -- timers fire on time, whatever the watch does


class IdleWatchApi(FakeApi):
    """A watch that delivers the Node once and then stays silent (a 300 s watch term on an
    idle Node), until the test releases it."""

    def __init__(self, node: dict) -> None:
        super().__init__(node)
        self.release = threading.Event()

    def get_node(self, name: str) -> dict:
        node = super().get_node(name)
        if self.calls.count("get_node") == 1:  # the first read predates the opt-in
            node["metadata"]["annotations"].pop(OPT_IN_KEY)
        return node

    def watch_node(self, name: str, *, resource_version: str, timeout_seconds: int) -> Iterator[dict]:
        yield {"type": "MODIFIED", "object": copy.deepcopy(self.node)}
        self.release.wait(timeout_seconds)


class FlakyEngine(FakeEngine):
    """Fails the first install; signals ``second`` on the next one and stops the agent."""

    def __init__(self, api: FakeApi, agent_box: list[Agent]) -> None:
        super().__init__(api, GOOD)
        self.installs = 0
        self.second = threading.Event()
        self.box = agent_box

    def install(self) -> EngineResult:
        self.installs += 1
        if self.installs == 1:
            raise EngineFailed("config", "cannot parse config.toml")
        self.box[0].stopping = True
        self.second.set()
        return GOOD


def test_retry_fires_while_the_watch_is_idle():
    """An install fails while handling a watch event; the retry (due in 50 ms) runs on time
    although the watch stays silent for its whole 300 s term."""
    node = {"metadata": {"name": "n1", "uid": "u1", "annotations": {}, "labels": {}}}
    api = IdleWatchApi(node)
    api.node["metadata"]["annotations"][OPT_IN_KEY] = "true"
    box: list[Agent] = []
    engine = FlakyEngine(api, box)
    config = AgentConfig(
        node_name="n1", namespace="kwasm-system", watch_timeout=300, backoff=Backoff(initial=0.05, scale=1.0)
    )
    agent = Agent(api, engine, config, log=Logger(io.StringIO()))
    box.append(agent)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        assert engine.second.wait(10), "the retry did not run while the watch was idle"
        runner.join(10)
        assert not runner.is_alive()
    finally:
        api.release.set()
    assert engine.installs == 2


def test_an_update_caused_by_our_own_earlier_patch_does_not_install_again():
    """The watch delivers the Node as our phase-installing patch left it (no label yet) after
    the label was written: it is recognised as older than our last write and ignored; a Node
    whose label someone removed later is acted on."""
    agent, api = _agent(GOOD)
    snapshots: list[dict] = []
    real_patch = api.patch_node

    def recording_patch(name: str, patch: dict) -> None:
        real_patch(name, patch)
        snapshots.append(copy.deepcopy(api.node))

    api.patch_node = recording_patch  # type: ignore[method-assign]
    agent.wall_clock = agent.progress.wall_clock = iter(range(1_700_000_000, 1_800_000_000)).__next__  # type: ignore[assignment]
    agent.reconcile(api.get_node("n1"))
    installing = snapshots[0]
    assert (
        nodeview_phase(installing) == "installing"
        and PROVISIONED_LABEL not in installing["metadata"]["labels"]
    )
    agent.reconcile(copy.deepcopy(installing))
    assert api.calls.count("engine:install") == 1
    api.node["metadata"]["labels"].pop(PROVISIONED_LABEL)  # someone takes the label away
    agent.reconcile(api.get_node("n1"))
    assert (
        api.calls.count("engine:install") == 2 and api.node["metadata"]["labels"][PROVISIONED_LABEL] == "true"
    )


def nodeview_phase(node: dict) -> str:
    return json.loads(node["metadata"]["annotations"][STATUS_ANNOTATION])["phase"]


def test_api_error_at_the_kubelet_deadline_backs_off():
    """Reading the Node at the kubelet deadline fails: the agent does not retry at once (no hot
    loop of GETs), but after the backoff, and then fails the node at step kubelet."""
    agent, api, clock = _clocked(GOOD, kubelet_timeout=10.0, backoff=Backoff(initial=2.0, scale=1.0))
    api.node = _with_handlers(api.node, "runc")
    agent.reconcile(api.get_node("n1"))
    clock.now += 10
    real_get = api.get_node

    def down(name: str) -> dict:
        raise KubeError("GET /api/v1/nodes/n1: 503", status=503)

    api.get_node = down  # type: ignore[method-assign]
    try:
        agent.tick()
    except KubeError as ex:
        agent._api_failed(ex)
    wait = agent._until_timer()
    assert wait is not None and wait > 1.0  # the backoff, not the overdue deadline
    api.get_node = real_get  # type: ignore[method-assign]
    clock.now += wait
    agent.tick()
    assert _status(api)["step"] == "kubelet" and PROVISIONED_LABEL not in api.node["metadata"]["labels"]


# -- the merge of kubelet confirmation and phases with the safeguards (budget, labels, taint)

STARTUP = {"key": "kwasm.sh/kwasm-not-ready", "value": "true", "effect": "NoSchedule"}
FOREIGN = {"key": "dedicated", "value": "wasm", "effect": "NoSchedule"}


def test_handler_label_and_untaint_wait_for_the_kubelet():
    """Verified by containerd while the kubelet does not list spin yet: no provisioned or
    handler label and the startup taint stays; once the kubelet lists spin, both labels come
    with phase provisioned and only our taint goes."""
    agent, api, _clock = _clocked(GOOD, kubelet_timeout=120.0)
    api.node = _with_handlers(api.node, "runc")
    api.node["spec"] = {"taints": [FOREIGN, STARTUP]}
    agent.reconcile(api.get_node("n1"))
    assert _status(api)["phase"] == "verifying"
    assert not api.node["metadata"]["labels"] and api.node["spec"]["taints"] == [FOREIGN, STARTUP]
    api.node = _with_handlers(api.node, "runc", "spin")
    agent.reconcile(api.get_node("n1"))
    labels = api.node["metadata"]["labels"]
    assert labels == {PROVISIONED_LABEL: "true", "kwasm.sh/runtime-spin": "true"}
    assert _status(api)["phase"] == "provisioned" and api.node["spec"]["taints"] == [FOREIGN]


def test_held_node_is_phase_failed_at_step_budget_with_condition_false():
    """Installs that keep failing: after max_attempts the node is held through the same
    progress path (phase failed, step budget, condition False, handler labels gone), and the
    held agent does not call the engine again for the same inputs."""
    failure = EngineFailed("restart", "containerd did not come back")
    agent, api, clock = _clocked(failure, max_attempts=2)
    api.node["metadata"]["labels"] = {PROVISIONED_LABEL: "true", "kwasm.sh/runtime-spin": "true"}
    for _ in range(3):
        agent.reconcile(api.get_node("n1"))
        clock.now += 1000
    assert api.calls.count("engine:install") == 2
    st = _status(api)
    assert st["phase"] == "failed" and st["step"] == "budget" and "--retry" in st["reason"]
    cond = _condition(api)
    assert cond is not None and cond["status"] == "False" and cond["message"].startswith("budget: ")
    assert not api.node["metadata"]["labels"]
    assert [e["reason"] for e in api.events].count("ProvisionHeld") == 1


class SilentAfterOneEventApi(IdleWatchApi):
    """IdleWatchApi that says when its watch has gone silent (the agent then waits for events)."""

    def __init__(self, node: dict) -> None:
        super().__init__(node)
        self.silent = threading.Event()

    def watch_node(self, name: str, *, resource_version: str, timeout_seconds: int) -> Iterator[dict]:
        yield {"type": "MODIFIED", "object": copy.deepcopy(self.node)}
        self.silent.set()
        self.release.wait(timeout_seconds)


def test_a_stop_request_wakes_an_agent_waiting_for_node_events():
    """An agent with nothing due waits for the next Node event; a stop request from another
    thread (how a fleet of agents in threads is stopped) ends its loop at once, not at the
    watch's 300 s term."""
    import contextlib

    from kwasm_py.cluster.safeguards import AgentStopped

    node = {"metadata": {"name": "n1", "uid": "u1", "annotations": {OPT_IN_KEY: "false"}, "labels": {}}}
    api = SilentAfterOneEventApi(node)
    config = AgentConfig(
        node_name="n1", namespace="kwasm-system", watch_timeout=300, backoff=Backoff(scale=0)
    )
    agent = Agent(api, FakeEngine(api, GOOD), config, log=Logger(io.StringIO()))
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        assert api.silent.wait(10), "the watch never delivered the Node"
        with contextlib.suppress(AgentStopped):
            agent.request_stop()
        runner.join(10)
        assert not runner.is_alive(), "the agent kept waiting for a Node event after the stop"
    finally:
        api.release.set()
