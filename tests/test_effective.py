"""The effective configuration: imports merged per containerd major, checked against the real binaries."""

from __future__ import annotations

import glob
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kwasm_py.containerd import effective
from kwasm_py.errors import ConflictError
from kwasm_py.model import CriSchema
from tests.harness.cli import Kwasm
from tests.harness.containerd import BINARIES, available
from tests.harness.noderoot import SYSTEMD, tree

V2_CRI = 'plugins."io.containerd.grpc.v1.cri"'
V3_CRI = 'plugins."io.containerd.cri.v1.runtime"'
V3_IMAGES = 'plugins."io.containerd.cri.v1.images"'


def _files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("@", str(root)))


def _resolve(root: Path, major: int) -> effective.Effective:
    """The prediction for root/main.toml, reading real files (absolute paths, no host root)."""

    def load(path: str) -> dict[str, Any] | None:
        try:
            return tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return None

    main = root / "main.toml"
    return effective.resolve(
        str(main),
        tomllib.loads(main.read_text()),
        major=major,
        expand=lambda pattern: sorted(glob.glob(pattern)),
        load=load,
    )


def _runtimes(data: dict[str, Any], major: int) -> set[str]:
    plugin = "io.containerd.grpc.v1.cri" if major < 2 else "io.containerd.cri.v1.runtime"
    cri = data.get("plugins", {}).get(plugin, {})
    return set(cri.get("containerd", {}).get("runtimes", {}))


def _mirrors(data: dict[str, Any], major: int) -> dict[str, Any]:
    plugin = "io.containerd.grpc.v1.cri" if major < 2 else "io.containerd.cri.v1.images"
    return dict(data.get("plugins", {}).get(plugin, {}).get("registry", {}).get("mirrors", {}))


def _dump(generation: str, root: Path) -> dict[str, Any]:
    out = subprocess.run(
        [str(BINARIES[generation] / "containerd"), "--config", str(root / "main.toml"), "config", "dump"],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return tomllib.loads(out.stdout)


def _cases(major: int) -> dict[str, dict[str, str]]:
    cri, images = (V2_CRI, V2_CRI) if major < 2 else (V3_CRI, V3_IMAGES)
    version = "version = 2\n" if major < 2 else "version = 3\n"
    main = (
        f'{version}imports = ["@/d/*.toml"]\n'
        f'[{cri}.containerd.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n'
        f'[{cri}.containerd.runtimes.spin]\n  runtime_type = "/opt/kwasm/bin/containerd-shim-spin-v2"\n'
        f'[{images}.registry.mirrors."main.example"]\n  endpoint = ["http://main"]\n'
    )
    registry = f'[{images}.registry.mirrors."r.example"]\nendpoint = ["http://imported"]\n'
    wasm = f'{version}[{cri}.containerd.runtimes.wasm]\nruntime_type = "io.containerd.wasm.v1"\n'
    return {
        "registry-import": {"main.toml": main, "d/a.toml": registry},
        "runtime-import-last": {"main.toml": main, "d/a.toml": registry, "d/b.toml": wasm},
        "runtime-import-first": {"main.toml": main, "d/0.toml": wasm, "d/a.toml": registry},
        "override-array": {
            "main.toml": main,
            "d/a.toml": f'[{images}.registry.mirrors."main.example"]\nendpoint = ["http://other"]\n',
        },
        "nested-relative": {
            "main.toml": main,
            "d/a.toml": f'{version}imports = ["../e/x.toml"]\n',
            "e/x.toml": wasm,
        },
        "no-cri-import": {
            "main.toml": main,
            "d/a.toml": f'{version}[plugins."io.containerd.internal.v1.opt"]\n  path = "@/opt"\n',
        },
    }


@pytest.mark.containerd
@pytest.mark.parametrize("generation", ["1.6", "2.x"])
@pytest.mark.parametrize("case", list(_cases(1)))
def test_merge_rules_match_the_real_containerd(generation: str, case: str, tmp_path: Path) -> None:
    """The predicted runtimes and registry mirrors equal what containerd's own `config dump` loads."""
    reason = available(generation)
    if reason:
        pytest.skip(reason)
    major = 1 if generation == "1.6" else 2
    _files(tmp_path, _cases(major)[case])
    predicted = _resolve(tmp_path, major).data
    dumped = _dump(generation, tmp_path)
    for handler in ("spin", "wasm"):
        assert (handler in _runtimes(predicted, major)) == (handler in _runtimes(dumped, major)), handler
    expected = {k: v["endpoint"] for k, v in _mirrors(predicted, major).items()}
    assert {k: v.get("endpoint") for k, v in _mirrors(dumped, major).items()} == expected


def test_1x_last_import_with_the_cri_plugin_wins(tmp_path: Path) -> None:
    """On 1.x an imported CRI table hides the main file's: the winner and the refusal name it."""
    _files(tmp_path, _cases(1)["runtime-import-last"])
    eff = _resolve(tmp_path, 1)
    main, b = str(tmp_path / "main.toml"), str(tmp_path / "d/b.toml")
    assert eff.contributors(CriSchema.V2.plugin_id) == (main, str(tmp_path / "d/a.toml"), b)
    won = eff.winner(CriSchema.V2.plugin_id)
    assert won is not None and won.path == b and won.imported_by == main
    assert f"from {b} (containerd 1.x uses the last file's table" in eff.describe(CriSchema.V2.plugin_id)
    assert _runtimes(eff.data, 1) == {"wasm"}
    with pytest.raises(ConflictError, match=f"{b} \\(imported by {main}\\)"):
        effective.check_takes_effect(eff, CriSchema.V2, edited=main)


def test_2x_merges_imports_deeply(tmp_path: Path) -> None:
    """On 2.x every contributor counts: no winner, no refusal, all runtimes kept."""
    _files(tmp_path, _cases(2)["runtime-import-last"])
    eff = _resolve(tmp_path, 2)
    assert eff.winner(CriSchema.V3.plugin_id) is None
    effective.check_takes_effect(eff, CriSchema.V3, edited=eff.main)
    assert _runtimes(eff.data, 2) == {"runc", "spin", "wasm"}
    assert "containerd 2.x merges them" in eff.describe(CriSchema.V3.plugin_id)


def test_import_without_cri_changes_nothing_on_1x(tmp_path: Path) -> None:
    """An import that only sets other plugins leaves the main file the CRI winner."""
    _files(tmp_path, _cases(1)["no-cri-import"])
    eff = _resolve(tmp_path, 1)
    effective.check_takes_effect(eff, CriSchema.V2, edited=eff.main)
    assert _runtimes(eff.data, 1) == {"runc", "spin"}
    assert len(eff.sources) == 2


def test_handler_in_an_import_is_named() -> None:
    """A handler another loaded file defines is refused with that file and its importer."""
    main = {"imports": ["/c/*.toml"]}
    other = {"plugins": {"io.containerd.grpc.v1.cri": {"containerd": {"runtimes": {"spin": {}}}}}}
    eff = effective.resolve("/m.toml", main, major=2, expand=lambda p: ["/c/x.toml"], load=lambda p: other)
    with pytest.raises(
        ConflictError, match=r"^/c/x.toml \(imported by /m.toml\) already defines runtime `spin`"
    ):
        effective.check_handlers(eff, ["spin"], edited="/m.toml")
    effective.check_handlers(eff, ["wasm"], edited="/m.toml")


def test_1x_relative_glob_is_from_the_working_directory() -> None:
    """containerd 1.6 globs a relative pattern from / (its cwd); a plain relative path from the file's dir."""
    asked: list[str] = []
    effective.resolve(
        "/etc/containerd/config.toml",
        {"imports": ["conf.d/*.toml", "extra.toml"]},
        major=1,
        expand=lambda p: asked.append(p) or [],
        load=lambda p: None,
    )
    assert asked == ["/conf.d/*.toml", "/etc/containerd/extra.toml"]


def test_each_file_is_loaded_once() -> None:
    """Import cycles end: a file already loaded is not loaded again."""
    loads: list[str] = []

    def load(path: str) -> dict[str, Any]:
        loads.append(path)
        return {"imports": ["/m.toml", "/a.toml"]}

    eff = effective.resolve("/m.toml", {"imports": ["/a.toml"]}, major=2, expand=lambda p: [p], load=load)
    assert loads == ["/a.toml"] and [s.path for s in eff.sources] == ["/m.toml", "/a.toml"]


def test_2x_decisions_read_the_imports(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """containerd 2.x merges an imported runc cgroup setting (as GPU toolkits write it), so our
    runtime follows it; the main file is the only one edited."""
    main = (
        'version = 3\nimports = ["/etc/containerd/conf.d/*.toml"]\n'
        f'[{V3_CRI}.containerd.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n'
    )
    dropin = f"version = 3\n[{V3_CRI}.containerd.runtimes.runc.options]\n  SystemdCgroup = true\n"
    root = tree(
        tmp_path / "root",
        {**SYSTEMD, "/etc/containerd/config.toml": main, "/etc/containerd/conf.d/99-gpu.toml": dropin},
    )
    args = ["node", "install", "--host-root", str(root), "--shim", str(shim), "--restart", "none"]
    r = kwasm(*args, "--mode", "edit")
    assert r.returncode == 0, r.stderr
    data = tomllib.loads((root / "etc/containerd/config.toml").read_text())
    spin = data["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["spin"]
    assert spin["options"] == {"SystemdCgroup": True}
    assert (root / "etc/containerd/conf.d/99-gpu.toml").read_text() == dropin
    assert kwasm("node", "uninstall", "--host-root", str(root), "--restart", "none").returncode == 0
    # auto: containerd 2.x reads conf.d and merges it deeply, so our runtime goes into a drop-in
    # of our own (still following the imported cgroup setting) and the main file stays as it is
    r = kwasm(*args)
    assert r.returncode == 0, r.stderr
    assert (root / "etc/containerd/config.toml").read_text() == main
    ours = tomllib.loads((root / "etc/containerd/conf.d/kwasm-py.toml").read_text())
    assert ours["version"] == 3
    spin = ours["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["spin"]
    assert spin["options"] == {"SystemdCgroup": True}


def test_k0s_generated_copy_of_our_drop_in_is_not_a_conflict(
    tmp_path: Path, shim: Path, kwasm: Kwasm
) -> None:
    """k0s merges CRI drop-ins into the /run/k0s/containerd-cri.toml it generates and imports:
    our own table there (our runtime_type) is no conflict on a re-run; a foreign one still is."""
    main = '# k0s_managed=true\nimports = ["/run/k0s/containerd-cri.toml"]\nversion = 2\n'
    unit = "[Service]\nExecStart=/usr/bin/k0s worker\n"
    files = {**SYSTEMD, "/etc/k0s/containerd.toml": main, "/etc/systemd/system/k0sworker.service": unit}
    root = tree(tmp_path / "root", files)
    base = ["node", "install", "--host-root", str(root), "--shim", str(shim), "--restart", "none"]
    assert kwasm(*base).returncode == 0
    generated = root / "run/k0s/containerd-cri.toml"
    generated.parent.mkdir(parents=True)
    ours = (root / "etc/k0s/containerd.d/kwasm-py.toml").read_text()
    generated.write_text(ours)  # what k0s renders from the drop-ins
    plan = ["node", "plan", *base[2:]]  # plan always reads every file (install may see a no-op first)
    r = kwasm(*plan)
    assert r.returncode == 0, r.stderr
    generated.write_text(ours.replace("/opt/kwasm/bin/containerd-shim-spin-v2", "io.containerd.spin.v2"))
    r = kwasm(*plan)
    assert (
        r.returncode == 1
        and "/run/k0s/containerd-cri.toml (imported by /etc/k0s/containerd.toml)" in r.stderr
    )


K3S_RENDERED_PATH = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"
K3S_RENDER = (
    'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
    '  runtime_type = "io.containerd.runc.v2"\n'
)


def test_k3s_render_carrying_our_table_is_ours(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """After k3s rendered our template block into config.toml, a re-plan sees our own table there
    (no conflict); a `spin` table k3s added itself (a shim on its PATH) is refused naming the file."""
    unit = "[Service]\nExecStart=/usr/local/bin/k3s server\n"
    files = {**SYSTEMD, K3S_RENDERED_PATH: K3S_RENDER, "/etc/systemd/system/k3s.service": unit}
    root = tree(tmp_path / "root", files)
    base = ["--host-root", str(root), "--shim", str(shim), "--restart", "none"]
    assert kwasm("node", "install", *base).returncode == 0
    rendered = root / K3S_RENDERED_PATH.lstrip("/")
    ours = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.spin]\n'
    rendered.write_text(K3S_RENDER + ours + '  runtime_type = "/opt/kwasm/shims/containerd-shim-spin-v2"\n')
    r = kwasm("node", "plan", *base)
    assert r.returncode == 0, r.stderr
    rendered.write_text(K3S_RENDER + ours + '  runtime_type = "/usr/bin/containerd-shim-spin-v2"\n')
    r = kwasm("node", "plan", *base)
    # the base-render check names the cause: k3s found that binary on its PATH
    assert r.returncode == 1 and f"{K3S_RENDERED_PATH} already has runtime `spin`" in r.stderr
    assert "/usr/bin/containerd-shim-spin-v2" in r.stderr and "PATH" in r.stderr
