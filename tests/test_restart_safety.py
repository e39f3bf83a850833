"""Failures cost little, and every catalog shim installs (issue 11 items 6 and 7).

Pure parts (shim file names, mountinfo) are unit tests; a real noexec tmpfs under a node root
and real private containerd 1.6 / 2.x daemons (a -v1 shim, a crash-looping config) cover the
effects.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path, PurePosixPath

import pytest

from kwasm_py.errors import RestartError, UsageError
from kwasm_py.model import RestartMethod, RestartSpec
from kwasm_py.node import plan, probe, restart
from tests.harness.cli import Kwasm, run_kwasm
from tests.harness.containerd import PrivateContainerd, fake_shim
from tests.harness.cri_client import run_pod
from tests.harness.noderoot import tree, tree_hash
from tests.harness.ocitar import busybox_oci
from tests.test_engine import DEFAULT_NODE, args

# ---------------------------------------------------------------------------------------------
# shim names: -v1 and -v2 both install


def test_shim_binary_names_carry_their_version() -> None:
    """containerd-shim-NAME-vN gives (NAME, vN); anything else is a usage error with a hint."""
    assert plan.parse_shim_binary("/x/containerd-shim-spin-v2") == ("spin", "v2")
    assert plan.parse_shim_binary("containerd-shim-wasmtime-v1") == ("wasmtime", "v1")
    assert plan.parse_shim_binary("containerd-shim-wasm-time-v1") == ("wasm-time", "v1")
    assert plan.shim_name("containerd-shim-wasmtime-v1") == "wasmtime"
    for bad in ("/x/spin", "containerd-shim--v2", "containerd-shim-spin", "containerd-shim-spin-v"):
        with pytest.raises(UsageError, match="containerd-shim-NAME-vN") as err:
            plan.parse_shim_binary(bad)
        assert "rename" in err.value.hint and "--handler" not in err.value.hint


def _fake_binary(directory: Path, binary: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / binary
    path.write_text("#!/bin/sh\nexit 3\n")
    path.chmod(0o755)
    return path


def test_every_listed_catalog_shim_installs(tmp_path: Path, kwasm: Kwasm) -> None:
    """`shims list` shows only shims that `node install` takes: each one installs under its own
    binary name, and the runtime points at that binary."""
    listed = kwasm("shims", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    catalog = json.loads(listed.stdout)["catalog"]
    assert {s["binary"] for s in catalog} >= {"containerd-shim-spin-v2", "containerd-shim-wasmtime-v1"}
    for entry in catalog:
        root = tree(tmp_path / entry["name"], DEFAULT_NODE)
        shim = _fake_binary(tmp_path / f"src-{entry['name']}", entry["binary"])
        r = kwasm("node", "install", *args(root, shim), "-o", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        (runtime,) = json.loads(r.stdout)["runtimes"]
        installed = f"/opt/kwasm/bin/{entry['binary']}"
        assert runtime == {**runtime, "handler": entry["handler"], "runtime_type": installed}
        assert (root / installed.lstrip("/")).read_bytes() == shim.read_bytes()
        assert f'runtime_type = "{installed}"' in (root / "etc/containerd/config.toml").read_text()
        u = kwasm("node", "uninstall", "--host-root", str(root), "--restart", "none")
        assert u.returncode == 0, u.stderr
        assert not (root / "opt/kwasm").exists()


# ---------------------------------------------------------------------------------------------
# noexec install directories

MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /opt rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw
31 30 0:26 / /opt/kwasm\040x rw,relatime shared:6 - tmpfs tmpfs rw
40 22 0:27 / /var rw,relatime - tmpfs tmpfs rw
41 22 0:28 / /var ro,noexec,relatime - tmpfs tmpfs ro
"""


def test_mount_for_picks_the_innermost_topmost_mount() -> None:
    """The longest mount point wins (escapes decoded); of two on one point, the later one."""
    point, opts = probe.mount_for(MOUNTINFO, PurePosixPath("/opt/kwasm/bin")) or ("", frozenset())
    assert (point, "noexec" in opts) == ("/opt", True)
    point, opts = probe.mount_for(MOUNTINFO, PurePosixPath("/opt/kwasm x/bin")) or ("", frozenset())
    assert (point, "noexec" in opts) == ("/opt/kwasm x", False)
    point, opts = probe.mount_for(MOUNTINFO, PurePosixPath("/var/lib/kwasm")) or ("", frozenset())
    assert (point, "noexec" in opts) == ("/var", True)
    point, opts = probe.mount_for(MOUNTINFO, PurePosixPath("/optional")) or ("", frozenset())
    assert point == "/" and "noexec" not in opts
    assert probe.mount_for("garbage\n", PurePosixPath("/opt")) is None


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A kubeadm-like node root (as in test_engine)."""
    return tree(tmp_path / "root", DEFAULT_NODE)


@pytest.mark.root
def test_noexec_install_dir_is_refused_before_anything_changes(node: Path, shim: Path, kwasm: Kwasm) -> None:
    """/opt on a real noexec tmpfs: refused with the reason and an --install-dir hint, the whole
    tree unchanged; the same install into /var/lib/kwasm works."""
    if os.geteuid() != 0:
        pytest.skip("needs root for mounts")
    (node / "opt").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=1m", "tmpfs", str(node / "opt")], check=True)
    try:
        before = tree_hash(node)
        r = kwasm("node", "install", *args(node, shim), "-o", "json")
        assert r.returncode == 1, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert "noexec" in out["error"] and "/opt/kwasm/bin" in out["error"], out
        assert "--install-dir" in out["hint"], out
        assert tree_hash(node) == before
        ok = kwasm("node", "install", *args(node, shim, "--install-dir", "/var/lib/kwasm"))
        assert ok.returncode == 0, ok.stderr
        assert (node / "var/lib/kwasm/bin/containerd-shim-spin-v2").is_file()
    finally:
        subprocess.run(["umount", str(node / "opt")], check=True)


# ---------------------------------------------------------------------------------------------
# crash-loop watch (pure enough: a process that we start and end ourselves)


def _no_answer() -> None:
    raise RestartError("the socket does not answer")


def test_crash_watch_counts_exits_of_a_signal_target(tmp_path: Path) -> None:
    """A supervisor whose `containerd` child exits at once, again and again, is a crash loop."""
    fake = tmp_path / "containerd"
    # lives as long as a real containerd 1.6 takes to refuse a broken config (20-100 ms here)
    fake.write_text("#!/bin/sh\nsleep 0.1\nexit 1\n")
    fake.chmod(0o755)
    go = tmp_path / "go"
    os.mkfifo(go)
    # the loop starts the child only after the test built its watch (no sleeps as sync)
    loop = f'read _ < {go}; while :; do "{fake}"; [ -e {tmp_path}/stop ] && exit 0; done'
    sup = subprocess.Popen(["/bin/sh", "-c", loop], start_new_session=True)
    try:
        watch = restart.CrashWatch(RestartSpec(RestartMethod.SIGNAL, "containerd"), pid=sup.pid, limit=2)
        assert watch.exits == 0
        go.write_text("\n")
        with pytest.raises(RestartError, match=r"stopped waiting for never: containerd exited \d+ times"):
            restart.wait_until(
                _no_answer,
                lambda _s: False,
                timeout=30,
                what="never",
                watch=watch,
            )
        assert watch.exits >= 2
    finally:
        (tmp_path / "stop").touch()
        sup.kill()
        sup.wait()


# ---------------------------------------------------------------------------------------------
# real containerd


def _install(ctd: PrivateContainerd, shim: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_kwasm("node", "install", *ctd.node_args(), "--shim", str(shim), "-o", "json", *extra)


@pytest.mark.containerd
@pytest.mark.root
def test_v1_shim_registers_and_pods_reach_it(ctd: PrivateContainerd) -> None:
    """containerd-shim-wasmtime-v1 (runwasi naming): containerd 1.6 and 2.x list runtime
    `wasmtime` with the installed binary's path, and a CRI sandbox starts that very binary."""
    log = ctd.dir / "v1-calls.log"
    shim = ctd.dir / "src" / "containerd-shim-wasmtime-v1"
    shim.parent.mkdir()
    shim.write_text(
        f'#!/bin/sh\n{{ echo "argv0=$0"; for a in "$@"; do echo "arg=$a"; done; }} >> {log}\nexit 3\n'
    )
    shim.chmod(0o755)
    r = _install(ctd, shim)
    assert r.returncode == 0, r.stdout + r.stderr + ctd.log_tail()
    installed = str(ctd.dir / "kwasm" / "bin" / "containerd-shim-wasmtime-v1")
    assert json.loads(r.stdout)["runtimes"][0]["runtime_type"] == installed
    status = ctd.cri_status()
    assert status.runtime_ready and status.runtimes["wasmtime"] == installed
    image = busybox_oci(ctd.dir / "bb.tar")
    if image is None:
        pytest.skip("busybox-static is not installed (needed for the CRI sandbox image)")
    imported = subprocess.run(
        [str(ctd.bin / "ctr"), "--address", str(ctd.socket), "-n", "k8s.io", "image", "import", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    ok, detail = run_pod(str(ctd.socket), "wasmtime")
    assert not ok and "exit status 3" in detail, detail
    calls = log.read_text()
    assert f"argv0={installed}" in calls and "arg=start" in calls, calls


@pytest.mark.containerd
@pytest.mark.root
def test_crash_loop_rolls_back_long_before_the_verify_timeout(ctd16: PrivateContainerd) -> None:
    """containerd exits at every start for a reason its `config dump` cannot show (its metrics
    port is taken, which the running daemon never tried) and its supervisor restarts it at
    once, again and again: install rolls back after a few exits instead of waiting
    KWASM_VERIFY_TIMEOUT (120 s), and says why. (A config containerd cannot parse is refused
    earlier, by pre-flight: see test_preflight.)"""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    original = ctd16.config.read_text() + f'\n[metrics]\n  address = "127.0.0.1:{port}"\n'
    ctd16.config.write_text(original)
    shim = fake_shim(ctd16.dir / "src")
    started = time.monotonic()
    try:
        r = run_kwasm(
            "node",
            "install",
            *ctd16.node_args(),
            "--shim",
            str(shim),
            env={"KWASM_VERIFY_TIMEOUT": "120"},
            timeout=200,
        )
    finally:
        taken.close()  # the old config works again: the supervisor brings containerd back
    elapsed = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    assert "crash-loops" in r.stderr and "rolled back" in r.stderr, r.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s: waited for the timeout instead of noticing the loop"
    assert ctd16.config.read_text() == original
    assert not (ctd16.dir / "kwasm" / "kwasm-state.json").exists()
    assert not (ctd16.dir / "kwasm" / "bin" / "containerd-shim-spin-v2").exists()
    status = ctd16.wait_ready(timeout=30)
    assert "spin" not in status.runtimes
