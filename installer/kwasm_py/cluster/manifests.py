"""PURE: the objects of manifests/installer.yaml, built from a few parameters. No I/O.

`kwasm-py manifests` renders them; the committed manifests/installer.yaml is the default output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from kwasm_py.cluster import policy
from kwasm_py.errors import UsageError
from kwasm_py.model import JSON, OPT_IN_KEY, PROVISIONED_LABEL, RUNTIME_LABEL_PREFIX, SLOT_LEASE_PREFIX
from kwasm_py.shims.catalog import Catalog

# The installer image, pinned by tag in exactly one place (images/Dockerfile builds it).
DEFAULT_IMAGE = "ghcr.io/kwasm-py/installer:0.1.0"
DEFAULT_NAMESPACE = "kwasm-system"
APP_NAME = "kwasm-node-installer"
# Shim paths inside the installer container. Empty: the agent installs every shim the image
# carries for the node's architecture ($KWASM_SHIM_DIR/<arch>, see images/Dockerfile).
DEFAULT_SHIMS: tuple[str, ...] = ()
DEFAULT_RUNTIME_CLASSES = (("wasmtime-spin", "spin"),)
HOST_ROOT = "/host"
# The agent's pods are node-critical (the kubelet does not evict them first, and they may preempt
# on admission). GKE admits pods of the built-in critical classes outside kube-system only in a
# namespace holding a ResourceQuota scoped to those classes ("limit priority class consumption by
# default", Kubernetes docs on resource quotas; GKE's own kube-system quota `gcp-critical-pods`
# is `pods: 1G`; reported as open-policy-agent/gatekeeper#1120, openservicemesh/osm#4408). So
# installer.yaml ships that quota instead of a PriorityClass of its own: a user-defined class is
# capped at 1e9 and loses the kubelet's critical-pod handling (priority >= 2e9).
PRIORITY_CLASS = "system-node-critical"
CRITICAL_PODS_QUOTA = "1G"  # not a limit: the quota only has to exist and match (as GKE's own)
# SIGTERM to exit: wait for a restart Lease (the agent's stop_lease_wait, 60 s), then an uninstall
# whose containerd restart may time out (90 s, node/restart.py) and be rolled back (90 s again).
TERMINATION_GRACE_SECONDS = 240
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def lease_names(max_parallel_restarts: int) -> list[str]:
    """The restart Leases the agents take turns on: ``kwasm-restart-0`` .. ``-(N-1)``."""
    return [f"{SLOT_LEASE_PREFIX}{i}" for i in range(max_parallel_restarts)]


@dataclass(frozen=True)
class InstallerParams:
    image: str = DEFAULT_IMAGE
    namespace: str = DEFAULT_NAMESPACE
    shims: tuple[str, ...] = DEFAULT_SHIMS
    runtime_classes: tuple[tuple[str, str], ...] = DEFAULT_RUNTIME_CLASSES
    max_parallel_restarts: int = 1
    # False: the agent runs only on nodes labelled kwasm.sh/kwasm-node=true (node affinity);
    # True: on every Linux node, whatever its taints (the annotation-only flow of KWasm).
    all_nodes: bool = False
    tolerations: tuple[str, ...] = ()  # KEY[=VALUE][:EFFECT], for RuntimeClasses and agent
    mode: str = "auto"  # the engine's --mode (KWASM_MODE): auto, dropin or edit
    labels: dict[str, str] = field(
        default_factory=lambda: {
            "app.kubernetes.io/name": APP_NAME,
            "app.kubernetes.io/part-of": "kwasm-py",
        }
    )


def parse_toleration(spec: str) -> JSON:
    """Takes ``KEY[=VALUE][:EFFECT]`` (kubectl's taint syntax); returns the toleration of that
    taint (``Equal`` with a value, ``Exists`` without). Raises UsageError for an empty key or an
    unknown effect."""
    body, _, effect = spec.partition(":")
    key, has_value, value = body.partition("=")
    if not key or (effect and effect not in TAINT_EFFECTS):
        raise UsageError(
            f"--toleration wants KEY[=VALUE][:EFFECT], not {spec!r}",
            hint=f"effects: {', '.join(TAINT_EFFECTS)}; e.g. --toleration pool=wasm:NoSchedule",
        )
    tol: JSON = {"key": key, "operator": "Equal" if has_value else "Exists"}
    if has_value:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def handler_of(shim: str, catalog: Catalog) -> str:
    """Takes a shim path and the catalog; returns the handler the engine registers it as (the
    catalog's for a known binary name, else NAME of ``containerd-shim-NAME-vN``, else "")."""
    base = PurePosixPath(shim).name
    for entry in catalog.shims:
        if entry.binary == base:
            return entry.handler
    stem = base.removeprefix("containerd-shim-")
    name, _, version = stem.rpartition("-v")
    return name if stem != base and name and version.isdigit() else ""


def provided_handlers(shims: Sequence[str], catalog: Catalog) -> list[str]:
    """Takes the install's shim paths (none: the image's default shims) and the catalog; returns
    the handlers this install provides, in order."""
    if shims:
        return [h for h in (handler_of(s, catalog) for s in shims) if h]
    return [s.handler for s in catalog.select()]


def check_runtime_classes(classes: Sequence[tuple[str, str]], provided: Sequence[str]) -> None:
    """Takes (RuntimeClass name, handler) pairs and the handlers the install provides; returns
    nothing. Raises UsageError naming the first handler no shim of the install provides (its
    pods would be scheduled onto nodes that cannot run them)."""
    for name, handler in classes:
        if handler not in provided:
            raise UsageError(
                f"RuntimeClass {name}: no shim of this install provides handler {handler!r}"
                f" (it provides: {', '.join(provided) or 'none'})",
                hint="add the shim with --shim, or fix the handler in --runtime-class NAME=HANDLER",
            )


def _meta(name: str, params: InstallerParams, *, namespaced: bool = True) -> JSON:
    meta: JSON = {"name": name}
    if namespaced:
        meta["namespace"] = params.namespace
    meta["labels"] = dict(params.labels)
    return meta


def installer_objects(params: InstallerParams | None = None) -> list[JSON]:
    """The installer's objects, in apply order, for PARAMS (defaults: manifests/installer.yaml).

    Namespace, critical-pods ResourceQuota, ServiceAccount, RBAC, the own-Node admission policy
    and its binding, the agent DaemonSet and the RuntimeClasses. Raises nothing.
    """
    p = params or InstallerParams()
    ns = p.namespace
    selector = {"app.kubernetes.io/name": APP_NAME}
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": ns,
            "labels": {
                **p.labels,
                # The agent is privileged with hostPID and a hostPath of the node's /.
                "pod-security.kubernetes.io/enforce": "privileged",
                "pod-security.kubernetes.io/audit": "privileged",
                "pod-security.kubernetes.io/warn": "privileged",
            },
        },
    }
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(APP_NAME, p)}
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _meta(f"{APP_NAME}-critical-pods", p),
        "spec": {
            "hard": {"pods": CRITICAL_PODS_QUOTA},
            "scopeSelector": {
                "matchExpressions": [
                    {"scopeName": "PriorityClass", "operator": "In", "values": [PRIORITY_CLASS]}
                ]
            },
        },
    }
    # Exactly what the agent calls (tests/test_agent.py records every request against the
    # stand-in API and fails on a grant never used or a use never granted). Nodes: get its Node,
    # watch it (fieldSelector metadata.name), merge-patch it, and patch nodes/status for its
    # KwasmProvisioned condition; which Node and which keys is the admission policy's job
    # (cluster/policy.py), since RBAC cannot say "my node".
    cluster_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _meta(APP_NAME, p, namespaced=False),
        "rules": [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "watch", "patch"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
        ],
    }
    subject = [{"kind": "ServiceAccount", "name": APP_NAME, "namespace": ns}]
    cluster_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _meta(APP_NAME, p, namespaced=False),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": APP_NAME,
        },
        "subjects": subject,
    }
    # In the installer namespace only: Events (KWASM_EVENT_NAMESPACE below) and the restart
    # Leases (cluster/leases.py). A node waiting for a restart slot creates a queue Lease of its
    # own (kwasm-wait-<node>), watches the namespace's Leases for a slot handed to it, and deletes
    # its queue Lease when served (or a vanished waiter's, that never confirmed a slot handed to
    # it). `create` cannot be limited by resourceNames (the name is not known when it is
    # authorised), nor can `list`/`watch` of several names, nor `delete` of per-node names: those
    # stay namespace-wide (the namespace holds only the installer's objects); get/update are
    # limited to the N restart Leases.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(APP_NAME, p),
        "rules": [
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["create", "delete", "list", "watch"],
            },
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": lease_names(p.max_parallel_restarts),
                "verbs": ["get", "update"],
            },
        ],
    }
    role_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(APP_NAME, p),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": APP_NAME,
        },
        "subjects": subject,
    }
    user_tolerations = [parse_toleration(t) for t in p.tolerations]
    if p.all_nodes:
        # Every node may opt in by annotation, whatever its taints.
        placement: JSON = {"tolerations": [{"operator": "Exists"}]}
    else:
        # Only where asked: nodes labelled kwasm.sh/kwasm-node=true (annotate-node sets it), and
        # there also before the startup taint is gone (the agent removes it) and in tainted pools.
        placement = {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": OPT_IN_KEY, "operator": "In", "values": ["true"]}]}
                        ]
                    }
                }
            },
            "tolerations": [
                {"key": policy.STARTUP_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"},
                *user_tolerations,
            ],
        }
    own_node = policy.own_node_policy(
        f"{APP_NAME}-own-node", namespace=ns, service_account=APP_NAME, labels=p.labels
    )
    env = [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "KWASM_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # Events go where the Role lets the agent create them (kubectl describe node lists a
        # Node's Events from every namespace).
        {
            "name": "KWASM_EVENT_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
        {"name": "KWASM_HOST_ROOT", "value": HOST_ROOT},
        {"name": "KWASM_PID", "value": "1"},
        {"name": "KWASM_RESTART", "value": "auto"},
        {"name": "KWASM_MAX_PARALLEL_RESTARTS", "value": str(p.max_parallel_restarts)},
    ]
    if p.shims:
        env.append({"name": "KWASM_SHIM", "value": ",".join(p.shims)})
    if p.mode != "auto":  # drop-in or edit where containerd merges imports (see `node plan`)
        env.append({"name": "KWASM_MODE", "value": p.mode})
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(APP_NAME, p),
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {**p.labels}},
                "spec": {
                    "serviceAccountName": APP_NAME,
                    "hostPID": True,
                    "priorityClassName": PRIORITY_CLASS,
                    **placement,
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    # An install in flight finishes (or rolls back) before the pod goes, and a
                    # node that opted out is uninstalled on SIGTERM (see the constant).
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                    "containers": [
                        {
                            "name": "agent",
                            "image": p.image,
                            # By digest the bytes cannot change, so a cached copy is right; a
                            # version tag is never moved by a release, and an image loaded into
                            # kind/k3d/minikube must not be pulled.
                            "imagePullPolicy": "IfNotPresent",
                            # no command/args: the image's ENTRYPOINT is `kwasm-py agent`
                            "env": env,
                            "securityContext": {"privileged": True},
                            "resources": {
                                # The resident agent stays under ~30 MiB; installs run the node
                                # engine as a short-lived child in the same cgroup.
                                "requests": {"cpu": "10m", "memory": "64Mi"},
                                "limits": {"cpu": "500m", "memory": "256Mi"},
                            },
                            "volumeMounts": [{"name": "host-root", "mountPath": HOST_ROOT}],
                        }
                    ],
                    "volumes": [{"name": "host-root", "hostPath": {"path": "/", "type": "Directory"}}],
                },
            },
        },
    }
    runtime_classes = [
        {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": name, "labels": dict(p.labels)},
            "handler": handler,
            # The agent sets kwasm.sh/runtime-<handler> only once containerd verified that
            # handler: a class whose handler this node lacks never lands there.
            "scheduling": {
                "nodeSelector": {PROVISIONED_LABEL: "true", f"{RUNTIME_LABEL_PREFIX}{handler}": "true"},
                **({"tolerations": user_tolerations} if user_tolerations else {}),
            },
        }
        for name, handler in p.runtime_classes
    ]
    # The quota before the DaemonSet (GKE refuses its pods without it), the policy before the
    # agent's first request.
    return [
        namespace,
        quota,
        sa,
        cluster_role,
        cluster_binding,
        role,
        role_binding,
        *own_node,
        daemonset,
        *runtime_classes,
    ]


# Kind -> resource (plural) of every object installer_objects() creates.
PLURALS = {
    "Namespace": "namespaces",
    "ResourceQuota": "resourcequotas",
    "ServiceAccount": "serviceaccounts",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
    "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
    "DaemonSet": "daemonsets",
    "RuntimeClass": "runtimeclasses",
}


def object_path(obj: JSON) -> str:
    """Takes one of the installer's objects; returns its API path (``/api/v1/namespaces/NAME``,
    ``/apis/apps/v1/namespaces/NS/daemonsets/NAME``, ...). Raises KeyError for another kind."""
    api_version = str(obj["apiVersion"])
    base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return base + (f"/namespaces/{ns}" if ns else "") + f"/{PLURALS[obj['kind']]}/{meta['name']}"


HEADER = (
    "# kwasm-py installer: generated by `kwasm-py manifests`; edit the generator, not this file.\n"
    "# kubectl apply -f manifests/installer.yaml, then `kwasm-py annotate-node --all`.\n"
)


def render_yaml(objects: list[JSON], *, header: str = HEADER) -> str:
    """A multi-document YAML stream, keys in construction order."""
    import yaml

    docs = [yaml.safe_dump(o, sort_keys=False, default_flow_style=False) for o in objects]
    return header + "---\n" + "---\n".join(docs)
