"""`kwasm-py agent` as a subprocess against the stand-in API, with a fake node engine.

The fake (tests/harness/fake_node.py) speaks the engine's process contract (kwasm_py.contract) and
records the argv the agent gave it; the real engine with a real containerd is exercised in
test_agent_e2e.py.
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
    # The label, annotation and condition are one patch of nodes/status: three faults make it
    # fail three times (a 500 is not a missing subresource, so there is no fallback write).
    standin.inject(500, 3, method="PATCH", plural="nodes/status")
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
    standin.inject(500, 10_000, method="PATCH", plural="nodes/status")  # the label goes there
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
    standin.wait_for(lambda: status(standin, "b").get("phase") == "waiting", what="b in phase waiting")
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


def test_engine_argv_carries_each_shim_as_its_own_argument(standin: StandIn, agents):
    """KWASM_SHIM's comma list is split once by the agent: the engine gets one --shim per path,
    the options as arguments, and no comma-joined KWASM_SHIM/KWASM_HANDLER in its environment."""
    spin, slight = "/s/containerd-shim-spin-v2", "/s/containerd-shim-slight-v2"
    standin.add_node("n1")
    agent = agents("n1", KWASM_SHIM=f"{spin},{slight}", KWASM_PID="7", KWASM_RESTART="none")
    wait_until(agent.calls, what="the start-up status call")  # not opted in: asks the engine
    standin.patch_node("n1", OPT_IN)
    wait_labelled(standin, "n1")
    standin.patch_node("n1", OPT_OUT)
    standin.wait_for(lambda: standin.events("Unprovisioned", "n1"), what="Unprovisioned event")
    calls = {c["verb"]: c for c in agent.calls()}
    root = str(agent.root)
    assert calls["install"]["argv"] == [
        "install", "--host-root", root, "--pid", "7", "--restart", "none",
        "--shim", spin, "--shim", slight, "--verify", "--output", "json",
    ]  # fmt: skip
    assert calls["uninstall"]["argv"] == [
        "uninstall", "--host-root", root, "--pid", "7", "--restart", "none", "--output", "json",
    ]  # fmt: skip
    assert calls["status"]["argv"] == ["status", "--host-root", root, "--pid", "7", "--output", "json"]
    assert all(c["env"] == [] for c in agent.calls())


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (json.dumps({"version": 99, "command": "install", "ok": True}), "contract version 99"),
        (json.dumps({"version": 1, "command": "install", "ok": True, "changed": True}), "needs 'layout'"),
        ("Segmentation fault", "not JSON"),
    ],
)
def test_result_outside_the_contract_is_a_clear_failure(standin: StandIn, agents, tmp_path, answer, why):
    """A newer, malformed or non-JSON engine answer: no label, ProvisionFailed naming the
    contract problem, the agent keeps running; a good answer later provisions the node."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    root = tmp_path / "node-n1"
    root.mkdir()
    (root / "bad-result").write_text(answer)
    agent = agents("n1", root=root)
    standin.wait_for(lambda: standin.events("ProvisionFailed", "n1"), what="ProvisionFailed")
    ev = standin.events("ProvisionFailed", "n1")[0]
    assert ev["type"] == "Warning" and ev["message"].startswith("contract: node install answered outside")
    assert why in ev["message"]
    assert not labelled(standin, "n1")
    st = status(standin, "n1")
    assert st["ok"] is False and st["step"] == "contract" and why in st["reason"]
    assert agent.proc.poll() is None and not [ln for ln in agent.lines() if "Traceback" in ln]
    (root / "bad-result").unlink()
    wait_labelled(standin, "n1")
    assert agent.stop() == 0


def test_agent_shim_sources(tmp_path, monkeypatch):
    """--shim-source image finds the image's shims for this architecture; dir reads a node
    directory through the host root; a missing source is a clear error."""
    import platform

    from kwasm_py.cluster.engine_proc import agent_shims
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
        "import sys, kwasm_py.cli, kwasm_py.cli.cluster, kwasm_py.cli.agent, kwasm_py.cluster.agent,"
        " kwasm_py.cluster.kube,"
        " kwasm_py.cluster.engine_proc, kwasm_py.cluster.leases, kwasm_py.contract;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def _installer_docs() -> list[dict]:
    from pathlib import Path

    import yaml

    path = Path(__file__).parent.parent / "manifests/installer.yaml"
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _rbac_grants() -> set[tuple[str, str, str, str | None, str | None]]:
    """Every (apiGroup, resource, verb, namespace, resourceName) installer.yaml grants the agent:
    namespace None for the ClusterRole (cluster-wide), resourceName None for any name."""
    docs = _installer_docs()
    grants = set()
    for d in docs:
        if d["kind"] not in ("ClusterRole", "Role"):
            continue
        namespace = d["metadata"].get("namespace") if d["kind"] == "Role" else None
        for r in d["rules"]:
            for group in r["apiGroups"]:
                for resource in r["resources"]:
                    for verb in r["verbs"]:
                        for name in r.get("resourceNames") or [None]:
                            grants.add((group, resource, verb, namespace, name))
    return grants


def _access(method: str, path: str, query: dict[str, str]) -> tuple[str, str, str, str | None, str | None]:
    """(apiGroup, resource, verb, namespace, name) of one API request, as the authorizer sees it
    (a list/watch with fieldSelector metadata.name=X is authorised for the name X)."""
    parts = [p for p in path.split("/") if p]
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    namespace = None
    if rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource, name = rest[0], (rest[1] if len(rest) > 1 else None)
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"  # a subresource: nodes/status
    watching = query.get("watch", "").lower() in ("true", "1")
    verb = {
        "GET": "get" if name else ("watch" if watching else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete",
    }[method]
    selector = query.get("fieldSelector", "")
    if name is None and selector.startswith("metadata.name=") and "," not in selector:
        name = selector.removeprefix("metadata.name=")
    return group, resource, verb, namespace, name


def test_every_agent_request_is_allowed_by_the_shipped_rbac(standin: StandIn, agents, tmp_path):
    """A whole opt-in / opt-out cycle, with the DaemonSet's Event namespace, while a second node
    queues for the one restart slot and the first node's release meets a conflict: each request
    the agents made is granted by installer.yaml (namespace and resource names included), and
    every verb on every resource installer.yaml grants was used."""
    (ds,) = [d for d in _installer_docs() if d["kind"] == "DaemonSet"]
    (ctr,) = ds["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in ctr["env"]}
    assert env["KWASM_EVENT_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    standin.add_node("n1")
    standin.add_node("n2")
    root = tmp_path / "node-n1"
    root.mkdir()
    os.mkfifo(root / "hold-install")
    log = tmp_path / "restarts.log"
    agent = agents("n1", root=root, KWASM_EVENT_NAMESPACE=NAMESPACE, KWASM_FAKE_LOG=str(log))
    other = agents("n2", KWASM_EVENT_NAMESPACE=NAMESPACE, KWASM_FAKE_LOG=str(log))
    standin.patch_node("n1", OPT_IN)
    wait_until(lambda: log.exists() and "start n1" in log.read_text(), what="n1 installing")
    standin.patch_node("n2", OPT_IN)
    wait_until(lambda: other.events("lease_wait"), what="n2 queued for the slot")
    standin.inject(409, 1, method="PUT", plural="leases")  # n1's release: conflict, read again
    with (root / "hold-install").open("w") as fifo:
        fifo.write("go")
    wait_labelled(standin, "n1")
    wait_labelled(standin, "n2")
    standin.patch_node("n1", {"metadata": {"annotations": {OPT_IN_KEY: None}}})
    standin.wait_for(lambda: standin.events("Unprovisioned", "n1"), what="Unprovisioned event")
    assert agent.stop() == 0 and other.stop() == 0
    grants = _rbac_grants()
    assert all(ns in (None, NAMESPACE) for _, _, _, ns, _ in grants)

    def granted(group: str, resource: str, verb: str, namespace: str | None, name: str | None) -> bool:
        return any(
            (g, r, v) == (group, resource, verb)
            and (gns is None or gns == namespace)
            and (gname is None or gname == name)
            for g, r, v, gns, gname in grants
        )

    used = set()
    for req in standin.recorded():
        group, resource, verb, namespace, name = _access(req.method, req.path, req.query)
        assert granted(group, resource, verb, namespace, name), (
            f"{req.method} {req.path} needs {verb} on {group or 'core'}/{resource}"
            f" (name {name}) in {namespace or 'the cluster'}"
        )
        used.add((group, resource, verb))
    unused = {(g, r, v) for g, r, v, _, _ in grants} - used
    assert not unused, f"installer.yaml grants what the agent never uses: {sorted(unused)}"


def condition(api: StandIn, node: str) -> dict | None:
    conds = api.node(node).get("status", {}).get("conditions") or []
    found = [c for c in conds if c["type"] == "KwasmProvisioned"]
    return found[0] if found else None


def test_kubelet_confirms_before_the_label(standin: StandIn, agents):
    """The Node reports runtime handlers (1.30+ kubelet, containerd 2.x) without spin: the
    agent installs, records phase verifying and does not label; once the kubelet lists spin
    the node is labelled, the status says check kubelet, and KwasmProvisioned is True next to
    the kubelet's Ready condition."""
    standin.add_node("n1")
    standin.set_runtime_handlers("n1", ["", "runc"])
    at_label: list[list[str]] = []

    def on_write(res, kind, obj):  # what the Node says at the moment the label is written
        if res.plural == "nodes" and obj["metadata"].get("labels", {}).get(PROVISIONED_LABEL) == "true":
            at_label.append([h["name"] for h in obj.get("status", {}).get("runtimeHandlers") or []])

    standin.on_write = on_write
    agent = agents("n1", KWASM_KUBELET_TIMEOUT="60")
    standin.patch_node("n1", OPT_IN)
    standin.wait_for(lambda: status(standin, "n1").get("phase") == "verifying", what="phase verifying")
    assert agent.events("kubelet_wait") and not labelled(standin, "n1")
    assert [c["verb"] for c in agent.calls() if c["verb"] == "install"] == ["install"]
    assert not at_label
    standin.set_runtime_handlers("n1", ["", "runc", "spin"])
    wait_labelled(standin, "n1")
    assert at_label and all("spin" in handlers for handlers in at_label)
    st = status(standin, "n1")
    assert st["phase"] == "provisioned" and st["check"] == "kubelet"
    assert {"installing", "verifying", "provisioned"} <= set(st["phases"])
    # The condition follows the label (a second request, to nodes/status).
    standin.wait_for(lambda: (condition(standin, "n1") or {}).get("status") == "True", what="condition True")
    assert [c["type"] for c in standin.node("n1")["status"]["conditions"]] == ["Ready", "KwasmProvisioned"]
    standin.wait_for(lambda: standin.events("Provisioned", "n1"), what="Provisioned event")
    ev = standin.events("Provisioned", "n1")[0]
    assert "verified by containerd and the kubelet" in ev["message"]


def test_kubelet_that_never_lists_the_handler_fails_the_node(standin: StandIn, agents):
    """The field is present and spin never appears: after KWASM_KUBELET_TIMEOUT the node fails
    at step kubelet: no label, condition False, a Warning naming the kubelet."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    standin.set_runtime_handlers("n1", ["runc"])
    agents("n1", KWASM_KUBELET_TIMEOUT="0.3")
    standin.wait_for(lambda: standin.events("ProvisionFailed", "n1"), what="ProvisionFailed")
    ev = standin.events("ProvisionFailed", "n1")[0]
    assert ev["message"].startswith("kubelet: the kubelet does not report runtime handler spin")
    assert not labelled(standin, "n1")
    st = status(standin, "n1")
    assert st["phase"] == "failed" and st["step"] == "kubelet"
    cond = condition(standin, "n1")
    assert cond is not None and cond["status"] == "False" and cond["reason"] == "Failed"


def test_without_the_field_cri_decides_and_status_says_so(standin: StandIn, agents):
    """No status.runtimeHandlers (kubelet < 1.30 or containerd 1.x): labelled on containerd's
    word, check cri, condition True."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    agents("n1")
    wait_labelled(standin, "n1")
    assert status(standin, "n1")["check"] == "cri"
    standin.wait_for(lambda: (condition(standin, "n1") or {}).get("status") == "True", what="condition True")


def test_retry_runs_on_time_while_the_watch_is_idle(standin: StandIn, agents, tmp_path):
    """A failure handled from a watch event schedules a retry in milliseconds; it runs then,
    not at the end of the agent's 300 s watch (the Node stays untouched meanwhile)."""
    standin.add_node("n1")
    root = tmp_path / "node-n1"
    root.mkdir()
    (root / "fail-install").write_text("containerd does not list runtime spin")
    agent = agents("n1", root=root, KWASM_WATCH_TIMEOUT="300", KWASM_BACKOFF_SCALE="0.5")
    standin.wait_for(
        lambda: any(r.query.get("watch") for r in standin.recorded("GET", "nodes")), what="a watch"
    )
    standin.patch_node("n1", OPT_IN)
    standin.wait_for(lambda: standin.events("ProvisionFailed", "n1"), what="ProvisionFailed")
    (root / "fail-install").unlink()  # the node heals; nothing writes to the Node
    wait_labelled(standin, "n1", timeout=20)
    assert len([c for c in agent.calls() if c["verb"] == "install"]) >= 2


def test_drift_check_runs_on_time_while_the_watch_is_idle(standin: StandIn, agents):
    """Opted in through the watch, then the drift check (every 0.2 s) runs although no Node
    event arrives within the 300 s watch."""
    standin.add_node("n1")
    agent = agents("n1", KWASM_WATCH_TIMEOUT="300", KWASM_DRIFT_INTERVAL="0.2")
    standin.wait_for(
        lambda: any(r.query.get("watch") for r in standin.recorded("GET", "nodes")), what="a watch"
    )
    standin.patch_node("n1", OPT_IN)
    wait_labelled(standin, "n1")
    (agent.root / "drift").write_text("runtime spin missing from config")
    standin.wait_for(lambda: standin.events("Repaired", "n1"), timeout=20, what="Repaired event")


def test_failure_after_provisioning_removes_label_and_sets_condition_false(standin: StandIn, agents):
    """Provisioned, then drift whose repair fails: the label goes, the condition turns False,
    the phase is failed with the engine's step and reason."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    agent = agents("n1", KWASM_DRIFT_INTERVAL="0.2")
    wait_labelled(standin, "n1")
    (agent.root / "fail-install").write_text("containerd does not list runtime spin")
    (agent.root / "drift").write_text("runtime spin missing from config")
    standin.wait_for(lambda: not labelled(standin, "n1"), what="label removed")
    st = status(standin, "n1")
    assert st["phase"] == "failed" and st["step"] == "verify"
    standin.wait_for(
        lambda: (condition(standin, "n1") or {}).get("status") == "False", what="condition False"
    )


def test_unverified_install_is_never_labelled(standin: StandIn, agents, tmp_path):
    """The engine installs but containerd did not confirm (verified false): no label is ever
    written (checked at every write), the failure names step verify; once the engine
    verifies, the node is labelled."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    label_writes: list[str] = []

    def on_write(res, kind, obj):
        if res.plural == "nodes" and obj["metadata"].get("labels", {}).get(PROVISIONED_LABEL) == "true":
            label_writes.append(status_of_obj(obj).get("phase", ""))

    standin.on_write = on_write
    root = tmp_path / "node-n1"
    root.mkdir()
    (root / "unverified").write_text("")
    agents("n1", root=root)
    standin.wait_for(lambda: len(standin.events("ProvisionFailed", "n1")) >= 2, what="two failed attempts")
    assert not label_writes and status(standin, "n1")["step"] == "verify"
    (root / "unverified").unlink()
    wait_labelled(standin, "n1")
    assert label_writes[0] == "provisioned"


def test_failed_step_from_the_engine_is_the_phase_step(standin: StandIn, agents, tmp_path):
    """The engine fails at step restart: the status, the condition and `kwasm-py wait` name
    restart."""
    from tests.harness.cli import invoke

    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    root = tmp_path / "node-n1"
    root.mkdir()
    (root / "fail-install").write_text("containerd did not come back")
    (root / "fail-step").write_text("restart")
    agents("n1", root=root, KWASM_BACKOFF_SCALE="50")  # the retry is far off
    standin.wait_for(lambda: status(standin, "n1").get("phase") == "failed", what="phase failed")
    assert status(standin, "n1")["step"] == "restart"
    standin.wait_for(
        lambda: (condition(standin, "n1") or {}).get("status") == "False", what="condition False"
    )
    assert condition(standin, "n1")["message"] == "restart: containerd did not come back"  # type: ignore[index]
    kubeconfig = standin.kubeconfig(tmp_path / "kubeconfig")
    res = invoke("wait", "n1", "--timeout", "60", "--kubeconfig", str(kubeconfig))
    assert res.code == 1 and "node 'n1' failed at step restart: containerd did not come back" in res.err


def status_of_obj(obj: dict) -> dict:
    raw = (obj["metadata"].get("annotations") or {}).get(STATUS_ANNOTATION)
    return json.loads(raw) if raw else {}


def _node_writes(api: StandIn, node: str) -> list[str]:
    """The Node writes the stand-in received, in order: "nodes" or "nodes/status"."""
    with api.cond:
        paths = [r.path for r in api.requests if r.method == "PATCH"]
    return ["nodes/status" if p.endswith("/status") else "nodes" for p in paths if f"/nodes/{node}" in p]


def test_outcome_is_one_status_write_with_labels_and_condition(standin: StandIn, agents):
    """Provisioned: the label, the status annotation and KwasmProvisioned=True arrive in one
    nodes/status request (the API keeps metadata written there); opt-out removes them in one."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    agent = agents("n1")
    wait_labelled(standin, "n1")
    assert (condition(standin, "n1") or {}).get("status") == "True"  # with the label, not after it
    assert status(standin, "n1")["phase"] == "provisioned"
    assert _node_writes(standin, "n1") == ["nodes", "nodes/status"]  # phase installing, then outcome
    standin.patch_node("n1", OPT_OUT)
    standin.wait_for(lambda: not labelled(standin, "n1") and condition(standin, "n1") is None, what="removed")
    assert not status(standin, "n1")
    assert _node_writes(standin, "n1")[2:] == ["nodes", "nodes/status"]  # phase removing, then removal
    assert agent.stop() == 0


def test_role_without_node_status_still_labels(standin: StandIn, agents):
    """A 403 from nodes/status (an older role without it): the label and annotation go to the
    Node itself, the lost condition is logged, and the node is provisioned."""
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    standin.inject(403, 100, method="PATCH", plural="nodes/status")
    agent = agents("n1")
    wait_labelled(standin, "n1")
    assert status(standin, "n1")["phase"] == "provisioned" and condition(standin, "n1") is None
    assert agent.events("condition_lost")
    assert _node_writes(standin, "n1") == ["nodes", "nodes/status", "nodes"]
