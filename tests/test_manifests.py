"""manifests/: the installer and examples validate offline for every supported Kubernetes minor."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kwasm_py.cluster import manifests, policy
from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((REPO / "manifests").rglob("*.yaml"))
OLDEST = (1, 27)
VERSIONS = sorted(
    {
        v
        for v in kubernetes_validate.utils.all_versions()
        if tuple(int(x) for x in v.split(".")[:2]) >= OLDEST
    },
    key=lambda v: tuple(int(x) for x in v.split(".")),
)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def installer() -> list[dict]:
    return docs(REPO / "manifests" / "installer.yaml")


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def test_supported_versions_reach_the_newest_bundled():
    """We validate from 1.27 up to the newest schema kubernetes-validate bundles."""
    assert VERSIONS[0].startswith("1.27")
    assert VERSIONS[-1] == kubernetes_validate.utils.latest_version()


# Kinds claimed only from a later minor: admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy
# is GA in 1.30 (README: below that, kubectl reports these two objects and applies the rest).
LATER = {
    "ValidatingAdmissionPolicy": policy.MIN_VERSION,
    "ValidatingAdmissionPolicyBinding": policy.MIN_VERSION,
}


def minor(version: str) -> tuple[int, int]:
    major, mnr = version.split(".")[:2]
    return int(major), int(mnr)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_validates_strictly(path: Path, version: str):
    """Every document in manifests/ passes strict schema validation for this Kubernetes minor;
    a kind claimed only from a later minor is unknown to the older ones (the claim is exact)."""
    objs = docs(path)
    assert objs
    for obj in objs:
        if minor(version) < LATER.get(obj["kind"], OLDEST):
            with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
                kubernetes_validate.validate(obj, version, strict=True)
        else:
            kubernetes_validate.validate(obj, version, strict=True)


def test_a_typo_fails_strict_validation():
    """A misspelt DaemonSet field is caught (the validation above can fail)."""
    ds = copy.deepcopy(by_kind(installer(), "DaemonSet")[0])
    spec = ds["spec"]["template"]["spec"]
    spec["serviceAcountName"] = spec.pop("serviceAccountName")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)


def test_committed_installer_is_the_default_render():
    """manifests/installer.yaml is exactly what `kwasm-py manifests` prints by default."""
    rendered = manifests.render_yaml(manifests.installer_objects())
    assert (REPO / "manifests" / "installer.yaml").read_text() == rendered


def test_installer_contents():
    """Namespace is privileged, RBAC is minimal, the DaemonSet is what a node agent needs."""
    objs = installer()
    ns = by_kind(objs, "Namespace")[0]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    (role,) = by_kind(objs, "ClusterRole")
    assert sorted((r["resources"][0], tuple(sorted(r["verbs"]))) for r in role["rules"]) == [
        ("nodes", ("get", "patch", "watch")),
        ("nodes/status", ("patch",)),  # the KwasmProvisioned condition
    ]
    (ns_role,) = by_kind(objs, "Role")
    assert ns_role["metadata"]["namespace"] == ns["metadata"]["name"]
    assert sorted(
        (r["resources"][0], tuple(r["verbs"]), tuple(r.get("resourceNames", ()))) for r in ns_role["rules"]
    ) == [
        ("events", ("create",), ()),
        ("leases", ("create", "delete", "list", "watch"), ()),  # the restart queue (cluster/leases.py)
        ("leases", ("get", "update"), ("kwasm-restart-0",)),
    ]
    (ds,) = by_kind(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert pod["hostPID"] is True and ctr["securityContext"]["privileged"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    # Only where asked (issue 14.2): the opt-in label, no blanket toleration, only our startup taint.
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term == {"matchExpressions": [{"key": OPT_IN_KEY, "operator": "In", "values": ["true"]}]}
    assert pod["tolerations"] == [
        {"key": "kwasm.sh/kwasm-not-ready", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["volumes"][0]["hostPath"]["path"] == "/"
    env = {e["name"]: e for e in ctr["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # Events go to the namespace the Role covers, not the agent's default ("default").
    assert env["KWASM_EVENT_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert set(ctr["resources"]) == {"requests", "limits"}
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ctr["image"] == manifests.DEFAULT_IMAGE and ":" in ctr["image"]
    (rc,) = by_kind(objs, "RuntimeClass")
    assert (rc["metadata"]["name"], rc["handler"]) == ("wasmtime-spin", "spin")
    # Each RuntimeClass selects its handler's label (issue 13.8), set only with that runtime.
    assert rc["scheduling"]["nodeSelector"] == {PROVISIONED_LABEL: "true", "kwasm.sh/runtime-spin": "true"}
    assert "tolerations" not in rc["scheduling"]


def test_examples_contents():
    """The Spin examples use the RuntimeClass, `/`, 128Mi/100m requests and limits, no token."""
    for name in ("spin-app.yaml", "spin-kv-app.yaml"):
        pod = by_kind(docs(REPO / "manifests/examples" / name), "Deployment")[0]["spec"]["template"]["spec"]
        assert pod["runtimeClassName"] == "wasmtime-spin"
        assert pod["automountServiceAccountToken"] is False
        (ctr,) = pod["containers"]
        assert ctr["command"] == ["/"] and "args" not in ctr
        want = {"cpu": "100m", "memory": "128Mi"}
        assert ctr["resources"] == {"requests": want, "limits": want}


def _kv() -> tuple[dict, dict, list[dict], list[dict]]:
    kv = docs(REPO / "manifests/examples/spin-kv-app.yaml")
    redis = docs(REPO / "manifests/examples/redis.yaml")
    secret = by_kind(kv, "Secret")[0]
    pod = by_kind(kv, "Deployment")[0]["spec"]["template"]["spec"]
    return secret, pod, kv, redis


def test_kv_runtime_config_is_mounted_where_the_spin_shim_reads_it():
    """The runtime config Secret is the single file /runtime-config.toml (subPath), as the shim's
    RUNTIME_CONFIG_PATH; its key-value store is Redis under the name the app opens ("foo")."""
    import tomllib

    secret, pod, _, _ = _kv()
    (ctr,) = pod["containers"]
    (mount,) = ctr["volumeMounts"]
    assert (mount["mountPath"], mount["subPath"], mount["readOnly"]) == (
        "/runtime-config.toml",
        "runtime-config.toml",
        True,
    )
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    assert mount["subPath"] in secret["stringData"]
    config = tomllib.loads(secret["stringData"]["runtime-config.toml"])
    assert config["key_value_store"]["foo"]["type"] == "redis"


def test_kv_runtime_config_uses_the_redis_password():
    """Redis requires the password from its Secret, and the runtime config's URL carries it."""
    import tomllib
    import urllib.parse

    secret, _, _, redis = _kv()
    (auth,) = by_kind(redis, "Secret")
    password = auth["stringData"]["password"]
    (deploy,) = by_kind(redis, "Deployment")
    (ctr,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in ctr["env"]}
    ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (auth["metadata"]["name"], "password")
    assert ctr["args"][ctr["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    url = urllib.parse.urlsplit(
        tomllib.loads(secret["stringData"]["runtime-config.toml"])["key_value_store"]["foo"]["url"]
    )
    assert url.password == password
    (svc,) = by_kind(redis, "Service")
    assert url.hostname.split(".")[0] == svc["metadata"]["name"]
    assert url.port == svc["spec"]["ports"][0]["port"]


def test_only_the_kv_app_may_reach_redis():
    """A NetworkPolicy selects the Redis pods and admits only the Spin KV app's pods, on 6379."""
    _, _, kv, redis = _kv()
    (netpol,) = by_kind(redis, "NetworkPolicy")
    redis_labels = by_kind(redis, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    app_labels = by_kind(kv, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    spec = netpol["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector / ipBlock widening it
    assert peer["podSelector"]["matchLabels"].items() <= app_labels.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_example_pods_are_safe_to_copy():
    """No example pod mounts a service-account token; every image has an exact version (no
    `latest`, no bare name); Redis runs as non-root, read-only, without capabilities."""
    import re

    for path in sorted((REPO / "manifests/examples").glob("*.yaml")):
        for deploy in by_kind(docs(path), "Deployment"):
            pod = deploy["spec"]["template"]["spec"]
            assert pod["automountServiceAccountToken"] is False, path.name
            for ctr in pod["containers"]:
                image = ctr["image"]
                assert re.search(r"(@sha256:[0-9a-f]{64}|:v?\d+\.\d+\.\d+[\w.-]*)$", image), image
    redis = by_kind(docs(REPO / "manifests/examples/redis.yaml"), "Deployment")[0]["spec"]["template"]["spec"]
    assert redis["securityContext"]["runAsNonRoot"] is True
    sc = redis["containers"][0]["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_gke_critical_pods_quota():
    """The agent keeps system-node-critical, and the installer namespace carries the quota GKE
    requires for it (scope PriorityClass In [that class]), applied before the DaemonSet."""
    objs = installer()
    kinds = [o["kind"] for o in objs]
    (quota,) = by_kind(objs, "ResourceQuota")
    (ds,) = by_kind(objs, "DaemonSet")
    assert quota["metadata"]["namespace"] == ds["metadata"]["namespace"]
    cls = ds["spec"]["template"]["spec"]["priorityClassName"]
    assert cls == "system-node-critical"
    assert quota["spec"]["scopeSelector"]["matchExpressions"] == [
        {"scopeName": "PriorityClass", "operator": "In", "values": [cls]}
    ]
    assert quota["spec"]["hard"] == {"pods": "1G"}  # not a limit, as GKE's own kube-system quota
    assert kinds.index("ResourceQuota") < kinds.index("DaemonSet")
    assert not by_kind(objs, "PriorityClass")


def test_admission_policy_is_applied_before_the_agent_runs():
    """The own-Node policy and binding come before the DaemonSet and match its ServiceAccount."""
    objs = installer()
    kinds = [o["kind"] for o in objs]
    assert kinds.index("ValidatingAdmissionPolicyBinding") < kinds.index("DaemonSet")
    (vap,) = by_kind(objs, "ValidatingAdmissionPolicy")
    (ds,) = by_kind(objs, "DaemonSet")
    sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
    (cond,) = vap["spec"]["matchConditions"]
    assert f"system:serviceaccount:{ds['metadata']['namespace']}:{sa}" in cond["expression"]


def test_lease_grants_follow_max_parallel_restarts():
    """With N restart slots the Role names exactly the N Leases the agents take turns on."""
    objs = manifests.installer_objects(manifests.InstallerParams(max_parallel_restarts=3))
    (role,) = by_kind(objs, "Role")
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["kwasm-restart-0", "kwasm-restart-1", "kwasm-restart-2"],
            "verbs": ["get", "update"],
        }
    ]


def test_kind_config_has_one_control_plane_two_workers():
    """kind-config.yaml describes one control plane and two workers."""
    cfg = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker", "worker"]


def test_default_image_tag_is_the_package_version():
    """The DaemonSet's pinned image tag follows pyproject's version (one release, one tag)."""
    import tomllib
    from pathlib import Path

    from kwasm_py.cluster import manifests

    version = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "version"
    ]
    assert manifests.DEFAULT_IMAGE.rsplit(":", 1)[1] == version


def test_daemonset_runs_the_image_entrypoint_as_is():
    """The container's argv (ENTRYPOINT + args, no command override) is exactly `kwasm-py agent`."""
    import json
    import re
    from pathlib import Path

    import yaml

    repo = Path(__file__).parent.parent
    entrypoints = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", (repo / "images/Dockerfile").read_text(), re.M)
    entrypoint = json.loads(entrypoints[-1])
    docs = list(yaml.safe_load_all((repo / "manifests/installer.yaml").read_text()))
    ds = next(d for d in docs if d and d["kind"] == "DaemonSet")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    argv = container.get("command") or entrypoint
    argv = [*argv, *container.get("args", [])]
    assert argv == ["kwasm-py", "agent"]


def test_cli_options_reach_quota_rbac_and_policy():
    """`kwasm-py manifests --namespace --max-parallel-restarts` moves the quota, the Role, its
    Lease names and the policy's ServiceAccount with them."""
    from tests.harness.cli import invoke

    res = invoke("manifests", "--namespace", "wasm", "--max-parallel-restarts", "2")
    assert res.code == 0, res.err
    objs = [o for o in yaml.safe_load_all(res.out) if o]
    (quota,) = by_kind(objs, "ResourceQuota")
    (role,) = by_kind(objs, "Role")
    (binding,) = by_kind(objs, "RoleBinding")
    assert quota["metadata"]["namespace"] == role["metadata"]["namespace"] == "wasm"
    assert binding["subjects"][0]["namespace"] == "wasm"
    names = [n for r in role["rules"] for n in r.get("resourceNames", ())]
    assert names == ["kwasm-restart-0", "kwasm-restart-1"]
    (vap,) = by_kind(objs, "ValidatingAdmissionPolicy")
    assert (
        "'system:serviceaccount:wasm:kwasm-node-installer'" in vap["spec"]["matchConditions"][0]["expression"]
    )


def test_all_nodes_keeps_the_annotation_only_flow():
    """--all-nodes: no affinity, every taint tolerated (KWasm's flow); the default is opt-in only."""
    objs = manifests.installer_objects(manifests.InstallerParams(all_nodes=True))
    (ds,) = by_kind(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert "affinity" not in pod and pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["terminationGracePeriodSeconds"] >= 240  # lease wait + restart + rollback


def test_tolerations_reach_runtime_classes_and_agent():
    """--toleration KEY[=VALUE][:EFFECT] lands in each RuntimeClass's scheduling.tolerations and
    lets the agent onto that pool; bad ones are usage errors."""
    from kwasm_py.errors import UsageError

    params = manifests.InstallerParams(tolerations=("pool=wasm:NoSchedule", "gpu"))
    objs = manifests.installer_objects(params)
    want = [
        {"key": "pool", "operator": "Equal", "value": "wasm", "effect": "NoSchedule"},
        {"key": "gpu", "operator": "Exists"},
    ]
    (rc,) = by_kind(objs, "RuntimeClass")
    assert rc["scheduling"]["tolerations"] == want
    (ds,) = by_kind(objs, "DaemonSet")
    assert ds["spec"]["template"]["spec"]["tolerations"][1:] == want
    for bad in ("", ":NoSchedule", "k:Sometimes"):
        with pytest.raises(UsageError, match="KEY"):
            manifests.parse_toleration(bad)


def test_runtime_class_needs_a_handler_the_install_provides():
    """A RuntimeClass whose handler no shim of the install provides is refused (the image's
    default shims, or the --shim paths)."""
    from kwasm_py.errors import UsageError
    from kwasm_py.shims.source import read_catalog

    catalog = read_catalog()
    assert manifests.provided_handlers((), catalog) == ["spin"]
    assert manifests.provided_handlers(("/s/containerd-shim-slight-v2",), catalog) == ["slight"]
    manifests.check_runtime_classes([("wasmtime-spin", "spin")], ["spin"])
    with pytest.raises(UsageError, match="'spni'"):
        manifests.check_runtime_classes([("typo", "spni")], ["spin"])


def test_mode_option_reaches_the_engine_through_the_daemonset():
    """`manifests --mode dropin` sets KWASM_MODE on the agent (which its engine runs inherit);
    the default render names no mode, so the engine's auto applies."""
    from tests.harness.cli import invoke

    def env(out: str) -> dict[str, str]:
        ds = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet")
        container = ds["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", "") for e in container["env"]}

    default = invoke("manifests")
    assert default.code == 0 and "KWASM_MODE" not in env(default.out)
    dropin = invoke("manifests", "--mode", "dropin")
    assert dropin.code == 0 and env(dropin.out)["KWASM_MODE"] == "dropin"
    bad = invoke("manifests", "--mode", "sideways")
    assert bad.code == 2
