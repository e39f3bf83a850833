"""Templates as users write them (pure): Go actions, base renders, microk8s placeholders."""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from kwasm_py.containerd import template as tmpl
from kwasm_py.errors import ConfigError, ConflictError
from kwasm_py.model import (
    ConfigKind,
    ContainerdVersion,
    CriSchema,
    Layout,
    RestartMethod,
    RestartSpec,
    ShimSpec,
)
from kwasm_py.node import plan

DATA = Path(__file__).parent / "data" / "templates"
C16, C21 = ContainerdVersion(1, 6, 20), ContainerdVersion(2, 1, 9)
SHA = "ab" * 32
SHIM = (ShimSpec(source="/src/containerd-shim-spin-v2", name="spin", handler="spin"), SHA)
OURS = "/opt/kwasm/shims/containerd-shim-spin-v2"  # k3s scans /opt/kwasm/bin, so not there


def rancher(name: str = "rke2", tmpl_name: str = "config.toml.tmpl") -> Layout:
    base = PurePosixPath(f"/var/lib/rancher/{name}/agent/etc/containerd")
    return Layout(
        name=name,
        config_path=base / tmpl_name,
        kind=ConfigKind.TEMPLATE,
        restart=RestartSpec(RestartMethod.SYSTEMD, f"{name}-server"),
        socket=PurePosixPath(f"/run/{name}/containerd/containerd.sock"),
        rendered_path=base / "config.toml",
    )


MICROK8S = Layout(
    name="microk8s",
    config_path=PurePosixPath("/var/snap/microk8s/current/args/containerd-template.toml"),
    kind=ConfigKind.TEMPLATE,
    restart=RestartSpec(RestartMethod.SYSTEMD, "snap.microk8s.daemon-containerd"),
    socket=PurePosixPath("/var/snap/microk8s/common/run/containerd.sock"),
    rendered_path=PurePosixPath("/var/snap/microk8s/current/args/containerd.toml"),
)


def make(
    layout: Layout, own: str | None, rendered: str | None, containerd: ContainerdVersion = C16, **kw: Any
):
    return plan.make_plan(
        layout=layout,
        own_text=own,
        reference_text=rendered,
        containerd=containerd,
        shims=[SHIM],
        installed={},
        install_dir=PurePosixPath("/opt/kwasm"),
        state=None,
        **kw,
    )


def runtimes(text: str, schema: CriSchema = CriSchema.V2) -> dict[str, Any]:
    data = tomllib.loads(text)
    out: dict[str, Any] = data["plugins"][schema.value]["containerd"]["runtimes"]
    return out


@pytest.mark.parametrize("name", ["rke2-stock-copy.toml.tmpl", "comment-then-base.toml.tmpl"])
def test_go_template_keeps_its_bytes_and_predicts_the_render(name: str) -> None:
    """A stock-template copy or a comment above the base line: the runtime goes after the last
    action, and the predicted render is today's render plus that block, which parses."""
    template = (DATA / name).read_text()
    rendered = (DATA / "rke2-rendered.toml").read_text()
    p = make(rancher(), template, rendered)
    assert p.new_text.startswith(tmpl.split(template)[0])
    assert p.effective is not None and p.effective.startswith(rendered.rstrip("\n"))
    got = runtimes(p.effective)
    assert got["spin"] == {"runtime_type": OURS, "options": {"SystemdCgroup": True}}
    assert got["runc"] == runtimes(rendered)["runc"]
    # apply twice: once rendered by rke2, and before rke2 restarted (render still the old one)
    assert not make(rancher(), p.new_text, p.effective).config_changed
    assert not make(rancher(), p.new_text, rendered).config_changed


def test_go_template_without_a_render_is_refused_with_the_cause() -> None:
    """Without today's render the next one cannot be predicted: refused, saying to start rke2."""
    with pytest.raises(ConfigError, match="does not exist yet") as info:
        make(rancher(), (DATA / "rke2-stock-copy.toml.tmpl").read_text(), None)
    assert "start rke2 once" in info.value.hint


def test_frozen_render_is_edited_as_plain_toml() -> None:
    """A template without actions renders verbatim: edited as TOML, and it is what containerd reads."""
    rendered = (DATA / "rke2-rendered.toml").read_text()
    p = make(rancher(), rendered, rendered)
    assert tmpl.kind(rendered) is tmpl.TemplateKind.NONE
    assert p.effective == p.new_text
    assert runtimes(p.new_text)["spin"]["runtime_type"] == OURS


def test_new_template_is_base_line_plus_block() -> None:
    """No template yet: `{{ template "base" . }}` and our block; the render is base + block."""
    rendered = (DATA / "rke2-rendered.toml").read_text()
    p = make(rancher(), None, rendered)
    assert p.new_text.startswith(plan.BASE_TEMPLATE)
    assert tmpl.kind(p.new_text) is tmpl.TemplateKind.BASE
    assert p.effective is not None and set(runtimes(p.effective)) == {"runc", "spin"}


@pytest.mark.parametrize(
    ("rendered", "tmpl_name", "containerd", "schema"),
    [
        ("k3s-rendered-spin.toml", "config.toml.tmpl", C16, CriSchema.V2),
        ("k3s-rendered-spin-v3.toml", "config-v3.toml.tmpl", C21, CriSchema.V3),
    ],
)
def test_base_render_with_k3s_own_spin(
    rendered: str, tmpl_name: str, containerd: ContainerdVersion, schema: CriSchema
) -> None:
    """k3s's own `spin` (a shim on its PATH) is a conflict found before writing, naming the cause;
    it is adopted when it runs our install directory's shim or the very binary asked for."""
    text = (DATA / rendered).read_text()
    layout = rancher("k3s", tmpl_name)
    with pytest.raises(ConflictError, match="from the base template") as info:
        make(layout, None, text, containerd)
    assert "/usr/bin/containerd-shim-spin-v2" in info.value.message
    assert "PATH" in info.value.hint and "--config" not in info.value.hint
    with pytest.raises(ConflictError):  # an existing template does not hide it either
        make(layout, '# ours\n{{ template "base" . }}\n', text, containerd)
    same = make(layout, None, text, containerd, base_digests={"/usr/bin/containerd-shim-spin-v2": SHA})
    assert any("adopting" in n for n in same.notes)
    assert same.entries[0].runtime_type == "io.containerd.spin.v2"
    assert same.effective is not None and runtimes(same.effective, schema) == runtimes(text, schema)
    ours = text.replace("/usr/bin/containerd-shim-spin-v2", OURS)
    adopted = make(layout, None, ours, containerd)
    assert tmpl.split(adopted.new_text)[1].strip() == ""  # nothing of ours in the template's tail


def test_base_conflict_with_a_different_binary() -> None:
    """A base-render runtime running another binary than the one asked for is refused."""
    text = (DATA / "k3s-rendered-spin.toml").read_text()
    with pytest.raises(ConflictError):
        make(rancher("k3s"), None, text, base_digests={"/usr/bin/containerd-shim-spin-v2": "cd" * 32})


def test_base_conflict_with_a_shim_k3s_found_in_opt_kwasm_bin() -> None:
    """k3s's own `spin` for a shim it found in /opt/kwasm/bin (#227, k3s of 2024 scans that
    directory, not PATH): the conflict names where k3s found it, and the hint says how to adopt."""
    text = (DATA / "k3s-rendered-spin.toml").read_text().replace("/usr/bin/", "/opt/kwasm/bin/")
    with pytest.raises(ConflictError) as info:
        make(rancher("k3s"), None, text)
    assert "k3s found /opt/kwasm/bin/containerd-shim-spin-v2" in info.value.message
    assert "look for shims in /opt/kwasm/bin" in info.value.message
    assert "PATH" not in info.value.message + info.value.hint
    assert "remove /opt/kwasm/bin/containerd-shim-spin-v2" in info.value.hint
    assert "same sha256" in info.value.hint


def test_stock_microk8s_template_installs_on_containerd1() -> None:
    """`${RUNTIME}` & co are resolved from the snap's render; the stock template installs and
    its render (placeholders substituted as the snap does) keeps runc as default."""
    template = (DATA / "microk8s-containerd-template.toml").read_text()
    rendered = tmpl.substitute_text(
        template,
        {
            "RUNTIME": "runc",
            "RUNTIME_TYPE": "io.containerd.runc.v2",
            "SNAPSHOTTER": "overlayfs",
            "SNAP_DATA": "/var/snap/microk8s/123",
        },
    )
    p = make(MICROK8S, template, rendered)
    assert p.companion is None
    assert p.new_text.count("${RUNTIME}") == template.count("${RUNTIME}")
    assert p.effective is not None and "${" not in p.effective
    eff = tomllib.loads(p.effective)["plugins"][CriSchema.V2.value]
    assert eff["containerd"]["default_runtime_name"] == "runc"
    assert eff["cni"]["bin_dir"] == "/var/snap/microk8s/123/opt/cni/bin"
    assert eff["containerd"]["runtimes"]["spin"]["runtime_type"] == "/opt/kwasm/bin/containerd-shim-spin-v2"
    alone = make(MICROK8S, template, None)  # never rendered yet: the snap's defaults, said so
    assert alone.companion is None and any("${RUNTIME}" in n for n in alone.notes)


def test_split_and_rendered_base() -> None:
    """The prelude ends with the line of the last action; a render lagging the tail is found."""
    text = "a = 1\n{{ if .X }}b = 2{{ end }}\n[t]\nc = 3\n"
    assert tmpl.split(text) == ("a = 1\n{{ if .X }}b = 2{{ end }}\n", "[t]\nc = 3\n")
    assert tmpl.split('s = "{{ not an action }}"\n') == ("", 's = "{{ not an action }}"\n')
    assert tmpl.rendered_base("a = 1\nb = 2\n[t]\nc = 3\n", "[t]\nc = 3\n") == ("a = 1\nb = 2\n", True)
    assert tmpl.rendered_base("x = 1\n[t]\n", "[t]\n[u]\n") == ("x = 1\n", False)
    assert tmpl.kind('# c\n{{- template "base" . }}\n') is tmpl.TemplateKind.BASE
    assert tmpl.kind(text) is tmpl.TemplateKind.GO
