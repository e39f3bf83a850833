"""Drop-in installs against real containerd: the main config stays byte-identical.

containerd 2.x merges imported files deeply, so our own `conf.d/kwasm-py.toml` adds the runtime
and changes nothing else (checked with containerd's own `config dump`); 1.x replaces a plugin's
whole table per imported file, so there `auto` edits the main file and `dropin` is refused.
"""

from __future__ import annotations

import subprocess
import tomllib

import pytest

from tests.harness.cli import run_kwasm
from tests.harness.containerd import PrivateContainerd, fake_shim
from tests.harness.noderoot import tree_hash

pytestmark = [pytest.mark.containerd, pytest.mark.root]

CRI_V3 = "io.containerd.cri.v1.runtime"
#: Files a private containerd and its supervisor rewrite themselves across a restart (under .dir).
CONTAINERD_WRITES = {"lib/io.containerd.metadata.v1.bolt/meta.db", "containerd.log", "containerd.pid"}


def _dump_without_runtime(ctd: PrivateContainerd, handler: str) -> dict:
    """containerd's own view of its config, minus one runtime (for before/after comparisons)."""
    dumped = ctd.config_dump()
    assert dumped.returncode == 0, dumped.stderr
    data = tomllib.loads(dumped.stdout)
    plugins = data.get("plugins", {})
    for plugin in (CRI_V3, "io.containerd.grpc.v1.cri"):
        plugins.get(plugin, {}).get("containerd", {}).get("runtimes", {}).pop(handler, None)
    data.pop("imports", None)  # names the files it read, which is what changes
    return data


def _uninstall(ctd: PrivateContainerd) -> subprocess.CompletedProcess[str]:
    args = [a for a in ctd.node_args() if a not in ("--config", str(ctd.config))]
    return run_kwasm("node", "uninstall", *args)


def _with_imports(ctd: PrivateContainerd) -> str:
    confd = ctd.dir / "conf.d"
    confd.mkdir(exist_ok=True)
    text = ctd.config.read_text()
    lines = text.splitlines(keepends=True)
    at = next(i + 1 for i, line in enumerate(lines) if line.startswith("version"))
    return "".join([*lines[:at], f'imports = ["{confd}/*.toml"]\n', *lines[at:]])


def test_2x_dropin_leaves_the_main_config_byte_identical(ctd2: PrivateContainerd) -> None:
    """containerd 2.x importing conf.d: auto writes our drop-in, CRI lists the runtime, every
    other setting reads as before (containerd's own dump), uninstall removes exactly our file."""
    main = _with_imports(ctd2)
    ctd2.config.write_text(main)
    shim = fake_shim(ctd2.dir / "src")
    before_dump = _dump_without_runtime(ctd2, "spin")
    before_tree = tree_hash(ctd2.dir / "conf.d")
    r = run_kwasm("node", "plan", *ctd2.node_args(), "--shim", str(shim))
    assert r.returncode == 0, r.stderr
    assert "mode dropin" in r.stdout and "merges it deeply" in r.stdout, r.stdout
    assert "preflight:  ok" in r.stdout, r.stdout
    r = run_kwasm("node", "install", *ctd2.node_args(), "--shim", str(shim))
    assert r.returncode == 0, r.stderr
    assert ctd2.config.read_text() == main  # every byte of the main configuration
    ours = ctd2.dir / "conf.d" / "kwasm-py.toml"
    data = tomllib.loads(ours.read_text())
    assert data["version"] == 3
    assert set(data) == {"version", "plugins"}
    status = ctd2.cri_status()
    installed = str(ctd2.dir / "kwasm" / "bin" / "containerd-shim-spin-v2")
    assert status.runtimes.get("spin") == installed
    assert "runc" in status.runtimes
    assert _dump_without_runtime(ctd2, "spin") == before_dump
    r = _uninstall(ctd2)
    assert r.returncode == 0, r.stderr
    assert not ours.exists()
    assert ctd2.config.read_text() == main
    assert tree_hash(ctd2.dir / "conf.d") == before_tree
    assert not (ctd2.dir / "kwasm").exists()
    assert "spin" not in ctd2.cri_status().runtimes


def test_2x_without_imports_auto_edits_and_dropin_adds_the_line(ctd2: PrivateContainerd) -> None:
    """No imports line: auto edits the main file; --mode dropin adds `imports`, writes our file
    beside it, and uninstall takes both out again (the main file byte-identical)."""
    main = ctd2.config.read_text()
    shim = fake_shim(ctd2.dir / "src")
    r = run_kwasm("node", "plan", *ctd2.node_args(), "--shim", str(shim))
    assert r.returncode == 0 and "mode edit" in r.stdout and "imports no directory" in r.stdout, r.stdout
    before = tree_hash(ctd2.dir)
    r = run_kwasm("node", "install", *ctd2.node_args(), "--shim", str(shim), "--mode", "dropin")
    assert r.returncode == 0, r.stderr
    confd = ctd2.config.parent / "conf.d"
    assert tomllib.loads(ctd2.config.read_text())["imports"] == [f"{confd}/*.toml"]
    assert (confd / "kwasm-py.toml").exists()
    assert ctd2.cri_status().runtimes.get("spin") == str(
        ctd2.dir / "kwasm" / "bin" / "containerd-shim-spin-v2"
    )
    r = _uninstall(ctd2)
    assert r.returncode == 0, r.stderr
    assert ctd2.config.read_text() == main
    assert not confd.exists()
    after = tree_hash(ctd2.dir)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed <= CONTAINERD_WRITES, changed


def test_1x_with_imports_edits_and_refuses_dropin(ctd16: PrivateContainerd) -> None:
    """containerd 1.6 would let our drop-in replace the whole CRI table: auto edits the main
    file, --mode dropin is refused with the reason and nothing changes."""
    main = _with_imports(ctd16)
    ctd16.config.write_text(main)
    shim = fake_shim(ctd16.dir / "src")
    before = tree_hash(ctd16.dir / "conf.d")
    r = run_kwasm("node", "install", *ctd16.node_args(), "--shim", str(shim), "--mode", "dropin")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "replaces a plugin's whole table" in r.stderr and "hint: use --mode auto or edit" in r.stderr
    assert ctd16.config.read_text() == main and tree_hash(ctd16.dir / "conf.d") == before
    r = run_kwasm("node", "install", *ctd16.node_args(), "--shim", str(shim))
    assert r.returncode == 0, r.stderr
    assert (
        "spin"
        in tomllib.loads(ctd16.config.read_text())["plugins"]["io.containerd.grpc.v1.cri"]["containerd"][
            "runtimes"
        ]
    )
    assert not (ctd16.dir / "conf.d" / "kwasm-py.toml").exists()
    assert _uninstall(ctd16).returncode == 0
    assert ctd16.config.read_text() == main


def test_2x_another_dropin_with_our_handler_is_refused_before_writing(ctd2: PrivateContainerd) -> None:
    """Another tool's drop-in in the same directory defines `spin`: the effective config shows
    it, so install is refused naming that file, and nothing is written or restarted."""
    main = _with_imports(ctd2)
    ctd2.config.write_text(main)
    theirs = ctd2.dir / "conf.d" / "50-other.toml"
    theirs.write_text(
        f'version = 3\n[plugins."{CRI_V3}".containerd.runtimes.spin]\n'
        '  runtime_type = "io.containerd.spin.v2"\n'
    )
    shim = fake_shim(ctd2.dir / "src")
    before = tree_hash(ctd2.dir / "conf.d")
    pid = ctd2.daemon().pid
    r = run_kwasm("node", "install", *ctd2.node_args(), "--shim", str(shim))
    assert r.returncode != 0
    assert "50-other.toml" in r.stderr, r.stderr
    assert tree_hash(ctd2.dir / "conf.d") == before and ctd2.config.read_text() == main
    assert not (ctd2.dir / "kwasm").exists()
    assert ctd2.daemon().pid == pid


def test_2x_switching_mode_moves_the_runtime_with_one_restart(ctd2: PrivateContainerd) -> None:
    """edit -> dropin -> edit on a provisioned node: each move restarts containerd once, CRI lists
    the runtime from its new place, and the old place holds no copy."""
    main = _with_imports(ctd2)
    ctd2.config.write_text(main)
    shim = fake_shim(ctd2.dir / "src")
    ours = ctd2.dir / "conf.d" / "kwasm-py.toml"
    installed = str(ctd2.dir / "kwasm" / "bin" / "containerd-shim-spin-v2")

    def boots() -> int:
        return ctd2.log.read_text().count("containerd successfully booted")

    def install(mode: str) -> None:
        r = run_kwasm("node", "install", *ctd2.node_args(), "--shim", str(shim), "--mode", mode)
        assert r.returncode == 0, r.stderr

    install("edit")
    assert "spin" in ctd2.config.read_text() and not ours.exists()
    start = boots()
    install("dropin")
    assert boots() == start + 1
    assert ctd2.config.read_text() == main and ours.exists()
    assert ctd2.cri_status().runtimes.get("spin") == installed
    install("edit")
    assert boots() == start + 2
    assert not ours.exists() and "spin" in ctd2.config.read_text()
    assert ctd2.cri_status().runtimes.get("spin") == installed
    assert _uninstall(ctd2).returncode == 0
    assert ctd2.config.read_text() == main
