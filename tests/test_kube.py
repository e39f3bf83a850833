"""kube.py: both transports against the stand-in, kubeconfig loading, one-line API errors."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest

from kwasm_py.cluster import kube, official
from kwasm_py.cluster.lean import LeanKube
from kwasm_py.errors import KubeError, KwasmError
from tests.harness.kube_standin import StandIn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lean(kubeconfig: Path) -> LeanKube:
    return LeanKube(kube.kubeconfig_endpoint(str(kubeconfig)))


def test_kube_error_is_ours_not_the_clients():
    """KubeError belongs to our tree, not to the kubernetes client's exception types."""
    from kubernetes.client.exceptions import ApiException

    assert issubclass(KubeError, KwasmError)
    assert not issubclass(KubeError, ApiException)


def test_lean_get_patch_and_watch_own_node(standin: StandIn, kubeconfig: Path):
    """The lean transport reads, merge-patches and watches exactly one node."""
    standin.add_node("n1")
    standin.add_node("n2")
    api = lean(kubeconfig)
    node = api.get_node("n1")
    rv = node["metadata"]["resourceVersion"]
    api.patch_node("n1", {"metadata": {"labels": {"a": "b"}}})
    api.patch_node("n1", {"metadata": {"labels": {"a": None}}})
    standin.patch_node("n2", {"metadata": {"labels": {"x": "y"}}})
    events = list(api.watch_node("n1", resource_version=rv, timeout_seconds=1))
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED"]
    assert {e["object"]["metadata"]["name"] for e in events} == {"n1"}
    assert "a" not in standin.node("n1")["metadata"]["labels"]
    patches = standin.recorded("PATCH", "nodes")
    assert {p.content_type for p in patches} == {"application/merge-patch+json"}
    assert standin.recorded("GET")[0].query == {}
    assert all(
        r.query.get("fieldSelector") == "metadata.name=n1"
        for r in standin.recorded("GET")
        if r.query.get("watch")
    )


def test_lean_watch_410_is_a_kube_error_with_status(standin: StandIn, kubeconfig: Path):
    """A watch from a compacted resourceVersion raises KubeError(status=410)."""
    standin.add_node("n1")
    rv = standin.node("n1")["metadata"]["resourceVersion"]
    standin.patch_node("n1", {"metadata": {"labels": {"a": "b"}}})
    standin.compact()
    with pytest.raises(KubeError) as info:
        list(lean(kubeconfig).watch_node("n1", resource_version=rv, timeout_seconds=1))
    assert info.value.status == 410


def test_lean_http_errors_carry_status_and_hint(standin: StandIn, kubeconfig: Path):
    """404 and 403 become one-line KubeErrors with the status and a hint."""
    api = lean(kubeconfig)
    with pytest.raises(KubeError) as info:
        api.get_node("nope")
    assert info.value.status == 404 and "nope" in info.value.message
    standin.inject(403, method="GET", message='nodes "n1" is forbidden')
    with pytest.raises(KubeError) as info:
        api.get_node("n1")
    assert info.value.status == 403 and "RBAC" in info.value.hint
    assert "\n" not in info.value.message


def test_lean_connection_refused(tmp_path: Path):
    """A server that is not there is one clear KubeError without a status."""
    api = LeanKube(kube.Endpoint(server=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(KubeError) as info:
        api.get_node("n1")
    assert info.value.status is None and "cannot reach" in info.value.message


def test_lean_leases_and_events(standin: StandIn, kubeconfig: Path):
    """Leases: get (None when absent), create, replace; events are created in a namespace."""
    api = lean(kubeconfig)
    assert api.get_lease("ns", "l") is None
    lease = api.create_lease("ns", {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}})
    lease["spec"]["holderIdentity"] = "b"
    api.replace_lease("ns", lease)
    with pytest.raises(KubeError) as info:
        api.replace_lease("ns", lease)  # stale resourceVersion
    assert info.value.status == 409
    api.create_event("default", {"metadata": {"name": "e1"}, "reason": "R"})
    assert [e["reason"] for e in standin.events()] == ["R"]


def test_lean_lease_list_watch_delete(standin: StandIn, kubeconfig: Path):
    """Leases of a namespace: list with its resourceVersion, a watch from there sees a change
    and a deletion of that namespace only, delete says whether there was one; a stale
    resourceVersion is a 410."""
    api = lean(kubeconfig)
    api.create_lease("ns", {"metadata": {"name": "a"}, "spec": {}})
    api.create_lease("other", {"metadata": {"name": "x"}, "spec": {}})
    items, rv = api.list_leases("ns")
    assert [i["metadata"]["name"] for i in items] == ["a"] and rv
    api.create_lease("ns", {"metadata": {"name": "b"}, "spec": {}})
    api.create_lease("other", {"metadata": {"name": "y"}, "spec": {}})
    assert api.delete_lease("ns", "a") is True and api.delete_lease("ns", "a") is False
    events = api.watch_leases("ns", resource_version=rv, timeout_seconds=5)
    seen = [(e["type"], e["object"]["metadata"]["name"]) for e in itertools.islice(events, 2)]
    events.close()  # type: ignore[attr-defined]
    assert seen == [("ADDED", "b"), ("DELETED", "a")]
    standin.compact()
    with pytest.raises(KubeError) as info:
        next(iter(api.watch_leases("ns", resource_version=rv, timeout_seconds=5)))
    assert info.value.status == 410


def test_kubeconfig_endpoint_errors(tmp_path: Path):
    """Missing, non-YAML, context-less and exec-plugin kubeconfigs each give one clear error."""
    with pytest.raises(KubeError, match="cannot read kubeconfig"):
        kube.kubeconfig_endpoint(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_text("{: nope")
    with pytest.raises(KubeError, match="not YAML"):
        kube.kubeconfig_endpoint(str(bad))
    nocontext = tmp_path / "noctx"
    nocontext.write_text("apiVersion: v1\nclusters: []\n")
    with pytest.raises(KubeError, match="no current-context"):
        kube.kubeconfig_endpoint(str(nocontext))
    execs = tmp_path / "exec"
    execs.write_text(
        "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "clusters: [{name: k, cluster: {server: 'https://x'}}]\n"
        "users: [{name: u, user: {exec: {command: aws}}}]\n"
    )
    with pytest.raises(KubeError, match="exec"):
        kube.kubeconfig_endpoint(str(execs))
    with pytest.raises(KubeError, match="no context named 'other'"):
        kube.kubeconfig_endpoint(str(execs), "other")


def test_in_cluster_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """In a pod, the endpoint comes from the service env vars and the service-account files."""
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "namespace").write_text("kwasm-system")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    ep = kube.in_cluster_endpoint(tmp_path)
    assert ep is not None
    assert ep.server == "https://10.0.0.1:6443" and ep.namespace == "kwasm-system"
    assert LeanKube(ep, timeout=1)._headers(None)["Authorization"] == "Bearer tok"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert kube.in_cluster_endpoint(tmp_path) is None


def test_client_kube_lists_and_patches(standin: StandIn, kubeconfig: Path):
    """The official-client transport lists with a selector and patches (null removes)."""
    standin.add_node("n1", labels={"pool": "wasm"})
    standin.add_node("n2")
    api = official.connect(str(kubeconfig))
    assert [n["metadata"]["name"] for n in api.list_nodes(label_selector="pool=wasm")] == ["n1"]
    api.patch_node("n2", {"metadata": {"annotations": {"k": "v"}}})
    assert standin.node("n2")["metadata"]["annotations"]["k"] == "v"
    api.patch_node("n2", {"metadata": {"annotations": {"k": None}}})
    assert "k" not in standin.node("n2")["metadata"]["annotations"]
    assert api.get_node("n1")["metadata"]["name"] == "n1"


def test_client_kube_errors(standin: StandIn, kubeconfig: Path, tmp_path: Path):
    """The official client's failures become KubeError: 404, 403, refused, bad kubeconfig."""
    api = official.connect(str(kubeconfig))
    with pytest.raises(KubeError) as info:
        api.patch_node("nope", {"metadata": {}})
    assert info.value.status == 404
    standin.inject(403, method="GET")
    with pytest.raises(KubeError) as info:
        api.list_nodes()
    assert info.value.status == 403
    dead = tmp_path / "dead"
    dead.write_text(kubeconfig.read_text().replace(standin.url, f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(KubeError) as info:
        official.connect(str(dead)).list_nodes()
    assert "connection refused" in info.value.message and info.value.status is None
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(KubeError, match="bad kubeconfig"):
        official.connect(str(broken))
    with pytest.raises(KubeError, match="no such file"):
        official.connect(str(tmp_path / "missing"))


def test_cli_picks_the_lean_client_only_for_plain_kubeconfigs(tmp_path):
    """Token/cert kubeconfigs use the lean client; exec plugins and merged lists the official one."""
    from kwasm_py.cluster import lean, official

    def write(name: str, user: str) -> str:
        path = tmp_path / name
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n"
            f"users: [{{name: u, user: {user}}}]\n"
            "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
        )
        return str(path)

    plain = official.connect_cli(write("plain", "{token: abc}"))
    assert isinstance(plain, lean.LeanKube)
    plain.close()
    exec_user = "{exec: {apiVersion: client.authentication.k8s.io/v1, command: aws}}"
    client = official.connect_cli(write("exec", exec_user))
    assert isinstance(client, official.ClientKube)
    client.close()
