"""The agent's engine runner: it passes the request as arguments and turns every answer outside
the process contract into an EngineFailed (the agent reports it on the Node, it never crashes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kwasm_py.cluster.engine_proc import EngineFailed, SubprocessEngine, default_node_command, parse_output
from kwasm_py.contract import EngineRequest, EngineResult
from kwasm_py.errors import ContractError
from tests.test_contract import INSTALLED


def test_parse_output_failures_are_engine_failures():
    """The runner turns a reported failure, no JSON, an outside-the-contract answer and a
    non-zero exit claiming success into EngineFailed (never a crash)."""
    failed = EngineResult.failed("install", step="verify", error="no spin", hint="look").dumps()
    with pytest.raises(EngineFailed) as info:
        parse_output("install", failed, "", 1)
    assert (info.value.step, info.value.error, info.value.hint) == ("verify", "no spin", "look")
    with pytest.raises(EngineFailed, match="gave no JSON \\(exit 2\\): error: no such option"):
        parse_output("install", "", "usage...\nerror: no such option", 2)
    newer = json.dumps({**INSTALLED.to_json(), "version": 7})
    with pytest.raises(EngineFailed, match=r"outside the contract: .*version 7") as info:
        parse_output("install", newer, "", 0)
    assert info.value.step == "contract" and isinstance(info.value.__cause__, ContractError)
    with pytest.raises(EngineFailed, match="exited 3 but reported success"):
        parse_output("install", INSTALLED.dumps(), "", 3)
    # A wrapper's chatter before a one-line document is tolerated.
    one_line = json.dumps(INSTALLED.to_json())
    assert parse_output("install", f"entering node\n{one_line}\n", "", 0) == INSTALLED


def test_subprocess_engine_scrubs_comma_lists_and_passes_arguments(tmp_path: Path, monkeypatch):
    """The child gets the request as arguments and no inherited KWASM_SHIM/KWASM_HANDLER."""
    script = tmp_path / "engine.py"
    script.write_text(
        "import json, os, sys\n"
        "print(json.dumps({'version': 1, 'command': 'status', 'ok': True, 'installed': False,\n"
        "  'status': json.dumps([sys.argv[1:], sorted(k for k in os.environ if k in ('KWASM_SHIM',"
        " 'KWASM_HANDLER', 'KWASM_SOCKET'))]),\n"
        "  'layout': '', 'config': '', 'runtimes': [], 'drift': [], 'containerd': None}))\n"
    )
    monkeypatch.setenv("KWASM_SHIM", "/x,/y")
    monkeypatch.setenv("KWASM_HANDLER", "x,y")
    monkeypatch.setenv("KWASM_SOCKET", "/run/c.sock")  # not the agent's: still inherited
    engine = SubprocessEngine([sys.executable, str(script)], EngineRequest(host_root="/h"))
    argv, env = json.loads(engine.status().status)
    assert argv == ["status", "--host-root", "/h", "--output", "json"]
    assert env == ["KWASM_SOCKET"]


def test_engine_that_cannot_run_or_hangs_is_an_engine_failure(tmp_path: Path):
    """A missing command or a timeout is an EngineFailed naming the verb, not an exception."""
    with pytest.raises(EngineFailed, match="cannot run /nonexistent/kwasm-py"):
        SubprocessEngine(["/nonexistent/kwasm-py", "node"]).install()
    with pytest.raises(EngineFailed, match="node status did not finish in 0s"):
        SubprocessEngine([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.2).status()
    with pytest.raises(EngineFailed, match="1 handlers for 2 shims"):
        SubprocessEngine(["true"], EngineRequest(shims=("/a", "/b"), handlers=("a",))).install()


def test_default_node_command():
    """KWASM_NODE_COMMAND is split as shell words; without it, this interpreter runs the engine."""
    assert default_node_command({"KWASM_NODE_COMMAND": "nsenter -t 1 -- 'kwasm py' node"}) == [
        "nsenter", "-t", "1", "--", "kwasm py", "node",
    ]  # fmt: skip
    assert default_node_command({}) == [sys.executable, "-m", "kwasm_py", "node"]
