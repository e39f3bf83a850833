"""manifests/installer-minimal.yaml: the agent without hostPID or privileged (systemd nodes).

Strict schema validation of the committed file for every supported minor is in test_manifests.py
(it validates every file under manifests/); the real D-Bus restarts it relies on are in
tests/nodes/test_node_dbus.py.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from kwasm_py.cluster import manifests, minimal
from kwasm_py.model import DEFAULT_INSTALL_DIR
from kwasm_py.node import dbus, layout
from tests.harness.cli import invoke

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "manifests" / "installer-minimal.yaml"


def pod(objs: list[dict]) -> dict:
    [ds] = [o for o in objs if o["kind"] == "DaemonSet"]
    return ds["spec"]["template"]["spec"]


def test_committed_minimal_installer_is_the_default_render():
    """installer-minimal.yaml is exactly what `kwasm-py manifests --minimal` prints."""
    result = invoke("manifests", "--minimal")
    assert result.code == 0, result.err
    assert COMMITTED.read_text() == result.out
    assert result.out == manifests.render_yaml(minimal.minimal_objects(), header=minimal.HEADER)


def test_minimal_agent_has_no_host_pid_no_privilege_and_a_read_only_root():
    """No hostPID, not privileged, no escalation, read-only container root, uid 0 with only
    CHOWN/DAC_OVERRIDE/FOWNER, the node's / read-only; D-Bus instead of a node PID."""
    spec = pod(list(yaml.safe_load_all(COMMITTED.read_text().split("\n", 3)[3])))
    assert "hostPID" not in spec
    assert "hostNetwork" not in spec
    [agent] = spec["containers"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]}
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["KWASM_BUS"] == str(dbus.SYSTEM_BUS)
    assert "KWASM_PID" not in env
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in agent["volumeMounts"]}
    assert mounts == {
        "/host": True,
        "/host/opt/kwasm": False,
        "/host/etc/containerd": False,
        "/host/run/containerd": True,
        "/host/run/dbus/system_bus_socket": True,
        "/tmp": False,
    }
    kinds = {v["name"]: v.get("hostPath", {}).get("type") for v in spec["volumes"]}
    assert kinds["system-bus"] == "Socket"
    assert kinds["host-root"] == "Directory"


def test_everything_but_the_agent_pod_is_the_privileged_installer():
    """RBAC, policy, quota, RuntimeClass: the same objects as installer.yaml, so both stay in step."""
    full, mini = manifests.installer_objects(), minimal.minimal_objects()
    assert [o for o in mini if o["kind"] != "DaemonSet"] == [o for o in full if o["kind"] != "DaemonSet"]
    assert "hostPID" in pod(full)  # the transform did not change the privileged variant


@pytest.mark.parametrize("name", sorted(minimal.LAYOUTS))
def test_each_layout_mounts_the_directories_the_engine_uses(name):
    """The writable directory is the layout's config directory and the socket directory holds
    containerd's socket, as node/layout.py says (the cluster side cannot import it)."""
    expected = {
        "containerd": (layout.DEFAULT_CONFIG.parent, layout.DEFAULT_SOCKET.parent),
        "k3s": (layout.K3S_DIR, layout.K3S_SOCKET.parent),
        "rke2": (layout.RKE2_DIR, layout.K3S_SOCKET.parent),
        "microk8s": (layout.MICROK8S_ARGS, PurePosixPath("/var/snap/microk8s/common/run")),
        "k0s": (layout.K0S_DROPINS, PurePosixPath("/run/k0s")),
    }[name]
    mounts = minimal.LAYOUTS[name]
    assert (PurePosixPath(mounts.config_dir), PurePosixPath(mounts.socket_dir)) == expected
    assert str(DEFAULT_INSTALL_DIR) == minimal.INSTALL_DIR
    objs = minimal.minimal_objects(layout=name)
    paths = {v["hostPath"]["path"] for v in pod(objs)["volumes"] if "hostPath" in v}
    assert {mounts.config_dir, mounts.socket_dir, minimal.INSTALL_DIR, "/", minimal.SYSTEM_BUS} == paths
    for obj in objs:
        if obj["kind"] in ("DaemonSet", "Namespace"):
            kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)


def test_layout_option_reaches_the_mounts_and_bad_ones_are_refused():
    """`--minimal --layout k3s` mounts k3s's directories; an unknown layout is a usage error."""
    k3s = invoke("manifests", "--minimal", "--layout", "k3s")
    assert k3s.code == 0, k3s.err
    assert "path: /var/lib/rancher/k3s/agent/etc/containerd" in k3s.out
    assert "path: /etc/containerd\n" not in k3s.out
    bad = invoke("manifests", "--minimal", "--layout", "k3d")
    assert bad.code == 2
    assert "unknown --layout 'k3d'" in bad.err
