"""Raw templates of other tools where containerd's config should be (pure): recognised, refused."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from kwasm_py.containerd import foreign
from kwasm_py.errors import ConfigError
from kwasm_py.model import ConfigKind, ContainerdVersion, Layout, RestartMethod, RestartSpec, ShimSpec
from kwasm_py.node import plan
from tests.harness.containerd import SHARED_CONFIGS

LAYOUT = Layout(
    name="containerd",
    config_path=PurePosixPath("/etc/containerd/config.toml"),
    kind=ConfigKind.CONFIG,
    restart=RestartSpec(RestartMethod.SYSTEMD, "containerd"),
    socket=PurePosixPath("/run/containerd/containerd.sock"),
)
SHIM = (ShimSpec(source="/src/containerd-shim-spin-v2", name="spin", handler="spin"), "ab" * 32)
#: name: (text shaped after each tool's template, language, tool, first action's line)
RAW = {
    "agentbaker": (
        'version = 2\noom_score = -999{{if getHasDataDir .KubeletConfig}}\nroot = "/d"{{- end}}\n',
        "Go",
        "AKS AgentBaker",
        2,
    ),
    "nodeadm": (
        "version = 3\n[plugins.'io.containerd.cri.v1.images']\n{{- if .UseSOCISnapshotter}}\n"
        'snapshotter = "soci"\n{{- end}}\n[x]\nsandbox = "{{.SandboxImage}}"\n',
        "Go",
        "EKS nodeadm",
        3,
    ),
    "bottlerocket": (
        'version = 2\nsandbox_image = "{{settings.kubernetes.pod-infra-container-image}}"\n'
        "{{#if settings.container-runtime.max-concurrent-downloads}}\n"
        "max_concurrent_downloads = 3\n{{/if}}\n",
        "Handlebars",
        "Bottlerocket",
        2,
    ),
    "unknown-go": ('{{/* a Go comment, not Handlebars */}}\n{{ template "base" . }}\n', "Go", "", 1),
}


@pytest.mark.parametrize("name", sorted(RAW))
def test_raw_templates_are_recognised_with_their_tool(name: str) -> None:
    """Language, tool (by names only its templates use) and the first action's line."""
    text, language, tool, line = RAW[name]
    raw = foreign.recognise(text)
    assert raw is not None
    assert (raw.language, raw.tool, raw.line) == (language, tool, line)
    assert raw.route == (
        foreign.GENERIC_ROUTE if not tool else next(o.route for o in foreign.ORIGINS if o.tool == tool)
    )


def test_configs_are_not_raw_templates() -> None:
    """No action, or TOML as a whole (strings holding `{{`): a config, whatever it says."""
    assert foreign.recognise('version = 2\n[a]\nb = "{{ .NotAnAction }}"\n') is None
    assert foreign.recognise("version = 3\n") is None
    if SHARED_CONFIGS.is_dir():  # every shipped config that parses is no template
        for path in SHARED_CONFIGS.glob("*.toml"):
            assert foreign.recognise(path.read_text()) is None, path.name


@pytest.mark.parametrize("name", sorted(RAW))
def test_plan_refuses_a_raw_template_in_place_of_the_config(name: str) -> None:
    """Where containerd reads the file as it is, a raw template is refused naming what it is and
    the tool's own route: not "start containerd so it renders it", not --config, not a version."""
    text, language, tool, line = RAW[name]
    with pytest.raises(ConfigError) as info:
        plan.make_plan(
            layout=LAYOUT,
            own_text=text,
            reference_text=None,
            containerd=ContainerdVersion(2, 1, 9),
            shims=[SHIM],
            installed={},
            install_dir=PurePosixPath("/opt/kwasm"),
            state=None,
        )
    of = f" of {tool}" if tool else ""
    assert info.value.message.startswith(
        f"/etc/containerd/config.toml is a raw {language} template{of}, not TOML"
    )
    assert f"(line {line}: {{{{" in info.value.message
    hint = info.value.hint
    assert "start containerd" not in hint and "--config" not in hint and "version" not in hint
