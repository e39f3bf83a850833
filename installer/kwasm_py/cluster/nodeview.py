"""PURE: read kwasm-py's keys off a Node object and build the status annotation. No I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kwasm_py.model import JSON, OPT_IN_KEY, PROVISIONED_LABEL, STATUS_ANNOTATION


def _meta(node: JSON, part: str) -> dict[str, Any]:
    meta = node.get("metadata") or {}
    value = meta.get(part) or {}
    return value if isinstance(value, dict) else {}


def name_of(node: JSON) -> str:
    return str((node.get("metadata") or {}).get("name", ""))


def opted_in(node: JSON) -> bool:
    """Opt-in is ``kwasm.sh/kwasm-node: "true"`` as an annotation or as a label."""
    return _meta(node, "annotations").get(OPT_IN_KEY) == "true" or (
        _meta(node, "labels").get(OPT_IN_KEY) == "true"
    )


def provisioned(node: JSON) -> bool:
    return _meta(node, "labels").get(PROVISIONED_LABEL) == "true"


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


def provisioned_status(result: JSON, *, now: str) -> str:
    """Status annotation after a verified install: per runtime its handler, shim and sha256."""
    runtimes = [
        {
            "handler": r.get("handler", ""),
            "runtime_type": r.get("runtime_type", ""),
            "shim": r.get("shim", ""),
            "sha256": r.get("sha256", ""),
        }
        for r in result.get("runtimes") or []
        if isinstance(r, dict)
    ]
    return json.dumps({"ok": True, "time": now, "runtimes": runtimes}, sort_keys=True)


def failed_status(*, step: str, reason: str, now: str) -> str:
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
        return {
            "name": self.name,
            "opted_in": self.opted_in,
            "provisioned": self.provisioned,
            "runtimes": self.runtimes,
            "time": self.time,
            "reason": self.reason,
        }


def row(node: JSON) -> NodeRow:
    st = status_of(node)
    return NodeRow(
        name=name_of(node),
        opted_in=opted_in(node),
        provisioned=provisioned(node),
        runtimes=[r for r in st.get("runtimes") or [] if isinstance(r, dict)],
        time=str(st.get("time", "")),
        reason="" if st.get("ok", True) else str(st.get("reason", "")),
    )
