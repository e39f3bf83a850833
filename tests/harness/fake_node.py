"""A stand-in for `kwasm-py node` that speaks the engine's process contract (kwasm_py.contract).

Usage: ``python fake_node.py install|uninstall|status --host-root DIR [OPTIONS] --output json``,
the options the real commands take (unknown ones exit 2, like the real CLI), with the host root a
scratch directory that plays the node. State lives in ``<root>/state.json``. Control files:

* ``fail-install``: install fails with its content as the error (step "verify", or the content
  of ``fail-step`` when that file exists);
* ``unverified``: install succeeds but reports ``verified: false`` (containerd did not confirm);
* ``fail-uninstall``: uninstall fails with its content as the error (step "uninstall");
* ``drift``: status reports its content as drift (until the next install);
* ``hold-install``: a FIFO; install blocks opening it until the test writes to it;
* ``bad-result``: every command prints its content instead of a result, exit 0 (a malformed or
  wrong-version answer);
* every call appends a JSON line (verb, argv, whether KWASM_SHIM/KWASM_HANDLER reached it, and
  what it did) to ``<root>/calls.log`` and, when KWASM_FAKE_LOG is set, a ``start``/``end``
  line with the node name to that shared file (to check restart overlap).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from kwasm_py.contract import EngineResult, Runtime

RUNTIME = Runtime(
    handler="spin",
    runtime_type="io.containerd.spin.v2",
    shim="/opt/kwasm/bin/containerd-shim-spin-v2",
    sha256="5a" * 32,
)
CONFIG = "/etc/containerd/config.toml"


def parse(argv: list[str]) -> argparse.Namespace:
    """The real commands' options, per verb (only those the agent may pass)."""
    parser = argparse.ArgumentParser(prog="fake_node")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb in ("install", "uninstall", "status"):
        p = verbs.add_parser(verb)
        p.add_argument("--host-root", required=True)
        p.add_argument("--pid")
        p.add_argument("--install-dir")
        p.add_argument("--output", choices=["text", "json"], default="text")
        if verb != "status":
            p.add_argument("--restart")
            p.add_argument("--handler", action="append", default=[])
        if verb == "install":
            p.add_argument("--shim", action="append", default=[])
            p.add_argument("--verify", action="store_true")
    return parser.parse_args(argv)


def main() -> int:
    args = parse(sys.argv[1:])
    verb = args.verb
    root = Path(args.host_root)
    state_file = root / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"installed": False}
    shared = os.environ.get("KWASM_FAKE_LOG")
    who = os.environ.get("NODE_NAME", root.name)

    def note(doc: dict) -> None:
        seen_env = sorted(k for k in ("KWASM_SHIM", "KWASM_HANDLER") if k in os.environ)
        with (root / "calls.log").open("a") as f:
            f.write(json.dumps({"verb": verb, "argv": sys.argv[1:], "env": seen_env, **doc}) + "\n")

    def shared_note(what: str) -> None:
        if shared:
            with open(shared, "a") as f:
                f.write(f"{what} {who} {time.monotonic()}\n")

    bad = root / "bad-result"
    if bad.exists():
        note({"bad": True})
        print(bad.read_text())
        return 0
    if verb == "status":
        drift = root / "drift"
        result = EngineResult(
            command="status",
            installed=state["installed"],
            status="installed" if state["installed"] else "absent",
            layout="fake",
            config=CONFIG,
            runtimes=(RUNTIME,) if state["installed"] else (),
            drift=(drift.read_text().strip(),) if drift.exists() else (),
        )
        note({"installed": state["installed"]})
        print(result.dumps())
        return 0
    if verb == "install":
        shared_note("start")
        hold = root / "hold-install"
        if hold.exists():
            with hold.open() as f:  # blocks until the test opens the FIFO for writing
                f.read()
        fail = root / "fail-install"
        step = (root / "fail-step").read_text().strip() if (root / "fail-step").exists() else "verify"
        if fail.exists():
            note({"ok": False})
            shared_note("end")
            print(EngineResult.failed("install", step=step, error=fail.read_text().strip(), hint="h").dumps())
            return 1
        drift = root / "drift"
        changed = not state["installed"] or drift.exists()
        drift.unlink(missing_ok=True)
        state_file.write_text(json.dumps({"installed": True}))
        note({"changed": changed, "restarted": changed})
        shared_note("end")
        result = EngineResult(
            command="install",
            changed=changed,
            restarted=changed,
            verified=not (root / "unverified").exists(),
            layout="fake",
            config=CONFIG,
            runtimes=(RUNTIME,),
        )
        print(result.dumps())
        return 0
    shared_note("start")  # uninstall
    fail = root / "fail-uninstall"
    if fail.exists():
        note({"ok": False})
        shared_note("end")
        print(EngineResult.failed("uninstall", step="uninstall", error=fail.read_text().strip()).dumps())
        return 1
    changed = state["installed"]
    state_file.write_text(json.dumps({"installed": False}))
    note({"changed": changed})
    shared_note("end")
    result = EngineResult(
        command="uninstall",
        changed=changed,
        restarted=changed,
        verified=True,
        layout="fake",
        config=CONFIG,
        runtimes=(RUNTIME,) if changed else (),
    )
    print(result.dumps())
    return 0


if __name__ == "__main__":
    sys.exit(main())
