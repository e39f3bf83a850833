"""The agent/engine process contract: results round-trip and are validated, the node CLI prints
them, requests carry one value per argument."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kwasm_py.contract import CONTRACT_VERSION, ContainerdView, EngineRequest, EngineResult, Runtime
from kwasm_py.errors import ContractError, KwasmError
from tests.harness.cli import invoke
from tests.harness.noderoot import SYSTEMD, UNIT, V2, tree

SPIN = Runtime(
    "spin", "/opt/kwasm/bin/containerd-shim-spin-v2", "/opt/kwasm/bin/containerd-shim-spin-v2", "ab" * 32
)
INSTALLED = EngineResult(
    command="install",
    changed=True,
    restarted=True,
    verified=True,
    layout="containerd",
    config="/etc/containerd/config.toml",
    runtimes=(SPIN,),
    notes=("a note",),
)
STATUS = EngineResult(
    command="status",
    installed=True,
    status="installed",
    layout="containerd",
    config="/etc/containerd/config.toml",
    runtimes=(SPIN,),
    drift=("shim changed",),
    containerd=ContainerdView(ready=True, version="1.6.20", runtimes={"spin": SPIN.runtime_type}),
)


@pytest.mark.parametrize(
    "result",
    [
        INSTALLED,
        STATUS,
        EngineResult(
            command="status", status="absent", containerd=ContainerdView(ready=False, error="no socket")
        ),
        EngineResult(command="uninstall", changed=False),
        EngineResult.failed("install", step="verify", error="containerd does not list spin", hint="h"),
    ],
)
def test_results_round_trip(result: EngineResult):
    """Every kind of result survives to_json -> JSON text -> from_json unchanged."""
    assert EngineResult.loads(result.dumps(), command=result.command) == result
    assert result.to_json()["version"] == CONTRACT_VERSION


def test_result_keys_per_kind():
    """A change result, a status and a failure carry exactly their documented keys."""
    assert set(INSTALLED.to_json()) == {
        "version", "command", "ok", "changed", "restarted", "verified",
        "layout", "config", "runtimes", "notes",
    }  # fmt: skip
    assert set(STATUS.to_json()) == {
        "version", "command", "ok", "installed", "status",
        "layout", "config", "runtimes", "drift", "containerd",
    }  # fmt: skip
    failed = EngineResult.failed("uninstall", step="", error="e").to_json()
    assert failed == {
        "version": 1,
        "command": "uninstall",
        "ok": False,
        "step": "uninstall",
        "error": "e",
        "hint": "",
    }


def _doc(**changes: object) -> dict:
    doc = INSTALLED.to_json()
    for key, value in changes.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_doc(version=CONTRACT_VERSION + 1), "contract version 2; this kwasm-py reads up to 1"),
        (_doc(version=None), "no valid version"),
        (_doc(version="1"), "no valid version"),
        (_doc(version=True), "no valid version"),
        (_doc(command="reboot"), "no known command"),
        (_doc(command="status"), "answers 'status', not 'install'"),
        (_doc(verified=None), "needs 'verified' as bool, got NoneType"),
        (_doc(changed=1), "needs 'changed' as bool, got int"),
        (_doc(runtimes="spin"), "needs 'runtimes' as list"),
        (_doc(runtimes=[{"handler": "spin"}]), "runtimes[0] needs 'runtime_type'"),
        (_doc(notes=[1]), "'notes' must hold only strings"),
        ([INSTALLED.to_json()], "must be a JSON object"),
    ],
)
def test_malformed_or_newer_results_are_refused(doc: object, message: str):
    """A newer version, another command, a missing key or a wrong type is a ContractError."""
    with pytest.raises(ContractError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        EngineResult.from_json(doc, command="install")
    assert isinstance(info.value, KwasmError) and info.value.hint


def test_unknown_keys_are_ignored_within_a_version():
    """Within one version keys are only added: an older reader ignores the new ones."""
    assert EngineResult.from_json({**INSTALLED.to_json(), "added_later": [1, 2]}) == INSTALLED


def test_not_json_is_refused():
    """Text that is not JSON at all is a ContractError, raised from the JSON error."""
    with pytest.raises(ContractError, match="not JSON") as info:
        EngineResult.loads("Traceback (most recent call last):")
    assert isinstance(info.value.__cause__, ValueError)


def test_request_argv_one_value_per_argument():
    """Each shim and handler is its own argument (a comma in a path stays in it); uninstall and
    status get only the options they take; every command ends in --output json."""
    req = EngineRequest(
        host_root="/host",
        pid=1,
        restart="auto",
        install_dir="/opt/kwasm",
        shims=("/s/containerd-shim-spin-v2", "/odd,dir/containerd-shim-slight-v2"),
        handlers=("spin", "slight"),
    )
    assert req.argv("install") == [
        "install", "--host-root", "/host", "--pid", "1", "--install-dir", "/opt/kwasm",
        "--restart", "auto",
        "--shim", "/s/containerd-shim-spin-v2", "--shim", "/odd,dir/containerd-shim-slight-v2",
        "--handler", "spin", "--handler", "slight",
        "--verify", "--output", "json",
    ]  # fmt: skip
    assert req.argv("uninstall") == [
        "uninstall", "--host-root", "/host", "--pid", "1", "--install-dir", "/opt/kwasm",
        "--restart", "auto", "--output", "json",
    ]  # fmt: skip
    assert req.argv("status") == [
        "status", "--host-root", "/host", "--pid", "1", "--install-dir", "/opt/kwasm", "--output", "json",
    ]  # fmt: skip
    assert EngineRequest().argv("status") == ["status", "--output", "json"]
    with pytest.raises(ContractError, match="1 handlers for 2 shims"):
        EngineRequest(shims=("/a", "/b"), handlers=("a",)).argv("install")


def _node_root(tmp_path: Path) -> Path:
    return tree(
        tmp_path / "root",
        {
            **SYSTEMD,
            "/etc/containerd/config.toml": V2,
            "/usr/bin/containerd": "",
            "/lib/systemd/system/containerd.service": UNIT,
        },
    )


def _shim(directory: Path) -> Path:
    directory.mkdir(parents=True)
    path = directory / "containerd-shim-spin-v2"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_node_cli_prints_contract_results(tmp_path: Path):
    """`node install|status|uninstall -o json` print contract documents the agent can read,
    failures included; a shim path with a comma given as --shim stays one path."""
    root = _node_root(tmp_path)
    shim = _shim(tmp_path / "odd,dir")
    common = ["--host-root", str(root), "--restart", "none", "-o", "json"]
    res = invoke("node", "install", *common, "--shim", str(shim))
    assert res.code == 0, res.err
    installed = EngineResult.loads(res.out, command="install")
    assert installed.changed and not installed.restarted and installed.layout == "containerd"
    assert [r.handler for r in installed.runtimes] == ["spin"]
    res = invoke("node", "status", "--host-root", str(root), "--no-containerd", "-o", "json")
    status = EngineResult.loads(res.out, command="status")
    assert status.installed and status.status == "installed" and status.drift == ()
    assert status.containerd is None and status.runtimes == installed.runtimes
    res = invoke("node", "install", *common, "--shim", str(tmp_path / "containerd-shim-nope-v2"))
    failed = EngineResult.loads(res.out, command="install")
    assert res.code != 0 and not failed.ok and failed.error and failed.step == "pre-flight"
    res = invoke("node", "uninstall", *common)
    assert res.code == 0, res.err
    removed = EngineResult.loads(res.out, command="uninstall")
    assert removed.changed and [r.handler for r in removed.runtimes] == ["spin"]


def test_node_cli_kwasm_shim_is_comma_separated(tmp_path: Path):
    """KWASM_SHIM (and KWASM_HANDLER) keep working for users: comma-separated lists."""
    root = _node_root(tmp_path)
    spin = _shim(tmp_path / "a")
    other = tmp_path / "b" / "containerd-shim-slight-v2"
    other.parent.mkdir()
    other.write_bytes(spin.read_bytes())
    other.chmod(0o755)
    env = {"KWASM_SHIM": f"{spin},{other}", "KWASM_HANDLER": "spin,wasm-slight"}
    res = invoke("node", "plan", "--host-root", str(root), "-o", "json", env=env)
    assert res.code == 0, res.err
    plan = json.loads(res.out)
    assert [b["source"] for b in plan["binaries"]] == [str(spin), str(other)]
    assert "wasm-slight" in plan["diff"]
