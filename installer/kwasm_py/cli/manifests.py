"""`kwasm-py manifests`: the installer objects, rendered (manifests/installer*.yaml)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kwasm_py.errors import UsageError
from kwasm_py.model import InstallMode


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
