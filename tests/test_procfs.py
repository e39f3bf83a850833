"""procfs: the one /proc reader, on a fake /proc tree and on this machine's own /proc."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from kwasm_py.node import probe
from kwasm_py.node.hostfs import HostFS
from kwasm_py.node.procfs import Proc, ProcFS, config_from_argv
from tests.harness.fake_ports import fake_process

NODE_NS, HOST_NS = "pid:[4026532001]", "pid:[4026531836]"


def test_containerd_configs_of_the_node_only(tmp_path: Path) -> None:
    """The config of every containerd in the node's PID namespace (flag forms and the default);
    a containerd of another namespace (this machine's) is not the node's."""
    proc = tmp_path / "proc"
    fake_process(proc, 1, comm="systemd", namespace=NODE_NS)
    fake_process(proc, 20, comm="containerd", argv=["/usr/bin/containerd"], ppid=1, namespace=NODE_NS)
    fake_process(
        proc, 21, comm="containerd", argv=["containerd", "--config=/etc/k3s.toml"], ppid=1, namespace=NODE_NS
    )
    fake_process(proc, 22, comm="containerd", argv=["containerd", "-c", "/x.toml"], ppid=1, namespace=NODE_NS)
    fake_process(
        proc, 30, comm="containerd", argv=["containerd", "--config", "/host.toml"], namespace=HOST_NS
    )
    reader = ProcFS(proc)
    assert reader.containerd_configs(1) == (
        PurePosixPath("/etc/containerd/config.toml"),
        PurePosixPath("/etc/k3s.toml"),
        PurePosixPath("/x.toml"),
    )
    assert [p.pid for p in reader.find(30, "containerd")] == [30]


def test_descendants_alive_and_gone(tmp_path: Path) -> None:
    """Descendants follow ppid links; a zombie, a new incarnation of the pid or a vanished
    entry are not alive."""
    proc = tmp_path / "proc"
    fake_process(proc, 1, comm="init")
    fake_process(proc, 5, comm="k3s", ppid=1)
    fake_process(proc, 9, comm="containerd", ppid=5, start=700)
    fake_process(proc, 11, comm="containerd", ppid=2, start=800)  # not below 1
    fake_process(proc, 12, comm="containerd", ppid=1, state="Z", start=900)
    reader = ProcFS(proc)
    below = reader.descendants(1, "containerd")
    assert sorted(below, key=lambda p: p.pid) == [Proc(9, 700), Proc(12, 900)]
    assert reader.alive(Proc(9, 700)) and not reader.alive(Proc(12, 900))
    assert not reader.alive(Proc(9, 699)), "same pid, other start time: another process"
    assert not reader.alive(Proc(404, 1)) and reader.argv(404) is None and reader.comm(404) == ""


def test_sees_root_and_socket_path(tmp_path: Path) -> None:
    """A pid whose root link points at the node root is the node's; the socket is reached
    through that root."""
    node = tmp_path / "node"
    node.mkdir()
    proc = tmp_path / "proc"
    fake_process(proc, 1, comm="systemd", root=node)
    fake_process(proc, 2, comm="other", root=tmp_path)
    reader = ProcFS(proc)
    assert reader.sees_root(1, node) and not reader.sees_root(2, node) and not reader.sees_root(3, node)
    assert reader.socket_path(1, PurePosixPath("/run/c.sock")) == f"{proc}/1/root/run/c.sock"


def test_this_machine(tmp_path: Path) -> None:
    """On the real /proc: this process is found, alive, with its argv, and / is its root."""
    reader = ProcFS()
    me = reader.proc(os.getpid())
    assert me is not None and reader.alive(me)
    argv = reader.argv(os.getpid())
    assert argv and "python" in Path(argv[0]).name
    assert reader.sees_root(os.getpid(), Path("/")) and not reader.sees_root(os.getpid(), tmp_path)


def test_probe_reads_init_and_running_config_through_the_reader(tmp_path: Path) -> None:
    """probe.gather takes the node's init and running containerd config from the given /proc."""
    proc = tmp_path / "proc"
    fake_process(proc, 1, comm="systemd", namespace=NODE_NS)
    fake_process(
        proc, 7, comm="containerd", argv=["containerd", "--config", "/etc/c.toml"], namespace=NODE_NS
    )
    facts = probe.gather(HostFS(tmp_path), pid=1, proc=ProcFS(proc))
    assert facts.init == "systemd" and facts.running_configs == (PurePosixPath("/etc/c.toml"),)
    assert probe.gather(HostFS(tmp_path), pid=None, proc=ProcFS(proc)).running_configs == ()


def test_config_from_argv_last_flag_wins() -> None:
    """Like Go's flag package, the last --config given is the one used."""
    assert config_from_argv(["--config", "/a", "--config=/b"]) == PurePosixPath("/b")
    assert config_from_argv(["--config"]) == PurePosixPath("/etc/containerd/config.toml")
