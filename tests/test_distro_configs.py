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

Files that are not what a node loads as it is get the result that is right for them instead:

- raw templates of other tools (AgentBaker, nodeadm, Bottlerocket) where containerd reads its
  config: the node's containerd refuses the file, and plan and install refuse it in one line
  naming the template's tool, with that tool's route as hint; the node root is unchanged;
- k3s's own spin lines (the #227 fragment) in a k3s render served by real containerd: the
  conflict is reported before anything is written, or k3s's runtime is adopted when it runs the
  very shim asked for;
- Talos's CRI registry part under /etc/cri/conf.d of a Talos-shaped root served by real
  containerd: refused naming Talos and its machine-config route, nothing changed.
"""

from __future__ import annotations

import json
import subprocess
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


K3S_FILES = {**NODE, "/etc/systemd/system/k3s.service": "[Service]\nExecStart=/usr/local/bin/k3s server\n"}
K3S_BINARY = "/var/lib/rancher/k3s/data/current/bin/containerd"
CASES = [
    Case("aks-agentbaker-06836ee-containerd1-rendered.toml"),
    Case("bottlerocket-aws-k8s-rendered-defaults.toml"),
    Case("containerd-1.6.20-default.toml"),
    Case("containerd-1.7.24-default.toml"),  # 1.7 is 1.x: 1.6 reads it the same way
    Case("debian-containerd-1.6.20-packaged.toml"),
    Case("debian-containerd-1.6.20-packaged.toml", generation="2.x"),  # the same bytes in sid's 2.1.9
    Case("eks-al2-v20260304-containerd-config.toml"),
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
        "k3s-v1.26-rendered-issue9194.toml",
        path=f"{K3S_DIR}/config.toml",
        layout="k3d",  # --pid is the harness's supervisor shell, not systemd: k3s as in k3d
        files=K3S_FILES,
        render="k3s",
        binary=K3S_BINARY,
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
]


@dataclass(frozen=True)
class RawTemplate:
    """A raw template of another tool, placed where the node's containerd reads its config."""

    file: str
    generation: str  # the containerd its render is for
    what: str  # what the refusal must call it
    route: str  # words of that tool's own route the hint must give


RAW_TEMPLATES = [
    RawTemplate(
        "aks-agentbaker-06836ee-containerd_v2.toml.tmpl",
        "2.x",
        "Go template of AKS AgentBaker",
        "re-provision",
    ),
    RawTemplate(
        "bottlerocket-containerd-config-toml_k8s_containerd_sock.toml.tmpl",
        "1.6",
        "Handlebars template of Bottlerocket",
        "Bottlerocket settings",
    ),
    RawTemplate(
        "eks-al2023-nodeadm-v20260724-config2.template.toml.tmpl",
        "2.x",
        "Go template of EKS nodeadm",
        "nodeadm init",
    ),
]
#: k3s's own spin lines (spinframework/containerd-shim-spin#227): a fragment of a k3s render.
K3S_FRAGMENT = "k3s-config.toml.tmpl-spin-fragment-issue227.toml"
#: Talos's CRI registry part (a test fixture of siderolabs/talos): /etc/cri/conf.d/01-registries.part.
TALOS_PART = "talos-cri-registry-dropin-testdata.toml"


def _id(case: Case) -> str:
    return f"{case.file}@{case.generation}"


def test_every_shipped_file_has_a_case() -> None:
    """A file added to the shared folder without a case here fails this test."""
    if not SHARED_CONFIGS.is_dir():
        pytest.skip("../shared/containerd-configs is absent")
    shipped = {p.name for p in SHARED_CONFIGS.iterdir() if p.name != "SOURCES.md"}
    assert shipped == {c.file for c in CASES} | {r.file for r in RAW_TEMPLATES} | {K3S_FRAGMENT, TALOS_PART}


def _shipped(name: str, generation: str) -> bytes:
    """The shipped file's bytes (skips when it or the containerd generation is not here)."""
    if why := available(generation):
        pytest.skip(why)
    source = SHARED_CONFIGS / name
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    return source.read_bytes()


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
    original = _shipped(case.file, case.generation)
    node = DistroNode(case.generation, binary=case.binary, reads=case.reads or case.path, render=case.render)
    try:
        tree(node.root, case.files)
        (node.root / case.path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (node.root / case.path.lstrip("/")).write_bytes(original)
        copy_containerd(node.root, BINARIES[case.generation] / "containerd", case.binary)
        node.start()
        shim = fake_shim(tmp_path / "src")
        before_runtimes = _status(node)
        before = tree_hash(node.root)

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


def _refusal(r: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The one error line and the one hint line of a refused run (exit 1, no traceback)."""
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), r.stderr
    return lines[0], lines[1]


@pytest.mark.parametrize("case", RAW_TEMPLATES, ids=[c.file for c in RAW_TEMPLATES])
def test_raw_template_where_the_config_goes_is_refused(case: RawTemplate, tmp_path: Path) -> None:
    """A raw template at /etc/containerd/config.toml: the node's own containerd cannot load it,
    and plan, install and install --mode dropin refuse it in one line naming the template's
    language and tool, the hint giving that tool's route (not --config, not a version); the
    whole node root is byte-identical afterwards."""
    text = _shipped(case.file, case.generation)
    root = tree(tmp_path / "node", {**SYSTEMD_NODE, "/etc/containerd/": ""})
    (root / ETC.lstrip("/")).write_bytes(text)
    binary = BINARIES[case.generation] / "containerd"
    copy_containerd(root, binary, "/usr/bin/containerd")
    dump = subprocess.run(
        [str(binary), "--config", str(root / ETC.lstrip("/")), "config", "dump"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dump.returncode != 0 and "TOML" in dump.stderr, dump.stderr  # not what a node loads
    shim = fake_shim(tmp_path / "src")
    before = tree_hash(root)
    for extra in ([], ["--mode", "dropin"]):
        for command in ("plan", "install"):
            r = run_kwasm("node", command, "--host-root", str(root), "--shim", str(shim), *extra)
            error, hint = _refusal(r)
            assert error.startswith(f"error: {ETC} is a raw {case.what}, not TOML"), (command, extra, error)
            assert case.route in hint and "--config" not in hint and "version" not in hint, hint
    r = run_kwasm("node", "install", "--host-root", str(root), "--shim", str(shim), "-o", "json")
    out = json.loads(r.stdout)
    assert (r.returncode, out["ok"], out["step"]) == (1, False, "pre-flight"), out
    assert tree_diff(before, tree_hash(root)) == {}


def _k3s_fragment_node(kwasm_bin_shim: bytes) -> DistroNode:
    """A k3s node (real containerd 1.x, k3s render stand-in) whose render ends with the #227
    fragment, as k3s writes its ExtraRuntimes after the base template's runtimes (field case 01's
    render), and with the shim k3s found at /opt/kwasm/bin/containerd-shim-spin-v2 (`kwasm_bin_shim`)."""
    render = _shipped("k3s-v1.26-rendered-issue9194.toml", "1.6") + _shipped(K3S_FRAGMENT, "1.6")
    node = DistroNode("1.6", binary=K3S_BINARY, reads=f"{K3S_DIR}/config.toml", render="k3s")
    tree(node.root, K3S_FILES)
    (node.root / K3S_DIR.lstrip("/")).mkdir(parents=True)
    (node.root / K3S_DIR.lstrip("/") / "config.toml").write_bytes(render)
    found = node.root / "opt/kwasm/bin/containerd-shim-spin-v2"
    found.parent.mkdir(parents=True)
    found.write_bytes(kwasm_bin_shim)
    found.chmod(0o755)
    copy_containerd(node.root, BINARIES["1.6"] / "containerd", K3S_BINARY)
    return node.start()


def test_k3s_spin_fragment_of_another_shim_conflicts_before_any_write(tmp_path: Path) -> None:
    """k3s's own spin lines in its render, for a shim in /opt/kwasm/bin that is not the one asked
    for: plan and install report the conflict naming that binary and where k3s found it (not
    PATH), before writing: the node root, the containerd process and its runtimes as they were."""
    shim = fake_shim(tmp_path / "src")
    node = _k3s_fragment_node(b"#!/bin/sh\n# another installer's spin shim\nexit 1\n")
    try:
        runtimes = _status(node)
        assert runtimes["spin"] == "io.containerd.spin.v2"  # k3s's, from the fragment
        before, daemon = tree_hash(node.root), node.daemon()
        for command in ("plan", "install"):
            error, hint = _refusal(run_kwasm("node", command, *node.node_args(), "--shim", str(shim)))
            assert "already has runtime `spin`" in error and "/opt/kwasm/bin/containerd-shim-spin-v2" in error
            assert "look for shims in /opt/kwasm/bin" in error and "PATH" not in error + hint, error + hint
            assert "same sha256" in hint, hint
        assert _changed(node, before) == {}
        assert node.daemon() == daemon, "containerd was not restarted"
        assert _status(node) == runtimes
    finally:
        node.cleanup()


def test_k3s_spin_fragment_of_the_very_shim_is_adopted(tmp_path: Path) -> None:
    """The same lines for the very shim asked for (same sha256 in /opt/kwasm/bin): install adopts
    k3s's runtime and adds no table (CRI lists spin as k3s wrote it, next to every other runtime),
    and uninstall leaves the node root and the runtimes as before."""
    shim = fake_shim(tmp_path / "src")
    node = _k3s_fragment_node(shim.read_bytes())
    try:
        runtimes = _status(node)
        before = tree_hash(node.root)
        r = run_kwasm("node", "plan", *node.node_args(), "--shim", str(shim), "-o", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert any("adopting it, adding no table" in n for n in json.loads(r.stdout)["notes"]), r.stdout
        r = run_kwasm("node", "install", *node.node_args(), "--shim", str(shim), "-o", "json")
        assert r.returncode == 0, r.stdout + r.stderr + node.log_tail()
        assert json.loads(r.stdout)["verified"] is True
        template = (node.root / K3S_DIR.lstrip("/") / "config.toml.tmpl").read_text()
        assert "spin" not in template, template
        assert _status(node) == runtimes
        r = run_kwasm("node", "uninstall", *node.node_args(), "-o", "json")
        assert r.returncode == 0, r.stdout + r.stderr + node.log_tail()
        assert _changed(node, before) == {}
        assert _status(node) == runtimes
    finally:
        node.cleanup()


#: A Talos node as of the fixture's commit (Talos 1.8, containerd 1.7), stand-ins shaped after
#: siderolabs/talos: /etc/os-release from pkg/machinery/constants OSReleaseTemplate; the system
#: containerd's config (hack/containerd.toml: CRI disabled); the CRI containerd's config
#: (hack/cri-containerd.toml: imports the merged parts) and its base part (hack/cri-plugin.part).
TALOS_BASE_PART = (
    'version = 2\n\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
    '  runtime_type = "io.containerd.runc.v2"\n'
)
TALOS_FILES = {
    "/opt/": "",
    "/etc/os-release": 'NAME="Talos"\nID=talos\nVERSION_ID=v1.8.0\nPRETTY_NAME="Talos (v1.8.0)"\n',
    "/etc/containerd/config.toml": 'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n',
    "/etc/cri/containerd.toml": 'version = 2\nimports = ["/etc/cri/conf.d/cri.toml"]\n',
    "/etc/cri/conf.d/00-base.part": TALOS_BASE_PART,
}


def test_talos_node_is_refused_naming_its_machine_config_route(tmp_path: Path) -> None:
    """A Talos-shaped root whose CRI containerd (real, 1.x) loads the fixture as its registry part
    (machined's merge of /etc/cri/conf.d/*.part into cri.toml): plan, install, install --config at
    a part, and status refuse in one line naming Talos, the hint giving the system extension and
    the `.machine.files` route; uninstall has nothing to do; the node root, the containerd process
    and its runtimes are as before."""
    part = _shipped(TALOS_PART, "1.6")
    node = DistroNode("1.6", binary="/usr/bin/containerd", reads="/etc/cri/containerd.toml")
    try:
        tree(node.root, TALOS_FILES)
        (node.root / "etc/cri/conf.d/01-registries.part").write_bytes(part)
        (node.root / "etc/cri/conf.d/cri.toml").write_bytes(TALOS_BASE_PART.encode() + b"\n" + part)
        copy_containerd(node.root, BINARIES["1.6"] / "containerd", "/usr/bin/containerd")
        node.start()
        shim = fake_shim(tmp_path / "src")
        runtimes = _status(node)
        before, daemon = tree_hash(node.root), node.daemon()
        at = ["--host-root", str(node.root), "--socket", node.socket_node_path, "--pid", str(node.pid)]
        for argv in (
            ["plan", *node.node_args(), "--shim", str(shim)],
            ["install", *node.node_args(), "--shim", str(shim)],
            ["install", *node.node_args(), "--shim", str(shim), "--config", "/etc/cri/conf.d/30-spin.part"],
            ["status", *at],
        ):
            error, hint = _refusal(run_kwasm("node", *argv))
            assert error.startswith("error: this node runs Talos Linux (os-release ID=talos)"), (argv, error)
            assert "siderolabs/spin" in hint and "/etc/cri/conf.d/20-customization.part" in hint, hint
        r = run_kwasm("node", "uninstall", *node.node_args())
        assert r.returncode == 0 and "nothing installed" in r.stdout + r.stderr, r.stdout + r.stderr
        assert _changed(node, before) == {}
        assert node.daemon() == daemon, "containerd was not restarted"
        assert _status(node) == runtimes
    finally:
        node.cleanup()
