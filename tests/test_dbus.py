"""node/dbus.py: systemd over D-Bus (unit facts, ResetFailedUnit + RestartUnit + job result),
against a fake systemd speaking real D-Bus; and how detection and the CLI use it.

The real systemd is exercised in tests/nodes/test_node_dbus.py.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from kwasm_py.errors import RestartError
from kwasm_py.model import RestartMethod, RestartSpec
from kwasm_py.node import dbus, layout, restart
from kwasm_py.node import probe as nodeprobe
from kwasm_py.node.hostfs import HostFS
from tests.harness.cli import invoke
from tests.harness.fake_systemd import FakeSystemd
from tests.harness.noderoot import tree, tree_hash

P = PurePosixPath
CONTAINERD = (["/usr/bin/containerd"],)


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    """A short socket path (unix socket paths are limited to 108 bytes)."""
    return tmp_path / "bus"


def test_unit_names_get_the_service_suffix_only_when_missing():
    """Layouts name units bare (containerd, snap.microk8s.daemon-containerd); systemd wants .service."""
    assert dbus.unit_name("containerd") == "containerd.service"
    assert dbus.unit_name("snap.microk8s.daemon-containerd") == "snap.microk8s.daemon-containerd.service"
    assert dbus.unit_name("k3s.service") == "k3s.service"


def test_running_configs_come_from_active_units_only():
    """containerd's own ExecStart gives its --config; k3s's unit gives k3s's rendered file;
    inactive units and duplicates give nothing."""
    facts = dbus.UnitFacts(
        (
            dbus.UnitInfo(
                "containerd", "loaded", "active", (("/usr/bin/containerd", "--config", "/etc/c.toml"),)
            ),
            dbus.UnitInfo("k3s", "loaded", "activating", (("/usr/local/bin/k3s", "server"),)),
            dbus.UnitInfo("rke2-server", "loaded", "inactive", (("/usr/bin/rke2", "server"),)),
            dbus.UnitInfo("k0sworker", "not-found", "inactive"),
        )
    )
    assert facts.running_configs() == (P("/etc/c.toml"), layout.K3S_DIR / "config.toml")
    assert facts.loaded == {"containerd", "k3s", "rke2-server"}


def test_over_bus_turns_systemd_restarts_into_dbus_only():
    """systemd:UNIT becomes dbus:UNIT; a signal or none restart stays as it is."""
    lay = layout.override(None, config=P("/etc/containerd/config.toml"), restart=None, socket=None)
    assert dbus.over_bus(lay).restart == RestartSpec(RestartMethod.DBUS, "containerd")
    signal = layout.override(lay, config=None, restart=RestartSpec(RestartMethod.SIGNAL, "x"), socket=None)
    assert dbus.over_bus(signal) is signal
    assert layout.parse_restart("dbus") == RestartSpec(RestartMethod.DBUS, "containerd")
    assert layout.parse_restart("dbus:k3s") == RestartSpec(RestartMethod.DBUS, "k3s")


def test_detection_without_proc_takes_the_running_file_from_systemd(tmp_path):
    """A leftover /etc/containerd/config.toml on a k3s node, no /proc of the node: the active
    k3s unit says which file containerd reads, and the evidence says so."""
    root = tree(
        tmp_path / "root",
        {
            "/etc/containerd/config.toml": "version = 2\n",
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml": "version = 2\n",
        },
    )
    units = dbus.UnitFacts(
        (
            dbus.UnitInfo("k3s", "loaded", "active", (("/usr/local/bin/k3s", "server"),)),
            dbus.UnitInfo("containerd", "loaded", "inactive", CONTAINERD),
        )
    )
    facts = nodeprobe.gather(HostFS(root), pid=None, units=units)
    assert facts.init == "systemd"
    assert facts.systemd_units == {"k3s", "containerd"}
    chosen = dbus.over_bus(layout.detect(facts))
    assert chosen.name == "k3s"
    assert chosen.restart == RestartSpec(RestartMethod.DBUS, "k3s")
    assert any("the running containerd reads /var/lib/rancher/k3s" in e for e in chosen.evidence)
    # Without the unit facts (and no /proc), the same root picks by file specificity only.
    assert not any(
        "running containerd" in e for e in layout.detect(nodeprobe.gather(HostFS(root), pid=None)).evidence
    )


@pytest.mark.parametrize("direct", [True, False], ids=["private-socket", "bus"])
def test_restart_resets_failed_then_restarts_and_reads_the_job_result(sock, direct):
    """ResetFailedUnit before RestartUnit (a start-limited unit starts again), then the job's
    own JobRemoved (another job's signal is skipped); on a bus also Hello + AddMatch; on the
    private socket Pings first until one is answered (systemd drops the first message there)."""
    fake = FakeSystemd(
        units={"containerd": ("loaded", "active", [["/usr/bin/containerd"]])},
        failed={"containerd.service"},
        drop_first_ping=True,
    )
    started = []
    with fake.serve(sock), dbus.SystemdBus(sock, direct=direct) as bus:
        bus.restart("containerd", timeout=5, started=lambda: started.append(True))
        bus.restart("containerd", timeout=5)  # again on the same connection: one Subscribe
    names = [c[0] for c in fake.calls]
    expected = ["ResetFailedUnit", "Subscribe", *([] if direct else ["AddMatch"]), "RestartUnit"]
    assert names == (["Ping", "Ping"] if direct else ["Hello"]) + expected + [
        "ResetFailedUnit",
        "RestartUnit",
    ]
    assert ("RestartUnit", ("containerd.service", "replace")) in fake.calls
    assert started == [True]


def test_a_unit_not_loaded_is_not_reset_but_still_restarted(sock):
    """ResetFailedUnit's NoSuchUnit (unit not loaded) is not an error: RestartUnit loads it."""
    fake = FakeSystemd()
    with fake.serve(sock), dbus.SystemdBus(sock, direct=True) as bus:
        bus.restart("k3s", timeout=5)
    assert [c[0] for c in fake.calls] == ["Ping", "ResetFailedUnit", "Subscribe", "RestartUnit"]


def test_a_failed_job_is_an_error_naming_result_and_unit_state(sock):
    """JobRemoved with result `failed`: RestartError with the job result and the unit's Result."""
    fake = FakeSystemd(
        units={"containerd": ("loaded", "active", [])}, results={"containerd.service": "failed"}
    )
    with fake.serve(sock), dbus.SystemdBus(sock, direct=True) as bus, pytest.raises(RestartError) as err:
        bus.restart("containerd", timeout=5)
    assert err.value.message == (
        "systemd's restart job for containerd.service ended `failed` (unit failed, result exit-code)"
    )
    assert "journalctl -u containerd.service" in err.value.hint


def test_a_job_that_never_finishes_times_out(sock):
    """No JobRemoved within the timeout: RestartError saying so (a bounded wait, not a hang)."""
    fake = FakeSystemd(units={"containerd": ("loaded", "active", [])}, hang=True)
    with fake.serve(sock), dbus.SystemdBus(sock, direct=True) as bus, pytest.raises(RestartError) as err:
        bus.restart("containerd", timeout=0.3)
    assert "did not finish within 0 s" in err.value.message


def test_facts_read_load_state_active_state_and_exec_start(sock):
    """facts(): every layout unit asked; ExecStart argv read only for loaded units."""
    fake = FakeSystemd(
        units={"containerd": ("loaded", "active", [["/usr/bin/containerd", "-c", "/etc/x.toml"]])}
    )
    with fake.serve(sock), dbus.SystemdBus(sock, direct=True) as bus:
        facts = bus.facts()
    assert [u.name for u in facts.units] == list(layout.UNITS)
    assert facts.loaded == {"containerd"}
    assert facts.running_configs() == (P("/etc/x.toml"),)


def test_no_socket_is_a_one_line_error_with_a_hint(tmp_path):
    """No socket at the path: RestartError naming it, with the hint to mount it."""
    with pytest.raises(RestartError) as err:
        dbus.SystemdBus(tmp_path / "absent")
    assert "cannot reach systemd over D-Bus" in err.value.message
    assert "/run/dbus/system_bus_socket" in err.value.hint


def test_cli_with_bus_and_no_socket_fails_cleanly_and_writes_nothing(tmp_path):
    """`node install --bus` on a root without the socket: exit 1, the error, the root untouched."""
    root = tree(
        tmp_path / "root", {"/etc/containerd/config.toml": "version = 2\n", "/usr/bin/containerd": ""}
    )
    shim = tmp_path / "containerd-shim-spin-v2"
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    before = tree_hash(root)
    result = invoke(
        "node",
        "install",
        "--host-root",
        str(root),
        "--shim",
        str(shim),
        "--bus",
        "/run/dbus/system_bus_socket",
    )
    assert result.code == 1
    assert "cannot reach systemd over D-Bus" in result.err
    assert "Traceback" not in result.err
    assert tree_hash(root) == before


@pytest.fixture
def short_root():
    """A node root with a short path (the bus socket path under it must fit in 108 bytes)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="kwb-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_open_node_over_the_bus_detects_from_units_and_restarts_over_dbus(short_root):
    """--bus: units come from systemd (the leftover default config loses to the active k3s
    unit), auto restart is dbus:k3s, containerd's socket is under the host root, no PID used;
    and it only reads: no unit is reset or restarted."""
    from kwasm_py.node import engine

    root = tree(
        short_root,
        {
            "/etc/containerd/config.toml": "version = 2\n",
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml": "version = 2\n",
            "/run/dbus/": "",
        },
    )
    fake = FakeSystemd(
        units={
            "k3s": ("loaded", "active", [["/usr/local/bin/k3s", "server"]]),
            "containerd": ("loaded", "inactive", [["/usr/bin/containerd"]]),
        }
    )
    opts = engine.NodeOptions(host_root=root, bus=P("/run/dbus/system_bus_socket"), pid=999_999)
    with fake.serve(root / "run/dbus/system_bus_socket"):
        node = engine.open_node(opts)
    assert node.layout.name == "k3s"
    assert node.layout.restart == RestartSpec(RestartMethod.DBUS, "k3s")
    assert node.socket == str(root / "run/k3s/containerd/containerd.sock")
    assert (node.pid_ok, node.reachable) == (False, True)  # no node PID is used or trusted
    assert fake.calls[0][0] == "Hello"  # a bus, not the private socket
    loaded = {c[1][0] for c in fake.calls if c[0] == "LoadUnit"}
    assert loaded == {dbus.unit_name(u) for u in layout.UNITS}
    assert not [c for c in fake.calls if c[0] in ("RestartUnit", "ResetFailedUnit")]  # it only looked


def test_a_privileged_install_is_restarted_over_dbus_by_the_minimal_pod(short_root):
    """The state file of an install by installer.yaml records systemd:containerd; the minimal
    pod (--bus, auto) keeps that unit but restarts it over D-Bus."""
    from kwasm_py.node import engine
    from kwasm_py.node import state as st

    root = tree(short_root, {"/etc/containerd/config.toml": "version = 2\n", "/run/dbus/": ""})
    record = st.State(
        status="installed",
        layout="containerd",
        config=st.ConfigRecord("/etc/containerd/config.toml", "config", False, None, "0" * 64, None, "x"),
        runtimes=(),
        restart="systemd:containerd",
    )
    tree(root, {"/opt/kwasm/kwasm-state.json": record.to_json().decode()})
    fake = FakeSystemd(units={"containerd": ("loaded", "active", [["/usr/bin/containerd"]])})
    with fake.serve(root / "run/dbus/system_bus_socket"):
        node = engine.open_node(engine.NodeOptions(host_root=root, bus=P("/run/dbus/system_bus_socket")))
    assert node.layout.restart == RestartSpec(RestartMethod.DBUS, "containerd")
    explicit = engine.NodeOptions(
        host_root=root,
        bus=P("/run/dbus/system_bus_socket"),
        restart=RestartSpec(RestartMethod.SYSTEMD, "containerd"),
    )
    with fake.serve(root / "run/dbus/system_bus_socket"):
        assert engine.open_node(explicit).layout.restart.method is RestartMethod.SYSTEMD  # as asked


def test_crash_watch_reads_the_unit_over_one_connection(sock, monkeypatch):
    """CrashWatch for dbus:UNIT: NRestarts since the baseline plus a pending auto-restart, read
    as D-Bus properties on one connection (one Ping, no reconnect per read); a failed unit ends
    the watch with the count."""
    monkeypatch.setattr(restart, "_WATCH_EVERY", 0.0)
    fake = FakeSystemd(units={"containerd": ("loaded", "active", [])}, state={"containerd": [4, "running"]})
    spec = RestartSpec(RestartMethod.DBUS, "containerd")
    with fake.serve(sock):
        watch = restart.CrashWatch(spec, pid=1, limit=3, bus=sock)
        watch.check()
        fake.state["containerd"] = [5, "auto-restart"]
        watch.check()
        assert watch.exits == 2
        fake.state["containerd"] = [6, "auto-restart"]
        with pytest.raises(RestartError, match=r"exited 3 times .*\(unit containerd\)"):
            watch.check()
        watch.close()
    names = [c[0] for c in fake.calls]
    assert names.count("Ping") + names.count("Hello") <= 2  # one connection (Ping may repeat once)
    assert names.count("LoadUnit") == 3
