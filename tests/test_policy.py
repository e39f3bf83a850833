"""The own-Node admission policy in installer.yaml, evaluated offline with cel-python.

A small evaluator applies the policy the way the API server does (matchConstraints, then
matchConditions, then every validation; an expression that errors denies, as failurePolicy Fail
does) to admission requests that must pass and must be denied.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes

from kwasm_py.cluster import manifests, policy

REPO = Path(__file__).resolve().parent.parent
AGENT = policy.agent_username(manifests.DEFAULT_NAMESPACE, manifests.APP_NAME)
TAINT = policy.STARTUP_TAINT_KEY


def installed_policy() -> dict[str, Any]:
    """The ValidatingAdmissionPolicy exactly as committed in manifests/installer.yaml."""
    docs = [d for d in yaml.safe_load_all((REPO / "manifests/installer.yaml").read_text()) if d]
    (vap,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
    return vap


@functools.cache
def _program(expr: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(expr))


def _eval(expr: str, activation: dict[str, Any]) -> Any:
    return _program(expr).evaluate(activation)


def admit(vap: dict[str, Any], request: dict[str, Any]) -> list[str]:
    """The denial messages for REQUEST (empty: admitted), as the API server would decide."""
    spec = vap["spec"]
    resource = request["resource"] + (f"/{request['subResource']}" if request.get("subResource") else "")
    matched = any(
        request["operation"] in rule["operations"] and resource in rule["resources"]
        for rule in spec["matchConstraints"]["resourceRules"]
    )
    base = {
        "request": celpy.json_to_cel(request),
        "object": celpy.json_to_cel(request.get("object")),
        "oldObject": celpy.json_to_cel(request.get("oldObject")),
    }
    if not matched or not all(_eval(c["expression"], base) for c in spec["matchConditions"]):
        return []
    variables: dict[Any, Any] = {}
    for var in spec["variables"]:  # each may use the ones before it
        act = {**base, "variables": celtypes.MapType(variables)}
        try:
            variables[celtypes.StringType(var["name"])] = _eval(var["expression"], act)
        except celpy.CELEvalError as ex:  # lazily evaluated by the server: an error only if used
            variables[celtypes.StringType(var["name"])] = ex
    act = {**base, "variables": celtypes.MapType(variables)}
    denied = []
    for check in spec["validations"]:
        try:
            ok = bool(_eval(check["expression"], act))
        except celpy.CELEvalError as ex:
            denied.append(f"error: {ex}")
            continue
        if not ok:
            message = check["message"]
            if "messageExpression" in check:
                with contextlib.suppress(celpy.CELEvalError):  # the server falls back to message
                    message = str(_eval(check["messageExpression"], act))
            denied.append(message)
    return denied


def node(name: str = "n1") -> dict[str, Any]:
    """A Node as the API server stores it: the kubelet's labels, a foreign taint, conditions."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {
            "podCIDR": "10.244.1.0/24",
            "providerID": f"kind://docker/kind/{name}",
            "taints": [
                {"key": "dedicated", "value": "wasm", "effect": "NoSchedule"},
                {"key": TAINT, "value": "true", "effect": "NoSchedule"},
            ],
        },
        "status": {
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady"},
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
            ],
            "nodeInfo": {"containerRuntimeVersion": "containerd://1.6.20", "kubeletVersion": "v1.31.0"},
        },
    }


def request(
    new: dict[str, Any] | None,
    old: dict[str, Any] | None,
    *,
    user: str = AGENT,
    claim: str | None = "n1",
    operation: str = "UPDATE",
    sub: str = "",
) -> dict[str, Any]:
    """An AdmissionRequest for a Node, from USER whose token names node CLAIM (None: no claim)."""
    extra = {policy.NODE_NAME_CLAIM: [claim]} if claim is not None else {}
    return {
        "operation": operation,
        "resource": "nodes",
        "subResource": sub,
        "name": (new or old or {}).get("metadata", {}).get("name", ""),
        "userInfo": {"username": user, "groups": ["system:serviceaccounts"], "extra": extra},
        "object": new,
        "oldObject": old,
    }


def changed(edit: Any, name: str = "n1") -> tuple[dict[str, Any], dict[str, Any]]:
    """(new, old): the Node NAME and a copy changed by EDIT(node)."""
    old = node(name)
    new = copy.deepcopy(old)
    edit(new)
    return new, old


def _set_label(n: dict[str, Any], key: str, value: str | None) -> None:
    labels = n["metadata"]["labels"]
    if value is None:
        labels.pop(key, None)
    else:
        labels[key] = value


def _provisioned(n: dict[str, Any]) -> None:
    n["metadata"]["labels"]["kwasm.sh/kwasm-provisioned"] = "true"
    n["metadata"]["labels"]["kwasm.sh/runtime-spin"] = "true"
    n["metadata"]["annotations"]["kwasm.sh/kwasm-status"] = '{"phase": "provisioned"}'


def _drop_startup_taint(n: dict[str, Any]) -> None:
    n["spec"]["taints"] = [t for t in n["spec"]["taints"] if t["key"] != TAINT]


def _our_condition(n: dict[str, Any]) -> None:
    n["status"]["conditions"].append(
        {"type": policy.CONDITION_TYPE, "status": "True", "reason": "Provisioned"}
    )


ALLOWED = {
    "label and status annotation": _provisioned,
    "opt-out removes our keys": lambda n: _set_label(n, "kwasm.sh/kwasm-node", None),
    "startup taint removed": _drop_startup_taint,
    "startup taint re-added": lambda n: n["spec"]["taints"].append(
        {"key": TAINT, "value": "true", "effect": "NoExecute"}
    ),
    "nothing changed": lambda n: None,
}


@pytest.mark.parametrize("edit", ALLOWED.values(), ids=ALLOWED.keys())
def test_the_agent_may_change_its_own_keys_on_its_own_node(edit):
    """Our labels, annotations and startup taint on the Node named by the token's claim pass."""
    new, old = changed(edit)
    assert admit(installed_policy(), request(new, old)) == []


def test_the_agent_may_set_its_own_condition_through_the_status_subresource():
    """A nodes/status update that adds or changes only KwasmProvisioned passes."""
    vap = installed_policy()
    new, old = changed(_our_condition)
    assert admit(vap, request(new, old, sub="status")) == []
    newer = copy.deepcopy(new)
    newer["status"]["conditions"][-1]["status"] = "False"
    assert admit(vap, request(newer, new, sub="status")) == []


def test_the_agents_outcome_write_through_the_status_subresource_passes_and_foreign_labels_do_not():
    """The outcome write (our labels, status annotation and condition in one nodes/status
    update, see cluster/progress.py) passes; a foreign label in the same write is refused."""
    vap = installed_policy()

    def outcome(n: dict) -> None:
        _our_condition(n)
        _set_label(n, "kwasm.sh/kwasm-provisioned", "true")
        n["metadata"]["annotations"]["kwasm.sh/status"] = "{}"

    new, old = changed(outcome)
    assert admit(vap, request(new, old, sub="status")) == []
    bad = copy.deepcopy(new)
    _set_label(bad, "node-role.kubernetes.io/control-plane", "")
    assert admit(vap, request(bad, old, sub="status")) != []


DENIED = {
    "foreign label added": (
        lambda n: _set_label(n, "node-role.kubernetes.io/control-plane", ""),
        "labels",
    ),
    "foreign label changed": (lambda n: _set_label(n, "kubernetes.io/os", "windows"), "labels"),
    "foreign label removed": (lambda n: _set_label(n, "kubernetes.io/hostname", None), "labels"),
    "look-alike prefix": (lambda n: _set_label(n, "kwasm.sh.evil/x", "1"), "labels"),
    "foreign annotation": (
        lambda n: n["metadata"]["annotations"].update({"cluster-autoscaler.kubernetes.io/x": "1"}),
        "annotations",
    ),
    "foreign taint removed": (
        lambda n: n["spec"].update({"taints": [t for t in n["spec"]["taints"] if t["key"] == TAINT]}),
        "taint",
    ),
    "foreign taint added": (
        lambda n: n["spec"]["taints"].append({"key": "evict", "effect": "NoExecute"}),
        "taint",
    ),
    "foreign taint's effect changed": (
        lambda n: n["spec"]["taints"][0].update({"effect": "PreferNoSchedule"}),
        "taint",
    ),
    "cordon": (lambda n: n["spec"].update({"unschedulable": True}), "spec"),
    "provider ID": (lambda n: n["spec"].update({"providerID": "aws:///x"}), "spec"),
    "finalizer": (lambda n: n["metadata"].update({"finalizers": ["kwasm.sh/hold"]}), "finalizers"),
}


@pytest.mark.parametrize(("edit", "what"), DENIED.values(), ids=DENIED.keys())
def test_the_agent_may_not_change_what_is_not_ours(edit, what):
    """Any change outside our keys is denied, with the message naming what was touched."""
    new, old = changed(edit)
    denied = admit(installed_policy(), request(new, old))
    assert len(denied) == 1 and what in denied[0], denied


def test_a_denied_change_is_denied_even_next_to_allowed_ones():
    """Our label plus a cordon in one patch is still denied."""
    new, old = changed(lambda n: (_provisioned(n), n["spec"].update({"unschedulable": True})))
    assert admit(installed_policy(), request(new, old)) != []


def test_the_agent_may_not_touch_another_node():
    """The agent of n1 is denied on n2, even for our own label, and the message says why."""
    new, old = changed(_provisioned, name="n2")
    denied = admit(installed_policy(), request(new, old, claim="n1"))
    assert denied == ["the kwasm-py agent of node n1 may not change node n2"]


def test_a_token_without_the_node_claim_is_denied():
    """A legacy (unbound) token has no node-name claim: fail closed, saying what is needed."""
    new, old = changed(_provisioned)
    denied = admit(installed_policy(), request(new, old, claim=None))
    assert len(denied) == 1 and "node-name claim" in denied[0] and "1.30" in denied[0]


def test_the_status_subresource_cannot_change_other_conditions_or_fields():
    """Through nodes/status only KwasmProvisioned may change: not Ready, not the capacity."""
    vap = installed_policy()
    for edit in (
        lambda n: n["status"]["conditions"][0].update({"status": "False"}),
        lambda n: n["status"]["conditions"].pop(1),
        lambda n: n["status"]["capacity"].update({"pods": "1000"}),
        lambda n: n["status"].update({"phase": "Terminated"}),
    ):
        new, old = changed(edit)
        denied = admit(vap, request(new, old, sub="status"))
        assert len(denied) == 1 and "status" in denied[0], denied


@pytest.mark.parametrize("operation", ["CREATE", "DELETE"])
def test_the_agent_may_not_create_or_delete_nodes(operation):
    """Node CREATE and DELETE from the agent are denied (RBAC grants neither; the policy agrees)."""
    n = node()
    new, old = (n, None) if operation == "CREATE" else (None, n)
    denied = admit(installed_policy(), request(new, old, operation=operation))
    assert "the kwasm-py agent may update Nodes, never create or delete them" in denied


@pytest.mark.parametrize(
    "user",
    [
        "kubernetes-admin",
        "system:node:n1",
        f"system:serviceaccount:{manifests.DEFAULT_NAMESPACE}:other",
        f"system:serviceaccount:default:{manifests.APP_NAME}",
    ],
)
def test_other_users_are_not_restricted(user):
    """The policy matches only the agent's ServiceAccount: an admin's cordon or the kubelet pass."""
    new, old = changed(lambda n: (n["spec"].update({"unschedulable": True}), _set_label(n, "x", "y")))
    assert admit(installed_policy(), request(new, old, user=user, claim="n2")) == []
    assert admit(installed_policy(), request(new, old, claim="n2")) != []  # the same, as the agent


def test_the_policy_follows_the_namespace_option():
    """Rendered for another namespace, the policy matches that namespace's agent, not ours."""
    params = manifests.InstallerParams(namespace="wasm")
    vap = next(o for o in manifests.installer_objects(params) if o["kind"] == "ValidatingAdmissionPolicy")
    new, old = changed(lambda n: n["spec"].update({"unschedulable": True}))
    assert admit(vap, request(new, old, user=policy.agent_username("wasm", manifests.APP_NAME))) != []
    assert admit(vap, request(new, old)) == []


def _schema_fields(version: str, definition: str) -> set[str]:
    import json

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = root / f"v{version}-local-strict" / f"{definition}.json"
    return set(json.loads(path.read_text())["properties"])


POLICY_VERSIONS = [
    v
    for v in sorted(
        set(kubernetes_validate.utils.all_versions()), key=lambda v: tuple(int(x) for x in v.split("."))
    )
    if tuple(int(x) for x in v.split(".")[:2]) >= policy.MIN_VERSION
]


def test_every_node_field_is_checked_or_known_to_be_newer():
    """The policy names every Node spec/status field of 1.30, and only fields 1.30 has; fields
    added later are listed as not covered (a new one makes this fail until someone decides)."""
    first = POLICY_VERSIONS[0]
    special = {"spec": {"taints"}, "status": {"conditions"}}
    for part, definition, named in (
        ("spec", "nodespec-v1", policy.SPEC_FIELDS),
        ("status", "nodestatus-v1", policy.STATUS_FIELDS),
    ):
        oldest = _schema_fields(first, definition)
        assert set(named) | special[part] == oldest, part
        every = set().union(*(_schema_fields(v, definition) for v in POLICY_VERSIONS))
        assert every - oldest == set(policy.NEWER_NODE_FIELDS[part]), part
    meta = _schema_fields(first, "objectmeta-meta-v1")
    assert set(policy.META_FIELDS) <= meta


@pytest.mark.parametrize("version", POLICY_VERSIONS)
def test_policy_objects_validate_strictly_from_1_30(version):
    """The policy and binding pass strict schema validation for every version we claim (1.30+)."""
    docs = [d for d in yaml.safe_load_all((REPO / "manifests/installer.yaml").read_text()) if d]
    objs = [d for d in docs if d["kind"].startswith("ValidatingAdmissionPolicy")]
    assert len(objs) == 2
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


def test_a_misspelt_policy_field_fails_strict_validation():
    """Strict validation of the policy can fail (a typo in a validation is caught)."""
    vap = copy.deepcopy(installed_policy())
    vap["spec"]["validations"][0]["messageExpresion"] = "'x'"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(vap, POLICY_VERSIONS[-1], strict=True)
