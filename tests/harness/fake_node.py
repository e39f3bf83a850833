"""A stand-in for `kwasm-py node` that speaks the engine's JSON contract (see COMMON.md).

Usage: ``python fake_node.py install|uninstall|status --output json`` with KWASM_HOST_ROOT set to a
scratch directory that plays the node. State lives in ``<root>/state.json``. Control files:

* ``fail-install``: install fails with its content as the error (step "verify");
* ``drift``: status reports its content as drift (until the next install);
* ``hold-install``: a FIFO; install blocks opening it until the test writes to it;
* every call appends a JSON line to ``<root>/calls.log`` and, when KWASM_FAKE_LOG is set, a
  ``start``/``end`` line with the node name to that shared file (to check restart overlap).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RUNTIME = {
    "handler": "spin",
    "runtime_type": "io.containerd.spin.v2",
    "shim": "/opt/kwasm/bin/containerd-shim-spin-v2",
    "sha256": "5a" * 32,
}


def main() -> int:
    verb = sys.argv[1]
    root = Path(os.environ["KWASM_HOST_ROOT"])
    state_file = root / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"installed": False}
    shared = os.environ.get("KWASM_FAKE_LOG")
    who = os.environ.get("NODE_NAME", root.name)

    def note(doc: dict) -> None:
        with (root / "calls.log").open("a") as f:
            f.write(json.dumps({"verb": verb, **doc}) + "\n")

    def shared_note(what: str) -> None:
        if shared:
            with open(shared, "a") as f:
                f.write(f"{what} {who} {time.monotonic()}\n")

    if verb == "status":
        drift = root / "drift"
        doc = {
            "installed": state["installed"],
            "layout": "fake",
            "config": "/etc/containerd/config.toml",
            "runtimes": [RUNTIME] if state["installed"] else [],
            "drift": [drift.read_text().strip()] if drift.exists() else [],
        }
        note({"installed": state["installed"]})
        print(json.dumps(doc))
        return 0
    if verb == "install":
        shared_note("start")
        hold = root / "hold-install"
        if hold.exists():
            with hold.open() as f:  # blocks until the test opens the FIFO for writing
                f.read()
        fail = root / "fail-install"
        if fail.exists():
            note({"ok": False})
            shared_note("end")
            print(json.dumps({"ok": False, "step": "verify", "error": fail.read_text().strip(), "hint": "h"}))
            return 1
        drift = root / "drift"
        changed = not state["installed"] or drift.exists()
        drift.unlink(missing_ok=True)
        state_file.write_text(json.dumps({"installed": True}))
        note({"changed": changed, "restarted": changed})
        shared_note("end")
        print(
            json.dumps(
                {
                    "ok": True,
                    "changed": changed,
                    "restarted": changed,
                    "layout": "fake",
                    "config": "/etc/containerd/config.toml",
                    "runtimes": [RUNTIME],
                    "verified": True,
                }
            )
        )
        return 0
    if verb == "uninstall":
        shared_note("start")
        changed = state["installed"]
        state_file.write_text(json.dumps({"installed": False}))
        note({"changed": changed})
        shared_note("end")
        print(
            json.dumps(
                {
                    "ok": True,
                    "changed": changed,
                    "restarted": changed,
                    "layout": "fake",
                    "config": "/etc/containerd/config.toml",
                    "runtimes": [],
                    "verified": True,
                }
            )
        )
        return 0
    print(f"unknown verb {verb}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
