"""`kwasm-py annotate-node / status / wait / manifests` against the stand-in API."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL, STATUS_ANNOTATION
from tests.harness.cli import invoke
from tests.harness.kube_standin import StandIn

REPO = Path(__file__).resolve().parent.parent


def annotations(api: StandIn, name: str) -> dict:
    return api.node(name)["metadata"].get("annotations") or {}


def test_annotate_named_nodes(standin: StandIn, kubeconfig: Path):
    """Named nodes get the opt-in annotation; the others are left alone."""
    for n in ("n1", "n2", "n3"):
        standin.add_node(n)
    res = invoke("annotate-node", "n1", "n3", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    assert annotations(standin, "n1")[OPT_IN_KEY] == "true"
    assert annotations(standin, "n3")[OPT_IN_KEY] == "true"
    assert OPT_IN_KEY not in annotations(standin, "n2")
    assert "2 of 2 nodes opted in" in res.out


def test_opt_in_sets_label_and_annotation(standin: StandIn, kubeconfig: Path):
    """By default both keys (the DaemonSet's affinity needs the label); --annotation-only for an
    installer rendered with --all-nodes; --retry bumps the retry annotation and nothing else."""
    standin.add_node("n1")
    standin.add_node("n2")
    res = invoke("annotate-node", "n1", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    meta = standin.node("n1")["metadata"]
    assert meta["labels"][OPT_IN_KEY] == "true" and meta["annotations"][OPT_IN_KEY] == "true"
    res = invoke("annotate-node", "n2", "--annotation-only", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    meta = standin.node("n2")["metadata"]
    assert OPT_IN_KEY not in meta["labels"] and meta["annotations"][OPT_IN_KEY] == "true"
    before = standin.node("n2")["metadata"]
    res = invoke("annotate-node", "n2", "--retry", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    after = standin.node("n2")["metadata"]
    first = after["annotations"].pop("kwasm.sh/kwasm-retry")
    assert after["labels"] == before["labels"] and after["annotations"] == before["annotations"]
    res = invoke("annotate-node", "n2", "--retry", "--kubeconfig", str(kubeconfig))
    assert standin.node("n2")["metadata"]["annotations"]["kwasm.sh/kwasm-retry"] != first
    res = invoke("annotate-node", "n2", "--retry", "--remove", "--kubeconfig", str(kubeconfig))
    assert res.code == 2 and "exclude each other" in res.err


def test_unknown_node_is_named_others_still_done(standin: StandIn, kubeconfig: Path):
    """An unknown node gives a clear error naming it and exit 1; the known ones are annotated."""
    standin.add_node("n1")
    res = invoke("annotate-node", "n1", "ghost", "--kubeconfig", str(kubeconfig))
    assert res.code == 1
    assert "node 'ghost' not found" in res.err
    assert "Traceback" not in res.err
    assert annotations(standin, "n1")[OPT_IN_KEY] == "true"


def test_annotate_all_selector_and_label(standin: StandIn, kubeconfig: Path):
    """--all patches every node; -l only matching ones; --label opts in with a label."""
    standin.add_node("a", labels={"pool": "wasm"})
    standin.add_node("b")
    res = invoke("annotate-node", "-l", "pool=wasm", "--label", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    assert standin.node("a")["metadata"]["labels"][OPT_IN_KEY] == "true"
    assert OPT_IN_KEY not in standin.node("b")["metadata"]["labels"]
    res = invoke("annotate-node", "--all", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    assert all(annotations(standin, n)[OPT_IN_KEY] == "true" for n in ("a", "b"))
    res = invoke("annotate-node", "--all", "--remove", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    for n in ("a", "b"):
        meta = standin.node(n)["metadata"]
        assert OPT_IN_KEY not in meta["annotations"] and OPT_IN_KEY not in meta["labels"]


def test_annotate_many_nodes_bounded_parallel(standin: StandIn, kubeconfig: Path):
    """200 nodes are all patched, with a count summary instead of a 200-row table."""
    for i in range(200):
        standin.add_node(f"n{i:03}")
    res = invoke("annotate-node", "--all", "--parallel", "8", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    assert "200 of 200 nodes opted in" in res.out
    assert "n150" not in res.out
    assert all(annotations(standin, f"n{i:03}")[OPT_IN_KEY] == "true" for i in range(200))


def test_usage_errors(standin: StandIn, kubeconfig: Path):
    """Naming nodes and --all together (or nothing) is a usage error: exit 2, one line."""
    standin.add_node("n1")
    res = invoke("annotate-node", "--kubeconfig", str(kubeconfig))
    assert res.code == 2 and res.err.startswith("error: ")
    res = invoke("annotate-node", "n1", "--all", "--kubeconfig", str(kubeconfig))
    assert res.code == 2
    assert OPT_IN_KEY not in annotations(standin, "n1")


def test_api_errors_are_one_line(standin: StandIn, kubeconfig: Path, tmp_path: Path):
    """Connection refused, 403 and a bad kubeconfig: one error line, exit 1, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = tmp_path / "dead"
    dead.write_text(kubeconfig.read_text().replace(standin.url, f"http://127.0.0.1:{port}"))
    res = invoke("annotate-node", "n1", "--kubeconfig", str(dead))
    assert res.code == 1 and "connection refused" in res.err
    assert "Traceback" not in res.err and res.err.count("error:") == 1
    standin.add_node("n1")
    standin.inject(403, method="PATCH", message='nodes "n1" is forbidden')
    res = invoke("annotate-node", "n1", "--kubeconfig", str(kubeconfig))
    assert res.code == 1 and "403" in res.err and "RBAC" in res.err
    bad = tmp_path / "bad"
    bad.write_text("kind: Config\n")
    res = invoke("status", "--kubeconfig", str(bad))
    assert res.code == 1 and res.err.startswith("error: bad kubeconfig")


def test_status_table_and_json(standin: StandIn, kubeconfig: Path):
    """status reports opt-in, provisioning, runtimes and the last failure per node."""
    ok_status = {"ok": True, "time": "t1", "runtimes": [{"handler": "spin", "sha256": "ab" * 32}]}
    standin.add_node(
        "good",
        labels={PROVISIONED_LABEL: "true"},
        annotations={OPT_IN_KEY: "true", STATUS_ANNOTATION: json.dumps(ok_status)},
    )
    bad_status = {"ok": False, "time": "t2", "step": "verify", "reason": "runtime missing"}
    standin.add_node("bad", annotations={OPT_IN_KEY: "true", STATUS_ANNOTATION: json.dumps(bad_status)})
    standin.add_node("off")
    res = invoke("status", "-o", "json", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    rows = {r["name"]: r for r in json.loads(res.out)}
    assert rows["good"]["provisioned"] and rows["good"]["runtimes"][0]["handler"] == "spin"
    assert rows["bad"]["opted_in"] and not rows["bad"]["provisioned"]
    assert rows["bad"]["reason"] == "runtime missing"
    assert not rows["off"]["opted_in"]
    res = invoke("status", "--kubeconfig", str(kubeconfig))
    assert res.code == 0
    assert "spin@abababababab" in res.out and "runtime missing" in res.out


def test_wait_reports_failing_nodes(standin: StandIn, kubeconfig: Path):
    """wait exits 1 naming the node that is not provisioned and why; 0 once all are."""
    bad_status = {"ok": False, "time": "t", "step": "verify", "reason": "runtime missing"}
    standin.add_node("n1", labels={PROVISIONED_LABEL: "true"}, annotations={OPT_IN_KEY: "true"})
    standin.add_node("n2", annotations={OPT_IN_KEY: "true", STATUS_ANNOTATION: json.dumps(bad_status)})
    res = invoke("wait", "--all", "--timeout", "0", "--kubeconfig", str(kubeconfig))
    assert res.code == 1
    assert "node 'n2' failed at step verify: runtime missing" in res.err and "'n1'" not in res.err
    standin.patch_node("n2", {"metadata": {"labels": {PROVISIONED_LABEL: "true"}}})
    res = invoke("wait", "n1", "n2", "--timeout", "5", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    res = invoke("wait", "ghost", "--timeout", "0", "--kubeconfig", str(kubeconfig))
    assert res.code == 1 and "'ghost' not found" in res.err


def test_manifests_default_matches_committed_file():
    """`kwasm-py manifests` prints manifests/installer.yaml byte for byte."""
    res = invoke("manifests")
    assert res.code == 0
    assert res.out == (REPO / "manifests" / "installer.yaml").read_text()


def test_manifests_options():
    """--image, --namespace, --shim, --runtime-class and --max-parallel-restarts reach the YAML."""
    import yaml

    res = invoke(
        "manifests",
        "--image", "example.org/kwasm:9",
        "--namespace", "wasm",
        "--shim", "/s/containerd-shim-spin-v2",
        "--shim", "/s/containerd-shim-slight-v2",
        "--runtime-class", "wasmtime-slight=slight",
        "--max-parallel-restarts", "3",
    )  # fmt: skip
    assert res.code == 0, res.err
    objs = list(yaml.safe_load_all(res.out))
    ds = next(o for o in objs if o["kind"] == "DaemonSet")
    ctr = ds["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert ctr["image"] == "example.org/kwasm:9" and ds["metadata"]["namespace"] == "wasm"
    assert env["KWASM_SHIM"] == "/s/containerd-shim-spin-v2,/s/containerd-shim-slight-v2"
    assert env["KWASM_MAX_PARALLEL_RESTARTS"] == "3"
    rcs = [(o["metadata"]["name"], o["handler"]) for o in objs if o["kind"] == "RuntimeClass"]
    assert rcs == [("wasmtime-slight", "slight")]
    res = invoke("manifests", "--runtime-class", "nohandler")
    assert res.code == 2 and "NAME=HANDLER" in res.err
    res = invoke("manifests", "--runtime-class", "wasmtime-slight=slight")  # the image has spin only
    assert res.code == 2 and "no shim of this install provides handler 'slight'" in res.err
    res = invoke("manifests", "--toleration", "pool=wasm:NoSchedule", "--all-nodes")
    assert res.code == 0, res.err
    objs = list(yaml.safe_load_all(res.out))
    rc = next(o for o in objs if o["kind"] == "RuntimeClass")
    assert rc["scheduling"]["tolerations"] == [
        {"key": "pool", "operator": "Equal", "value": "wasm", "effect": "NoSchedule"}
    ]
    pod = next(o for o in objs if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert "affinity" not in pod and pod["tolerations"] == [{"operator": "Exists"}]


def test_status_shows_phase_versions_and_the_kubelets_view(standin: StandIn, kubeconfig: Path):
    """status prints each node's phase, shim versions, the failed step, and whether the
    kubelet lists the handler (or does not report handlers at all)."""
    sha = "ab" * 32
    good = {
        "ok": True,
        "phase": "provisioned",
        "time": "t3",
        "phases": {"installing": "t1", "verifying": "t2", "provisioned": "t3"},
        "runtimes": [{"handler": "spin", "sha256": sha}],
        "shims": [{"handler": "spin", "version": "v0.15.1", "sha256": sha}],
        "check": "kubelet",
    }
    standin.add_node(
        "good",
        labels={PROVISIONED_LABEL: "true"},
        annotations={OPT_IN_KEY: "true", STATUS_ANNOTATION: json.dumps(good)},
    )
    standin.set_runtime_handlers("good", ["", "runc", "spin"])
    verifying = {**good, "ok": False, "phase": "verifying", "time": "t2", "check": None}
    standin.add_node("slow", annotations={OPT_IN_KEY: "true", STATUS_ANNOTATION: json.dumps(verifying)})
    standin.set_runtime_handlers("slow", ["runc"])
    failed = {"ok": False, "phase": "failed", "time": "t4", "step": "kubelet", "reason": "spin not listed"}
    standin.add_node("bad", annotations={OPT_IN_KEY: "true", STATUS_ANNOTATION: json.dumps(failed)})
    res = invoke("status", "-o", "json", "--kubeconfig", str(kubeconfig))
    rows = {r["name"]: r for r in json.loads(res.out)}
    assert rows["good"]["phase"] == "provisioned" and rows["good"]["check"] == "kubelet"
    assert (
        rows["good"]["kubelet_handlers"] == ["", "runc", "spin"]
        and rows["good"]["phases"]["verifying"] == "t2"
    )
    assert rows["slow"]["phase"] == "verifying" and not rows["slow"]["reason"]
    assert rows["bad"]["step"] == "kubelet" and rows["bad"]["kubelet_handlers"] is None
    res = invoke("status", "--kubeconfig", str(kubeconfig))
    lines = {ln.split()[0]: ln for ln in res.out.splitlines()[1:]}
    assert "provisioned" in lines["good"] and "spin@abababababab (v0.15.1)" in lines["good"]
    assert "verifying" in lines["slow"] and "spin missing" in lines["slow"]
    assert "not reported" in lines["bad"] and "kubelet: spin not listed" in lines["bad"]


def test_wait_exits_as_soon_as_a_node_fails_naming_the_step(standin: StandIn, kubeconfig: Path):
    """A failed node ends `wait` at once (well before its timeout) with the step and reason;
    phases are printed as they are."""
    installing = {"ok": False, "phase": "installing", "time": "t1", "phases": {"installing": "t1"}}
    standin.add_node("n1", annotations={OPT_IN_KEY: "true", STATUS_ANNOTATION: json.dumps(installing)})
    failed = {
        "ok": False,
        "phase": "failed",
        "time": "t2",
        "step": "restart",
        "reason": "containerd did not come back",
    }
    standin.add_node("n2", annotations={OPT_IN_KEY: "true", STATUS_ANNOTATION: json.dumps(failed)})
    res = invoke("wait", "--all", "--timeout", "120", "--kubeconfig", str(kubeconfig))
    assert res.code == 1
    assert "node 'n2' failed at step restart: containerd did not come back" in res.err
    assert "node n1: installing (t1)" in res.err and "'n1'" not in res.err
