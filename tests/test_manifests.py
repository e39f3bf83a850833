"""manifests/: the installer and examples validate offline for every supported Kubernetes minor."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kwasm_py.cluster import manifests
from kwasm_py.model import PROVISIONED_LABEL

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


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_validates_strictly(path: Path, version: str):
    """Every document in manifests/ passes strict schema validation for this Kubernetes minor."""
    objs = docs(path)
    assert objs
    for obj in objs:
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
        ("events", ("create", "patch")),
        ("nodes", ("get", "list", "patch", "watch")),
    ]
    (lease_role,) = by_kind(objs, "Role")
    assert lease_role["rules"][0]["resources"] == ["leases"]
    assert lease_role["metadata"]["namespace"] == ns["metadata"]["name"]
    (ds,) = by_kind(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert pod["hostPID"] is True and ctr["securityContext"]["privileged"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["volumes"][0]["hostPath"]["path"] == "/"
    env = {e["name"]: e for e in ctr["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert set(ctr["resources"]) == {"requests", "limits"}
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ctr["image"] == manifests.DEFAULT_IMAGE and ":" in ctr["image"]
    (rc,) = by_kind(objs, "RuntimeClass")
    assert (rc["metadata"]["name"], rc["handler"]) == ("wasmtime-spin", "spin")
    assert rc["scheduling"]["nodeSelector"] == {PROVISIONED_LABEL: "true"}


def test_examples_contents():
    """The Spin examples use the RuntimeClass, the limits, `/` and the runtime-config Secret."""
    spin = by_kind(docs(REPO / "manifests/examples/spin-app.yaml"), "Deployment")[0]
    pod = spin["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "wasmtime-spin"
    assert pod["containers"][0]["command"] == ["/"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "100m", "memory": "128Mi"}
    kv = docs(REPO / "manifests/examples/spin-kv-app.yaml")
    secret = by_kind(kv, "Secret")[0]
    assert "key_value_store" in secret["stringData"]["runtime-config.toml"]
    kv_pod = by_kind(kv, "Deployment")[0]["spec"]["template"]["spec"]
    args = kv_pod["containers"][0]["args"]
    mount = kv_pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert args[0] == "--runtime-config-file" and args[1].startswith(mount)
    assert kv_pod["volumes"][0]["secret"]["secretName"] == secret["metadata"]["name"]
    redis = docs(REPO / "manifests/examples/redis.yaml")
    assert {o["kind"] for o in redis} == {"Deployment", "Service"}


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
