"""The agent in process, with fakes for its two ports (the API and the engine): what it records
on the Node for each kind of engine result, and the order of its effects."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator

from kwasm_py.cluster.agent import Agent, AgentConfig, Backoff
from kwasm_py.cluster.agentlog import Logger
from kwasm_py.cluster.engine_proc import EngineFailed
from kwasm_py.contract import EngineResult, Runtime
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
        self.events: list[dict] = []
        self.calls: list[str] = []

    def get_node(self, name: str) -> dict:
        self.calls.append("get_node")
        return copy.deepcopy(self.node)

    def patch_node(self, name: str, patch: dict) -> None:
        self.calls.append("patch_node")
        meta = self.node.setdefault("metadata", {})
        for part, values in patch.get("metadata", {}).items():
            target = meta.setdefault(part, {})
            for key, value in values.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value

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
        "patch_node",  # label + phase provisioned
        "patch_status",  # condition KwasmProvisioned=True
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
