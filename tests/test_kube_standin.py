"""The stand-in API server behaves like the parts of kube-apiserver the cluster side relies on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness.kube_standin import StandIn, json_patch, label_match, merge_patch

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH")


def call(api: StandIn, method: str, path: str, body=None, ctype="application/json"):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api.url + path, data=data, method=method)
    req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as ex:
        return ex.code, json.loads(ex.read())


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(kubeconfig.parent)}
    return subprocess.run(
        [KUBECTL or "kubectl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_merge_patch_null_deletes_and_lists_replace():
    """Merge patch: maps merge recursively, null removes a key, lists are replaced."""
    doc = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    out = merge_patch(doc, {"a": {"b": None, "d": 3}, "l": [3]})
    assert out == {"a": {"c": 2, "d": 3}, "l": [3]}


def test_json_patch_ops_and_escaping():
    """JSON patch add/replace/remove/test work, with ~1 escaping of slashes in keys."""
    doc = {"metadata": {"labels": {"x": "1"}}, "items": [1]}
    out = json_patch(
        doc,
        [
            {"op": "add", "path": "/metadata/labels/kwasm.sh~1kwasm-node", "value": "true"},
            {"op": "replace", "path": "/metadata/labels/x", "value": "2"},
            {"op": "add", "path": "/items/-", "value": 2},
            {"op": "test", "path": "/items/1", "value": 2},
            {"op": "remove", "path": "/items/0"},
        ],
    )
    assert out == {"metadata": {"labels": {"x": "2", "kwasm.sh/kwasm-node": "true"}}, "items": [2]}


def test_label_selector_forms():
    """Label selectors: equality, inequality, existence, negation and set-based terms."""
    labels = {"a": "1", "b": "2"}
    assert label_match(labels, "a=1,b==2")
    assert not label_match(labels, "a!=1")
    assert label_match(labels, "a,!c")
    assert not label_match(labels, "!a")
    assert label_match(labels, "a in (1,3),b notin (3)")
    assert not label_match(labels, "a in (2,3)")


def test_patch_types_resource_version_and_conflict(standin: StandIn):
    """PATCH bumps resourceVersion; a stale resourceVersion in the patch gets 409."""
    standin.add_node("n1")
    rv0 = standin.node("n1")["metadata"]["resourceVersion"]
    code, obj = call(
        standin,
        "PATCH",
        "/api/v1/nodes/n1",
        {"metadata": {"labels": {"k": "v"}}},
        "application/strategic-merge-patch+json",
    )
    assert code == 200 and obj["metadata"]["labels"]["k"] == "v"
    assert int(obj["metadata"]["resourceVersion"]) > int(rv0)
    code, obj = call(
        standin,
        "PATCH",
        "/api/v1/nodes/n1",
        {"metadata": {"resourceVersion": rv0, "labels": {"k": "w"}}},
        "application/merge-patch+json",
    )
    assert code == 409 and obj["reason"] == "Conflict"
    code, obj = call(
        standin,
        "PATCH",
        "/api/v1/nodes/n1",
        [{"op": "remove", "path": "/metadata/labels/k"}],
        "application/json-patch+json",
    )
    assert code == 200 and "k" not in obj["metadata"]["labels"]
    assert call(standin, "GET", "/api/v1/nodes/nope")[0] == 404


def test_lease_create_update_conflict(standin: StandIn):
    """Leases: create, 409 on a second create, PUT with a stale resourceVersion gets 409."""
    path = "/apis/coordination.k8s.io/v1/namespaces/ns/leases"
    lease = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}
    code, created = call(standin, "POST", path, lease)
    assert code == 201 and created["metadata"]["namespace"] == "ns"
    assert call(standin, "POST", path, lease)[1]["reason"] == "AlreadyExists"
    created["spec"]["holderIdentity"] = "b"
    code, updated = call(standin, "PUT", f"{path}/l", created)
    assert code == 200 and updated["spec"]["holderIdentity"] == "b"
    code, _ = call(standin, "PUT", f"{path}/l", created)  # created's resourceVersion is stale now
    assert code == 409


def test_watch_filters_by_field_selector_and_resumes(standin: StandIn):
    """A watch with fieldSelector metadata.name streams only that node, from a resourceVersion."""
    standin.add_node("n1")
    standin.add_node("n2")
    rv = standin.node("n2")["metadata"]["resourceVersion"]
    standin.patch_node("n2", {"metadata": {"labels": {"x": "1"}}})
    standin.patch_node("n1", {"metadata": {"labels": {"x": "1"}}})
    url = (
        f"{standin.url}/api/v1/nodes?watch=true&fieldSelector=metadata.name%3Dn1"
        f"&resourceVersion={rv}&timeoutSeconds=1"
    )
    with urllib.request.urlopen(url, timeout=10) as resp:
        events = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "n1")]


def test_watch_from_compacted_version_gets_410(standin: StandIn):
    """After compaction, a watch from an older resourceVersion gets an ERROR event with 410."""
    standin.add_node("n1")
    rv = standin.node("n1")["metadata"]["resourceVersion"]
    standin.patch_node("n1", {"metadata": {"labels": {"x": "1"}}})
    standin.compact()
    url = f"{standin.url}/api/v1/nodes?watch=true&resourceVersion={rv}&timeoutSeconds=1"
    with urllib.request.urlopen(url, timeout=10) as resp:
        events = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_fault_injection_counts_down(standin: StandIn):
    """inject() fails exactly the next N matching requests, then the API answers again."""
    standin.add_node("n1")
    standin.inject(500, 2, method="GET", plural="nodes")
    assert call(standin, "GET", "/api/v1/nodes/n1")[0] == 500
    assert call(standin, "GET", "/api/v1/nodes/n1")[0] == 500
    assert call(standin, "GET", "/api/v1/nodes/n1")[0] == 200


@needs_kubectl
def test_real_kubectl_annotates_and_selects(standin: StandIn, kubeconfig: Path):
    """Real kubectl annotates a node on the stand-in and lists nodes by the provisioned label."""
    standin.add_node("n1")
    standin.add_node("n2", labels={"kwasm.sh/kwasm-provisioned": "true"})
    res = kubectl(kubeconfig, "annotate", "node", "n1", "kwasm.sh/kwasm-node=true")
    assert res.returncode == 0, res.stderr
    assert standin.node("n1")["metadata"]["annotations"]["kwasm.sh/kwasm-node"] == "true"
    res = kubectl(kubeconfig, "get", "nodes", "-l", "kwasm.sh/kwasm-provisioned=true", "-o", "name")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["node/n2"]
    res = kubectl(kubeconfig, "get", "nodes", "-l", "kwasm.sh/kwasm-provisioned=true")
    assert res.returncode == 0 and "n2" in res.stdout and "n1" not in res.stdout


def test_node_status_subresource_and_condition_merge(standin: StandIn):
    """nodes/NAME/status keeps the spec and changes metadata and status (kube-apiserver's
    nodeStatusStrategy resets only spec), conditions merge by type ($patch: delete removes one);
    a patch of nodes/NAME leaves the status alone, as kube-apiserver does."""
    standin.add_node("n1")
    smp = "application/strategic-merge-patch+json"
    cond = {"type": "KwasmProvisioned", "status": "True", "reason": "Provisioned"}
    code, doc = call(
        standin,
        "PATCH",
        "/api/v1/nodes/n1/status",
        {
            "status": {"conditions": [cond]},
            "metadata": {"labels": {"x": "y"}},
            "spec": {"unschedulable": True},
        },
        smp,
    )
    assert code == 200 and [c["type"] for c in doc["status"]["conditions"]] == ["Ready", "KwasmProvisioned"]
    assert doc["metadata"]["labels"]["x"] == "y" and "unschedulable" not in doc.get("spec", {})
    code, doc = call(
        standin,
        "PATCH",
        "/api/v1/nodes/n1/status",
        {"status": {"conditions": [{**cond, "status": "False"}]}},
        smp,
    )
    assert [c["status"] for c in doc["status"]["conditions"]] == ["True", "False"]
    code, doc = call(
        standin,
        "PATCH",
        "/api/v1/nodes/n1",
        {"metadata": {"labels": {"x": "y"}}, "status": {"conditions": []}},
        smp,
    )
    assert code == 200 and doc["metadata"]["labels"]["x"] == "y" and len(doc["status"]["conditions"]) == 2
    delete = {"status": {"conditions": [{"type": "KwasmProvisioned", "$patch": "delete"}]}}
    code, doc = call(standin, "PATCH", "/api/v1/nodes/n1/status", delete, smp)
    assert [c["type"] for c in doc["status"]["conditions"]] == ["Ready"]
    standin.set_runtime_handlers("n1", ["runc", "spin"])
    assert [h["name"] for h in standin.node("n1")["status"]["runtimeHandlers"]] == ["runc", "spin"]
    code, _ = call(standin, "PUT", "/api/v1/nodes/n1/status", {})
    assert code == 405
