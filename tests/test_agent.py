"""`kwasm-py agent` as a subprocess against the stand-in API, with a fake node engine.

The fake (tests/harness/fake_node.py) speaks the engine's JSON contract; the real engine with a real
containerd is exercised in test_agent_e2e.py.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL, STATUS_ANNOTATION
from tests.harness.cluster import NAMESPACE, wait_until
from tests.harness.kube_standin import RESOURCES, StandIn

OPT_IN = {"metadata": {"annotations": {OPT_IN_KEY: "true"}}}
OPT_OUT = {"metadata": {"annotations": {OPT_IN_KEY: None}}}


def labelled(api: StandIn, node: str) -> bool:
    return api.node(node)["metadata"]["labels"].get(PROVISIONED_LABEL) == "true"


def status(api: StandIn, node: str) -> dict:
    raw = (api.node(node)["metadata"].get("annotations") or {}).get(STATUS_ANNOTATION)
    return json.loads(raw) if raw else {}


def wait_labelled(api: StandIn, node: str, timeout: float = 20) -> None:
    api.wait_for(lambda: labelled(api, node), timeout, f"{node} labelled")


def test_opt_in_provisions_then_labels(standin: StandIn, agents):
    """Annotation opt-in: install, then label, status annotation and a Provisioned event."""
    standin.add_node("n1")
    agent = agents("n1")
    standin.patch_node("n1", OPT_IN)
    wait_labelled(standin, "n1")
    st = status(standin, "n1")
    assert st["ok"] and st["runtimes"][0]["handler"] == "spin" and st["time"]
    assert len(st["runtimes"][0]["sha256"]) == 64
    standin.wait_for(lambda: standin.events("Provisioned", "n1"), what="Provisioned event")
    assert [c["verb"] for c in agent.calls() if c["verb"] != "status"] == ["install"]
    # The restart Lease was taken for the install and given back.
    lease = next(x for x in standin.leases() if x["metadata"]["name"] == "kwasm-restart-0")
    assert lease["metadata"]["namespace"] == NAMESPACE
    assert not lease["spec"].get("holderIdentity")
    assert agent.stop() == 0
    assert agent.events("stop")


def test_label_opt_in_and_opt_out(standin: StandIn, agents):
    """A label opts in too; removing it uninstalls, drops label and status, emits Unprovisioned."""
    standin.add_node("n1", labels={OPT_IN_KEY: "true"})
    agent = agents("n1")
    wait_labelled(standin, "n1")
    standin.patch_node("n1", {"metadata": {"labels": {OPT_IN_KEY: "false"}}})
    standin.wait_for(lambda: not labelled(standin, "n1") and not status(standin, "n1"), what="unlabelled")
    standin.wait_for(lambda: standin.events("Unprovisioned", "n1"), what="Unprovisioned event")
    assert [c["verb"] for c in agent.calls() if c["verb"] != "status"] == ["install", "uninstall"]
    assert json.loads((agent.root / "state.json").read_text())["installed"] is False


def test_failure_gives_no_label_then_retries(standin: StandIn, agents, tmp_path):
    """A failed install: no label, the reason in the status, a Warning; the retry succeeds."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    root = tmp_path / "node-n1"
    root.mkdir()
    (root / "fail-install").write_text("containerd does not list runtime spin")
    agents("n1", root=root)
    standin.wait_for(lambda: standin.events("ProvisionFailed", "n1"), what="ProvisionFailed")
    ev = standin.events("ProvisionFailed", "n1")[0]
    assert ev["type"] == "Warning" and "does not list runtime spin" in ev["message"]
    assert not labelled(standin, "n1")
    st = status(standin, "n1")
    assert st["ok"] is False and st["reason"] == "containerd does not list runtime spin"
    (root / "fail-install").unlink()
    wait_labelled(standin, "n1")
    assert status(standin, "n1")["ok"] is True


def test_drift_is_repaired(standin: StandIn, agents, tmp_path):
    """When status reports drift, the agent re-installs and emits Repaired."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    agent = agents("n1", KWASM_DRIFT_INTERVAL="0.2")
    wait_labelled(standin, "n1")
    (agent.root / "drift").write_text("runtime spin missing from config")
    standin.wait_for(lambda: standin.events("Repaired", "n1"), what="Repaired event")
    installs = [c for c in agent.calls() if c["verb"] == "install"]
    assert installs[-1]["changed"] is True and len(installs) == 2
    assert agent.events("drift")


def test_api_500_on_label_patch_is_retried(standin: StandIn, agents):
    """500s on the Node PATCH after a good install: the agent backs off and labels later."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    standin.inject(500, 3, method="PATCH", plural="nodes")
    agent = agents("n1")
    wait_labelled(standin, "n1")
    assert len(agent.events("api_error")) >= 3
    assert not [f for f in standin.faults if f.count]


def test_watch_410_relists(standin: StandIn, agents):
    """After a compaction and a dropped watch, the agent re-lists (410) and still reacts."""
    standin.add_node("n1")
    agent = agents("n1")
    standin.wait_for(
        lambda: any(r.query.get("watch") for r in standin.recorded("GET", "nodes")), what="a watch"
    )
    standin.add_node("other")  # history moves on past the agent's resourceVersion...
    standin.compact()  # ...and is forgotten, so resuming from it is too old
    standin.drop_watches()
    wait_until(lambda: agent.events("relist"), what="relist after 410")
    standin.patch_node("n1", OPT_IN)
    wait_labelled(standin, "n1")


def test_watch_and_lease_faults(standin: StandIn, agents):
    """410 returned as HTTP status, 500 on GET and 409 on lease writes do not stop provisioning."""
    standin.add_node("n1")
    standin.inject(410, 1, method="GET", watch=True)
    standin.inject(500, 2, method="GET", plural="nodes", watch=False)
    standin.inject(409, 2, method="POST", plural="leases")
    agents("n1")
    standin.patch_node("n1", OPT_IN)
    wait_labelled(standin, "n1")


def test_killed_between_install_and_label(standin: StandIn, agents, tmp_path):
    """Killed after the install but before the label: the next agent converges, no second change."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    standin.inject(500, 10_000, method="PATCH", plural="nodes")
    root = tmp_path / "node-n1"
    first = agents("n1", root=root)
    wait_until(lambda: [c for c in first.calls() if c["verb"] == "install"], what="install")
    wait_until(lambda: first.events("api_error"), what="the failed label patch")
    first.kill()
    assert not labelled(standin, "n1")
    standin.clear_faults()
    second = agents("n1", root=root)
    wait_labelled(standin, "n1")
    installs = [c for c in second.calls() if c["verb"] == "install"]
    assert installs[0]["changed"] is True and installs[-1]["changed"] is False


def test_two_nodes_share_one_restart_lease(standin: StandIn, agents, tmp_path):
    """With one restart Lease, the second node's install waits until the first finished."""
    shared = tmp_path / "restarts.log"
    standin.add_node("a", annotations={OPT_IN_KEY: "true"})
    standin.add_node("b")
    root_a = tmp_path / "node-a"
    root_a.mkdir()
    os.mkfifo(root_a / "hold-install")
    agents("a", root=root_a, KWASM_FAKE_LOG=str(shared))
    wait_until(lambda: shared.exists() and "start a" in shared.read_text(), what="a installing")
    b = agents("b", KWASM_FAKE_LOG=str(shared))
    standin.patch_node("b", OPT_IN)
    wait_until(lambda: b.events("lease_wait"), what="b waiting for the lease")
    assert "start b" not in shared.read_text()
    with (root_a / "hold-install").open("w") as fifo:  # let a's install finish
        fifo.write("go")
    wait_labelled(standin, "a")
    wait_labelled(standin, "b")
    lines = [ln.split() for ln in shared.read_text().splitlines()]
    assert [(kind, who) for kind, who, _ in lines] == [
        ("start", "a"),
        ("end", "a"),
        ("start", "b"),
        ("end", "b"),
    ]


def test_expired_lease_of_a_dead_holder_is_taken_over(standin: StandIn, agents):
    """A Lease whose holder stopped renewing it is free once it expired."""
    long_ago = "2020-01-01T00:00:00.000000Z"
    standin.create(
        next(r for r in RESOURCES if r.plural == "leases"),
        NAMESPACE,
        {
            "metadata": {"name": "kwasm-restart-0"},
            "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 15, "renewTime": long_ago},
        },
    )
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    agent = agents("n1")
    wait_labelled(standin, "n1")
    assert agent.events("lease_expired")


def test_sigterm_during_install_finishes_it_then_exits(standin: StandIn, agents, tmp_path):
    """SIGTERM while the engine runs: the install completes and is recorded, then exit 0."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    root = tmp_path / "node-n1"
    root.mkdir()
    os.mkfifo(root / "hold-install")
    agent = agents("n1", root=root)
    wait_until(lambda: agent.events("install_start"), what="install started")
    agent.proc.terminate()
    with (root / "hold-install").open("w") as fifo:
        fifo.write("go")
    assert agent.proc.wait(20) == 0
    assert labelled(standin, "n1")
    lease = standin.leases()[0]
    assert not lease["spec"].get("holderIdentity")


def test_sigterm_when_idle_exits_promptly(standin: StandIn, agents):
    """SIGTERM while watching ends the agent cleanly (exit 0) well before the watch timeout."""
    standin.add_node("n1")
    agent = agents("n1")
    standin.wait_for(
        lambda: any(r.query.get("watch") for r in standin.recorded("GET", "nodes")), what="a watch"
    )
    started = time.monotonic()
    assert agent.stop(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert agent.events("stop")


def test_agent_shim_sources(tmp_path, monkeypatch):
    """--shim-source image finds the image's shims for this architecture; dir reads a node
    directory through the host root; a missing source is a clear error."""
    import platform

    from kwasm_py.cluster.agent import agent_shims
    from kwasm_py.errors import KwasmError
    from kwasm_py.shims.catalog import normalize_arch

    arch = normalize_arch(platform.machine())
    image = tmp_path / "image" / arch
    image.mkdir(parents=True)
    (image / "containerd-shim-spin-v2").write_text("#!/bin/sh\n")
    (image / "containerd-shim-spin-v2").chmod(0o755)
    paths, handlers = agent_shims("image", shim_dir=str(tmp_path / "image"), host_root=None)
    assert paths == [str(image / "containerd-shim-spin-v2")] and handlers == ["spin"]
    node_dir = tmp_path / "root" / "srv" / "shims"
    node_dir.mkdir(parents=True)
    (node_dir / "containerd-shim-spin-v2").write_bytes(b"#!/bin/sh\n")
    (node_dir / "containerd-shim-spin-v2").chmod(0o755)
    paths, _ = agent_shims("dir", shim_dir="/srv/shims", host_root=str(tmp_path / "root"))
    assert paths == [str(node_dir / "containerd-shim-spin-v2")]
    with pytest.raises(KwasmError, match="does not exist"):
        agent_shims("image", shim_dir=str(tmp_path / "empty"), host_root=None)
    with pytest.raises(KwasmError, match="needs --shim-dir"):
        agent_shims("dir", shim_dir=None, host_root=None)


def test_agent_code_path_does_not_load_the_kubernetes_client():
    """The resident agent's imports leave the official client (about 64 MB of RSS) unloaded."""
    import subprocess
    import sys

    from tests.harness.cli import child_env

    code = (
        "import sys, kwasm_py.cli, kwasm_py.cli.cluster, kwasm_py.cluster.agent, kwasm_py.cluster.kube;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def _rbac_rules() -> tuple[list[dict], list[dict]]:
    from pathlib import Path

    import yaml

    docs = list(yaml.safe_load_all((Path(__file__).parent.parent / "manifests/installer.yaml").read_text()))
    cluster = [r for d in docs if d and d["kind"] == "ClusterRole" for r in d["rules"]]
    namespaced = [r for d in docs if d and d["kind"] == "Role" for r in d["rules"]]
    return cluster, namespaced


def _access(method: str, path: str, query: dict[str, str]) -> tuple[str, str, str, str | None]:
    """(apiGroup, resource, verb, namespace) of one API request."""
    parts = [p for p in path.split("/") if p]
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    namespace = None
    if rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource, name = rest[0], (rest[1] if len(rest) > 1 else None)
    watching = query.get("watch", "").lower() in ("true", "1")
    verb = {
        "GET": "get" if name else ("watch" if watching else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete",
    }[method]
    return group, resource, verb, namespace


def test_every_agent_request_is_allowed_by_the_shipped_rbac(standin: StandIn, agents):
    """A whole opt-in / opt-out cycle: each request the agent made is granted by installer.yaml's
    ClusterRole (cluster-wide) or Role (in the installer namespace), nothing more is needed."""
    standin.add_node("n1")
    agent = agents("n1")
    standin.patch_node("n1", OPT_IN)
    wait_labelled(standin, "n1")
    standin.patch_node("n1", {"metadata": {"annotations": {OPT_IN_KEY: None}}})
    standin.wait_for(lambda: standin.events("Unprovisioned", "n1"), what="Unprovisioned event")
    assert agent.stop() == 0
    cluster, namespaced = _rbac_rules()

    def allowed(rules: list[dict], group: str, resource: str, verb: str) -> bool:
        return any(
            group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules
        )

    seen = set()
    for req in standin.recorded():
        group, resource, verb, namespace = _access(req.method, req.path, req.query)
        seen.add((resource, verb))
        ok = allowed(cluster, group, resource, verb) or (
            namespace == NAMESPACE and allowed(namespaced, group, resource, verb)
        )
        assert ok, f"{req.method} {req.path} needs {verb} on {group or 'core'}/{resource} in {namespace}"
    assert {("nodes", "watch"), ("nodes", "patch"), ("events", "create"), ("leases", "update")} <= seen
