"""Cluster-side commands: annotate-node, status, wait, manifests, agent.

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

from kwasm_py.errors import KubeError, KwasmError, UsageError
from kwasm_py.model import OPT_IN_KEY, STATUS_ANNOTATION, InstallMode

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


def manifests(
    image: Annotated[str | None, typer.Option("--image", help="installer image")] = None,
    image_digest: Annotated[
        str | None,
        typer.Option(
            "--image-digest", help="pull the image by this digest (sha256:...); default: the release's"
        ),
    ] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="installer namespace")] = None,
    shim: Annotated[
        list[str] | None, typer.Option("--shim", help="shim path inside the image (repeat)")
    ] = None,
    runtime_class: Annotated[
        list[str] | None, typer.Option("--runtime-class", help="NAME=HANDLER (repeat)")
    ] = None,
    max_parallel_restarts: Annotated[
        int, typer.Option("--max-parallel-restarts", min=1, help="nodes restarting at once")
    ] = 1,
    mode: Annotated[
        InstallMode,
        typer.Option(
            "--mode",
            help="the agent's engine --mode: auto (a drop-in where containerd merges it), dropin, edit",
        ),
    ] = InstallMode.AUTO,
    minimal: Annotated[
        bool,
        typer.Option("--minimal", help="no hostPID, not privileged: systemd nodes (installer-minimal.yaml)"),
    ] = False,
    layout: Annotated[
        str, typer.Option("--layout", help="with --minimal: containerd, k3s, rke2, microk8s or k0s")
    ] = "containerd",
    toleration: Annotated[
        list[str] | None,
        typer.Option(
            "--toleration",
            help="KEY[=VALUE][:EFFECT] the RuntimeClasses (and the agent) tolerate (repeat)",
        ),
    ] = None,
    all_nodes: Annotated[
        bool,
        typer.Option(
            "--all-nodes",
            help="run the agent on every Linux node; nodes opt in by annotation (KWasm's flow)",
        ),
    ] = False,
) -> None:
    """Print the installer manifests (manifests/installer.yaml is the default output;
    manifests/installer-minimal.yaml the default with --minimal).

    The image goes by digest when one is known: --image-digest, else (for the default image)
    the digest images/release.toml records once a release pushed it.
    """
    from kwasm_py.cluster import manifests as m
    from kwasm_py.cluster import minimal as mini
    from kwasm_py.cluster import release
    from kwasm_py.shims.source import read_catalog

    classes: list[tuple[str, str]] = []
    for spec in runtime_class or []:
        name, sep, handler = spec.partition("=")
        if not sep or not name or not handler:
            raise UsageError(f"--runtime-class wants NAME=HANDLER, not {spec!r}")
        classes.append((name, handler))
    defaults = m.InstallerParams()
    if image_digest:
        image = release.pinned_image(image or defaults.image, image_digest)
    elif image is None:
        image = release.read_release().reference  # image:tag, @digest once released
    params = m.InstallerParams(
        image=image,
        namespace=namespace or defaults.namespace,
        shims=tuple(shim) if shim else defaults.shims,
        runtime_classes=tuple(classes) if classes else defaults.runtime_classes,
        max_parallel_restarts=max_parallel_restarts,
        all_nodes=all_nodes,
        tolerations=tuple(toleration or ()),
        mode=mode.value,
    )
    m.check_runtime_classes(params.runtime_classes, m.provided_handlers(params.shims, read_catalog()))
    if not minimal:
        sys.stdout.write(m.render_yaml(m.installer_objects(params)))
        return
    if layout not in mini.LAYOUTS:
        raise UsageError(f"unknown --layout {layout!r}", hint="use one of " + ", ".join(mini.LAYOUTS))
    sys.stdout.write(m.render_yaml(mini.minimal_objects(params, layout=layout), header=mini.HEADER))


# ---------------------------------------------------------------------------- agent


def agent(
    node_name: Annotated[
        str | None, typer.Option("--node-name", envvar="NODE_NAME", help="this node")
    ] = None,
    host_root: Annotated[
        str | None, typer.Option("--host-root", envvar="KWASM_HOST_ROOT", help="the node's /")
    ] = None,
    pid: Annotated[
        int | None, typer.Option("--pid", envvar="KWASM_PID", help="a PID in the node's namespaces")
    ] = None,
    shim: Annotated[
        list[str] | None,
        typer.Option(
            "--shim",
            envvar="KWASM_SHIM",
            help="shim binary path (repeat); KWASM_SHIM: paths separated by commas",
        ),
    ] = None,
    shim_source: Annotated[
        str,
        typer.Option(
            "--shim-source",
            envvar="KWASM_SHIM_SOURCE",
            help="without --shim: image (baked in), fetch (download and verify), dir (--shim-dir)",
        ),
    ] = "image",
    shim_dir: Annotated[
        str | None,
        typer.Option(
            "--shim-dir", envvar="KWASM_SHIM_DIR", help="image: shims root; dir: a directory on the node"
        ),
    ] = None,
    restart: Annotated[
        str | None, typer.Option("--restart", envvar="KWASM_RESTART", help="restart method")
    ] = None,
    install_dir: Annotated[
        str | None, typer.Option("--install-dir", envvar="KWASM_INSTALL_DIR", help="node path")
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", envvar="KWASM_NAMESPACE", help="namespace of restart Leases"),
    ] = None,
    event_namespace: Annotated[
        str, typer.Option("--event-namespace", envvar="KWASM_EVENT_NAMESPACE")
    ] = "default",
    max_parallel_restarts: Annotated[
        int, typer.Option("--max-parallel-restarts", envvar="KWASM_MAX_PARALLEL_RESTARTS", min=1)
    ] = 1,
    lease_duration: Annotated[
        int, typer.Option("--lease-duration", envvar="KWASM_LEASE_DURATION", min=1)
    ] = 60,
    drift_interval: Annotated[
        float,
        typer.Option("--drift-interval", envvar="KWASM_DRIFT_INTERVAL", min=0.05, help="seconds"),
    ] = 300.0,
    watch_timeout: Annotated[
        int, typer.Option("--watch-timeout", envvar="KWASM_WATCH_TIMEOUT", min=1, hidden=True)
    ] = 300,
    kubelet_timeout: Annotated[
        float,
        typer.Option(
            "--kubelet-timeout",
            envvar="KWASM_KUBELET_TIMEOUT",
            min=0,
            help="seconds to wait for the kubelet to list a new handler in status.runtimeHandlers",
        ),
    ] = 120.0,
    max_attempts: Annotated[
        int,
        typer.Option(
            "--max-attempts",
            envvar="KWASM_MAX_ATTEMPTS",
            min=1,
            help="install attempts (containerd restarts) for unchanged inputs before giving up",
        ),
    ] = 3,
    attempts_file: Annotated[
        str | None,
        typer.Option(
            "--attempts-file",
            envvar="KWASM_ATTEMPTS_FILE",
            help="node path of the attempt count kept across agent restarts"
            " (default /var/lib/kwasm-py/agent-attempts.json)",
        ),
    ] = None,
    backoff_scale: Annotated[
        float,
        typer.Option(
            "--backoff-scale",
            envvar="KWASM_BACKOFF_SCALE",
            min=0,
            hidden=True,
            help="multiply every backoff (0 turns waiting off, for tests)",
        ),
    ] = 1.0,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Run the node agent (the DaemonSet's entrypoint): watch this Node and converge it."""
    import signal

    from kwasm_py.cluster import kube, lean
    from kwasm_py.cluster.agent import Agent, AgentConfig
    from kwasm_py.cluster.agentlog import Logger
    from kwasm_py.cluster.disruption import Backoff
    from kwasm_py.cluster.engine_proc import SubprocessEngine, agent_shim_versions, default_node_command
    from kwasm_py.cluster.inputs import ATTEMPTS_FILE, FileStore, NodeInputs
    from kwasm_py.contract import EngineRequest

    if not node_name:
        raise UsageError("the agent needs its node name", hint="set NODE_NAME or --node-name")
    log = Logger(node=node_name)
    # The user's one place for commas (KWASM_SHIM in the DaemonSet): split here, once; the
    # engine gets each shim as its own argument.
    shims = [p for value in shim or [] for p in value.split(",") if p]
    handlers: list[str] = []
    versions: dict[str, str] = {}
    if not shims:  # from the image, a download, or a directory on the node
        try:
            found = agent_shim_versions(shim_source, shim_dir=shim_dir, host_root=host_root)
            shims, handlers = [p for p, _, _ in found], [h for _, h, _ in found]
            versions = {h: v for _, h, v in found}
        except KwasmError as ex:  # the engine will report it on the Node as ProvisionFailed
            log("no_shims", level="warning", source=shim_source, error=ex.message)
    endpoint = kube.load_endpoint(kubeconfig, context)
    api = lean.LeanKube(endpoint)
    request = EngineRequest(
        host_root=host_root,
        pid=pid,
        restart=restart,
        install_dir=install_dir,
        shims=tuple(shims),
        handlers=tuple(handlers),
    )
    config = AgentConfig(
        node_name=node_name,
        namespace=namespace or endpoint.namespace,
        event_namespace=event_namespace,
        max_parallel_restarts=max_parallel_restarts,
        lease_duration=lease_duration,
        drift_interval=drift_interval,
        watch_timeout=watch_timeout,
        backoff=Backoff(scale=backoff_scale),
        kubelet_timeout=kubelet_timeout,
        shim_versions=versions,
        max_attempts=max_attempts,
    )
    the_agent = Agent(
        api,
        SubprocessEngine(default_node_command(), request),
        config,
        log=log,
        inputs=NodeInputs(shims, host_root, options=_install_options(request)),
        store=FileStore(host_root, attempts_file or ATTEMPTS_FILE),
    )

    def on_term(signum: int, frame: object) -> None:
        del signum, frame
        the_agent.request_stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    raise typer.Exit(the_agent.run())


def _install_options(request: Any) -> list[str]:
    """The engine's install argv (part of the disruption budget's inputs); [] for a request
    the engine will refuse anyway (it then fails before any restart)."""
    try:
        return list(request.argv("install"))
    except KwasmError:
        return []


def register(app: typer.Typer) -> None:
    """Add the cluster-side commands to the root app."""
    app.command("annotate-node")(annotate_node)
    app.command("status")(status)
    app.command("wait")(wait)
    app.command("manifests")(manifests)
    app.command("agent")(agent)
    from kwasm_py.cli.uninstall import uninstall

    app.command("uninstall")(uninstall)
