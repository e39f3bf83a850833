"""containerd/dropin.py: mode choice and the `imports` line edits (pure)."""

from __future__ import annotations

import tomllib
from pathlib import PurePosixPath as P

import pytest

from kwasm_py.containerd import dropin
from kwasm_py.containerd.dropin import Mode
from kwasm_py.errors import ConfigError, UsageError
from kwasm_py.model import ConfigKind, ContainerdVersion, Layout, RestartMethod, RestartSpec
from tests.harness.noderoot import SYSTEMD, UNIT, tree, tree_hash

MAIN = P("/etc/containerd/config.toml")
PLAIN = Layout(
    name="containerd",
    config_path=MAIN,
    kind=ConfigKind.CONFIG,
    restart=RestartSpec(RestartMethod.SYSTEMD, "containerd"),
    socket=P("/run/containerd/containerd.sock"),
)
K3S_DIR = P("/var/lib/rancher/k3s/agent/etc/containerd")
K3S = Layout(
    name="k3s",
    config_path=K3S_DIR / "config-v3.toml.tmpl",
    kind=ConfigKind.TEMPLATE,
    restart=RestartSpec(RestartMethod.SYSTEMD, "k3s"),
    socket=P("/run/k3s/containerd/containerd.sock"),
    rendered_path=K3S_DIR / "config.toml",
)
K0S = Layout(
    name="k0s",
    config_path=P("/etc/k0s/containerd.d/kwasm-py.toml"),
    kind=ConfigKind.DROP_IN,
    restart=RestartSpec(RestartMethod.SYSTEMD, "k0sworker"),
    socket=P("/run/k0s/containerd.sock"),
    rendered_path=P("/etc/k0s/containerd.toml"),
)
C16 = ContainerdVersion(1, 6, 20)
C21 = ContainerdVersion(2, 1, 9)
IMPORTS = {"version": 3, "imports": ["/etc/containerd/conf.d/*.toml"]}


def test_auto_picks_a_dropin_where_containerd_2_imports_a_directory():
    """containerd 2.x + a directory import: our own file in that directory, main untouched."""
    got = dropin.choose(Mode.AUTO, layout=PLAIN, main_data=IMPORTS, containerd=C21)
    assert got.mode is Mode.DROPIN and got.add_import is None
    assert got.layout.kind is ConfigKind.DROP_IN
    assert got.layout.config_path == P("/etc/containerd/conf.d/kwasm-py.toml")
    assert got.layout.rendered_path == MAIN
    assert "merges it deeply" in got.reason


def test_auto_edits_on_containerd_1x_even_with_a_directory_import():
    """containerd 1.x replaces whole plugin tables per import: edit the main file instead."""
    data = {"version": 2, "imports": ["/etc/containerd/conf.d/*.toml"]}
    got = dropin.choose(Mode.AUTO, layout=PLAIN, main_data=data, containerd=C16)
    assert got.mode is Mode.EDIT and got.layout == PLAIN
    assert "replaces a plugin's whole table" in got.reason
    with pytest.raises(UsageError, match=r"--mode dropin: containerd 1\.6\.20 replaces"):
        dropin.choose(Mode.DROPIN, layout=PLAIN, main_data=data, containerd=C16)


def test_auto_edits_without_an_import_and_dropin_adds_one():
    """No directory import: auto edits; dropin adds `conf.d/*.toml` beside the main config."""
    data = {"version": 3}
    assert dropin.choose(Mode.AUTO, layout=PLAIN, main_data=data, containerd=C21).mode is Mode.EDIT
    got = dropin.choose(Mode.DROPIN, layout=PLAIN, main_data=data, containerd=C21)
    assert got.mode is Mode.DROPIN
    assert got.add_import == "/etc/containerd/conf.d/*.toml"
    assert got.layout.config_path == P("/etc/containerd/conf.d/kwasm-py.toml")


def test_edit_is_always_honoured_except_on_k0s():
    """--mode edit keeps the detected layout; k0s regenerates its main file, so edit is refused."""
    got = dropin.choose(Mode.EDIT, layout=PLAIN, main_data=IMPORTS, containerd=C21)
    assert got.mode is Mode.EDIT and got.layout == PLAIN
    with pytest.raises(UsageError, match="k0s regenerates"):
        dropin.choose(Mode.EDIT, layout=K0S, main_data={}, containerd=C21)
    assert dropin.choose(Mode.AUTO, layout=K0S, main_data={}, containerd=C21).layout == K0S


def test_k3s_render_with_its_drop_in_import():
    """k3s renders `imports = [".../config-v3.toml.d/*.toml"]`: drop-in there, template untouched."""
    data = {"version": 3, "imports": [f"{K3S_DIR}/config-v3.toml.d/*.toml"]}
    got = dropin.choose(Mode.AUTO, layout=K3S, main_data=data, containerd=C21)
    assert got.layout.config_path == K3S_DIR / "config-v3.toml.d" / "kwasm-py.toml"
    assert got.layout.rendered_path == K3S_DIR / "config.toml"
    with pytest.raises(UsageError, match="imports no directory"):
        dropin.choose(Mode.DROPIN, layout=K3S, main_data={"version": 3}, containerd=C21)


def test_unknown_containerd_version_decides_from_the_file():
    """No running containerd: a version 3 file is read by 2.x only; version 2 stays an edit."""
    got = dropin.choose(Mode.AUTO, layout=PLAIN, main_data=IMPORTS, containerd=None)
    assert got.mode is Mode.DROPIN
    v2 = {"version": 2, "imports": ["/etc/containerd/conf.d/*.toml"]}
    got = dropin.choose(Mode.AUTO, layout=PLAIN, main_data=v2, containerd=None)
    assert got.mode is Mode.EDIT and "unknown" in got.reason


def test_import_dirs_resolves_relative_entries_and_skips_other_globs():
    """Only DIR/*.toml entries count; relative ones resolve against the main config's directory."""
    data = {"imports": ["conf.d/*.toml", "/etc/x/single.toml", "/etc/y/*-runtime.toml", "/etc/*/z/*.toml"]}
    assert dropin.import_dirs(data, MAIN) == [("conf.d/*.toml", P("/etc/containerd/conf.d"))]
    with pytest.raises(ConfigError, match="must be a list"):
        dropin.import_dirs({"imports": "/etc/x/*.toml"}, MAIN)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version = 3\n[plugins]\n", 'version = 3\nimports = ["/e/*.toml"]\n[plugins]\n'),
        ("# c\n[plugins]\n", 'imports = ["/e/*.toml"]\n# c\n[plugins]\n'),
        ("", 'imports = ["/e/*.toml"]\n'),
        ('version = 2\nimports = ["/a.toml"]\n', 'version = 2\nimports = ["/a.toml", "/e/*.toml"]\n'),
        ("version = 3\r\n[x]\r\n", 'version = 3\r\nimports = ["/e/*.toml"]\r\n[x]\r\n'),
        ("imports = []\n", 'imports = ["/e/*.toml"]\n'),
    ],
)
def test_add_import_round_trips(text, expected):
    """add_import writes one line (or one item) and remove_import gives the original bytes back."""
    new = dropin.add_import(text, "/e/*.toml", source="c.toml")
    assert new == expected
    assert dropin.add_import(new, "/e/*.toml", source="c.toml") == new
    back = dropin.remove_import(new, "/e/*.toml", source="c.toml")
    if text == "imports = []\n":  # containerd reads an empty `imports` as none at all
        assert back == ""
    else:
        assert back == text


def test_add_import_refuses_a_multi_line_array():
    """An `imports` array over several lines is left alone, with a hint."""
    text = 'imports = [\n  "/a.toml",\n]\n'
    with pytest.raises(ConfigError, match="cannot add") as err:
        dropin.add_import(text, "/e/*.toml", source="c.toml")
    assert "--mode edit" in (err.value.hint or "")


def test_remove_import_keeps_others_changes():
    """Another tool added an import after ours: only ours goes."""
    text = 'version = 3\nimports = ["/e/*.toml", "/gpu/*.toml"]\n'
    assert dropin.remove_import(text, "/e/*.toml", source="c") == 'version = 3\nimports = ["/gpu/*.toml"]\n'
    assert dropin.remove_import("version = 3\n", "/e/*.toml", source="c") == "version = 3\n"


# --- through the CLI on node roots (no containerd running: its version comes from the file) ---

V3_MAIN = 'version = 3\nimports = ["/etc/containerd/conf.d/*.toml"]\n'
K3S_NODE_DIR = "/var/lib/rancher/k3s/agent/etc/containerd"


def test_version_4_main_config_gets_a_version_4_dropin(tmp_path, shim, kwasm):
    """containerd 2.3 writes `version = 4`; our drop-in carries the same version (a mismatch
    loses settings on 2.0-2.2 and stops 2.3.0-2.3.4 from starting) and the v3 plugin IDs."""
    main = V3_MAIN.replace("version = 3", "version = 4")
    root = tree(
        tmp_path / "root",
        {**SYSTEMD, "/etc/containerd/config.toml": main, "/etc/systemd/system/containerd.service": UNIT},
    )
    r = kwasm("node", "install", "--host-root", str(root), "--shim", str(shim), "--restart", "none")
    assert r.returncode == 0, r.stderr
    ours = tomllib.loads((root / "etc/containerd/conf.d/kwasm-py.toml").read_text())
    assert ours["version"] == 4
    assert "spin" in ours["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
    assert (root / "etc/containerd/config.toml").read_text() == main


def test_k3s_render_that_imports_config_v3_toml_d(tmp_path, shim, kwasm):
    """k3s (since k3s-io/k3s#13680) renders `imports = [".../config-v3.toml.d/*.toml"]`: our
    runtime goes there, no template is written, and uninstall leaves the tree as it was."""
    render = f'version = 3\nimports = ["{K3S_NODE_DIR}/config-v3.toml.d/*.toml"]\n'
    unit = "[Service]\nExecStart=/usr/local/bin/k3s server\n"
    root = tree(
        tmp_path / "root",
        {
            **SYSTEMD,
            f"{K3S_NODE_DIR}/config.toml": render,
            "/etc/systemd/system/k3s.service": unit,
            "/opt/": "",
        },
    )
    before = tree_hash(root)
    base = ["--host-root", str(root), "--restart", "none"]
    r = kwasm("node", "install", *base, "--shim", str(shim))
    assert r.returncode == 0, r.stderr
    assert (root / K3S_NODE_DIR.lstrip("/") / "config-v3.toml.d/kwasm-py.toml").exists()
    assert not (root / K3S_NODE_DIR.lstrip("/") / "config-v3.toml.tmpl").exists()
    r = kwasm("node", "plan", *base, "--shim", str(shim), "--mode", "edit")
    assert r.returncode == 2 and "would move the runtime" in r.stderr and "--mode edit` moves it" in r.stderr
    # install --mode edit moves it: the drop-in goes, the template holds our table
    r = kwasm("node", "install", *base, "--shim", str(shim), "--mode", "edit")
    assert r.returncode == 0, r.stderr
    assert "moved the runtime from" in r.stdout + r.stderr
    k3s = root / K3S_NODE_DIR.lstrip("/")
    assert not (k3s / "config-v3.toml.d").exists()
    assert "containerd-shim-spin-v2" in (k3s / "config-v3.toml.tmpl").read_text()
    assert kwasm("node", "uninstall", *base).returncode == 0
    assert tree_hash(root) == before
