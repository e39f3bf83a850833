"""PURE: the ValidatingAdmissionPolicy that keeps each agent to its own Node. No I/O.

RBAC cannot say "only the Node this pod runs on" or "only these label keys", so installer.yaml
also ships this policy (admissionregistration.k8s.io/v1, GA in Kubernetes 1.30). It matches only
requests from the agent's ServiceAccount and allows an UPDATE/PATCH of ``nodes`` or
``nodes/status`` only when:

- the Node is the one named by the ``authentication.kubernetes.io/node-name`` claim of the bound
  service-account token (``request.userInfo.extra``; beta and on by default since 1.30, GA in
  1.32: the ServiceAccountTokenPodNodeInfo feature, KEP-4193);
- labels and annotations change only under ``kwasm.sh/``;
- taints change only in the startup taint ``kwasm.sh/kwasm-not-ready``;
- the status changes only in the agent's own condition (``KwasmProvisioned``);
- every other field of the spec, the status and the metadata we can name is unchanged.

Validating admission runs after the registry's PrepareForUpdate, so a ``nodes`` request already
carries the old status and a ``nodes/status`` request the old spec; checking both resources the
same way is therefore exact. Only the fields present in every Kubernetes version from 1.30 on are
named (an unknown field in a CEL expression fails compilation, which would deny everything); the
fields newer versions added are listed in NEWER_NODE_FIELDS and documented as not covered.
"""

from __future__ import annotations

from kwasm_py.model import JSON

KEY_PREFIX = "kwasm.sh/"
STARTUP_TAINT_KEY = "kwasm.sh/kwasm-not-ready"
CONDITION_TYPE = "KwasmProvisioned"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"
# Kubernetes minor from which admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy exists.
MIN_VERSION = (1, 30)

# Node fields present from 1.30 on (kubernetes-validate's bundled OpenAPI schemas, io.k8s.api.core.v1).
SPEC_FIELDS = ("configSource", "externalID", "podCIDR", "podCIDRs", "providerID", "unschedulable")
STATUS_FIELDS = (
    "addresses",
    "allocatable",
    "capacity",
    "config",
    "daemonEndpoints",
    "images",
    "nodeInfo",
    "phase",
    "runtimeHandlers",
    "volumesAttached",
    "volumesInUse",
)
META_FIELDS = ("finalizers", "ownerReferences")
# Fields added after 1.30 that the policy cannot name without breaking on 1.30 (see module doc).
NEWER_NODE_FIELDS = {
    "spec": ("podPreemptionPolicy",),
    "status": ("declaredFeatures", "features"),
}


def agent_username(namespace: str, service_account: str) -> str:
    """The username Kubernetes gives a ServiceAccount's tokens (``system:serviceaccount:NS:NAME``)."""
    return f"system:serviceaccount:{namespace}:{service_account}"


def _unchanged(path: str) -> str:
    """CEL: the optional field ``object.PATH`` is absent in both or equal in both."""
    new, old = f"object.{path}", f"oldObject.{path}"
    return f"(has({new}) == has({old}) && (!has({new}) || {new} == {old}))"


def _only_ours_changed(old: str, new: str) -> str:
    """CEL: the string maps ``old`` and ``new`` differ only in keys under KEY_PREFIX."""
    return (
        f"{new}.all(k, k.startsWith('{KEY_PREFIX}') || (k in {old} && {old}[k] == {new}[k]))"
        f" && {old}.all(k, k.startsWith('{KEY_PREFIX}') || k in {new})"
    )


def _or_empty(expr: str, empty: str) -> str:
    """CEL: the optional field ``expr``, or ``empty`` where it is absent."""
    return f"has({expr}) ? {expr} : {empty}"


def variables() -> list[JSON]:
    """The policy's CEL variables (evaluated lazily by the API server, in this order)."""
    extra = "request.userInfo.extra"
    claim = f"{extra}['{NODE_NAME_CLAIM}']"
    return [
        {
            "name": "nodeName",
            "expression": (
                f"has(request.userInfo.extra) && '{NODE_NAME_CLAIM}' in {extra}"
                f" && size({claim}) > 0 ? {claim}[0] : ''"
            ),
        },
        {"name": "oldLabels", "expression": _or_empty("oldObject.metadata.labels", "{}")},
        {"name": "newLabels", "expression": _or_empty("object.metadata.labels", "{}")},
        {"name": "oldAnnotations", "expression": _or_empty("oldObject.metadata.annotations", "{}")},
        {"name": "newAnnotations", "expression": _or_empty("object.metadata.annotations", "{}")},
        {
            "name": "oldTaints",
            "expression": (
                "has(oldObject.spec.taints) ? oldObject.spec.taints.filter(t, "
                f"t.key != '{STARTUP_TAINT_KEY}') : []"
            ),
        },
        {
            "name": "newTaints",
            "expression": (
                f"has(object.spec.taints) ? object.spec.taints.filter(t, t.key != '{STARTUP_TAINT_KEY}') : []"
            ),
        },
        {
            "name": "oldConditions",
            "expression": (
                "has(oldObject.status.conditions) ? oldObject.status.conditions.filter(c, "
                f"c.type != '{CONDITION_TYPE}') : []"
            ),
        },
        {
            "name": "newConditions",
            "expression": (
                "has(object.status.conditions) ? object.status.conditions.filter(c, "
                f"c.type != '{CONDITION_TYPE}') : []"
            ),
        },
    ]


def validations() -> list[JSON]:
    """The policy's checks; each one denies with its own message and reason Forbidden."""
    update = "request.operation != 'UPDATE' || "
    own_node = (
        "variables.nodeName == '' ? 'the kwasm-py agent token carries no "
        f"{NODE_NAME_CLAIM} claim (needs a bound service-account token, Kubernetes 1.30+)'"
        " : 'the kwasm-py agent of node ' + variables.nodeName + ' may not change node '"
        " + object.metadata.name"
    )
    checks = [
        (
            "request.operation == 'UPDATE'",
            "the kwasm-py agent may update Nodes, never create or delete them",
            None,
        ),
        (
            update + "(variables.nodeName != '' && object.metadata.name == variables.nodeName)",
            "the kwasm-py agent may change only the Node it runs on",
            own_node,
        ),
        (
            update + "(" + _only_ours_changed("variables.oldLabels", "variables.newLabels") + ")",
            f"the kwasm-py agent may change only {KEY_PREFIX}* labels",
            None,
        ),
        (
            update + "(" + _only_ours_changed("variables.oldAnnotations", "variables.newAnnotations") + ")",
            f"the kwasm-py agent may change only {KEY_PREFIX}* annotations",
            None,
        ),
        (
            update + "variables.newTaints == variables.oldTaints",
            f"the kwasm-py agent may change only the {STARTUP_TAINT_KEY} taint",
            None,
        ),
        (
            update + "(" + " && ".join(_unchanged(f"spec.{f}") for f in SPEC_FIELDS) + ")",
            "the kwasm-py agent may not change the Node's spec (cordon, CIDRs, provider ID)",
            None,
        ),
        (
            update + "(" + " && ".join(_unchanged(f"metadata.{f}") for f in META_FIELDS) + ")",
            "the kwasm-py agent may not change the Node's finalizers or owner references",
            None,
        ),
        (
            update
            + "(variables.newConditions == variables.oldConditions && "
            + " && ".join(_unchanged(f"status.{f}") for f in STATUS_FIELDS)
            + ")",
            f"the kwasm-py agent may change only its own {CONDITION_TYPE} condition in the status",
            None,
        ),
    ]
    out: list[JSON] = []
    for expression, message, message_expression in checks:
        check: JSON = {"expression": expression, "message": message, "reason": "Forbidden"}
        if message_expression:
            check["messageExpression"] = message_expression
        out.append(check)
    return out


def own_node_policy(name: str, *, namespace: str, service_account: str, labels: dict[str, str]) -> list[JSON]:
    """The ValidatingAdmissionPolicy and its binding, for the agent ServiceAccount NAMESPACE/SA.

    Takes the objects' name and labels; returns [policy, binding] (cluster-scoped, v1).
    Source for the claim: Kubernetes KEP-4193 (bound service-account token improvements).
    """
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE", "DELETE"],
                        "resources": ["nodes", "nodes/status"],
                    }
                ]
            },
            "matchConditions": [
                {
                    "name": "is-the-kwasm-py-agent",
                    "expression": (
                        f"request.userInfo.username == '{agent_username(namespace, service_account)}'"
                    ),
                }
            ],
            "variables": variables(),
            "validations": validations(),
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    return [policy, binding]
