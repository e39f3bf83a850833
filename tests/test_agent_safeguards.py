"""The agent's safeguards against the stand-in API with the fake engine (subprocesses): the
bounded-disruption budget (issue 13.3), the startup taint (13.4), per-handler labels (13.8)
and what it does on SIGTERM (13.9, 14.2)."""

from __future__ import annotations

import json

from kwasm_py.cluster import disruption, nodeview
from kwasm_py.cluster.policy import STARTUP_TAINT_KEY
from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL, STATUS_ANNOTATION
from tests.harness.cli import invoke
from tests.harness.cluster import wait_until
from tests.harness.kube_standin import StandIn

SPIN_LABEL = "kwasm.sh/runtime-spin"
OURS = {"key": STARTUP_TAINT_KEY, "value": "true", "effect": "NoSchedule"}
OURS_NOEXECUTE = {"key": STARTUP_TAINT_KEY, "effect": "NoExecute"}
FOREIGN = {"key": "dedicated", "value": "wasm", "effect": "NoSchedule"}


def labels(api: StandIn, node: str) -> dict:
    return api.node(node)["metadata"].get("labels") or {}


def status(api: StandIn, node: str) -> dict:
    raw = (api.node(node)["metadata"].get("annotations") or {}).get(STATUS_ANNOTATION)
    return json.loads(raw) if raw else {}


def installs(agent) -> list[dict]:
    return [c for c in agent.calls() if c["verb"] == "install"]


def node_gets(api: StandIn) -> int:
    return len([r for r in api.recorded("GET", "nodes") if not r.query.get("watch")])


def test_unchanged_inputs_cost_at_most_n_attempts(standin: StandIn, agents, tmp_path, kubeconfig):
    """An install that keeps failing is attempted exactly KWASM_MAX_ATTEMPTS times, then the
    node is held (no label, status failed at step budget, one ProvisionHeld) while the agent
    keeps re-checking its inputs; `annotate-node --retry` buys N more attempts, and a fixed
    node then provisions and forgets the count."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    root = tmp_path / "node-n1"
    root.mkdir()
    (root / "fail-install").write_text("containerd does not list runtime spin")
    agent = agents("n1", root=root, KWASM_MAX_ATTEMPTS="2", KWASM_DRIFT_INTERVAL="0.05")
    standin.wait_for(lambda: standin.events("ProvisionHeld", "n1"), what="ProvisionHeld")
    st = status(standin, "n1")
    assert st["ok"] is False and st["step"] == "budget" and "--retry" in st["reason"]
    assert PROVISIONED_LABEL not in labels(standin, "n1")
    # The held agent keeps looking (a Node read per re-check) and still does not install.
    seen = node_gets(standin)
    standin.wait_for(lambda: node_gets(standin) >= seen + 5, what="five re-checks while held")
    assert len(installs(agent)) == 2
    assert len(standin.events("ProvisionHeld", "n1")) == 1
    record = json.loads((root / "var/lib/kwasm-py/agent-attempts.json").read_text())
    assert record["count"] == 2
    # A retry request: two more attempts, then held again.
    res = invoke("annotate-node", "--retry", "n1", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    assert disruption.retry_token(standin.node("n1"))
    standin.wait_for(lambda: len(standin.events("ProvisionHeld", "n1")) == 2, what="held again")
    seen = node_gets(standin)
    standin.wait_for(lambda: node_gets(standin) >= seen + 3, what="re-checks while held again")
    assert len(installs(agent)) == 4
    # The node is fixed and a retry is asked: provisioned, the record is gone.
    (root / "fail-install").unlink()
    res = invoke("annotate-node", "--retry", "n1", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    standin.wait_for(lambda: labels(standin, "n1").get(PROVISIONED_LABEL) == "true", what="label")
    assert len(installs(agent)) == 5
    wait_until(lambda: not (root / "var/lib/kwasm-py").exists(), what="the record removed")


def test_budget_survives_an_agent_restart(standin: StandIn, agents, tmp_path):
    """The count is kept on the node: a new agent pod continues it instead of starting over."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    root = tmp_path / "node-n1"
    root.mkdir()
    (root / "fail-install").write_text("restart failed")
    first = agents("n1", root=root, KWASM_MAX_ATTEMPTS="3")
    wait_until(lambda: len(installs(first)) >= 1, what="a first attempt")
    first.kill()
    done = len(installs(first))
    second = agents("n1", root=root, KWASM_MAX_ATTEMPTS="3")
    standin.wait_for(lambda: standin.events("ProvisionHeld", "n1"), what="ProvisionHeld")
    assert len(installs(second)) == 3, f"{done} attempts before the restart"


def test_changed_inputs_rearm_the_budget(standin: StandIn, agents, tmp_path):
    """A changed node config file is a new input: the held agent tries again by itself."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    root = tmp_path / "node-n1"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text("version = 2\n")
    (root / "fail-install").write_text("bad config")
    agent = agents("n1", root=root, KWASM_MAX_ATTEMPTS="1", KWASM_DRIFT_INTERVAL="0.05")
    standin.wait_for(lambda: standin.events("ProvisionHeld", "n1"), what="ProvisionHeld")
    assert len(installs(agent)) == 1
    (root / "fail-install").unlink()
    (root / "etc/containerd/config.toml").write_text("version = 2\n# fixed by the admin\n")
    standin.wait_for(lambda: labels(standin, "n1").get(PROVISIONED_LABEL) == "true", what="label")
    assert len(installs(agent)) == 2


def test_only_our_startup_taint_is_removed(standin: StandIn, agents):
    """Provisioned: exactly kwasm.sh/kwasm-not-ready:NoSchedule goes, the same key with another
    effect and foreign taints stay; one added later (an autoscaler's template) goes as well."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"}, taints=[FOREIGN, OURS, OURS_NOEXECUTE])
    agents("n1")
    standin.wait_for(
        lambda: standin.node("n1")["spec"].get("taints") == [FOREIGN, OURS_NOEXECUTE], what="untainted"
    )
    assert labels(standin, "n1").get(PROVISIONED_LABEL) == "true"
    other = {"key": "example.com/maintenance", "effect": "NoSchedule"}
    standin.patch_node("n1", {"spec": {"taints": [FOREIGN, OURS_NOEXECUTE, OURS, other]}})
    standin.wait_for(
        lambda: standin.node("n1")["spec"].get("taints") == [FOREIGN, OURS_NOEXECUTE, other],
        what="the later startup taint removed",
    )


def test_failed_install_keeps_the_startup_taint(standin: StandIn, agents, tmp_path):
    """Not provisioned, not untainted: a failing node keeps its startup taint."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"}, taints=[OURS])
    root = tmp_path / "node-n1"
    root.mkdir()
    (root / "fail-install").write_text("no")
    agents("n1", root=root, KWASM_MAX_ATTEMPTS="1")
    standin.wait_for(lambda: standin.events("ProvisionHeld", "n1"), what="ProvisionHeld")
    assert standin.node("n1")["spec"]["taints"] == [OURS]


def test_handler_label_follows_the_runtime(standin: StandIn, agents, tmp_path):
    """kwasm.sh/runtime-spin is set with the provisioned label, removed after a later failure
    (drift that cannot be repaired) and on opt-out."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    # Above 1 s: below it the loop only sleeps and ticks and never watches (the other timers).
    agent = agents("n1", KWASM_DRIFT_INTERVAL="1.1")
    standin.wait_for(lambda: labels(standin, "n1").get(SPIN_LABEL) == "true", what="handler label")
    assert labels(standin, "n1")[PROVISIONED_LABEL] == "true"
    (agent.root / "fail-install").write_text("shim missing")
    (agent.root / "drift").write_text("runtime spin missing")
    standin.wait_for(lambda: standin.events("ProvisionFailed", "n1"), what="ProvisionFailed")
    assert SPIN_LABEL not in labels(standin, "n1") and PROVISIONED_LABEL not in labels(standin, "n1")
    (agent.root / "fail-install").unlink()
    standin.wait_for(lambda: labels(standin, "n1").get(SPIN_LABEL) == "true", what="relabelled")
    standin.patch_node("n1", {"metadata": {"annotations": {OPT_IN_KEY: None}}})
    standin.wait_for(lambda: standin.events("Unprovisioned", "n1"), what="Unprovisioned")
    assert not nodeview.runtime_labels(standin.node("n1"))


def test_sigterm_while_opted_in_says_so_in_an_event(standin: StandIn, agents):
    """An agent deleted while its node still opts in leaves the runtime and says so (Warning)."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    agent = agents("n1")
    standin.wait_for(lambda: labels(standin, "n1").get(PROVISIONED_LABEL) == "true", what="label")
    assert agent.stop() == 0
    (ev,) = standin.events("AgentStopped", "n1")
    assert ev["type"] == "Warning" and "unmanaged" in ev["message"]
    assert [c["verb"] for c in agent.calls() if c["verb"] != "status"] == ["install"]


def test_sigterm_after_the_opt_out_uninstalls_first(standin: StandIn, agents):
    """The node stopped matching (opt-in label gone) and the pod is deleted at once, while the
    agent's watch fails: by the time it exits it has uninstalled and removed the labels (from
    the relist or from its SIGTERM check, whichever comes first; the in-process test below pins
    the SIGTERM path)."""
    standin.add_node("n1", labels={OPT_IN_KEY: "true"})
    agent = agents("n1")
    standin.wait_for(lambda: labels(standin, "n1").get(PROVISIONED_LABEL) == "true", what="label")
    # Hide the opt-out from the watch: the stream fails until the agent is gone.
    standin.inject(500, 10_000, method="GET", watch=True)
    standin.drop_watches()
    standin.patch_node("n1", {"metadata": {"labels": {OPT_IN_KEY: None}}})
    assert agent.stop(timeout=30) == 0
    assert [c["verb"] for c in agent.calls() if c["verb"] != "status"] == ["install", "uninstall"]
    assert PROVISIONED_LABEL not in labels(standin, "n1") and SPIN_LABEL not in labels(standin, "n1")
    assert standin.events("Unprovisioned", "n1")


class _Api:
    """The agent's API port in memory: one Node; patches merged, Events kept."""

    def __init__(self, node: dict) -> None:
        self.node, self.events, self.patches = node, [], []

    def get_node(self, name: str) -> dict:
        return json.loads(json.dumps(self.node))

    def patch_node(self, name: str, patch: dict) -> None:
        self.patches.append(patch)
        for part, values in patch.get("metadata", {}).items():
            target = self.node["metadata"].setdefault(part, {})
            for key, value in values.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value

    def create_event(self, namespace: str, event: dict) -> None:
        self.events.append(event)

    def get_lease(self, namespace: str, name: str) -> dict | None:
        return None

    def create_lease(self, namespace: str, lease: dict) -> dict:
        return lease

    def replace_lease(self, namespace: str, lease: dict) -> dict:
        return lease

    def list_leases(self, namespace: str) -> tuple[list[dict], str]:
        return [], "1"

    def watch_leases(self, namespace: str, *, resource_version: str, timeout_seconds: int):
        return iter(())

    def delete_lease(self, namespace: str, name: str) -> bool:
        return False

    def watch_node(self, name: str, *, resource_version: str, timeout_seconds: int):
        return iter(())


class _Engine:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def _result(self, verb: str):
        from kwasm_py.contract import EngineResult

        self.calls.append(verb)
        return EngineResult(command=verb, changed=True, restarted=True, verified=True)

    def install(self):
        return self._result("install")

    def uninstall(self):
        return self._result("uninstall")

    def status(self):
        from kwasm_py.contract import EngineResult

        self.calls.append("status")
        return EngineResult(command="status", installed=True, status="installed")


def _agent(node: dict):
    import io

    from kwasm_py.cluster.agent import Agent, AgentConfig
    from kwasm_py.cluster.agentlog import Logger

    api, engine = _Api(node), _Engine()
    agent = Agent(api, engine, AgentConfig("n1", "kwasm-system"), log=Logger(io.StringIO()))
    return agent, api, engine


def test_finish_uninstalls_a_node_that_opted_out():
    """SIGTERM path in process: the Node no longer opts in, the agent (which never saw that
    event) asks the engine, uninstalls and removes provisioned and handler labels."""
    from kwasm_py.cluster import safeguards

    node = {
        "metadata": {
            "name": "n1",
            "labels": {PROVISIONED_LABEL: "true", SPIN_LABEL: "true", "kubernetes.io/os": "linux"},
            "annotations": {STATUS_ANNOTATION: "{}"},
        }
    }
    agent, api, engine = _agent(node)
    safeguards.finish(agent)
    assert engine.calls == ["status", "uninstall"]
    assert api.node["metadata"]["labels"] == {"kubernetes.io/os": "linux"}
    assert STATUS_ANNOTATION not in api.node["metadata"]["annotations"]
    assert [e["reason"] for e in api.events] == ["Unprovisioned"]


def test_finish_leaves_an_opted_in_node_and_says_so():
    """SIGTERM path in process, node still opted in: nothing uninstalled, one AgentStopped."""
    from kwasm_py.cluster import safeguards

    node = {"metadata": {"name": "n1", "labels": {PROVISIONED_LABEL: "true", OPT_IN_KEY: "true"}}}
    agent, api, engine = _agent(node)
    safeguards.finish(agent)
    assert engine.calls == [] and api.patches == []
    assert [e["reason"] for e in api.events] == ["AgentStopped"]


def test_untaint_rereads_after_a_conflict_and_keeps_a_taint_added_meanwhile():
    """The taint patch carries the resourceVersion; on 409 (someone added a taint) the agent
    re-reads the Node and removes only ours from the new list."""
    import io

    from kwasm_py.cluster import untaint
    from kwasm_py.cluster.agentlog import Logger
    from kwasm_py.errors import KubeError

    added = {"key": "example.com/new", "effect": "NoExecute"}
    old = {"metadata": {"name": "n1", "resourceVersion": "5"}, "spec": {"taints": [OURS, FOREIGN]}}
    new = {"metadata": {"name": "n1", "resourceVersion": "6"}, "spec": {"taints": [OURS, FOREIGN, added]}}

    class Api(_Api):
        def patch_node(self, name: str, patch: dict) -> None:
            self.patches.append(patch)
            if patch["metadata"].get("resourceVersion") != self.node["metadata"]["resourceVersion"]:
                raise KubeError("conflict", status=409)

    api = Api(new)
    assert untaint.remove_startup_taint(api, "n1", old, log=Logger(io.StringIO())) is True
    assert [p["metadata"]["resourceVersion"] for p in api.patches] == ["5", "6"]
    assert api.patches[-1]["spec"]["taints"] == [FOREIGN, added]
    assert (
        untaint.remove_startup_taint(api, "n1", {"spec": {"taints": [FOREIGN]}}, log=Logger(io.StringIO()))
        is False
    )


def test_untaint_failure_is_logged_not_raised():
    """A refused taint patch (say a policy denies it) does not break the agent's loop."""
    import io

    from kwasm_py.cluster import untaint
    from kwasm_py.cluster.agentlog import Logger
    from kwasm_py.errors import KubeError

    class Api(_Api):
        def patch_node(self, name: str, patch: dict) -> None:
            raise KubeError("denied", status=403)

    out = io.StringIO()
    node = {"metadata": {"name": "n1", "resourceVersion": "1"}, "spec": {"taints": [OURS]}}
    assert untaint.remove_startup_taint(Api(node), "n1", node, log=Logger(out)) is False
    assert "event=untaint_failed" in out.getvalue()


def test_a_failing_uninstall_is_bounded_too(standin: StandIn, agents, kubeconfig):
    """Opted out, uninstall fails every time: exactly KWASM_MAX_ATTEMPTS uninstalls (each may
    restart containerd), one UnprovisionHeld, no label; --retry once it works cleans up."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    # Above 1 s, so the provisioned agent still watches (below it the loop only ticks).
    agent = agents("n1", KWASM_MAX_ATTEMPTS="2", KWASM_DRIFT_INTERVAL="1.1")
    standin.wait_for(lambda: labels(standin, "n1").get(PROVISIONED_LABEL) == "true", what="label")
    (agent.root / "fail-uninstall").write_text("containerd did not come back")
    standin.patch_node("n1", {"metadata": {"annotations": {OPT_IN_KEY: None}}})
    standin.wait_for(lambda: standin.events("UnprovisionHeld", "n1"), what="UnprovisionHeld")
    # The held agent keeps re-reading its Node (each read runs the opt-out path again) and
    # starts no further uninstall.
    seen = node_gets(standin)
    standin.wait_for(lambda: node_gets(standin) >= seen + 3, 15, "three re-checks while held")
    uninstalls = [c for c in agent.calls() if c["verb"] == "uninstall"]
    assert len(uninstalls) == 2
    assert PROVISIONED_LABEL not in labels(standin, "n1") and SPIN_LABEL not in labels(standin, "n1")
    assert status(standin, "n1")["step"] == "budget"
    (agent.root / "fail-uninstall").unlink()
    res = invoke("annotate-node", "--retry", "n1", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    standin.wait_for(lambda: standin.events("Unprovisioned", "n1"), what="Unprovisioned")
    assert len([c for c in agent.calls() if c["verb"] == "uninstall"]) == 3
    assert not status(standin, "n1")
