"""The engine in process with fake ports: order of effects, verification, rollback, uninstall plan."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from kwasm_py.errors import RestartError, VerifyError
from kwasm_py.model import ContainerdVersion, RestartMethod, RestartSpec, ShimSpec
from kwasm_py.node import engine, nodebinary
from kwasm_py.node.procfs import ProcFS
from tests.harness.cli import Kwasm
from tests.harness.containerd import fake_shim
from tests.harness.fake_ports import FakeContainerd, fake_process, node_proc
from tests.harness.noderoot import SYSTEMD, UNIT, V2, tree, tree_hash
from tests.test_engine import DEFAULT_NODE

SYSTEMD_RESTART = RestartSpec(RestartMethod.SYSTEMD, "containerd")
BINARY = "opt/kwasm/bin/containerd-shim-spin-v2"
STATE = "opt/kwasm/kwasm-state.json"
CONFIG = "etc/containerd/config.toml"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A kubeadm-like node root: systemd, containerd, a version-2 config with runc, and /opt
    (as every FHS root has; kwasm-py owns only /opt/kwasm)."""
    return tree(tmp_path / "root", {**DEFAULT_NODE, "/opt/": ""})


def options(root: Path, *shims: Path, timeout: float = 5.0) -> engine.NodeOptions:
    """Options as the CLI builds them, restart auto-detected (systemd)."""
    specs = tuple(
        ShimSpec(source=str(s), name=s.name.split("-")[2], handler=s.name.split("-")[2]) for s in shims
    )
    return engine.NodeOptions(host_root=root, shims=specs, verify_timeout=timeout, lock_timeout=5.0)


@dataclass
class Ports:
    """A fake containerd reading the node's config (restarter and CRI client) and a fake /proc."""

    ctd: FakeContainerd
    proc: ProcFS

    def install(
        self, opts: engine.NodeOptions, log: Callable[[str], None] = lambda _m: None
    ) -> engine.Outcome:
        """engine.install through these ports."""
        return engine.install(opts, log=log, restarter=self.ctd, cri_client=self.ctd, proc=self.proc)

    def uninstall(self, opts: engine.NodeOptions, handlers: list[str]) -> engine.Outcome:
        """engine.uninstall through these ports."""
        return engine.uninstall(opts, handlers, restarter=self.ctd, cri_client=self.ctd, proc=self.proc)


def ports(
    tmp_path: Path, root: Path, *, registers: bool = True, down_after: frozenset[int] = frozenset()
) -> Ports:
    """Fake ports for the node at `root`."""
    ctd = FakeContainerd(config=root / CONFIG, events=[], registers=registers, down_after=down_after)
    return Ports(ctd, node_proc(tmp_path / "proc", root))


def test_install_order_of_effects(tmp_path: Path, root: Path, shim: Path) -> None:
    """binary, then config, then restart (state still pending, files in place), then verify
    over CRI, then the state file says installed."""
    fake = ports(tmp_path, root)
    seen: dict[str, object] = {}

    def mid_restart() -> None:
        seen["state"] = json.loads((root / STATE).read_text())["status"]
        seen["binary"] = (root / BINARY).read_bytes() == shim.read_bytes()
        seen["config"] = "/opt/kwasm/bin/containerd-shim-spin-v2" in (root / CONFIG).read_text()

    fake.ctd.on_restart = mid_restart
    fake.ctd.on_status = lambda: seen.setdefault(
        "state at verify", json.loads((root / STATE).read_text())["status"]
    )
    log = fake.ctd.events.append
    outcome = fake.install(options(root, shim), log=lambda m: log(m.split()[0]))
    assert outcome.changed and outcome.restarted and outcome.verified
    assert fake.ctd.events == [
        "step=binary",
        "step=config",
        "step=restart",
        "restart systemd:containerd",
        "status",
    ]
    assert seen == {"state": "pending", "binary": True, "config": True, "state at verify": "pending"}
    assert json.loads((root / STATE).read_text())["status"] == "installed"
    assert fake.ctd.runtimes["spin"] == "/opt/kwasm/bin/containerd-shim-spin-v2"


def test_todays_dump_runs_while_containerd_is_asked_its_version(
    tmp_path: Path, root: Path, shim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pre-flight's dump of today's config (by the running containerd's binary) is under way
    before the engine asks containerd its version, and is not run a second time."""
    fake = ports(tmp_path, root)
    fake_process(tmp_path / "proc", 50, comm="containerd", argv=["/usr/bin/containerd"], ppid=1)
    (tmp_path / "proc/50/exe").symlink_to("/usr/bin/containerd")
    (root / "usr/bin/containerd").chmod(0o755)
    today = (root / CONFIG).read_text()
    dumped_today = threading.Event()
    texts: list[str] = []

    def dump(argv: list[str]) -> subprocess.CompletedProcess[str]:  # the file as its own dump
        text = (root / argv[argv.index("--config") + 1].lstrip("/")).read_text()
        texts.append(text)
        if text == today:
            dumped_today.set()
        return subprocess.CompletedProcess(argv, 0, text, "")

    monkeypatch.setattr(nodebinary, "run_argv", dump)
    answer = fake.ctd.version
    asked: list[bool] = []

    def version(socket: str, *, timeout: float) -> ContainerdVersion:
        asked.append(dumped_today.wait(timeout=5))
        return answer(socket, timeout=timeout)

    monkeypatch.setattr(fake.ctd, "version", version)
    outcome = fake.install(options(root, shim))
    assert asked == [True]
    assert len(texts) == 2 and texts.count(today) == 1
    assert any(n.startswith("pre-flight ok: /usr/bin/containerd on the node loads it") for n in outcome.notes)


def test_second_run_restarts_nothing_and_verify_only_asks(tmp_path: Path, root: Path, shim: Path) -> None:
    """A re-run neither restarts nor asks; with verify it asks containerd once and restarts nothing."""
    fake = ports(tmp_path, root)
    fake.install(options(root, shim))
    fake.ctd.events.clear()
    before = tree_hash(root)
    assert not fake.install(options(root, shim)).changed
    assert fake.ctd.events == []
    opts = engine.NodeOptions(**{**options(root, shim).__dict__, "verify": True})
    outcome = fake.install(opts)
    assert outcome.verified and not outcome.restarted and fake.ctd.events == ["status"]
    assert tree_hash(root) == before


def test_runtime_never_listed_rolls_back(tmp_path: Path, root: Path, shim: Path) -> None:
    """containerd comes back but never lists the runtime: VerifyError after the verify timeout,
    the config, binary and state are put back, containerd is restarted again, and the whole
    node root (including /opt) is exactly as before."""
    fake = ports(tmp_path, root, registers=False)
    before = tree_hash(root)
    with pytest.raises(VerifyError) as caught:
        fake.install(options(root, shim, timeout=0.2))
    message = caught.value.message
    assert message.startswith("verify: containerd runs but does not report the runtime")
    assert caught.value.step == "verify"  # what the agent records as the failed step
    assert "rolled back the config and shim binaries" in message
    cause = caught.value.__cause__  # raised from the error as it happened, which is untouched
    assert isinstance(cause, VerifyError) and cause.message.startswith("containerd runs but")
    assert "rolled back" not in cause.message
    assert "containerd runs again with the previous config" in message
    assert fake.ctd.restarts == [SYSTEMD_RESTART, SYSTEMD_RESTART]
    second = fake.ctd.events.index("restart systemd:containerd", 1)
    assert fake.ctd.events[second + 1 :] == ["status"], "after the rollback restart: asked once, ready"
    assert tree_hash(root) == before


def test_containerd_not_coming_back_rolls_back(tmp_path: Path, root: Path, shim: Path) -> None:
    """containerd does not answer after our restart: RestartError, rollback restart, and it runs
    again on the previous config; nothing of ours is left."""
    fake = ports(tmp_path, root, down_after=frozenset({1}))
    before = tree_hash(root)
    with pytest.raises(RestartError, match="did not come back after the restart") as caught:
        fake.install(options(root, shim, timeout=0.2))
    assert "containerd runs again with the previous config" in caught.value.message
    # containerd not answering after the restart is found while verifying; message and step agree
    assert caught.value.step == "verify" and caught.value.message.startswith("verify: ")
    assert len(fake.ctd.restarts) == 2 and fake.ctd.up and "spin" not in fake.ctd.runtimes
    assert tree_hash(root) == before


def test_uninstall_restarts_and_checks_the_runtime_is_gone(tmp_path: Path, root: Path, shim: Path) -> None:
    """Uninstall in process: one restart, containerd no longer lists spin, the root is as before."""
    fake = ports(tmp_path, root)
    before = tree_hash(root)
    fake.install(options(root, shim))
    fake.ctd.events.clear()
    outcome = fake.uninstall(options(root), [])
    assert outcome.changed and outcome.restarted and outcome.verified
    assert fake.ctd.events == ["restart systemd:containerd", "status"] and "spin" not in fake.ctd.runtimes
    assert tree_hash(root) == before


def test_uninstall_plan_is_what_uninstall_does(tmp_path: Path, root: Path, shim: Path) -> None:
    """Planning the removal of one of two runtimes: the plan's config bytes and file list are
    exactly what the uninstall then leaves and removes, and planning changed nothing."""
    other = fake_shim(tmp_path / "shims", "slight")
    fake = ports(tmp_path, root)
    fake.install(options(root, shim, other))
    before = tree_hash(root)
    node, the_plan = engine.plan_uninstall(options(root), ["slight"], proc=fake.proc)
    assert tree_hash(root) == before
    assert the_plan is not None and the_plan.changed and not the_plan.restores_original
    assert [r.handler for r in the_plan.chosen] == ["slight"] and [r.handler for r in the_plan.keep] == [
        "spin"
    ]
    assert the_plan.removes == (PurePosixPath("/opt/kwasm/bin/containerd-shim-slight-v2"),)
    assert '-  runtime_type = "/opt/kwasm/bin/containerd-shim-slight-v2"' in the_plan.diff()
    assert node.layout.restart == SYSTEMD_RESTART
    fake.uninstall(options(root), ["slight"])
    assert (root / CONFIG).read_bytes() == the_plan.new_data
    after = tree_hash(root)
    assert set(before) - set(after) == {"opt/kwasm/bin/containerd-shim-slight-v2"}
    state = json.loads((root / STATE).read_text())
    assert [r["handler"] for r in state["runtimes"]] == ["spin"]
    assert fake.ctd.runtimes.get("spin") and "slight" not in fake.ctd.runtimes


def test_plan_uninstall_cli_changes_nothing(root: Path, shim: Path, kwasm: Kwasm) -> None:
    """`node plan --uninstall` shows the restored file, the files that go and the restart, as
    text and JSON, and the node root (every file, /opt included) is unchanged."""
    assert (
        kwasm(
            "node", "install", "--host-root", str(root), "--shim", str(shim), "--restart", "none"
        ).returncode
        == 0
    )
    before = tree_hash(root)
    r = kwasm("node", "plan", "--uninstall", "--host-root", str(root), "--restart", "systemd:containerd")
    assert r.returncode == 0, r.stderr
    assert "config:     /etc/containerd/config.toml (restored byte for byte from its backup)" in r.stdout
    for path in (
        "/opt/kwasm/bin/containerd-shim-spin-v2",
        "/opt/kwasm/backup/config.toml.orig",
        "/opt/kwasm/kwasm-state.json",
    ):
        assert f"delete:     {path}" in r.stdout
    assert "systemctl restart containerd" in r.stdout
    assert '-[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.spin]' in r.stdout
    r = kwasm("node", "plan", "--uninstall", "--host-root", str(root), "--restart", "none", "-o", "json")
    data = json.loads(r.stdout)
    assert data["remove"] == ["spin"] and data["keep"] == [] and data["restart"].startswith("none")
    assert data["config_action"] == "restored byte for byte from its backup"
    r = kwasm("node", "plan", "--uninstall", "--host-root", str(root), "--handler", "nope")
    assert r.returncode == 2 and "did not install handler(s) nope" in r.stderr
    assert tree_hash(root) == before


def test_plan_uninstall_with_nothing_installed(root: Path, kwasm: Kwasm) -> None:
    """On a node kwasm-py never touched, the uninstall plan says so and changes nothing."""
    before = tree_hash(root)
    r = kwasm("node", "plan", "--uninstall", "--host-root", str(root), "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["installed"] is False
    assert tree_hash(root) == before


def test_uninstall_of_an_adopted_k3s_runtime_does_not_wait_for_it_to_go(tmp_path: Path, shim: Path) -> None:
    """k3s renders its own `spin` for the very shim asked for (found in /opt/kwasm/bin): install
    adopts it, and uninstall restarts once and is verified with k3s's runtime still listed (it is
    k3s's, not ours), leaving the node root as before."""
    rendered = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"
    spin = (
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."spin"]\n'
        '  runtime_type = "io.containerd.spin.v2"\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."spin".options]\n'
        '  BinaryName = "/opt/kwasm/bin/containerd-shim-spin-v2"\n'
    )
    k3s = {
        **SYSTEMD,
        rendered: V2 + spin,
        "/etc/systemd/system/k3s.service": UNIT,
        "/opt/kwasm/bin/containerd-shim-spin-v2": shim.read_text(),
    }
    root = tree(tmp_path / "root", k3s)
    (root / "opt/kwasm/bin/containerd-shim-spin-v2").chmod(0o755)
    ctd = FakeContainerd(config=root / rendered.lstrip("/"), events=[])  # the render keeps k3s's spin
    fake = Ports(ctd, node_proc(tmp_path / "proc", root))
    before = tree_hash(root)
    installed = fake.install(options(root, shim, timeout=1.0))
    assert installed.verified and any("adopting" in n for n in installed.notes)
    ctd.events.clear()
    outcome = fake.uninstall(options(root, timeout=1.0), [])
    assert outcome.restarted and outcome.verified
    assert ctd.events == ["restart systemd:k3s", "status"] and ctd.runtimes["spin"] == "io.containerd.spin.v2"
    assert tree_hash(root) == before
