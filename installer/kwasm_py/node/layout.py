"""Which containerd layout a node has: pure decisions over facts gathered from the host root.

A layout names the file kwasm-py edits, what containerd actually reads, the socket, and how
containerd is restarted. Presets are ordered data, most specific first. Detection never guesses
silently: it returns what it found as `evidence`, and refuses when nothing matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath as P

from kwasm_py.errors import LayoutError, ManagedNode, UsageError
from kwasm_py.model import ConfigKind, Layout, RestartMethod, RestartSpec

K3S_DIR = P("/var/lib/rancher/k3s/agent/etc/containerd")
RKE2_DIR = P("/var/lib/rancher/rke2/agent/etc/containerd")
MICROK8S_ARGS = P("/var/snap/microk8s/current/args")
K0S_CONFIG = P("/etc/k0s/containerd.toml")
K0S_DROPINS = P("/etc/k0s/containerd.d")
DEFAULT_CONFIG = P("/etc/containerd/config.toml")
EKS_AL2_TEMPLATE = P("/etc/eks/containerd/containerd-config.toml")
DEFAULT_SOCKET = P("/run/containerd/containerd.sock")
K3S_SOCKET = P("/run/k3s/containerd/containerd.sock")
#: os-release(5): /etc/os-release, else /usr/lib/os-release.
OS_RELEASE = (P("/etc/os-release"), P("/usr/lib/os-release"))
#: Talos: /etc/os-release says `ID=talos` (siderolabs/talos pkg/machinery/constants/constants.go
#: OSReleaseTemplate, ID = the lower-cased name "Talos" of pkg/machinery/gendata/data/name; the
#: Dockerfile copies it to /rootfs/etc/os-release). Its CRI containerd reads /etc/cri/containerd.toml,
#: which imports /etc/cri/conf.d/cri.toml, which machined merges from /etc/cri/conf.d/*.part
#: (internal/app/machined/pkg/controllers/files/cri_config_parts.go); the root is a read-only
#: squashfs (internal/app/init/main.go mountRootFS) and /etc/containerd/config.toml is the system
#: containerd's, with CRI disabled (hack/containerd.toml).
TALOS_ID = "talos"
TALOS_CRI_CONFIG = P("/etc/cri/containerd.toml")
TALOS_CRI_PARTS = P("/etc/cri/conf.d")

#: Every node path detection looks at; the effect layer reports which exist.
PROBED_PATHS: tuple[P, ...] = (
    K3S_DIR / "config.toml",
    K3S_DIR / "config.toml.tmpl",
    K3S_DIR / "config-v3.toml.tmpl",
    RKE2_DIR / "config.toml",
    RKE2_DIR / "config.toml.tmpl",
    RKE2_DIR / "config-v3.toml.tmpl",
    MICROK8S_ARGS / "containerd-template.toml",
    MICROK8S_ARGS / "containerd.toml",
    K0S_CONFIG,
    K0S_DROPINS,
    DEFAULT_CONFIG,
    EKS_AL2_TEMPLATE,
    P("/usr/bin/containerd"),
    P("/usr/local/bin/containerd"),
    P("/usr/local/bin/k3s"),
    P("/usr/bin/k3s"),
)

#: systemd units and OpenRC services that may run containerd, in preference order per layout.
UNITS = (
    "k3s",
    "k3s-agent",
    "rke2-server",
    "rke2-agent",
    "k0sworker",
    "k0scontroller",
    "snap.microk8s.daemon-containerd",
    "containerd",
)


@dataclass(frozen=True)
class NodeFacts:
    """What the effect layer found on the node (all paths are node paths)."""

    existing: frozenset[P] = frozenset()
    systemd_units: frozenset[str] = frozenset()  # units with a unit file
    openrc_services: frozenset[str] = frozenset()  # /etc/init.d scripts
    init: str = ""  # comm of the target PID (systemd, init, k3s, ...)
    running_configs: tuple[P, ...] = ()  # --config of containerd processes in the node
    k0s_managed: bool = False  # /etc/k0s/containerd.toml carries `# k0s_managed=true`
    rendered_versions: dict[P, int] = field(default_factory=dict)  # `version` of rendered files
    os_id: str = ""  # `ID=` of the node's os-release (see `os_release_id`)


def os_release_id(text: str) -> str:
    """The `ID=` value of an os-release file's text, unquoted ("" when absent; os-release(5))."""
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key == "ID":
            return value.strip().strip("\"'")
    return ""


def refuse_managed(facts: NodeFacts) -> None:
    """Raise ManagedNode when the node's OS owns containerd's config on a read-only root (Talos,
    by its os-release ID: see TALOS_ID), naming the OS's own route to an extra runtime."""
    if facts.os_id != TALOS_ID:
        return
    raise ManagedNode(
        f"this node runs Talos Linux (os-release ID={TALOS_ID}): machined generates its CRI "
        f"containerd config ({TALOS_CRI_CONFIG}, importing {TALOS_CRI_PARTS}/cri.toml merged from "
        f"{TALOS_CRI_PARTS}/*.part) on a read-only root, so kwasm-py changes nothing here",
        hint="add the runtime the Talos way: the siderolabs/spin system extension (it ships the shim "
        f"and {TALOS_CRI_PARTS}/10-spin.part), or a machine config patch holding the runtime table "
        f"(`.machine.files`, op: create, path: {TALOS_CRI_PARTS}/20-customization.part; from Talos "
        "1.14 a CRICustomizationConfig document)",
    )


def _restart(facts: NodeFacts, candidates: tuple[str, ...]) -> RestartSpec:
    if facts.init == "systemd":
        for unit in candidates:
            if unit in facts.systemd_units:
                return RestartSpec(RestartMethod.SYSTEMD, unit)
    for svc in candidates:
        if svc in facts.openrc_services:
            return RestartSpec(RestartMethod.OPENRC, svc)
    if facts.init == "systemd":
        return RestartSpec(RestartMethod.SYSTEMD, candidates[0])
    # No init system drives containerd (k3d: k3s is PID 1): stop containerd, its parent restarts it.
    return RestartSpec(RestartMethod.SIGNAL, "containerd")


def _rancher(name: str, base: P, facts: NodeFacts, units: tuple[str, str]) -> Layout:
    rendered = base / "config.toml"
    version = facts.rendered_versions.get(rendered, 2)
    v3_tmpl = base / "config-v3.toml.tmpl"
    v2_tmpl = base / "config.toml.tmpl"
    evidence = [f"found {rendered} (rendered by {name}, version {version})"]
    if version >= 3:
        # k3s/rke2 on containerd 2.x read config-v3.toml.tmpl, falling back to config.toml.tmpl.
        template = v3_tmpl if v3_tmpl in facts.existing or v2_tmpl not in facts.existing else v2_tmpl
    else:
        template = v2_tmpl
    evidence.append(
        f"editing template {template}" + (" (exists)" if template in facts.existing else " (to be created)")
    )
    restart = _restart(facts, units)
    return Layout(
        name=name,
        config_path=template,
        kind=ConfigKind.TEMPLATE,
        restart=restart,
        socket=K3S_SOCKET,
        rendered_path=rendered,
        evidence=tuple(evidence),
    )


def detect(facts: NodeFacts) -> Layout:
    """Pick the layout of a node from `facts`; raise LayoutError listing what was probed, and
    ManagedNode on an OS whose containerd config is not kwasm-py's to edit (`refuse_managed`)."""
    refuse_managed(facts)
    found = facts.existing
    running = set(facts.running_configs)
    rancher: list[Layout] = []
    if RKE2_DIR / "config.toml" in found:
        units = ("rke2-server", "rke2-agent")
        if "rke2-agent" in facts.systemd_units and "rke2-server" not in facts.systemd_units:
            units = ("rke2-agent", "rke2-server")
        rancher.append(_rancher("rke2", RKE2_DIR, facts, units))
    if K3S_DIR / "config.toml" in found:
        units = ("k3s", "k3s-agent")
        if "k3s-agent" in (facts.systemd_units | facts.openrc_services) and "k3s" not in (
            facts.systemd_units | facts.openrc_services
        ):
            units = ("k3s-agent", "k3s")
        managed = facts.init == "systemd" or bool({"k3s", "k3s-agent"} & facts.openrc_services)
        name = "k3s" if managed else "k3d"  # k3d: k3s runs as the container's PID 1
        rancher.append(_rancher(name, K3S_DIR, facts, units))
    candidates: list[Layout] = list(rancher)
    if MICROK8S_ARGS / "containerd-template.toml" in found:
        candidates.append(
            Layout(
                name="microk8s",
                config_path=MICROK8S_ARGS / "containerd-template.toml",
                kind=ConfigKind.TEMPLATE,
                restart=RestartSpec(RestartMethod.SYSTEMD, "snap.microk8s.daemon-containerd"),
                socket=P("/var/snap/microk8s/common/run/containerd.sock"),
                rendered_path=MICROK8S_ARGS / "containerd.toml",
                evidence=(f"found {MICROK8S_ARGS / 'containerd-template.toml'} (microk8s snap)",),
            )
        )
    if K0S_CONFIG in found or K0S_DROPINS in found:
        units = ("k0sworker", "k0scontroller")
        if "k0scontroller" in facts.systemd_units and "k0sworker" not in facts.systemd_units:
            units = ("k0scontroller", "k0sworker")
        evidence = [f"found {K0S_CONFIG}" + (" (k0s_managed=true)" if facts.k0s_managed else "")]
        if facts.k0s_managed or K0S_CONFIG not in found:
            candidates.append(
                Layout(
                    name="k0s",
                    config_path=K0S_DROPINS / "kwasm-py.toml",
                    kind=ConfigKind.DROP_IN,
                    restart=_restart(facts, units),
                    socket=P("/run/k0s/containerd.sock"),
                    rendered_path=K0S_CONFIG,
                    evidence=(*evidence, f"writing drop-in under {K0S_DROPINS} (k0s merges it)"),
                )
            )
        else:
            candidates.append(
                Layout(
                    name="k0s-user-managed",
                    config_path=K0S_CONFIG,
                    kind=ConfigKind.CONFIG,
                    restart=_restart(facts, units),
                    socket=P("/run/k0s/containerd.sock"),
                    evidence=(
                        *evidence,
                        "user-managed (no k0s_managed marker): editing it directly",
                    ),
                )
            )
    default_evidence = []
    if DEFAULT_CONFIG in found:
        default_evidence.append(f"found {DEFAULT_CONFIG}")
    if EKS_AL2_TEMPLATE in found:
        default_evidence.append(
            f"found {EKS_AL2_TEMPLATE} (EKS AL2 bootstrap copies it to {DEFAULT_CONFIG} at boot; "
            "the agent re-applies the runtime if that reverts it)"
        )
    has_containerd = any(
        p in found for p in (P("/usr/bin/containerd"), P("/usr/local/bin/containerd"))
    ) or "containerd" in (facts.systemd_units | facts.openrc_services)
    if DEFAULT_CONFIG in found or has_containerd:
        if DEFAULT_CONFIG not in found:
            default_evidence.append(f"containerd installed without {DEFAULT_CONFIG} (to be created)")
        candidates.append(
            Layout(
                name="containerd",
                config_path=DEFAULT_CONFIG,
                kind=ConfigKind.CONFIG,
                restart=_restart(facts, ("containerd",)),
                socket=DEFAULT_SOCKET,
                evidence=tuple(default_evidence),
            )
        )
    if not candidates:
        probed = ", ".join(str(p) for p in PROBED_PATHS)
        raise LayoutError(
            "no containerd found on the node (probed: " + probed + ")",
            hint="check --host-root, or name the file with --config and the restart with --restart",
        )
    if running and len(candidates) > 1:
        for layout in candidates:
            reads = layout.rendered_path if layout.kind is not ConfigKind.CONFIG else layout.config_path
            if reads in running or (layout.kind is ConfigKind.DROP_IN and K0S_CONFIG in running):
                others = ", ".join(c.name for c in candidates if c is not layout)
                return replace(
                    layout,
                    evidence=(
                        *layout.evidence,
                        f"the running containerd reads {reads}; also found: {others} (not in use)",
                    ),
                )
    chosen = candidates[0]
    if len(candidates) > 1:
        others = ", ".join(c.name for c in candidates[1:])
        chosen = replace(
            chosen,
            evidence=(*chosen.evidence, f"preferred over {others} (more specific layout)"),
        )
    return chosen


def parse_restart(value: str) -> RestartSpec | None:
    """Parse `--restart`: auto (None), none, systemd[:UNIT], dbus[:UNIT], openrc[:SERVICE],
    signal[:PROC].

    Returns the RestartSpec (target `containerd` when none is given), None for auto; raises
    UsageError for an unknown method.
    """
    method_name, _, target = value.partition(":")
    if method_name == "auto":
        return None
    try:
        method = RestartMethod(method_name)
    except ValueError:
        raise UsageError(
            f"unknown --restart {value!r}",
            hint="use auto, none, systemd:UNIT, dbus:UNIT, openrc:SERVICE or signal:PROCESS",
        ) from None
    defaults = {
        RestartMethod.SYSTEMD: "containerd",
        RestartMethod.OPENRC: "containerd",
        RestartMethod.SIGNAL: "containerd",
        RestartMethod.DBUS: "containerd",
        RestartMethod.NONE: "",
    }
    return RestartSpec(method, target or defaults[method])


def override(
    layout: Layout | None,
    *,
    config: P | None,
    restart: RestartSpec | None,
    socket: P | None,
) -> Layout:
    """Apply --config/--restart/--socket on top of a detected layout (or instead of one).

    Returns the Layout to use; raises LayoutError when nothing was detected and no --config given.
    """
    if layout is None:
        if config is None:
            raise LayoutError("no layout detected and no --config given")
        layout = Layout(
            name="custom",
            config_path=config,
            kind=ConfigKind.CONFIG,
            restart=restart or RestartSpec(RestartMethod.SYSTEMD, "containerd"),
            socket=socket or DEFAULT_SOCKET,
            evidence=(f"--config {config}",),
        )
    changes: dict[str, object] = {}
    if config is not None and config != layout.config_path:
        kind = ConfigKind.CONFIG
        rendered = None
        if config.name.endswith(".tmpl") or config.name == "containerd-template.toml":
            kind, rendered = ConfigKind.TEMPLATE, layout.rendered_path
        changes.update(
            config_path=config,
            kind=kind,
            rendered_path=rendered,
            evidence=(*layout.evidence, f"--config {config} overrides {layout.config_path}"),
        )
    if restart is not None:
        changes["restart"] = restart
    if socket is not None:
        changes["socket"] = socket
    return replace(layout, **changes) if changes else layout  # type: ignore[arg-type]
