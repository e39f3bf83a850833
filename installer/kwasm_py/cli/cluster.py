"""Cluster-side commands: annotate-node, status, wait (manifests and agent: cli.manifests, cli.agent).

Heavy imports (the kubernetes client, rich tables) happen inside the command functions so
`kwasm-py --help` stays fast, and `kwasm-py agent` never loads the kubernetes client at all.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kwasm_py.errors import KubeError, UsageError
from kwasm_py.model import OPT_IN_KEY, STATUS_ANNOTATION

if TYPE_CHECKING:
    from kwasm_py.cluster.kube import NodeApi
    from kwasm_py.cluster.nodeview import NodeRow

KubeconfigOpt = Annotated[
    str | None,
    typer.Option("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, ~/.kube/config)"),
]
ContextOpt = Annotated[str | None, typer.Option("--context", help="kubeconfig context")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="seconds to wait", min=0)]

PROGRESS_FROM = 20  # show a progress bar from this many nodes on
TABLE_ROWS_MAX = 50  # list every node in the summary up to this many


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _stdout_console(*, wide: bool = False) -> Any:
    """Rich console on stdout; ``wide``: a table is never folded when stdout is no terminal
    (a pipe or a file gets whole lines, as kubectl prints them)."""
    from rich.console import Console

    if wide and not sys.stdout.isatty():
        return Console(soft_wrap=True, width=1000)
    return Console(soft_wrap=True)


# ---------------------------------------------------------------------------- annotate-node


def _targets(api: NodeApi, nodes: list[str], all_nodes: bool, selector: str | None) -> list[str]:
    chosen = sum([bool(nodes), all_nodes, selector is not None])
    if chosen != 1:
        raise UsageError(
            "name the nodes, or pass --all, or -l SELECTOR (exactly one of them)",
            hint="kwasm-py annotate-node --all",
        )
    if nodes:
        return list(dict.fromkeys(nodes))
    from kwasm_py.cluster import nodeview

    return [nodeview.name_of(n) for n in api.list_nodes(label_selector=selector or "")]


def _patch_all(
    api: NodeApi, names: list[str], patch: dict[str, Any], parallel: int
) -> dict[str, KubeError | None]:
    """Patch every node with at most `parallel` requests in flight; errors per node."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    results: dict[str, KubeError | None] = {}
    progress = None
    task = None
    if len(names) >= PROGRESS_FROM and sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(console=_stderr_console(), transient=True)
        progress.start()
        task = progress.add_task("patching nodes", total=len(names))
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(names)))) as pool:
            futures = {pool.submit(api.patch_node, name, patch): name for name in names}
            for fut in as_completed(futures):
                name = futures[fut]
                try:
                    fut.result()
                    results[name] = None
                except KubeError as ex:
                    results[name] = ex
                if progress is not None and task is not None:
                    progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return results


def annotate_node(
    nodes: Annotated[list[str] | None, typer.Argument(help="node names")] = None,
    all_nodes: Annotated[bool, typer.Option("--all", help="every node")] = False,
    selector: Annotated[
        str | None, typer.Option("--selector", "-l", help="nodes matching a label selector")
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="opt the nodes out")] = False,
    as_label: Annotated[
        bool, typer.Option("--label", help="opt in with the label only (no annotation)")
    ] = False,
    annotation_only: Annotated[
        bool,
        typer.Option(
            "--annotation-only",
            help="opt in with the annotation only (installer rendered with --all-nodes)",
        ),
    ] = False,
    retry: Annotated[
        bool,
        typer.Option(
            "--retry",
            help="ask the agents of held nodes to try again (bumps kwasm.sh/kwasm-retry)",
        ),
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="wait until the agents finished")] = False,
    timeout: TimeoutOpt = 300.0,
    parallel: Annotated[int, typer.Option("--parallel", min=1, help="patches in flight")] = 16,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Opt nodes in (or out, with --remove): kwasm.sh/kwasm-node=true as label and annotation.

    The label is what the agent DaemonSet's node affinity selects; the annotation is the
    KWasm-compatible opt-in (an installer rendered with --all-nodes needs only that).
    """
    from kwasm_py.cluster import official

    if sum([remove, retry, as_label or annotation_only]) > 1 or (as_label and annotation_only):
        raise UsageError(
            "--remove, --retry and --label/--annotation-only exclude each other",
            hint="kwasm-py annotate-node --retry NODE",
        )

    with contextlib.closing(official.connect_cli(kubeconfig, context, pool_size=parallel)) as api:
        names = _targets(api, nodes or [], all_nodes, selector)
        if not names:
            _stderr_console().print("no node matched: nothing to do")
            return
        patch = _opt_in_patch(remove=remove, retry=retry, label=not annotation_only, annotation=not as_label)
        results = _patch_all(api, names, patch, parallel)
        failed = {n: e for n, e in results.items() if e is not None}
        if failed and len(failed) == len(names):
            first = next(iter(failed.values()))
            if first is not None and first.status in (None, 401, 403):
                raise first  # one clear line for a cluster-wide problem
        _summary(names, results, "opted out" if remove else ("retried" if retry else "opted in"))
        for name, err in failed.items():
            if err is not None and err.status == 404:
                print(f"error: node {name!r} not found", file=sys.stderr)
            elif err is not None:
                print(f"error: {err.message}", file=sys.stderr)
        ok = [n for n in names if results.get(n) is None]
        code = 1 if failed else 0
        if wait and ok:
            pending = _wait(api, ok, timeout, want=not remove)
            code = code or (1 if pending else 0)
        if code:
            raise typer.Exit(code)


def _opt_in_patch(*, remove: bool, retry: bool, label: bool, annotation: bool) -> dict[str, Any]:
    """The Node merge patch of annotate-node: opt out (both keys, whichever way the node opted
    in), ask for a retry (a fresh kwasm.sh/kwasm-retry value) or opt in (label and/or
    annotation)."""
    if remove:
        return {"metadata": {"annotations": {OPT_IN_KEY: None}, "labels": {OPT_IN_KEY: None}}}
    if retry:
        from kwasm_py.cluster import disruption

        token = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
        return {"metadata": {"annotations": {disruption.RETRY_ANNOTATION: token}}}
    meta: dict[str, Any] = {}
    if label:
        meta["labels"] = {OPT_IN_KEY: "true"}
    if annotation:
        meta["annotations"] = {OPT_IN_KEY: "true"}
    return {"metadata": meta}


def _summary(names: list[str], results: dict[str, KubeError | None], done: str) -> None:
    from rich.table import Table

    console = _stdout_console()
    failed = [n for n in names if results.get(n) is not None]
    if len(names) <= TABLE_ROWS_MAX:
        table = Table("NODE", "RESULT", box=None, pad_edge=False)
        for name in names:
            err = results.get(name)
            if err is None:
                table.add_row(name, done)
            else:
                table.add_row(name, "not found" if err.status == 404 else f"failed: {err.message}")
        console.print(table)
    console.print(f"{len(names) - len(failed)} of {len(names)} nodes {done}, {len(failed)} failed")


# ---------------------------------------------------------------------------- status / wait


def _rows(api: NodeApi) -> list[NodeRow]:
    from kwasm_py.cluster import nodeview

    return [nodeview.row(n) for n in api.list_nodes()]


def status(
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Every node: opted in, provisioned, phase, runtimes and versions, the kubelet's view of
    the handlers, last failure."""
    if output not in ("table", "json"):
        raise UsageError(f"--output must be table or json, not {output!r}")
    from kwasm_py.cluster import official

    with contextlib.closing(official.connect_cli(kubeconfig, context)) as api:
        rows = _rows(api)
    if output == "json":
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    from rich.table import Table

    table = Table(
        "NODE", "OPTED-IN", "PROVISIONED", "PHASE", "RUNTIMES", "KUBELET", "SINCE", "LAST FAILURE", box=None
    )
    for r in rows:
        table.add_row(
            r.name,
            "yes" if r.opted_in else "no",
            "yes" if r.provisioned else "no",
            r.phase or "-",
            r.runtimes_cell() or "-",
            r.kubelet_cell(),
            r.time or "-",
            (f"{r.step}: {r.reason}" if r.step else r.reason) or "-",
        )
    _stdout_console(wide=True).print(table)


def _wait(api: NodeApi, names: list[str] | None, timeout: float, *, want: bool = True) -> list[str]:
    """Poll until the nodes are provisioned (want) or cleaned up (not want), printing each
    node's phase as it changes; returns the names not done: at the deadline, or at once when
    an agent reports a failure (naming the failed step)."""
    from kwasm_py.cluster import nodeview

    deadline = time.monotonic() + timeout
    interval = 0.5
    phases: dict[str, str] = {}
    while True:
        nodes = {nodeview.name_of(n): n for n in api.list_nodes()}
        if names is None:
            targets = [k for k, n in nodes.items() if nodeview.opted_in(n)]
        else:
            missing = [n for n in names if n not in nodes]
            if missing:
                raise KubeError(
                    f"node {missing[0]!r} not found",
                    hint="kubectl get nodes lists them",
                    status=404,
                )
            targets = names

        def done(node: dict[str, Any]) -> bool:
            if want:
                return nodeview.provisioned(node)
            meta = node.get("metadata") or {}
            return not nodeview.provisioned(node) and STATUS_ANNOTATION not in (meta.get("annotations") or {})

        pending = [t for t in targets if not done(nodes[t])]
        _print_phases(phases, {t: nodeview.row(nodes[t]) for t in targets})
        if not pending:
            what = "provisioned" if want else "unprovisioned"
            print(f"{len(targets)} node(s) {what}", file=sys.stderr)
            return []
        failed = [t for t in pending if nodeview.row(nodes[t]).failed]
        if failed:
            for name in failed:
                row = nodeview.row(nodes[name])
                where = f" at step {row.step}" if row.step else ""
                print(
                    f"error: node {name!r} failed{where}: {row.reason or 'no reason recorded'}",
                    file=sys.stderr,
                )
            return pending
        if time.monotonic() >= deadline:
            for name in pending:
                row = nodeview.row(nodes[name])
                why = row.reason or ("not opted in" if want and not row.opted_in else "pending")
                print(f"error: node {name!r} not ready: {why}", file=sys.stderr)
            return pending
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 1.5, 5.0)


def _print_phases(seen: dict[str, str], rows: dict[str, NodeRow]) -> None:
    """Print ``node NAME: PHASE (TIME)`` on stderr for each node whose phase changed since
    the last poll (``seen`` is updated)."""
    for name, row in rows.items():
        if row.phase and seen.get(name) != row.phase:
            when = row.phases.get(row.phase) or row.time
            print(f"node {name}: {row.phase}" + (f" ({when})" if when else ""), file=sys.stderr)
        seen[name] = row.phase


def wait(
    nodes: Annotated[list[str] | None, typer.Argument(help="node names")] = None,
    all_nodes: Annotated[bool, typer.Option("--all", help="every opted-in node")] = False,
    timeout: TimeoutOpt = 300.0,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Wait until opted-in nodes are provisioned, printing their phases; exit 1 naming the
    ones that are not, at once when a node fails (with the failed step)."""
    if bool(nodes) == all_nodes:
        raise UsageError("name the nodes or pass --all (one of them)")
    from kwasm_py.cluster import official

    with contextlib.closing(official.connect_cli(kubeconfig, context)) as api:
        pending = _wait(api, nodes or None, timeout)
    if pending:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- manifests


def register(app: typer.Typer) -> None:
    """Add the cluster-side commands to the root app."""
    app.command("annotate-node")(annotate_node)
    app.command("status")(status)
    app.command("wait")(wait)
    from kwasm_py.cli.agent import agent
    from kwasm_py.cli.manifests import manifests

    app.command("manifests")(manifests)
    app.command("agent")(agent)
    from kwasm_py.cli.uninstall import uninstall

    app.command("uninstall")(uninstall)
