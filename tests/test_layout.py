"""Layout detection over host-root trees shaped like each distribution's nodes."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from kwasm_py.errors import LayoutError, ManagedNode, UsageError
from kwasm_py.model import ConfigKind, RestartMethod, RestartSpec
from kwasm_py.node import layout
from kwasm_py.node import probe as nodeprobe
from kwasm_py.node.hostfs import HostFS
from tests.harness.noderoot import SYSTEMD, UNIT, V2, tree

V3 = (
    "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n"
    "  runtime_type = 'io.containerd.runc.v2'\n"
)


K0S_MAIN = '# k0s_managed=true\nimports = ["/run/k0s/containerd-cri.toml"]\nversion = 2\n'

CASES: dict[str, tuple[dict[str, str], str, str, RestartSpec]] = {
    # name: (files, expected layout, expected config, expected restart)
    "kubeadm": (
        {
            **SYSTEMD,
            "/etc/containerd/config.toml": V2,
            "/usr/bin/containerd": "",
            "/lib/systemd/system/containerd.service": UNIT,
        },
        "containerd",
        "/etc/containerd/config.toml",
        RestartSpec(RestartMethod.SYSTEMD, "containerd"),
    ),
    "no-config-yet": (
        {**SYSTEMD, "/usr/bin/containerd": "", "/lib/systemd/system/containerd.service": UNIT},
        "containerd",
        "/etc/containerd/config.toml",
        RestartSpec(RestartMethod.SYSTEMD, "containerd"),
    ),
    "k3s-server": (
        {
            **SYSTEMD,
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml": V2,
            "/etc/systemd/system/k3s.service": UNIT,
        },
        "k3s",
        "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
        RestartSpec(RestartMethod.SYSTEMD, "k3s"),
    ),
    "k3s-agent-v3": (
        {
            **SYSTEMD,
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml": V3,
            "/etc/systemd/system/k3s-agent.service": UNIT,
        },
        "k3s",
        "/var/lib/rancher/k3s/agent/etc/containerd/config-v3.toml.tmpl",
        RestartSpec(RestartMethod.SYSTEMD, "k3s-agent"),
    ),
    "k3s-v3-with-old-template": (
        {
            **SYSTEMD,
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml": V3,
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl": '{{ template "base" . }}\n',
            "/etc/systemd/system/k3s.service": UNIT,
        },
        "k3s",
        "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
        RestartSpec(RestartMethod.SYSTEMD, "k3s"),
    ),
    "k3s-openrc": (
        {
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml": V2,
            "/etc/init.d/k3s": "#!/sbin/openrc-run\n",
        },
        "k3s",
        "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
        RestartSpec(RestartMethod.OPENRC, "k3s"),
    ),
    "k3d": (
        {"/var/lib/rancher/k3s/agent/etc/containerd/config.toml": V2, "/bin/k3s": ""},
        "k3d",
        "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
        RestartSpec(RestartMethod.SIGNAL, "containerd"),
    ),
    "rke2-agent": (
        {
            **SYSTEMD,
            "/var/lib/rancher/rke2/agent/etc/containerd/config.toml": V2,
            "/usr/local/lib/systemd/system/rke2-agent.service": UNIT,
            "/etc/systemd/system/rke2-agent.service": UNIT,
        },
        "rke2",
        "/var/lib/rancher/rke2/agent/etc/containerd/config.toml.tmpl",
        RestartSpec(RestartMethod.SYSTEMD, "rke2-agent"),
    ),
    "microk8s": (
        {
            **SYSTEMD,
            "/var/snap/microk8s/current/args/containerd-template.toml": V2,
            "/var/snap/microk8s/current/args/containerd.toml": V2,
        },
        "microk8s",
        "/var/snap/microk8s/current/args/containerd-template.toml",
        RestartSpec(RestartMethod.SYSTEMD, "snap.microk8s.daemon-containerd"),
    ),
    "k0s-worker": (
        {
            **SYSTEMD,
            "/etc/k0s/containerd.toml": K0S_MAIN,
            "/etc/systemd/system/k0sworker.service": UNIT,
        },
        "k0s",
        "/etc/k0s/containerd.d/kwasm-py.toml",
        RestartSpec(RestartMethod.SYSTEMD, "k0sworker"),
    ),
    "k0s-controller-user-managed": (
        {
            **SYSTEMD,
            "/etc/k0s/containerd.toml": V2,
            "/etc/systemd/system/k0scontroller.service": UNIT,
        },
        "k0s-user-managed",
        "/etc/k0s/containerd.toml",
        RestartSpec(RestartMethod.SYSTEMD, "k0scontroller"),
    ),
    "eks-al2": (
        {
            **SYSTEMD,
            "/etc/eks/containerd/containerd-config.toml": V2,
            "/etc/containerd/config.toml": V2,
            "/usr/bin/containerd": "",
            "/usr/lib/systemd/system/containerd.service": UNIT,
        },
        "containerd",
        "/etc/containerd/config.toml",
        RestartSpec(RestartMethod.SYSTEMD, "containerd"),
    ),
    "alpine-openrc": (
        {"/etc/containerd/config.toml": V2, "/usr/bin/containerd": "", "/etc/init.d/containerd": ""},
        "containerd",
        "/etc/containerd/config.toml",
        RestartSpec(RestartMethod.OPENRC, "containerd"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_detect_distribution_trees(case: str, tmp_path: Path) -> None:
    """Each distribution's node tree is recognised with the right file and restart."""
    files, name, config, restart = CASES[case]
    fs = HostFS(tree(tmp_path, files))
    facts = nodeprobe.gather(fs, pid=None)
    found = layout.detect(facts)
    assert (found.name, str(found.config_path), found.restart) == (name, config, restart)
    assert found.evidence, "detection must say what it found"


def test_template_layouts_point_at_the_rendered_file(tmp_path: Path) -> None:
    """k3s edits the template but knows containerd reads the rendered config."""
    files, *_ = CASES["k3s-server"]
    found = layout.detect(nodeprobe.gather(HostFS(tree(tmp_path, files)), pid=None))
    assert found.kind is ConfigKind.TEMPLATE
    assert found.rendered_path == PurePosixPath("/var/lib/rancher/k3s/agent/etc/containerd/config.toml")
    assert str(found.socket) == "/run/k3s/containerd/containerd.sock"


def test_nothing_found_lists_every_probe(tmp_path: Path) -> None:
    """An empty root is an error that names what was probed and how to override."""
    with pytest.raises(LayoutError, match="no containerd found") as info:
        layout.detect(nodeprobe.gather(HostFS(tmp_path), pid=None))
    assert "/etc/containerd/config.toml" in info.value.message
    assert "--config" in info.value.hint


def test_running_containerd_decides_between_candidates() -> None:
    """A leftover /etc/containerd/config.toml on a k3s node: the running containerd's file wins."""
    existing = frozenset(
        {
            layout.K3S_DIR / "config.toml",
            layout.DEFAULT_CONFIG,
            PurePosixPath("/usr/bin/containerd"),
        }
    )
    base = layout.NodeFacts(existing=existing, init="systemd", systemd_units=frozenset({"k3s", "containerd"}))
    assert layout.detect(base).name == "k3s"
    running_default = layout.NodeFacts(
        existing=existing,
        init="systemd",
        systemd_units=frozenset({"k3s", "containerd"}),
        running_configs=(layout.DEFAULT_CONFIG,),
    )
    chosen = layout.detect(running_default)
    assert chosen.name == "containerd"
    assert any("running containerd reads /etc/containerd/config.toml" in e for e in chosen.evidence)
    running_k3s = layout.NodeFacts(
        existing=existing,
        init="systemd",
        systemd_units=frozenset({"k3s", "containerd"}),
        running_configs=(layout.K3S_DIR / "config.toml",),
    )
    chosen = layout.detect(running_k3s)
    assert chosen.name == "k3s" and any("also found: containerd" in e for e in chosen.evidence)


#: A Talos root (siderolabs/talos: /etc/os-release from OSReleaseTemplate, the system containerd's
#: config with CRI disabled, the CRI containerd's config importing the merged parts).
TALOS = {
    "/etc/os-release": 'NAME="Talos"\nID=talos\nVERSION_ID=v1.13.9\n',
    "/etc/containerd/config.toml": 'version = 3\ndisabled_plugins = ["io.containerd.cri.v1.runtime"]\n',
    "/etc/cri/containerd.toml": 'version = 3\nimports = ["/etc/cri/conf.d/cri.toml"]\n',
    "/usr/bin/containerd": "",
}


def test_os_release_id() -> None:
    """`ID=` unquoted, whatever the quoting; "" when absent (os-release(5))."""
    assert layout.os_release_id('NAME="Talos"\nID=talos\n') == "talos"
    assert layout.os_release_id("ID='debian'\nID_LIKE=x\n") == "debian"
    assert layout.os_release_id('  ID="ubuntu"  \n') == "ubuntu"
    assert layout.os_release_id("NAME=x\n") == ""


def test_talos_is_refused_naming_its_route(tmp_path: Path) -> None:
    """A Talos root (marker: its os-release ID) is refused, naming Talos, its generated CRI config
    and the machine-config route, instead of editing the system containerd's config; the same
    files without the marker are a plain containerd node."""
    root = tree(tmp_path / "talos", TALOS)
    facts = nodeprobe.gather(HostFS(root), pid=None)
    assert facts.os_id == "talos"
    with pytest.raises(ManagedNode) as info:
        layout.detect(facts)
    assert info.value.message.startswith("this node runs Talos Linux (os-release ID=talos)")
    assert "/etc/cri/conf.d/*.part" in info.value.message
    assert "siderolabs/spin" in info.value.hint
    assert "`.machine.files`, op: create, path: /etc/cri/conf.d/20-customization.part" in info.value.hint
    plain = tree(tmp_path / "plain", {**TALOS, "/etc/os-release": "ID=debian\n"})
    assert layout.detect(nodeprobe.gather(HostFS(plain), pid=None)).name == "containerd"


def test_parse_restart() -> None:
    """--restart values parse, with clear errors for unknown methods."""
    assert layout.parse_restart("auto") is None
    assert layout.parse_restart("none") == RestartSpec(RestartMethod.NONE, "")
    assert layout.parse_restart("systemd:k3s-agent") == RestartSpec(RestartMethod.SYSTEMD, "k3s-agent")
    assert layout.parse_restart("signal") == RestartSpec(RestartMethod.SIGNAL, "containerd")
    with pytest.raises(UsageError, match="unknown --restart 'reboot'"):
        layout.parse_restart("reboot")


def test_overrides() -> None:
    """--config on a template name keeps template semantics; --restart replaces the method."""
    base = layout.detect(
        layout.NodeFacts(
            existing=frozenset({layout.K3S_DIR / "config.toml"}),
            init="systemd",
            systemd_units=frozenset({"k3s"}),
        )
    )
    custom = layout.override(
        base,
        config=PurePosixPath("/etc/custom/config.toml.tmpl"),
        restart=RestartSpec(RestartMethod.NONE),
        socket=None,
    )
    assert custom.kind is ConfigKind.TEMPLATE and custom.restart.method is RestartMethod.NONE
    plain = layout.override(
        base, config=PurePosixPath("/etc/containerd/other.toml"), restart=None, socket=None
    )
    assert plain.kind is ConfigKind.CONFIG and plain.restart == base.restart


def test_hostfs_resolves_absolute_symlinks_inside_the_root(tmp_path: Path) -> None:
    """/etc/containerd -> /data/containerd on the node resolves under the root, never on this machine."""
    (tmp_path / "data/containerd").mkdir(parents=True)
    (tmp_path / "data/containerd/config.toml").write_text(V2)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/containerd").symlink_to("/data/containerd")
    fs = HostFS(tmp_path)
    assert (
        fs.resolve(PurePosixPath("/etc/containerd/config.toml")) == tmp_path / "data/containerd/config.toml"
    )
    assert fs.read_text(PurePosixPath("/etc/containerd/config.toml")) == V2
    (tmp_path / "etc/escape").symlink_to("../../../../../../etc")
    assert fs.resolve(PurePosixPath("/etc/escape/passwd")) == tmp_path / "etc/passwd"
