"""What `kwasm-py node plan` prints: the install plan, or with --uninstall what `uninstall` would
do, as text or as one JSON object. Changes nothing on the node.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from kwasm_py.errors import UsageError
from kwasm_py.model import OutputFormat


def _emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_plan(opts: Any, output: OutputFormat) -> None:
    """Print what `install` with `opts` would do: layout, config, diff, shims, restart, pre-flight.

    Raises typer.Exit(1) when pre-flight refuses the plan (install would refuse it too).
    """
    from kwasm_py.node import engine
    from kwasm_py.node import restart as restart_mod

    node, the_plan = engine.plan_only(opts)
    lay = node.layout
    data = {
        "layout": lay.name,
        "evidence": list(lay.evidence),
        "config": str(lay.config_path),
        "config_kind": lay.kind.value,
        "reads": str(lay.rendered_path or lay.config_path),
        "containerd": str(the_plan.containerd or "unknown (not answering)"),
        "schema": the_plan.schema.value,
        "notes": list(the_plan.notes),
        "diff": the_plan.diff(),
        "binaries": [
            {"source": b.shim.source, "dest": str(b.dest), "sha256": b.sha256, "write": b.write}
            for b in the_plan.binaries
        ],
        "restart": restart_mod.describe(lay.restart, opts.pid, bus=opts.bus)
        if the_plan.config_changed
        else "none needed",
        "changes": the_plan.changes,
        "preflight": the_plan.preflight,
        "mode": node.mode.mode.value if node.mode else "edit",
        "mode_reason": node.mode.reason if node.mode else "",
    }
    if output is OutputFormat.JSON:
        _emit_json(data)
        if the_plan.preflight.startswith("REFUSED"):
            raise typer.Exit(1)  # install would refuse: the plan is not accepted either
        return
    lines = [
        f"layout:     {data['layout']}",
        *(f"            - {e}" for e in lay.evidence),
        f"config:     {data['config']} ({data['config_kind']}; containerd reads {data['reads']})",
        f"containerd: {data['containerd']}",
        f'table:      plugins."{the_plan.schema.value}".containerd.runtimes',
        *(f"note:       {n}" for n in the_plan.notes),
    ]
    for b in the_plan.binaries:
        action = "write" if b.write else "unchanged"
        lines.append(f"shim:       {b.shim.source} -> {b.dest} ({action}, sha256 {b.sha256[:16]}…)")
    lines.append(f"restart:    {data['restart']}")
    lines.append(f"preflight:  {the_plan.preflight}")
    if not the_plan.changes:
        lines.append("nothing to change")
    print("\n".join(lines))
    if the_plan.config_changed:
        print(the_plan.diff(), end="")
    if the_plan.preflight.startswith("REFUSED"):
        raise typer.Exit(1)  # install would refuse: the plan is not accepted either


def print_uninstall_plan(opts: Any, handlers: list[str], output: str) -> None:
    """Print what `uninstall` of `handlers` would do: the config diff, the files that go, the restart."""
    from kwasm_py.node import engine
    from kwasm_py.node import restart as restart_mod

    if output not in ("text", "json"):
        raise UsageError(f"--output must be text or json, not {output!r}")
    node, the_plan = engine.plan_uninstall(opts, handlers)
    if the_plan is None:
        if output == "json":
            _emit_json({"installed": False, "changes": False, "notes": ["nothing installed by kwasm-py"]})
        else:
            print("nothing installed by kwasm-py on this node; nothing to change")
        return
    lay = node.layout
    config_action = "unchanged"
    if the_plan.changed:
        config_action = "removed" if the_plan.new_data is None else "edited"
        if the_plan.restores_original:
            config_action = "restored byte for byte from its backup"
    remove = [r.handler for r in the_plan.chosen]
    keep = [r.handler for r in the_plan.keep]
    removed_files = [str(p) for p in the_plan.removes]
    data: dict[str, Any] = {
        "installed": True,
        "layout": the_plan.state.layout,
        "config": str(the_plan.config_path),
        "config_action": config_action,
        "remove": remove,
        "keep": keep,
        "files_removed": removed_files,
        "diff": the_plan.diff(),
        "restart": restart_mod.describe(lay.restart, opts.pid, bus=opts.bus)
        if the_plan.changed
        else "none needed",
        "changes": True,
    }
    if output == "json":
        _emit_json(data)
        return
    lines = [
        f"layout:     {data['layout']}",
        f"config:     {data['config']} ({config_action})",
        f"remove:     {', '.join(data['remove'])}",
        *(
            [f"keep:       {', '.join(data['keep'])} (rewrite {the_plan.state_path})"]
            if the_plan.keep
            else []
        ),
        *(f"delete:     {p}" for p in data["files_removed"]),
        f"restart:    {data['restart']}",
    ]
    print("\n".join(lines))
    if the_plan.changed:
        print(the_plan.diff(), end="")
