"""`kwasm-py sandbox ...`: throwaway real nodes (systemd-nspawn) to try and test the installer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kwasm_py import sandbox
from kwasm_py.errors import UsageError
from kwasm_py.model import OutputFormat

app = typer.Typer(
    no_args_is_help=True,
    help="Boot throwaway real nodes (systemd + containerd under systemd-nspawn, needs root).",
)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _describe(node: sandbox.Node) -> str:
    return "\n".join(
        [
            f"node {node.name} is up ({node.suite}, {node.flavor}); containerd socket {node.socket}",
            f"  host root: {node.root}",
            f"  pid:       {node.pid}",
            f"  restart:   {node.restart}",
            "use it:",
            f"  export KWASM_HOST_ROOT={node.root} KWASM_PID={node.pid}",
            "  kwasm-py node install --shim ./containerd-shim-spin-v2",
            "  kwasm-py node status",
            f"stop it:  kwasm-py sandbox down {node.name}",
        ]
    )


@app.command()
def up(
    suite: Annotated[str, typer.Option(help=f"Debian suite: {', '.join(sandbox.SUITES)}")] = "bookworm",
    name: Annotated[str | None, typer.Option(help="Node name (default: SUITE[-FLAVOR][-N])")] = None,
    flavor: Annotated[
        str,
        typer.Option(
            help="What runs containerd: containerd (its systemd unit), k3s / k3s-agent "
            "(a k3s stand-in unit), k3d (no systemd; PID 1 restarts containerd)"
        ),
    ] = "containerd",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for containerd")] = 90.0,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="text, or one JSON object")
    ] = OutputFormat.TEXT,
) -> None:
    """Build (once, cached) and boot a node; print its host root and PID."""
    node = sandbox.up(suite=suite, flavor_name=flavor, name=name, timeout=timeout, log=_progress)
    if output is OutputFormat.JSON:
        print(json.dumps({**node.to_json(), "host_socket": str(node.host_socket)}))
    else:
        print(_describe(node))


@app.command()
def down(
    name: Annotated[str | None, typer.Argument(help="Node to stop")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every sandbox node")] = False,
) -> None:
    """Stop a node's processes (by PID) and remove its copy."""
    if all_ == (name is not None):
        raise UsageError("give a node NAME or --all", hint="see `kwasm-py sandbox list`")
    nodes = sandbox.down_all() if all_ else [sandbox.down(name or "")]
    for node in nodes:
        print(f"node {node.name} stopped and removed")


@app.command("list")
def list_(
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="text, or a JSON list")
    ] = OutputFormat.TEXT,
) -> None:
    """List sandbox nodes with their host root and PID."""
    rows = sandbox.list_nodes()
    if output is OutputFormat.JSON:
        print(json.dumps([{**n.to_json(), "running": alive} for n, alive in rows]))
        return
    if not rows:
        print("no sandbox nodes")
        return
    print(f"{'NAME':<24} {'SUITE':<9} {'FLAVOR':<10} {'STATE':<8} {'PID':>8}  HOST ROOT")
    for n, alive in rows:
        state = "running" if alive else "stopped"
        print(f"{n.name:<24} {n.suite:<9} {n.flavor:<10} {state:<8} {n.pid:>8}  {n.root}")


@app.command()
def build(
    suite: Annotated[list[str] | None, typer.Option(help="Suite(s) to build (default: all)")] = None,
) -> None:
    """Build the cached node roots now (debootstrap; about a minute each, once)."""
    for s in suite or list(sandbox.SUITES):
        path = sandbox.ensure_root(s, log=_progress)
        print(f"{s}: {path}")


STAND_IN_SHIM = """#!/bin/sh
# kwasm-py demo stand-in for containerd-shim-spin-v2 (the real shim could not be downloaded):
# it logs how containerd called it and refuses to start. Registration works the same way.
echo "$(date -u +%FT%TZ) $0 $*" >> /var/log/kwasm-demo-shim.log
echo "kwasm-py demo stand-in shim: fetch the real one with 'kwasm-py shims fetch spin'" >&2
exit 3
"""


def _demo_shim(log: sandbox.Log) -> str:
    """The real spin shim when it can be downloaded, else a clearly labelled stand-in."""
    from kwasm_py.errors import KwasmError
    from kwasm_py.shims import fetch as artifacts
    from kwasm_py.shims import source as shim_source

    dest = sandbox.cache_dir() / "shims"
    try:
        shims = shim_source.resolve_shims(
            "fetch",
            names=["spin"],
            directory=dest / shim_source.resolve_arch("auto"),
            fetch_options=artifacts.FetchOptions(retries=1, connect_timeout=5.0, read_timeout=20.0),
        )
        log(f"using the spin shim {shims[0].version} ({shims[0].sha256[:16]}…, checksum verified)")
        return str(shims[0].path)
    except KwasmError as err:
        stand_in = dest / "stand-in" / "containerd-shim-spin-v2"
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text(STAND_IN_SHIM)
        stand_in.chmod(0o755)
        log(f"could not download the spin shim ({err.message})")
        log(f"using a stand-in shim script instead: {stand_in}")
        return str(stand_in)


@app.command()
def demo(
    suite: Annotated[str, typer.Option(help=f"Debian suite: {', '.join(sandbox.SUITES)}")] = "bookworm",
    shim: Annotated[str | None, typer.Option(help="Shim to install (default: fetch spin)")] = None,
    keep: Annotated[bool, typer.Option("--keep/--down", help="Leave the node running afterwards")] = True,
) -> None:
    """Boot a throwaway node, install the Spin runtime into it, and show containerd's view."""
    from kwasm_py.model import ShimSpec
    from kwasm_py.node import engine, layout, plan

    shim_path = shim or _demo_shim(_progress)
    name = plan.shim_name(shim_path)
    node = sandbox.up(suite=suite, flavor_name="containerd", name=None, timeout=90.0, log=_progress)
    print(_describe(node).splitlines()[0])
    opts = engine.NodeOptions(
        host_root=Path(node.root),
        shims=(ShimSpec(source=shim_path, name=name, handler=name),),
        restart=layout.parse_restart("auto"),
        pid=node.pid,
    )
    try:
        print(f"$ kwasm-py node install --host-root {node.root} --pid {node.pid} --shim {shim_path}")
        outcome = engine.install(opts, log=_progress)
        for r in outcome.runtimes:
            print(f"installed: runtime {r['handler']} -> {r['runtime_type']} in {outcome.config}")
        print(
            f"restarted containerd: {outcome.restarted}; containerd reports the runtime: {outcome.verified}"
        )
        print(f"$ kwasm-py node status --host-root {node.root} --pid {node.pid}")
        report = engine.status(opts, ask_containerd=True)
        cs = report.containerd or {}
        print(f"state: {report.status}; drift: {report.drift or 'none'}")
        print(f"containerd {cs.get('version', '?')} ready={cs.get('ready')}; runtimes: {cs.get('runtimes')}")
    finally:
        if keep:
            print(f"the node keeps running: kwasm-py sandbox down {node.name}")
        else:
            sandbox.down(node.name)
            print(f"node {node.name} stopped and removed")
