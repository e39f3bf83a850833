"""The node engine against real containerd daemons (1.6 from bookworm, 2.x from sid).

containerd itself is asked whether the runtime is registered (CRI Status, `config dump`), and a
CRI RunPodSandbox with handler `spin` must reach the installed shim binary: the shim's own log
proves it. Private daemons only: nothing here touches this machine's containerd.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from kwasm_py.containerd import tomlscan
from tests.harness.cli import Kwasm, run_kwasm, start_kwasm
from tests.harness.containerd import PrivateContainerd, fake_shim
from tests.harness.cri_client import run_pod
from tests.harness.noderoot import tree_diff, tree_hash
from tests.harness.ocitar import busybox_oci

pytestmark = [pytest.mark.containerd, pytest.mark.root]
#: Files a running private containerd rewrites by itself (paths relative to PrivateContainerd.dir).
CONTAINERD_WRITES = {"lib/io.containerd.metadata.v1.bolt/meta.db", "containerd.log"}


def install(ctd: PrivateContainerd, shim: Path, *extra: str, env: dict[str, str] | None = None):
    return run_kwasm("node", "install", *ctd.node_args(), "--shim", str(shim), "-o", "json", *extra, env=env)


def uninstall(ctd: PrivateContainerd, *extra: str, env: dict[str, str] | None = None):
    args = [a for a in ctd.node_args() if a not in ("--config", str(ctd.config))]
    return run_kwasm("node", "uninstall", *args, "-o", "json", *extra, env=env)


def installed_path(ctd: PrivateContainerd) -> str:
    return str(ctd.dir / "kwasm" / "bin" / "containerd-shim-spin-v2")


def test_install_registers_runtime_and_pods_reach_the_shim(ctd: PrivateContainerd, kwasm: Kwasm) -> None:
    """install -> containerd lists spin with our runtime_type, and a spin pod starts our binary."""
    shim_log = ctd.dir / "shim-calls.log"
    shim = fake_shim(ctd.dir / "src", log=shim_log)
    before = ctd.daemon()
    r = install(ctd, shim)
    assert r.returncode == 0, r.stderr + ctd.log_tail()
    out = json.loads(r.stdout)
    assert (out["changed"], out["restarted"], out["verified"]) == (True, True, True)
    assert ctd.daemon() != before, "containerd was restarted"

    status = ctd.cri_status()
    assert status.runtime_ready
    assert status.runtimes["spin"] == installed_path(ctd)
    dump = ctd.config_dump()
    assert dump.returncode == 0, dump.stderr
    dumped = tomllib.loads(dump.stdout)
    plugin = "io.containerd.cri.v1.runtime" if ctd.generation == "2.x" else "io.containerd.grpc.v1.cri"
    assert dumped["plugins"][plugin]["containerd"]["runtimes"]["spin"]["runtime_type"] == installed_path(ctd)

    image = busybox_oci(ctd.dir / "bb.tar")
    if image is None:
        pytest.skip("busybox-static is not installed (needed for the CRI sandbox image)")
    ctr = ctd.bin / "ctr"
    imported = subprocess.run(
        [str(ctr), "--address", str(ctd.socket), "-n", "k8s.io", "image", "import", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    ok, detail = run_pod(str(ctd.socket), "spin")
    assert not ok and "exit status 3" in detail, detail
    calls = shim_log.read_text()
    assert f"argv0={installed_path(ctd)}" in calls, calls
    assert "arg=start" in calls
    ok, detail = run_pod(str(ctd.socket), "nosuch", name="p2")
    assert not ok and 'no runtime for "nosuch" is configured' in detail


def test_rerun_is_a_noop_and_uninstall_restores(ctd: PrivateContainerd) -> None:
    """Second run: no write, no restart. Uninstall: original bytes, runtime gone, containerd up."""
    original = ctd.config.read_bytes()
    shim = fake_shim(ctd.dir / "src")
    assert install(ctd, shim).returncode == 0
    running, mtime = ctd.daemon(), ctd.config.stat().st_mtime_ns
    r = install(ctd, shim)
    out = json.loads(r.stdout)
    assert r.returncode == 0 and (out["changed"], out["restarted"]) == (False, False)
    assert ctd.daemon() == running and ctd.config.stat().st_mtime_ns == mtime

    r = install(ctd, shim, "--verify")
    out = json.loads(r.stdout)
    assert (out["changed"], out["restarted"], out["verified"]) == (False, False, True)
    assert ctd.daemon() == running

    r = uninstall(ctd)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["restarted"] is True
    assert ctd.config.read_bytes() == original
    status = ctd.cri_status()
    assert status.runtime_ready and "spin" not in status.runtimes
    assert not (ctd.dir / "kwasm").exists(), "state, backups and binaries are all gone"


def test_node_commands_load_the_node_area_alone(ctd16: PrivateContainerd) -> None:
    """`kwasm-py node install` and `uninstall` (the agent runs one per engine call) import the
    node area of the CLI alone: `-X importtime` lists neither rich nor typer's rich formatting,
    nor the other areas (grpcio, for the CRI calls, is the one heavy import they need); and the
    result the process printed before its os._exit is whole."""
    unwanted = ("rich", "typer.rich_utils", "kwasm_py.cli.cluster", "kwasm_py.sandbox", "kubernetes")
    shim = fake_shim(ctd16.dir / "src")
    profile = {"PYTHONPROFILEIMPORTTIME": "1"}
    for run in (lambda: install(ctd16, shim, env=profile), lambda: uninstall(ctd16, env=profile)):
        r = run()
        assert r.returncode == 0, r.stderr[-2000:] + ctd16.log_tail()
        assert json.loads(r.stdout)["verified"] is True
        imported = {
            line.rsplit("|", 1)[1].strip()
            for line in r.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert {"kwasm_py.cli.node", "grpc"} <= imported  # the profile is read
        assert sorted(m for m in imported if m.split(".")[0] in unwanted or m.startswith(unwanted)) == []


def test_containerd16_refuses_a_version3_config() -> None:
    """containerd 1.6 silently ignores a version = 3 file: refuse instead of 'succeeding'."""
    from tests.harness.containerd import available

    if available("1.6"):
        pytest.skip(available("1.6"))
    v3 = PrivateContainerd("1.6", version=3)
    try:
        v3.start()
        assert "spin" not in v3.cri_status().runtimes
        before_files, running = tree_hash(v3.dir), v3.daemon()
        r = install(v3, fake_shim(v3.dir.parent / (v3.dir.name + "-src")))
        assert r.returncode == 1
        out = json.loads(r.stdout)
        assert "version = 3" in out["error"] and "1.6.20" in out["error"], out
        assert "silently ignores" in out["error"]
        # The whole private tree, containerd's own root and state included: the only change
        # allowed is containerd itself rewriting its metadata database (and log) in place.
        changed = tree_diff(before_files, tree_hash(v3.dir))
        assert set(changed) <= CONTAINERD_WRITES, changed
        assert all(old and new and old.kind == new.kind == "file" for old, new in changed.values())
        assert v3.daemon() == running
    finally:
        v3.cleanup()
        shutil.rmtree(v3.dir.parent / (v3.dir.name + "-src"), ignore_errors=True)


@pytest.mark.parametrize("step", ["backup", "binary", "config", "restart", "state"])
def test_sigkill_at_each_step_converges(ctd16: PrivateContainerd, step: str) -> None:
    """SIGKILL mid-install: the config is the old or the new one, and the next run converges
    with at most one restart."""
    ctd = ctd16
    original = ctd.config.read_bytes()
    shim = fake_shim(ctd.dir / "src")
    r = install(ctd, shim, env={"KWASM_TEST_KILL_AT": step})
    assert r.returncode == -9, (r.returncode, r.stderr)
    text = ctd.config.read_bytes()
    assert text == original or tomllib.loads(text.decode())["plugins"]["io.containerd.grpc.v1.cri"][
        "containerd"
    ]["runtimes"]["spin"]["runtime_type"] == installed_path(ctd)
    r = install(ctd, shim)
    assert r.returncode == 0, r.stderr
    assert ctd.cri_status().runtimes.get("spin") == installed_path(ctd)
    running = ctd.daemon()
    r = install(ctd, shim)
    assert json.loads(r.stdout)["restarted"] is False and ctd.daemon() == running
    assert uninstall(ctd).returncode == 0
    assert ctd.config.read_bytes() == original


def test_two_installs_at_once_make_one_table(ctd16: PrivateContainerd) -> None:
    """Two concurrent installs: the node lock serialises them; one table, valid TOML."""
    ctd = ctd16
    shim = fake_shim(ctd.dir / "src")
    env_args = [*ctd.node_args(), "--shim", str(shim), "-o", "json"]
    procs = [start_kwasm("node", "install", *env_args) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    outs = [json.loads(out) for out, _ in results]
    assert sorted(o["changed"] for o in outs) == [False, True]
    text = ctd.config.read_text()
    headers = [h.path for h in tomlscan.scan(text).headers if h.path[-1] == "spin"]
    assert len(headers) == 1
    assert ctd.cri_status().runtimes["spin"] == installed_path(ctd)


@pytest.mark.parametrize("generation", ["1.6", "2.x"])
def test_debian_packaged_config_keeps_the_default_runtime(generation: str) -> None:
    """Debian's packaged config declares no runtimes: containerd 1.x would drop runc when only
    `spin` is declared, so runc is added too (and removed again); 2.x needs nothing extra."""
    from tests.harness.containerd import available

    if available(generation):
        pytest.skip(available(generation))
    ctd = PrivateContainerd(generation, debian_packaged=True)
    try:
        ctd.start()
        original = ctd.config.read_bytes()
        r = install(ctd, fake_shim(ctd.dir / "src"))
        assert r.returncode == 0, r.stdout + r.stderr + ctd.log_tail()
        runtimes = ctd.cri_status().runtimes
        assert runtimes["spin"] == installed_path(ctd)
        assert runtimes["runc"] == "io.containerd.runc.v2"
        declared = tomllib.loads(ctd.config.read_text())["plugins"]["io.containerd.grpc.v1.cri"]
        assert ("runc" in declared["containerd"]["runtimes"]) == (generation == "1.6")
        r = uninstall(ctd)
        assert r.returncode == 0, r.stderr
        assert ctd.config.read_bytes() == original
        assert "runc" in ctd.cri_status().runtimes
    finally:
        ctd.cleanup()


def test_verify_repairs_a_containerd_that_never_loaded_the_runtime(ctd16: PrivateContainerd) -> None:
    """Files in place but containerd never restarted: --verify notices and restarts once."""
    ctd = ctd16
    shim = fake_shim(ctd.dir / "src")
    args = [a if a != "signal:containerd" else "none" for a in ctd.node_args()]
    r = run_kwasm("node", "install", *args, "--shim", str(shim), "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["verified"] is False
    assert "spin" not in ctd.cri_status().runtimes
    r = install(ctd, shim)
    assert json.loads(r.stdout)["restarted"] is False, "without --verify the state is trusted"
    r = install(ctd, shim, "--verify")
    out = json.loads(r.stdout)
    assert r.returncode == 0, r.stderr
    assert (out["restarted"], out["verified"]) == (True, True)
    assert ctd.cri_status().runtimes["spin"] == installed_path(ctd)


@pytest.mark.parametrize("generation", ["1.6", "2.x"])
def test_each_containerd_accepts_our_edit_of_its_own_default_config(generation: str, tmp_path: Path) -> None:
    """`containerd config default` of each generation (2.x: version 3, single quotes, arrays of
    tables): our edit is what that containerd's own `config dump` reads back, and removing it
    gives the default bytes again."""
    from kwasm_py.containerd import config as cc
    from kwasm_py.model import ContainerdVersion
    from tests.harness.containerd import BINARIES, available

    if available(generation):
        pytest.skip(available(generation))
    binary = str(BINARIES[generation] / "containerd")
    default = subprocess.run([binary, "config", "default"], capture_output=True, text=True, check=True).stdout
    doc = cc.load(default, source="default")
    version = ContainerdVersion(2, 1) if generation == "2.x" else ContainerdVersion(1, 6)
    choice = cc.choose_schema(doc.data, containerd=version)
    entry = cc.RuntimeEntry(
        "spin", "/opt/kwasm/bin/containerd-shim-spin-v2", cc.runc_systemd_cgroup(doc.data, choice.schema)
    )
    edit = cc.add_runtime(doc, entry, schema=choice.schema)
    edited = tmp_path / "config.toml"
    edited.write_text(edit.text)
    dump = subprocess.run(
        [binary, "--config", str(edited), "config", "dump"], capture_output=True, text=True, check=False
    )
    assert dump.returncode == 0, dump.stderr
    runtimes = tomllib.loads(dump.stdout)["plugins"][choice.schema.value]["containerd"]["runtimes"]
    assert runtimes["spin"]["runtime_type"] == entry.runtime_type
    assert "runc" in runtimes
    assert cc.remove_runtime(cc.load(edit.text, source="t"), "spin", schema=choice.schema).text == default
