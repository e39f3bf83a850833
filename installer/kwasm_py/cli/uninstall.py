"""`kwasm-py uninstall`: remove kwasm-py from a cluster in the one safe order (issue 13.9).

1. opt every node out (label and annotation), so each agent uninstalls its node's runtimes and
   removes its labels and status (an agent whose pod is deleted meanwhile does it on SIGTERM);
2. wait until every node that was opted in or provisioned is clean;
3. only then delete the installer's objects, in the reverse of their apply order (RuntimeClasses,
   the DaemonSet, the admission policy, RBAC, the quota, the namespace).

Deleting the objects first would leave nodes configured and labelled with nobody managing them,
so a node that is not clean by ``--timeout`` stops the command before anything is deleted. It
runs with the user's credentials, not the agent's.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated, Any, cast

import typer

from kwasm_py.cli.cluster import ContextOpt, KubeconfigOpt, TimeoutOpt, _wait
from kwasm_py.model import OPT_IN_KEY


def uninstall(
    namespace: Annotated[
        str | None, typer.Option("--namespace", help="the installer namespace (as rendered)")
    ] = None,
    runtime_class: Annotated[
        list[str] | None,
        typer.Option("--runtime-class", help="RuntimeClass names to delete (repeat; default: as rendered)"),
    ] = None,
    timeout: TimeoutOpt = 600.0,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Opt every node out, wait until each agent cleaned its node, then delete the installer."""
    from kwasm_py.cluster import manifests as m
    from kwasm_py.cluster import nodeview, official
    from kwasm_py.cluster.kube import ObjectApi

    defaults = m.InstallerParams()
    classes = tuple((name, "") for name in runtime_class or ()) or defaults.runtime_classes
    params = m.InstallerParams(namespace=namespace or defaults.namespace, runtime_classes=classes)
    objects = m.installer_objects(params)
    with contextlib.closing(official.connect_cli(kubeconfig, context)) as api:
        ours = [
            n
            for n in api.list_nodes()
            if nodeview.opted_in(n)
            or nodeview.provisioned(n)
            or nodeview.status_of(n)
            or nodeview.runtime_labels(n)
        ]
        names = [nodeview.name_of(n) for n in ours]
        opt_out: dict[str, Any] = {
            "metadata": {"annotations": {OPT_IN_KEY: None}, "labels": {OPT_IN_KEY: None}}
        }
        for name in names:
            api.patch_node(name, opt_out)
        print(f"opted out {len(names)} node(s); waiting for their agents", file=sys.stderr)
        if names and _wait(api, names, timeout, want=False):
            print(
                "error: not deleting the installer while nodes are still configured:"
                " their agents must clean them first (check the agent pods, then run again)",
                file=sys.stderr,
            )
            raise typer.Exit(1)
        deleter = cast(ObjectApi, api)
        for obj in reversed(objects):
            path = m.object_path(obj)
            gone = deleter.delete_path(path)
            print(f"{'deleted' if gone else 'absent '} {obj['kind']} {obj['metadata']['name']}")
