"""Ownership that survives other tools: our keys, today's files, fresh pre-images (issue 11, item 4)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from kwasm_py.node import ownership
from kwasm_py.node.state import ConfigRecord, RuntimeRecord, State
from tests.harness.cli import Kwasm, run_kwasm
from tests.harness.containerd import PrivateContainerd, fake_shim
from tests.harness.noderoot import SYSTEMD, UNIT, V2, tree, tree_hash

CONFIG = "etc/containerd/config.toml"
SPIN = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.spin]'
EKS_TEMPLATE = (
    "version = 2\n"
    'root = "/var/lib/containerd"\n'
    '[plugins."io.containerd.grpc.v1.cri"]\n'
    'sandbox_image = "PAUSE"\n'
    '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
    'default_runtime_name = "runc"\n'
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
    'runtime_type = "io.containerd.runc.v2"\n'
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
    "SystemdCgroup = true\n"
)


def eks_node(tmp_path: Path, pause: str) -> Path:
    return tree(
        tmp_path / "root",
        {
            **SYSTEMD,
            "/" + CONFIG: EKS_TEMPLATE.replace("PAUSE", pause),
            "/lib/systemd/system/containerd.service": UNIT,
            "/var/lib/containerd/": "",
            "/run/containerd/": "",
            "/opt/": "",  # every Debian root has it; ours is /opt/kwasm
        },
    )


def node_args(root: Path, *extra: str) -> list[str]:
    return ["--host-root", str(root), "--restart", "none", *extra]


def test_uninstall_after_regeneration_leaves_todays_file(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """Install, the bootstrap regenerates the config, re-install, uninstall: the regenerated file
    comes back byte for byte (not the stale first backup), and nothing of ours stays anywhere."""
    root = eks_node(tmp_path, "pause:3.5")
    assert kwasm("node", "install", *node_args(root, "--shim", str(shim))).returncode == 0
    regenerated = EKS_TEMPLATE.replace("PAUSE", "pause:3.10")
    (root / CONFIG).write_text(regenerated)  # the node's bootstrap, at the next boot
    after_boot = tree_hash(root)
    r = kwasm("node", "install", *node_args(root, "--shim", str(shim)), "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["changed"] is True, r.stderr
    assert SPIN in (root / CONFIG).read_text()
    backup = json.loads((root / "opt/kwasm/kwasm-state.json").read_text())["config"]["backup"]
    assert (root / backup.lstrip("/")).read_text() == regenerated, "a fresh pre-image for the new file"
    r = kwasm("node", "uninstall", *node_args(root))
    assert r.returncode == 0, r.stderr
    assert (root / CONFIG).read_text() == regenerated
    after = tree_hash(root)
    assert not [p for p in after if p.startswith("opt/")], "nothing of ours under the install dir"
    assert after == {k: v for k, v in after_boot.items() if not k.startswith("opt/")}


def test_edit_after_regeneration_is_removed_by_key(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """Regenerated, re-installed, then someone edits another key: uninstall removes only our
    table from today's file and keeps their edit."""
    root = eks_node(tmp_path, "pause:3.5")
    assert kwasm("node", "install", *node_args(root, "--shim", str(shim))).returncode == 0
    regenerated = EKS_TEMPLATE.replace("PAUSE", "pause:3.10")
    (root / CONFIG).write_text(regenerated)
    assert kwasm("node", "install", *node_args(root, "--shim", str(shim))).returncode == 0
    edited = (root / CONFIG).read_text().replace('root = "/var/lib/containerd"', 'root = "/data/containerd"')
    (root / CONFIG).write_text(edited)
    assert kwasm("node", "uninstall", *node_args(root)).returncode == 0
    assert (root / CONFIG).read_text() == regenerated.replace("/var/lib/containerd", "/data/containerd")


def dumped(text: str, runtime_type: str) -> str:
    """What writing `containerd config dump` back does to our table: every default key added."""
    return text.replace(
        f'runtime_type = "{runtime_type}"',
        f'runtime_type = "{runtime_type}"\n  runtime_path = ""\n  pod_annotations = []\n'
        '  privileged_without_host_devices = false\n  base_runtime_spec = ""',
    )


def test_our_runtime_is_ours_after_a_dump_rewrite(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """A table with our runtime_type and extra default keys is still ours: re-install writes
    nothing, uninstall removes it and keeps the rest of the rewritten file."""
    root = tree(tmp_path / "root", {**SYSTEMD, "/" + CONFIG: V2})
    assert kwasm("node", "install", *node_args(root, "--shim", str(shim))).returncode == 0
    ours = "/opt/kwasm/bin/containerd-shim-spin-v2"
    rewritten = dumped((root / CONFIG).read_text(), ours).replace("version = 2", "version = 2\noom_score = 0")
    (root / CONFIG).write_text(rewritten)
    mtime = (root / CONFIG).stat().st_mtime_ns
    r = kwasm("node", "install", *node_args(root, "--shim", str(shim)), "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["changed"] is False and (root / CONFIG).stat().st_mtime_ns == mtime
    status = kwasm("node", "status", "--host-root", str(root), "-o", "json")
    assert json.loads(status.stdout)["drift"] == []
    assert kwasm("node", "uninstall", *node_args(root)).returncode == 0
    left = (root / CONFIG).read_text()
    assert "spin" not in left and "oom_score = 0" in left and "runtimes.runc" in left
    assert not (root / "opt").exists() or not any((root / "opt").rglob("*"))


def test_a_table_someone_else_rewrote_is_left_in_place(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """Another tool points `spin` at its own shim after us: uninstall keeps their table and says so."""
    root = tree(tmp_path / "root", {**SYSTEMD, "/" + CONFIG: V2})
    assert kwasm("node", "install", *node_args(root, "--shim", str(shim))).returncode == 0
    ours = "/opt/kwasm/bin/containerd-shim-spin-v2"
    theirs = (root / CONFIG).read_text().replace(ours, "io.containerd.spin.v2")
    (root / CONFIG).write_text(theirs)
    r = kwasm("node", "uninstall", *node_args(root))
    assert r.returncode == 0, r.stderr
    assert "no longer the one kwasm-py added" in r.stdout + r.stderr
    assert (root / CONFIG).read_text() == theirs
    assert not (root / "opt/kwasm").exists()


def test_force_gives_back_the_foreign_table_in_todays_file(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """--force records their table; after a later edit elsewhere, uninstall puts theirs back and
    keeps the edit (no runtime or default runtime of theirs lost)."""
    foreign = f'{SPIN}\n  runtime_type = "io.containerd.spin.v2"\n'
    root = tree(tmp_path / "root", {**SYSTEMD, "/" + CONFIG: V2 + foreign})
    assert kwasm("node", "install", *node_args(root, "--shim", str(shim), "--force")).returncode == 0
    text = (root / CONFIG).read_text()
    assert "io.containerd.spin.v2" not in text
    (root / CONFIG).write_text("# edited later\n" + text)
    assert kwasm("node", "uninstall", *node_args(root)).returncode == 0
    final = (root / CONFIG).read_text()
    assert final.startswith("# edited later\n") and 'runtime_type = "io.containerd.spin.v2"' in final
    assert "runtimes.runc]" in final and "/opt/kwasm" not in final


def test_1x_import_that_hides_the_cri_table_is_refused(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """Field case 02's kind: an imported registry file replaces the CRI plugin on containerd 1.x;
    plan and install refuse naming it, and no byte under the root changes (/opt, /run included)."""
    main = 'version = 2\nimports = ["/etc/containerd/config.d/*.toml"]\n' + V2.split("\n", 1)[1]
    registry = '[plugins."io.containerd.grpc.v1.cri".registry.mirrors."r.example"]\nendpoint = ["http://r"]\n'
    root = tree(
        tmp_path / "root",
        {**SYSTEMD, "/" + CONFIG: main, "/etc/containerd/config.d/registries.toml": registry, "/run/x/": ""},
    )
    before = tree_hash(root)
    for command in ("plan", "install"):
        r = kwasm("node", command, *node_args(root, "--shim", str(shim)))
        assert r.returncode == 1, r.stdout
        imported = "/etc/containerd/config.d/registries.toml (imported by /etc/containerd/config.toml)"
        assert imported in r.stderr
        assert "--config" not in r.stderr
    assert tree_hash(root) == before


def test_plan_names_the_files_that_set_the_cri_plugin(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """With imports that do not touch the CRI plugin, plan lists what containerd loads and the winner."""
    main = 'version = 2\nimports = ["/etc/containerd/config.d/*.toml"]\n' + V2.split("\n", 1)[1]
    other = '[plugins."io.containerd.internal.v1.opt"]\npath = "/opt/containerd"\n'
    files = {**SYSTEMD, "/" + CONFIG: main, "/etc/containerd/config.d/opt.toml": other}
    root = tree(tmp_path / "root", files)
    r = kwasm("node", "plan", *node_args(root, "--shim", str(shim)), "-o", "json")
    assert r.returncode == 0, r.stderr
    notes = json.loads(r.stdout)["notes"]
    assert "containerd loads /etc/containerd/config.toml, /etc/containerd/config.d/opt.toml" in notes
    winner = "plugin io.containerd.grpc.v1.cri from /etc/containerd/config.toml"
    assert any(n.startswith(winner) for n in notes)


# -- against real containerd -------------------------------------------------------------------


def _install(ctd: PrivateContainerd, shim: Path, *extra: str) -> dict[str, object]:
    r = run_kwasm("node", "install", *ctd.node_args(), "--shim", str(shim), "-o", "json", *extra)
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


@pytest.mark.containerd
@pytest.mark.root
def test_real_dump_rewrite_keeps_ownership(ctd: PrivateContainerd) -> None:
    """The config replaced by containerd's own `config dump`: re-install changes nothing and does
    not restart; uninstall removes only our table from the dumped file and containerd drops it."""
    shim = fake_shim(ctd.dir / "src")
    _install(ctd, shim)
    dump = ctd.config_dump()
    assert dump.returncode == 0, dump.stderr
    ctd.config.write_text(dump.stdout)
    running = ctd.daemon()
    out = _install(ctd, shim)
    assert (out["changed"], out["restarted"]) == (False, False) and ctd.daemon() == running
    args = [a for a in ctd.node_args() if a not in ("--config", str(ctd.config))]
    r = run_kwasm("node", "uninstall", *args, "-o", "json")
    assert r.returncode == 0, r.stderr
    left = ctd.config.read_text()
    assert "runtimes.spin" not in left.replace("'", '"') and len(left) > len(dump.stdout) / 2
    assert "spin" not in ctd.cri_status().runtimes and ctd.cri_status().runtime_ready
    assert not (ctd.dir / "kwasm").exists()


# -- the installed set follows the request (issue 11, item 5) -----------------------------------


def test_smaller_shim_set_removes_the_rest(tmp_path: Path, shim: Path, kwasm: Kwasm) -> None:
    """spin + wasmtime, then spin alone: wasmtime's table, binary and state entry go; then
    uninstall leaves the node as it was, /opt, /run and /var/lib included."""
    root = eks_node(tmp_path, "pause:3.5")
    before = tree_hash(root)
    wasmtime = fake_shim(tmp_path / "shims", "wasmtime")
    both = ("--shim", str(shim), "--shim", str(wasmtime))
    assert kwasm("node", "install", *node_args(root, *both)).returncode == 0
    assert (root / "opt/kwasm/bin/containerd-shim-wasmtime-v2").exists()
    with_both = (root / CONFIG).read_text()
    assert "runtimes.wasmtime]" in with_both
    r = kwasm("node", "plan", *node_args(root, "--shim", str(shim)))
    assert (
        r.returncode == 0
        and '-[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.wasmtime]' in r.stdout
    )
    assert "removing runtime wasmtime" in r.stdout
    r = kwasm("node", "install", *node_args(root, "--shim", str(shim)), "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["changed"] is True
    config = (root / CONFIG).read_text()
    assert "wasmtime" not in config and "runtimes.spin]" in config
    assert not (root / "opt/kwasm/bin/containerd-shim-wasmtime-v2").exists()
    assert (root / "opt/kwasm/bin/containerd-shim-spin-v2").exists()
    state = json.loads((root / "opt/kwasm/kwasm-state.json").read_text())
    assert [r["handler"] for r in state["runtimes"]] == ["spin"] and state["status"] == "installed"
    r = kwasm("node", "install", *node_args(root, "--shim", str(shim)), "-o", "json")
    assert json.loads(r.stdout)["changed"] is False
    assert kwasm("node", "uninstall", *node_args(root)).returncode == 0
    assert tree_hash(root) == before


def _boots(ctd: PrivateContainerd) -> int:
    return ctd.log.read_text().count("containerd successfully booted")


@pytest.mark.containerd
@pytest.mark.root
def test_real_smaller_shim_set_one_restart(ctd: PrivateContainerd) -> None:
    """On real containerd: dropping wasmtime from the request restarts containerd once, after
    which it lists spin and not wasmtime; uninstall leaves nothing under the install dir."""
    spin, wasmtime = fake_shim(ctd.dir / "src"), fake_shim(ctd.dir / "src", "wasmtime")
    original = ctd.config.read_bytes()
    _install(ctd, spin, "--shim", str(wasmtime))
    status = ctd.cri_status().runtimes
    assert "spin" in status and "wasmtime" in status
    boots = _boots(ctd)
    out = _install(ctd, spin)
    assert out["restarted"] is True and _boots(ctd) == boots + 1
    status = ctd.cri_status().runtimes
    assert (
        status.get("spin") == str(ctd.dir / "kwasm/bin/containerd-shim-spin-v2") and "wasmtime" not in status
    )
    assert sorted(p.name for p in (ctd.dir / "kwasm/bin").iterdir()) == ["containerd-shim-spin-v2"]
    args = [a for a in ctd.node_args() if a not in ("--config", str(ctd.config))]
    assert run_kwasm("node", "uninstall", *args).returncode == 0
    assert ctd.config.read_bytes() == original and not (ctd.dir / "kwasm").exists()


# -- the pure rules -------------------------------------------------------------------------------


def _record(
    handler: str = "spin", runtime_type: str = "/opt/kwasm/bin/containerd-shim-spin-v2"
) -> RuntimeRecord:
    return RuntimeRecord(
        handler=handler,
        name=handler,
        runtime_type=runtime_type,
        shim=runtime_type,
        sha256="0" * 64,
        table={"runtime_type": runtime_type},
    )


def _state(text: str, *records: RuntimeRecord) -> State:
    config = ConfigRecord(
        path="/etc/containerd/config.toml",
        kind="config",
        created=False,
        original_sha256=None,
        written_sha256=hashlib.sha256(text.encode()).hexdigest(),
        backup=None,
        schema="io.containerd.grpc.v1.cri",
    )
    return State(status="installed", layout="containerd", config=config, runtimes=records)


def test_is_ours_needs_our_runtime_type_under_the_install_dir() -> None:
    """Extra keys do not matter; another runtime_type, or one outside the install dir, is not ours."""
    install = PurePosixPath("/opt/kwasm")
    ours = _record()
    assert ownership.is_ours(
        {"runtime_type": ours.runtime_type, "runtime_path": ""}, ours, install_dir=install
    )
    assert not ownership.is_ours({"runtime_type": "io.containerd.spin.v2"}, ours, install_dir=install)
    assert not ownership.is_ours(None, ours, install_dir=install)
    outside = _record(runtime_type="/usr/bin/containerd-shim-spin-v2")
    assert not ownership.is_ours({"runtime_type": outside.runtime_type}, outside, install_dir=install)


def test_rebase_forgets_file_facts_of_a_regenerated_file() -> None:
    """A changed file keeps our runtimes but not the version line or companion we added to the old one."""
    state = replace(_state(V2, _record()), companion={"handler": "runc", "table": {}})
    state = replace(state, config=replace(state.config, version_added=True))
    same = ownership.rebase(state, state.config.path, state.config.written_sha256)
    assert same is state
    other = ownership.rebase(state, state.config.path, "f" * 64)
    assert other is not None and other.companion is None and not other.config.version_added
    assert other.runtimes == state.runtimes


def test_remove_ours_keeps_foreign_tables_and_their_edits() -> None:
    """Only the tables still ours go; a rewritten one stays with a note; other edits stay."""
    spin, wasm = _record(), _record("wasmtime", "/opt/kwasm/bin/containerd-shim-wasmtime-v2")
    text = (
        V2
        + f'{SPIN}\n  runtime_type = "{spin.runtime_type}"\n  runtime_path = ""\n'
        + '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.wasmtime]\n'
        + '  runtime_type = "io.containerd.wasmtime.v1"\n'
    )
    state = _state("not this text", spin, wasm)
    new, notes = ownership.remove_ours(
        ("# theirs\n" + text).encode(),
        state,
        [spin, wasm],
        keep=False,
        install_dir=PurePosixPath("/opt/kwasm"),
    )
    assert new is not None
    left = new.decode()
    assert left.startswith("# theirs\n") and "runtimes.spin]" not in left
    assert 'runtime_type = "io.containerd.wasmtime.v1"' in left
    assert len(notes) == 1 and "wasmtime" in notes[0]


def test_drop_unrequested_removes_only_what_is_not_asked_for() -> None:
    """Asked for spin alone: wasmtime's table goes, spin's stays, the dropped record is returned."""
    spin, wasm = _record(), _record("wasmtime", "/opt/kwasm/bin/containerd-shim-wasmtime-v2")
    text = (
        V2
        + f'{SPIN}\n  runtime_type = "{spin.runtime_type}"\n'
        + '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.wasmtime]\n'
        + f'  runtime_type = "{wasm.runtime_type}"\n'
    )
    state = _state(text, spin, wasm)
    new, dropped, notes = ownership.drop_unrequested(
        text, state, path=state.config.path, handlers={"spin"}, install_dir=PurePosixPath("/opt/kwasm")
    )
    assert dropped == (wasm,) and "wasmtime" not in new and "runtimes.spin]" in new
    assert notes == (f"removing runtime wasmtime and {wasm.shim}: no longer asked for",)
    same = ownership.drop_unrequested(
        text, state, path=state.config.path, handlers={"spin", "wasmtime"}, install_dir=PurePosixPath("/opt")
    )
    assert same == (text, (), ())


@pytest.mark.parametrize("step", ["state", "binary", "config"])
def test_smaller_set_killed_midway_converges(tmp_path: Path, shim: Path, kwasm: Kwasm, step: str) -> None:
    """SIGKILL while dropping wasmtime: the next run finishes it (no wasmtime table, binary or
    state entry), and uninstall leaves the node as it was."""
    root = eks_node(tmp_path, "pause:3.5")
    before = tree_hash(root)
    wasmtime = fake_shim(tmp_path / "shims", "wasmtime")
    assert (
        kwasm("node", "install", *node_args(root, "--shim", str(shim), "--shim", str(wasmtime))).returncode
        == 0
    )
    r = kwasm("node", "install", *node_args(root, "--shim", str(shim)), env={"KWASM_TEST_KILL_AT": step})
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert kwasm("node", "install", *node_args(root, "--shim", str(shim))).returncode == 0
    state = json.loads((root / "opt/kwasm/kwasm-state.json").read_text())
    assert [x["handler"] for x in state["runtimes"]] == ["spin"]
    assert "wasmtime" not in (root / CONFIG).read_text()
    assert not (root / "opt/kwasm/bin/containerd-shim-wasmtime-v2").exists()
    assert kwasm("node", "uninstall", *node_args(root)).returncode == 0
    assert tree_hash(root) == before
