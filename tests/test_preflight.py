"""Pre-flight: the node's own containerd reads the config before anything is written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from kwasm_py.containerd import config as cc
from kwasm_py.containerd import template as tmpl
from kwasm_py.errors import KwasmError, PreflightError
from kwasm_py.model import ConfigKind, CriSchema, Layout, RestartMethod, RestartSpec, ShimSpec
from kwasm_py.node import engine, preflight, restart
from kwasm_py.node.hostfs import HostFS
from kwasm_py.node.procfs import ProcFS
from tests.harness.containerd import BINARIES, REPO, available
from tests.harness.fake_ports import fake_process
from tests.harness.noderoot import tree_hash

CFG = PurePosixPath("/etc/containerd/config.toml")
V2, V3 = "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"
SOCKET = PurePosixPath("/run/containerd/containerd.sock")


def dump(runtimes: dict[str, dict[str, object]], default: str = "runc", key: str = V2) -> dict[str, object]:
    return {"plugins": {key: {"containerd": {"default_runtime_name": default, "runtimes": runtimes}}}}


def test_compare_names_what_the_dump_gets_wrong() -> None:
    """Our runtime missing, another runtime changed, the default changed: each is reported."""
    runc = {"runtime_type": "io.containerd.runc.v2"}
    before = dump({"runc": runc, "kata": {"runtime_type": "io.containerd.kata.v2"}})
    good = dump(
        {"runc": runc, "kata": {"runtime_type": "io.containerd.kata.v2"}, "spin": {"runtime_type": "/s"}},
        key=V3,
    )
    assert preflight.compare(before, good, wanted={"spin": "/s"}) == []
    bad = dump({"runc": {"runtime_type": "x"}}, default="spin")
    problems = preflight.compare(before, bad, wanted={"spin": "/s"})
    assert any("spin has runtime_type None" in p for p in problems)
    assert any("runc would change" in p for p in problems)
    assert any("kata would change or vanish" in p for p in problems)
    assert any("default runtime would change" in p for p in problems)
    assert preflight.compare(before, bad, wanted={}, ours=frozenset({"runc", "kata"})) == [
        "default runtime would change from 'runc' to 'spin'"
    ]


def _shim(tmp_path: Path) -> Path:
    shim = tmp_path / "src" / "containerd-shim-spin-v2"
    shim.parent.mkdir(parents=True)
    shim.write_text("#!/bin/sh\necho fake\n")
    shim.chmod(0o755)
    return shim


def _opts(root: Path, shim: Path) -> engine.NodeOptions:
    return engine.NodeOptions(
        host_root=root,
        shims=(ShimSpec(source=str(shim), name="spin", handler="spin"),),
        config=CFG,
        restart=RestartSpec(RestartMethod.SYSTEMD, "containerd"),
    )


def test_binary_is_the_one_that_says_the_running_version(tmp_path: Path) -> None:
    """With the running containerd's version known, a candidate saying another version is not
    used: pre-flight with the wrong generation would judge the wrong parser."""
    root = tmp_path / "root"
    for rel in ("usr/bin/containerd", "usr/local/bin/containerd"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
        (root / rel).chmod(0o755)
    says = {
        "/usr/bin/containerd": "containerd x 1.6.20~ds1 y\n",
        "/usr/local/bin/containerd": "containerd x v2.1.9 y\n",
    }

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, says[argv[2]], "")

    fs = HostFS(root)
    pick = preflight.choose_binary
    assert pick(fs, pid=None, config=CFG, version=(2, 1, 9), runner=runner) == (
        PurePosixPath("/usr/local/bin/containerd"),
        "",
    )
    assert pick(fs, pid=None, config=CFG, version=(1, 6, 20), runner=runner)[0] == PurePosixPath(
        "/usr/bin/containerd"
    )
    assert pick(fs, pid=None, config=CFG, version=None, runner=runner)[0] == PurePosixPath(
        "/usr/bin/containerd"
    )
    none, why = pick(fs, pid=None, config=CFG, version=(1, 7, 0), runner=runner)
    assert none is None and "version 1.7.0" in why


def test_skipped_without_a_containerd_binary(tmp_path: Path) -> None:
    """A root without containerd: plan says pre-flight was skipped and why."""
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text("version = 2\n")
    _node, the_plan = engine.plan_only(_opts(root, _shim(tmp_path)))
    assert the_plan.preflight.startswith("skipped: no containerd binary on the node root")


def test_refusal_by_containerd_names_file_and_message(tmp_path: Path) -> None:
    """containerd refusing the file (fake runner): PreflightError with its own last line."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "tmp").mkdir()  # no /etc/containerd: the scratch file goes to the node's /tmp
    (root / "usr/bin/containerd").write_text("")
    (root / "usr/bin/containerd").chmod(0o755)
    fs = HostFS(root)
    seen: list[str] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        written = root / argv[argv.index("--config") + 1].lstrip("/")
        seen.append(written.read_text())
        rc = 1 if "spin" in seen[-1] else 0
        return subprocess.CompletedProcess(
            argv, rc, "version = 2\n", "noise\ncontainerd: duplicated tables\n"
        )

    with pytest.raises(
        PreflightError, match=r"refuses the config /x/config.toml.tmpl .*: containerd: duplicated tables"
    ):
        preflight.check(
            fs,
            effective=CFG,
            before_text="version = 2\n",
            after_text="version = 2\n# spin\n",
            wanted={"spin": "/s"},
            source="/x/config.toml.tmpl",
            binary=PurePosixPath("/usr/bin/containerd"),
            runner=runner,
        )
    assert sorted(seen) == ["version = 2\n", "version = 2\n# spin\n"]  # today and next, both read
    assert list((root / "tmp").iterdir()) == []


def _root_with_running_containerd(tmp_path: Path) -> tuple[HostFS, ProcFS]:
    """A node root with a containerd binary and config, and a /proc in which PID 1 is its init
    and PID 50 that containerd, running with --config /etc/containerd/config.toml."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc/containerd").mkdir(parents=True)
    (root / "usr/bin/containerd").write_text("")
    (root / "usr/bin/containerd").chmod(0o755)
    (root / "etc/containerd/config.toml").write_text("version = 2\n")
    proc_root = tmp_path / "proc"
    fake_process(proc_root, 1, comm="systemd", root=root)
    fake_process(proc_root, 50, comm="containerd", argv=["/usr/bin/containerd", "--config", str(CFG)], ppid=1)
    (proc_root / "50" / "exe").symlink_to("/usr/bin/containerd")
    return HostFS(root), ProcFS(proc_root)


def _recording_runner(fs: HostFS, seen: list[str]) -> preflight.Runner:
    """A containerd whose dump of any file is an empty config; records each file's text."""

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        seen.append((fs.root / argv[argv.index("--config") + 1].lstrip("/")).read_text())
        return subprocess.CompletedProcess(argv, 0, "version = 2\n", "")

    return runner


def test_todays_dump_started_ahead_is_taken_not_run_again(tmp_path: Path) -> None:
    """The dump `dump_ahead` started (the running containerd's binary on today's file) is the
    one `check` compares with: today's file is dumped once in all, the next one once."""
    fs, proc = _root_with_running_containerd(tmp_path)
    seen: list[str] = []
    runner = _recording_runner(fs, seen)
    lay = Layout("generic", CFG, ConfigKind.CONFIG, RestartSpec(RestartMethod.SYSTEMD, "containerd"), SOCKET)
    with preflight.dump_ahead(fs, lay, pid=1, proc=proc, runner=runner) as ahead:
        assert ahead is not None and ahead.binary == PurePosixPath("/usr/bin/containerd")
        ahead.result.result()  # done before check: check must not start it again
        verdict = preflight.check(
            fs,
            effective=CFG,
            before_text="version = 2\n",
            after_text="version = 2\n# next\n",
            wanted={},
            source=str(CFG),
            binary=ahead.binary,
            runner=runner,
            ahead=ahead,
        )
    assert verdict.ran and verdict.ok
    assert seen == ["version = 2\n", "version = 2\n# next\n"]
    assert sorted(p.name for p in (fs.root / "etc/containerd").iterdir()) == ["config.toml"]


def test_a_dump_ahead_of_other_text_is_not_taken(tmp_path: Path) -> None:
    """A dump started ahead of a file whose text is not what `check` is given (or with another
    binary) is not used: today's text is dumped again."""
    fs, proc = _root_with_running_containerd(tmp_path)
    seen: list[str] = []
    runner = _recording_runner(fs, seen)
    lay = Layout("generic", CFG, ConfigKind.CONFIG, RestartSpec(RestartMethod.SYSTEMD, "containerd"), SOCKET)
    with preflight.dump_ahead(fs, lay, pid=1, proc=proc, runner=runner) as ahead:
        assert ahead is not None
        for before, binary in (("version = 2\n# edited since\n", ahead.binary), ("version = 2\n", CFG)):
            preflight.check(
                fs,
                effective=CFG,
                before_text=before,
                after_text="version = 2\n# next\n",
                wanted={},
                source=str(CFG),
                binary=binary,
                runner=runner,
                ahead=ahead,
            )
    today, edited, after = "version = 2\n", "version = 2\n# edited since\n", "version = 2\n# next\n"
    assert sorted(seen) == sorted([today, edited, after, today, after])  # ahead, then 2 checks


def test_no_dump_ahead_without_the_running_containerd(tmp_path: Path) -> None:
    """Without a node PID, or when no running containerd reads today's file, nothing starts
    ahead (the binary would depend on containerd's version, asked later)."""
    fs, proc = _root_with_running_containerd(tmp_path)
    seen: list[str] = []
    runner = _recording_runner(fs, seen)
    other = PurePosixPath("/etc/containerd/other.toml")
    (fs.root / "etc/containerd/other.toml").write_text("version = 2\n")
    restart_spec = RestartSpec(RestartMethod.SYSTEMD, "containerd")
    for lay, pid in (
        (Layout("generic", CFG, ConfigKind.CONFIG, restart_spec, SOCKET), None),
        (Layout("generic", other, ConfigKind.CONFIG, restart_spec, SOCKET), 1),
    ):
        with preflight.dump_ahead(fs, lay, pid=pid, proc=proc, runner=runner) as ahead:
            assert ahead is None
    assert seen == []


def _node_root(tmp_path: Path, generation: str) -> Path:
    """A node root holding the real containerd binary and the libraries it links."""
    root = tmp_path / "root"
    for rel in ("usr/bin", "lib/x86_64-linux-gnu", "lib64", "etc/containerd", "tmp"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BINARIES[generation] / "containerd", root / "usr/bin/containerd")
    shutil.copy2("/lib/x86_64-linux-gnu/libc.so.6", root / "lib/x86_64-linux-gnu/libc.so.6")
    shutil.copy2("/lib64/ld-linux-x86-64.so.2", root / "lib64/ld-linux-x86-64.so.2")
    return root


GENERATIONS = [
    pytest.param("1.6", 2, V2, "Can't convert x(string) to int", id="containerd-1.6"),
    pytest.param("2.x", 3, V3, "cannot decode TOML string", id="containerd-2.x"),
]


@pytest.mark.root
@pytest.mark.containerd
@pytest.mark.parametrize(("generation", "version", "cri", "refusal"), GENERATIONS)
def test_real_containerd_refuses_nothing_written_no_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, generation: str, version: int, cri: str, refusal: str
) -> None:
    """A config the node's containerd refuses: install fails naming the file and containerd's
    message, the whole node root is unchanged, and containerd is never restarted."""
    if why := available(generation):
        pytest.skip(why)
    root = _node_root(tmp_path, generation)
    (root / "etc/containerd/config.toml").write_text(f'version = {version}\noom_score = "x"\n')
    shim = _shim(tmp_path)
    restarts: list[object] = []
    monkeypatch.setattr(restart, "restart", lambda *a, **k: restarts.append(a))
    before = tree_hash(root)
    with pytest.raises(PreflightError) as info:
        engine.install(_opts(root, shim))
    assert str(CFG) in info.value.message and refusal in info.value.message
    assert "does not load either" in info.value.hint
    assert tree_hash(root) == before and restarts == []


@pytest.mark.root
@pytest.mark.containerd
@pytest.mark.parametrize(("generation", "version", "cri", "refusal"), GENERATIONS)
def test_real_containerd_accepts_and_plan_shows_it(
    tmp_path: Path, generation: str, version: int, cri: str, refusal: str
) -> None:
    """A good config: plan's verdict is containerd's own dump listing our runtime, and the
    dump's scratch file is gone afterwards."""
    if why := available(generation):
        pytest.skip(why)
    root = _node_root(tmp_path, generation)
    (root / "etc/containerd/config.toml").write_text(
        f'version = {version}\n[plugins."{cri}".containerd.runtimes.runc]\n'
        '  runtime_type = "io.containerd.runc.v2"\n'
    )
    before = tree_hash(root)
    _node, the_plan = engine.plan_only(_opts(root, _shim(tmp_path)))
    assert the_plan.preflight.startswith("ok: /usr/bin/containerd on the node loads it: spin=/opt/kwasm/bin/")
    assert "default runtime runc" in the_plan.preflight
    assert tree_hash(root) == before


@pytest.mark.root
@pytest.mark.containerd
def test_real_containerd_sees_an_import_override(tmp_path: Path) -> None:
    """containerd 1.6 replaces the CRI table with an imported file's: the dump lacks our runtime,
    so install refuses before writing (whatever the planner thought)."""
    if why := available("1.6"):
        pytest.skip(why)
    root = _node_root(tmp_path, "1.6")
    (root / "etc/containerd/conf.d").mkdir()
    (root / "etc/containerd/conf.d/10-registry.toml").write_text(
        f'version = 2\n[plugins."{V2}".registry]\n  config_path = "/etc/containerd/certs.d"\n'
    )
    (root / "etc/containerd/config.toml").write_text(
        f'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n'
        f'[plugins."{V2}".containerd.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n'
    )
    before = tree_hash(root)
    try:
        _node, the_plan = engine.plan_only(_opts(root, _shim(tmp_path)))
    except KwasmError as err:  # a refusal by the effective-config planner, naming the import, is right too
        assert "10-registry.toml" in err.message
        return
    assert the_plan.preflight.startswith("REFUSED") and "spin has runtime_type None" in the_plan.preflight
    cli = subprocess.run(
        [sys.executable, "-m", "kwasm_py", "node", "plan", "--host-root", str(root), "--restart", "none",
         "--shim", str(_shim(tmp_path / "cli"))],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO / "installer")},
    )  # fmt: skip
    assert cli.returncode == 1 and "preflight:  REFUSED" in cli.stdout, cli.stdout + cli.stderr
    with pytest.raises(PreflightError):
        engine.install(_opts(root, _shim(tmp_path / "again")))
    assert tree_hash(root) == before


@pytest.mark.root
@pytest.mark.containerd
@pytest.mark.parametrize("generation", ["1.6", "2.x"])
def test_stock_microk8s_template_installs_and_its_render_loads(tmp_path: Path, generation: str) -> None:
    """The stock microk8s template (placeholders and all) installs; the snap's containerd at
    /snap/microk8s/current/bin reads its render (placeholders substituted) with spin in it."""
    if why := available(generation):
        pytest.skip(why)
    root = _node_root(tmp_path, generation)
    snap_bin = root / "snap/microk8s/current/bin"
    snap_bin.mkdir(parents=True)
    (root / "usr/bin/containerd").rename(snap_bin / "containerd")
    args = root / "var/snap/microk8s/current/args"
    args.mkdir(parents=True)
    stock = (Path(__file__).parent / "data/templates/microk8s-containerd-template.toml").read_text()
    (args / "containerd-template.toml").write_text(stock)
    values = {"RUNTIME": "runc", "RUNTIME_TYPE": "io.containerd.runc.v2", "SNAPSHOTTER": "overlayfs"}
    values["SNAP_DATA"] = "/var/snap/microk8s/7000"
    (args / "containerd.toml").write_text(tmpl.substitute_text(stock, values))
    opts = engine.NodeOptions(
        host_root=root,
        shims=(ShimSpec(source=str(_shim(tmp_path)), name="spin", handler="spin"),),
        restart=RestartSpec(RestartMethod.NONE, ""),
    )
    _node, the_plan = engine.plan_only(opts)
    assert the_plan.layout.name == "microk8s"
    assert the_plan.preflight.startswith(
        "ok: /snap/microk8s/current/bin/containerd on the node loads it: spin="
    )
    engine.install(opts)
    written = (args / "containerd-template.toml").read_text()
    assert written.count("${") == stock.count("${")
    doc = cc.load(written, source="t")
    assert cc.remove_runtime(doc, "spin", schema=CriSchema.V2).text == stock  # only our block added
    render = tmp_path / "render.toml"
    render.write_text(tmpl.substitute_text(written, values))
    proc = subprocess.run(
        [str(snap_bin / "containerd"), "--config", str(render), "config", "dump"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    runtimes, default = preflight.cri_view(tomllib.loads(proc.stdout))
    assert default == "runc" and runtimes["spin"]["runtime_type"] == "/opt/kwasm/bin/containerd-shim-spin-v2"
