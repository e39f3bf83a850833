"""k0s's containerd config step (harness.k0s_render) and the engine's prediction of it
(`dropin.k0s_render_after`), which pre-flight has containerd read for a k0s node."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from kwasm_py.containerd import dropin
from kwasm_py.errors import KwasmError
from tests.harness import k0s_render
from tests.harness.containerd import SHARED_CONFIGS

SHIPPED = SHARED_CONFIGS / "k0s-v1.35.7-containerd.toml"
RUNC = {"runc": {"runtime_type": "io.containerd.runc.v2"}}
DEFAULT = {"sandbox_image": "pause:3.9", "containerd": {"runtimes": RUNC}}
OURS = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.spin]\nruntime_type = "/opt/spin"\n'


def _node(tmp_path: Path, config: str) -> Path:
    (tmp_path / "etc/k0s/containerd.d").mkdir(parents=True)
    (tmp_path / k0s_render.CONFIG).write_text(config)
    return tmp_path


def test_no_dropins_renders_the_shipped_file_byte_for_byte(tmp_path: Path) -> None:
    root = _node(tmp_path, "# k0s_managed=true\n")
    assert k0s_render.render(root, DEFAULT)
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} is absent")
    assert (root / k0s_render.CONFIG).read_bytes() == SHIPPED.read_bytes()
    cri = tomllib.loads((root / "run/k0s/containerd-cri.toml").read_text())
    assert cri == {"version": 2, "plugins": {k0s_render.CRI: DEFAULT}}


def test_cri_dropins_merge_in_glob_order_and_others_are_imported(tmp_path: Path) -> None:
    root = _node(tmp_path, k0s_render.HEADER)
    d = root / "etc/k0s/containerd.d"
    (d / "b.toml").write_text(OURS)
    (d / "a.toml").write_text('[plugins."io.containerd.grpc.v1.cri"]\nsandbox_image = "mine:1"\n')
    (d / "c.toml").write_text('[plugins."io.containerd.internal.v1.opt"]\npath = "/x"\n')
    k0s_render.render(root, DEFAULT)
    cri = tomllib.loads((root / "run/k0s/containerd-cri.toml").read_text())["plugins"][k0s_render.CRI]
    assert cri["sandbox_image"] == "mine:1"
    assert set(cri["containerd"]["runtimes"]) == {"runc", "spin"}
    main = tomllib.loads((root / k0s_render.CONFIG).read_text())
    assert main["imports"] == ["/etc/k0s/containerd.d/c.toml", "/run/k0s/containerd-cri.toml"]


def test_user_managed_config_is_left_alone(tmp_path: Path) -> None:
    root = _node(tmp_path, "version = 2\n")
    assert not k0s_render.render(root, DEFAULT)
    assert (root / k0s_render.CONFIG).read_text() == "version = 2\n"
    assert not (root / "run").exists()


def test_engine_prediction_equals_the_stand_in(tmp_path: Path) -> None:
    root = _node(tmp_path, k0s_render.HEADER)
    k0s_render.render(root, DEFAULT)
    today = (root / "run/k0s/containerd-cri.toml").read_text()
    predicted = dropin.k0s_render_after(today, OURS, source="kwasm-py.toml")
    (root / "etc/k0s/containerd.d/kwasm-py.toml").write_text(OURS)
    k0s_render.render(root, DEFAULT)
    assert tomllib.loads(predicted) == tomllib.loads((root / "run/k0s/containerd-cri.toml").read_text())


def test_engine_prediction_refuses_a_broken_dropin() -> None:
    with pytest.raises(KwasmError, match=r"kwasm-py\.toml"):
        dropin.k0s_render_after("version = 2\n", "[plugins\n", source="kwasm-py.toml")
