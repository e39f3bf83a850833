"""`kwasm-py agent`: the node agent the DaemonSet runs (never loads the kubernetes client)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kwasm_py.cli.cluster import ContextOpt, KubeconfigOpt
from kwasm_py.errors import KwasmError, UsageError


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
