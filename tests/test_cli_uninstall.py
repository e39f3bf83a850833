"""`kwasm-py uninstall` against the stand-in API with agents on fake nodes (issue 13.9): nodes
are opted out and cleaned by their agents before any installer object is deleted."""

from __future__ import annotations

from pathlib import Path

from kwasm_py.cluster import manifests
from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL, STATUS_ANNOTATION
from tests.harness.cli import invoke
from tests.harness.kube_standin import RESOURCES, StandIn

OPTED_IN = {"labels": {OPT_IN_KEY: "true"}, "annotations": {OPT_IN_KEY: "true"}}


def _apply_installer(api: StandIn) -> list[dict]:
    """Create installer.yaml's objects in the stand-in (as `kubectl apply` would)."""
    objs = manifests.installer_objects()
    for obj in objs:
        res = next(r for r in RESOURCES if r.kind == obj["kind"] and r.api_version == obj["apiVersion"])
        api.create(res, obj["metadata"].get("namespace", "") if res.namespaced else "", obj)
    return objs


def _present(api: StandIn, objs: list[dict]) -> list[str]:
    out = []
    for obj in objs:
        res = next(r for r in RESOURCES if r.kind == obj["kind"] and r.api_version == obj["apiVersion"])
        ns = obj["metadata"].get("namespace", "") if res.namespaced else ""
        if (res, ns, obj["metadata"]["name"]) in api.objects:
            out.append(f"{obj['kind']}/{obj['metadata']['name']}")
    return out


def test_uninstall_cleans_nodes_before_deleting_the_installer(standin: StandIn, agents, kubeconfig: Path):
    """Two provisioned nodes and one never opted in: both agents uninstall and unlabel, then
    every installer object is deleted in reverse apply order, none before the last cleanup."""
    objs = _apply_installer(standin)
    standin.add_node("a", **OPTED_IN)
    standin.add_node("b", **OPTED_IN)
    standin.add_node("plain")
    a, b = agents("a"), agents("b")
    for n in ("a", "b"):
        standin.wait_for(lambda n=n: standin.node(n)["metadata"]["labels"].get(PROVISIONED_LABEL), what=n)
    res = invoke("uninstall", "--kubeconfig", str(kubeconfig), "--timeout", "30")
    assert res.code == 0, res.err
    for agent in (a, b):
        assert [c["verb"] for c in agent.calls() if c["verb"] != "status"] == ["install", "uninstall"]
    for n in ("a", "b"):
        meta = standin.node(n)["metadata"]
        assert not [k for k in meta["labels"] if k.startswith("kwasm.sh/")]
        assert OPT_IN_KEY not in meta["annotations"] and STATUS_ANNOTATION not in meta["annotations"]
    assert _present(standin, objs) == []
    requests = standin.recorded()
    # (an agent that waited for a restart slot deletes its queue Lease: not an installer object)
    deletes = [
        i for i, r in enumerate(requests) if r.method == "DELETE" and "/leases/kwasm-wait-" not in r.path
    ]
    cleanups = [
        i
        for i, r in enumerate(requests)
        if r.method == "PATCH"
        and isinstance(r.body, dict)
        and PROVISIONED_LABEL in ((r.body.get("metadata") or {}).get("labels") or {})
        and r.body["metadata"]["labels"][PROVISIONED_LABEL] is None
    ]
    assert len(cleanups) >= 2 and min(deletes) > max(cleanups)
    order = [requests[i].path.rsplit("/", 2)[-2] for i in deletes]
    assert order[0] == "runtimeclasses" and order[-1] == "namespaces"
    assert "nodes/plain" not in " ".join(r.path for r in requests if r.method == "PATCH")


def test_uninstall_deletes_nothing_while_a_node_is_not_clean(standin: StandIn, kubeconfig: Path):
    """No agent cleans the provisioned node: exit 1 naming it, every installer object kept."""
    objs = _apply_installer(standin)
    standin.add_node("stuck", labels={OPT_IN_KEY: "true", PROVISIONED_LABEL: "true"})
    res = invoke("uninstall", "--kubeconfig", str(kubeconfig), "--timeout", "0.5")
    assert res.code == 1
    assert "node 'stuck' not ready" in res.err and "not deleting the installer" in res.err
    assert len(_present(standin, objs)) == len(objs)
    assert not standin.recorded("DELETE")
    assert OPT_IN_KEY not in standin.node("stuck")["metadata"]["labels"]  # opted out all the same
