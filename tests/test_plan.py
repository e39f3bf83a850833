"""plan.make_plan: pure decisions from what is on the node."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from kwasm_py.containerd import config as cc
from kwasm_py.errors import UsageError
from kwasm_py.model import ConfigKind, ContainerdVersion, Layout, RestartMethod, RestartSpec, ShimSpec
from kwasm_py.node import plan
from kwasm_py.node.state import ConfigRecord, RuntimeRecord, State

DEBIAN = (
    'version = 2\n\n[plugins]\n  [plugins."io.containerd.grpc.v1.cri"]\n'
    '    [plugins."io.containerd.grpc.v1.cri".cni]\n      bin_dir = "/usr/lib/cni"\n'
)
LAYOUT = Layout(
    name="containerd",
    config_path=PurePosixPath("/etc/containerd/config.toml"),
    kind=ConfigKind.CONFIG,
    restart=RestartSpec(RestartMethod.SYSTEMD, "containerd"),
    socket=PurePosixPath("/run/containerd/containerd.sock"),
)
SHIM = (ShimSpec(source="/src/containerd-shim-spin-v2", name="spin", handler="spin"), "ab" * 32)
C16, C21 = ContainerdVersion(1, 6, 20), ContainerdVersion(2, 1, 9)


def make(text: str | None, containerd: ContainerdVersion | None, state: State | None = None, **kw: object):
    return plan.make_plan(
        layout=kw.pop("layout", LAYOUT),  # type: ignore[arg-type]
        own_text=text,
        reference_text=kw.pop("reference", None),  # type: ignore[arg-type]
        containerd=containerd,
        shims=[SHIM],
        installed={},
        install_dir=PurePosixPath("/opt/kwasm"),
        state=state,
    )


def test_containerd1_keeps_its_default_runtime() -> None:
    """A config without runtimes gets runc next to spin on containerd 1.x, not on 2.x."""
    p = make(DEBIAN, C16)
    data = cc.load(p.new_text, source="t").data
    runtimes = data["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert set(runtimes) == {"runc", "spin"}
    assert p.companion == {"handler": "runc", "table": {"runtime_type": "io.containerd.runc.v2"}}
    assert any("default runtime" in n for n in p.notes)
    assert make(DEBIAN, C21).companion is None


def test_owned_companion_is_not_added_twice() -> None:
    """On a re-run the runc table we added is recognised from the state file."""
    first = make(DEBIAN, C16)
    state = State(
        status="installed",
        layout="containerd",
        config=ConfigRecord(
            path=str(LAYOUT.config_path),
            kind="config",
            created=False,
            original_sha256="x",
            written_sha256="y",
            backup=None,
            schema=cc.CriSchema.V2.value,
        ),
        runtimes=(
            RuntimeRecord(
                handler="spin",
                name="spin",
                runtime_type="/opt/kwasm/bin/containerd-shim-spin-v2",
                shim="/opt/kwasm/bin/containerd-shim-spin-v2",
                sha256="ab" * 32,
                table={"runtime_type": "/opt/kwasm/bin/containerd-shim-spin-v2"},
            ),
        ),
        companion=first.companion,
    )
    again = make(first.new_text, C16, state)
    assert not again.config_changed and again.companion == first.companion


def test_k3s_template_with_rendered_runc_needs_no_companion() -> None:
    """The rendered k3s config has runc, so only spin goes into the template."""
    k3s = Layout(
        name="k3s",
        config_path=PurePosixPath("/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl"),
        kind=ConfigKind.TEMPLATE,
        restart=RestartSpec(RestartMethod.SYSTEMD, "k3s"),
        socket=PurePosixPath("/run/k3s/containerd/containerd.sock"),
        rendered_path=PurePosixPath("/var/lib/rancher/k3s/agent/etc/containerd/config.toml"),
    )
    rendered = (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n  runtime_type = "x"\n'
    )
    p = make(None, C16, layout=k3s, reference=rendered)
    assert p.companion is None and p.new_text.startswith(plan.BASE_TEMPLATE)
    assert p.old_text is None and p.config_changed


def test_shim_names_and_duplicate_handlers() -> None:
    """Shim file names give the runtime name; two shims on one handler are refused."""
    assert plan.shim_name("/x/containerd-shim-spin-v2") == "spin"
    assert plan.shim_name("containerd-shim-wasm-time-v2") == "wasm-time"
    with pytest.raises(UsageError):
        plan.shim_name("/x/spin")
    with pytest.raises(UsageError, match="two shims want handler"):
        plan.make_plan(
            layout=LAYOUT,
            own_text=DEBIAN,
            reference_text=None,
            containerd=C21,
            shims=[SHIM, SHIM],
            installed={},
            install_dir=PurePosixPath("/opt/kwasm"),
            state=None,
        )
