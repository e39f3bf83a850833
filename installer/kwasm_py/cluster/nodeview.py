"""PURE: read kwasm-py's keys off a Node object and build the status annotation. No I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kwasm_py.cluster.policy import STARTUP_TAINT_KEY
from kwasm_py.contract import Runtime
from kwasm_py.model import JSON, OPT_IN_KEY, PROVISIONED_LABEL, RUNTIME_LABEL_PREFIX, STATUS_ANNOTATION

STARTUP_TAINT_EFFECT = "NoSchedule"


def _meta(node: JSON, part: str) -> dict[str, Any]:
    meta = node.get("metadata") or {}
    value = meta.get(part) or {}
    return value if isinstance(value, dict) else {}


def name_of(node: JSON) -> str:
    """Takes a Node object; returns its name ("" when it has none)."""
    return str((node.get("metadata") or {}).get("name", ""))


def opted_in(node: JSON) -> bool:
    """Opt-in is ``kwasm.sh/kwasm-node: "true"`` as an annotation or as a label."""
    return _meta(node, "annotations").get(OPT_IN_KEY) == "true" or (
        _meta(node, "labels").get(OPT_IN_KEY) == "true"
    )


def provisioned(node: JSON) -> bool:
    """Takes a Node object; returns whether it carries ``kwasm.sh/kwasm-provisioned=true``."""
    return _meta(node, "labels").get(PROVISIONED_LABEL) == "true"


def runtime_label(handler: str) -> str:
    """Takes a runtime handler; returns its node label key, ``kwasm.sh/runtime-<handler>``."""
    return f"{RUNTIME_LABEL_PREFIX}{handler}"


def runtime_labels(node: JSON) -> list[str]:
    """Takes a Node object; returns the per-handler label keys it carries (sorted)."""
    return sorted(k for k in _meta(node, "labels") if k.startswith(RUNTIME_LABEL_PREFIX))


def label_patch(node: JSON, handlers: Sequence[str]) -> dict[str, str | None]:
    """Takes the Node and the handlers now verified; returns the merge-patch ``labels`` that set
    the provisioned label and one label per handler, and remove the handler labels of runtimes
    no longer installed."""
    want = {runtime_label(h): "true" for h in handlers}
    stale: dict[str, str | None] = {k: None for k in runtime_labels(node) if k not in want}
    return {PROVISIONED_LABEL: "true", **want, **stale}


def unlabel_patch(node: JSON) -> dict[str, str | None]:
    """Takes the Node; returns the merge-patch ``labels`` removing the provisioned label and
    every per-handler label it carries ({} when it carries none)."""
    keys = runtime_labels(node) + ([PROVISIONED_LABEL] if provisioned(node) else [])
    return dict.fromkeys(keys)


def _taints(node: JSON) -> list[JSON]:
    spec = node.get("spec") or {}
    taints = (spec.get("taints") or []) if isinstance(spec, dict) else []
    return [t for t in taints if isinstance(t, dict)] if isinstance(taints, list) else []


def is_startup_taint(taint: JSON) -> bool:
    """Takes a taint; returns whether it is exactly ours: key ``kwasm.sh/kwasm-not-ready``,
    effect ``NoSchedule`` (any value)."""
    return taint.get("key") == STARTUP_TAINT_KEY and taint.get("effect") == STARTUP_TAINT_EFFECT


def has_startup_taint(node: JSON) -> bool:
    """Takes a Node object; returns whether it carries the startup taint."""
    return any(is_startup_taint(t) for t in _taints(node))


def untaint_patch(node: JSON) -> JSON | None:
    """Takes a Node object; returns the merge patch that removes the startup taint and keeps
    every other taint as it is, guarded by the Node's resourceVersion (a taint added meanwhile
    makes it fail with 409 instead of being dropped); None when there is no startup taint."""
    taints = _taints(node)
    if not any(is_startup_taint(t) for t in taints):
        return None
    rest = [t for t in taints if not is_startup_taint(t)]
    meta: JSON = {}
    rv = (node.get("metadata") or {}).get("resourceVersion")
    if rv:
        meta["resourceVersion"] = str(rv)
    return {"metadata": meta, "spec": {"taints": rest or None}}


def status_of(node: JSON) -> JSON:
    """The parsed status annotation ({} when absent or unreadable)."""
    raw = _meta(node, "annotations").get(STATUS_ANNOTATION)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {"ok": False, "reason": "unreadable status annotation"}
    return doc if isinstance(doc, dict) else {}


def provisioned_status(runtimes: Sequence[Runtime], *, now: str) -> str:
    """Takes the runtimes a verified install reported and the time; returns the status
    annotation: per runtime its handler, runtime_type, shim and sha256."""
    entries = [r.to_json() for r in runtimes]
    return json.dumps({"ok": True, "time": now, "runtimes": entries}, sort_keys=True)


def failed_status(*, step: str, reason: str, now: str) -> str:
    """Takes the failed step, its reason and the time; returns the status annotation."""
    return json.dumps({"ok": False, "time": now, "step": step, "reason": reason}, sort_keys=True)


@dataclass(frozen=True)
class NodeRow:
    """One line of `kwasm-py status`."""

    name: str
    opted_in: bool
    provisioned: bool
    runtimes: list[JSON] = field(default_factory=list)
    time: str = ""
    reason: str = ""

    def to_json(self) -> JSON:
        """Takes nothing; returns the row as the JSON object `kwasm-py status -o json` prints."""
        return {
            "name": self.name,
            "opted_in": self.opted_in,
            "provisioned": self.provisioned,
            "runtimes": self.runtimes,
            "time": self.time,
            "reason": self.reason,
        }


def row(node: JSON) -> NodeRow:
    """Takes a Node object; returns its `kwasm-py status` row (from labels and annotation)."""
    st = status_of(node)
    return NodeRow(
        name=name_of(node),
        opted_in=opted_in(node),
        provisioned=provisioned(node),
        runtimes=[r for r in st.get("runtimes") or [] if isinstance(r, dict)],
        time=str(st.get("time", "")),
        reason="" if st.get("ok", True) else str(st.get("reason", "")),
    )
