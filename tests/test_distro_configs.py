"""Every shipped config in ../shared/containerd-configs, on the containerd it ships for.

One case per file (SOURCES.md says where each lives and which containerd reads it): the file
is placed at its distribution's path under a node root holding the layout's marker files and the
real containerd binary, a private daemon of that generation reads it (`harness.distro_node`:
rendered as the distribution renders it), and then, with auto-detection:

- `node plan`: the detected layout and file, and pre-flight run by the node's own containerd, ok;
- `node install` (restart by signal to the private daemon): CRI Status lists spin with our
  runtime_type and every runtime it listed before, unchanged;
- `node uninstall`: the config byte-identical to the input, the whole node root tree as before,
  and CRI Status back to what it listed before.

Files that are not what a node loads (raw templates of other tools, fragments) are cases too,
skipped with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.cli import run_kwasm
from tests.harness.containerd import BINARIES, SHARED_CONFIGS, available, fake_shim
from tests.harness.distro_node import K3S_DIR, MICROK8S_ARGS, DistroNode, copy_containerd
from tests.harness.noderoot import SYSTEMD, UNIT, Entry, tree, tree_diff, tree_hash

pytestmark = [pytest.mark.containerd, pytest.mark.root]
ETC = "/etc/containerd/config.toml"


def runtime_type(layout: str) -> str:
    """Where our shim is installed: /opt/kwasm/bin, or /opt/kwasm/shims where k3s/rke2 would scan bin."""
    return f"/opt/kwasm/{'shims' if layout in ('k3s', 'k3d', 'rke2') else 'bin'}/containerd-shim-spin-v2"


# Every distribution's root has /opt (FHS).
NODE = {**SYSTEMD, "/opt/": ""}
SYSTEMD_NODE = {**NODE, "/lib/systemd/system/containerd.service": UNIT}
#: A base OCI spec where a config names one (kind, kubespray and EKS ship theirs beside it).
BASE_SPEC = '{"ociVersion": "1.1.0"}\n'


@dataclass(frozen=True)
class Case:
    """One shipped file: where it goes, which containerd reads it, what the layout looks like."""

    file: str
    generation: str = "1.6"  # "1.6" stands for containerd 1.x here, "2.x" for 2.x
    path: str = ETC  # where the file lives on the node
    layout: str = "containerd"
    files: dict[str, str] = field(default_factory=lambda: dict(SYSTEMD_NODE))
    render: str = ""  # "k3s" / "microk8s": the distribution renders it before containerd reads it
    reads: str = ""  # the node path containerd reads (default: `path`)
    binary: str = "/usr/bin/containerd"
    skip: str = ""


K3S_FILES = {**NODE, "/etc/systemd/system/k3s.service": "[Service]\nExecStart=/usr/local/bin/k3s server\n"}
NOT_ON_NODE = "a raw template of the node image's build; the node only holds its render"
CASES = [
    Case("aks-agentbaker-06836ee-containerd1-rendered.toml"),
    Case("aks-agentbaker-06836ee-containerd_v2.toml.tmpl", skip="AgentBaker's Go template: " + NOT_ON_NODE),
    Case("bottlerocket-aws-k8s-rendered-defaults.toml"),
    Case(
        "bottlerocket-containerd-config-toml_k8s_containerd_sock.toml.tmpl",
        skip="Bottlerocket's Handlebars template, rendered by its settings API: " + NOT_ON_NODE,
    ),
    Case("containerd-1.6.20-default.toml"),
    Case("containerd-1.7.24-default.toml"),  # 1.7 is 1.x: 1.6 reads it the same way
    Case("debian-containerd-1.6.20-packaged.toml"),
    Case("debian-containerd-1.6.20-packaged.toml", generation="2.x"),  # the same bytes in sid's 2.1.9
    Case("eks-al2-v20260304-containerd-config.toml"),
    Case(
        "eks-al2023-nodeadm-v20260724-config2.template.toml.tmpl",
        skip="nodeadm's internal Go template: " + NOT_ON_NODE,
    ),
    Case(
        "eks-al2023-nodeadm-v20260724-v2-rendered.toml",
        files={**SYSTEMD_NODE, "/etc/containerd/base-runtime-spec.json": BASE_SPEC},
    ),
    Case(
        "eks-al2023-nodeadm-v20260724-v3-rendered.toml",
        generation="2.x",
        files={**SYSTEMD_NODE, "/etc/containerd/base-runtime-spec.json": BASE_SPEC},
    ),
    Case(
        "k0s-v1.35.7-containerd.toml",
        generation="2.x",
        path="/etc/k0s/containerd.toml",
        layout="k0s",
        files={**NODE, "/etc/systemd/system/k0sworker.service": UNIT},
        render="k0s",  # harness.k0s_render: k0s's merge of containerd.d into containerd-cri.toml
        binary="/var/lib/k0s/bin/containerd",
    ),
    Case(
        "k3s-config.toml.tmpl-spin-fragment-issue227.toml",
        skip="a fragment of a k3s render, not a config a node loads (its conflict is field case 01)",
    ),
    Case(
        "k3s-v1.26-rendered-issue9194.toml",
        path=f"{K3S_DIR}/config.toml",
        layout="k3d",  # --pid is the harness's supervisor shell, not systemd: k3s as in k3d
        files=K3S_FILES,
        render="k3s",
        binary="/var/lib/rancher/k3s/data/current/bin/containerd",
    ),
    Case(
        "kind-v0.32.0-base-image.toml",
        generation="2.x",
        files={**SYSTEMD_NODE, "/etc/containerd/cri-base.json": BASE_SPEC},
    ),
    Case(
        "kubespray-v2.31.0-rendered.toml",
        generation="2.x",
        files={**SYSTEMD_NODE, "/etc/containerd/cri-base.json": BASE_SPEC},
    ),
    Case(
        "microk8s-v1.36-containerd-template.toml",
        generation="2.x",
        path=f"{MICROK8S_ARGS}/containerd-template.toml",
        layout="microk8s",
        files={**NODE, "/etc/systemd/system/snap.microk8s.daemon-containerd.service": UNIT},
        render="microk8s",
        reads=f"{MICROK8S_ARGS}/containerd.toml",
        binary="/snap/microk8s/current/bin/containerd",
    ),
    Case("minikube-v1.38.1-kicbase.toml"),
    Case("minikube-v1.38.1-node-rendered.toml"),
    Case(
        "talos-cri-registry-dropin-testdata.toml",
        skip="a Talos CRI drop-in test fixture; Talos nodes are API-managed and read-only, "
        "and the base /etc/cri/containerd.toml is not captured",
    ),
]


def _id(case: Case) -> str:
    return f"{case.file}@{case.generation}"


def test_every_shipped_file_has_a_case() -> None:
    """A file added to the shared folder without a case here fails this test."""
    if not SHARED_CONFIGS.is_dir():
        pytest.skip("../shared/containerd-configs is absent")
    shipped = {p.name for p in SHARED_CONFIGS.iterdir() if p.name != "SOURCES.md"}
    assert shipped == {c.file for c in CASES}


def _status(node: DistroNode) -> dict[str, str]:
    status = node.cri_status()
    assert status.runtime_ready
    return dict(status.runtimes)


def _changed(node: DistroNode, before: dict[str, Entry]) -> dict[str, tuple[Entry | None, Entry | None]]:
    """What changed under the node root since `before`, leaving out what containerd itself
    writes (its root and state directories, its socket) and the harness's own directory."""
    changed = tree_diff(before, tree_hash(node.root))
    return {p: c for p, c in changed.items() if not p.startswith(node.daemon_writes())}


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_shipped_config_installs_renders_and_uninstalls(case: Case, tmp_path: Path) -> None:
    """plan (pre-flight ok) -> install (CRI lists spin and every runtime it had) -> uninstall
    (the input bytes, the whole node root as before, the runtimes as before)."""
    if case.skip:
        pytest.skip(case.skip)
    if why := available(case.generation):
        pytest.skip(why)
    source = SHARED_CONFIGS / case.file
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    node = DistroNode(case.generation, binary=case.binary, reads=case.reads or case.path, render=case.render)
    try:
        tree(node.root, case.files)
        (node.root / case.path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (node.root / case.path.lstrip("/")).write_bytes(source.read_bytes())
        copy_containerd(node.root, BINARIES[case.generation] / "containerd", case.binary)
        node.start()
        shim = fake_shim(tmp_path / "src")
        before_runtimes = _status(node)
        before = tree_hash(node.root)
        original = source.read_bytes()

        r = run_kwasm("node", "plan", *node.node_args(), "--shim", str(shim), "-o", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        plan = json.loads(r.stdout)
        assert plan["layout"] == case.layout, plan
        assert plan["reads"] == (case.reads or case.path), plan
        assert plan["preflight"].startswith(
            f"ok: {case.binary} on the node loads it: spin={runtime_type(case.layout)}"
        ), plan
        assert _changed(node, before) == {}, "plan changes nothing"

        r = run_kwasm("node", "install", *node.node_args(), "--shim", str(shim), "-o", "json")
        assert r.returncode == 0, r.stdout + r.stderr + node.log_tail()
        out = json.loads(r.stdout)
        assert (out["changed"], out["restarted"], out["verified"]) == (True, True, True), out
        after_runtimes = _status(node)
        assert after_runtimes == {**before_runtimes, "spin": runtime_type(case.layout)}

        r = run_kwasm("node", "uninstall", *node.node_args(), "-o", "json")
        assert r.returncode == 0, r.stdout + r.stderr + node.log_tail()
        assert (node.root / case.path.lstrip("/")).read_bytes() == original
        assert _status(node) == before_runtimes
        assert _changed(node, before) == {}
    finally:
        node.cleanup()
