"""PURE: read kwasm-py's keys off a Node object and build the status annotation. No I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kwasm_py.cluster.policy import CONDITION_TYPE, STARTUP_TAINT_KEY
from kwasm_py.contract import Runtime
from kwasm_py.model import JSON, OPT_IN_KEY, PROVISIONED_LABEL, RUNTIME_LABEL_PREFIX, STATUS_ANNOTATION

STARTUP_TAINT_EFFECT = "NoSchedule"

#: Where a node is on its way, as the status annotation names it (``phase``).
Phase = Literal["waiting", "installing", "verifying", "provisioned", "failed", "removing"]
#: Phases after which the next one starts a new round (``phases`` starts afresh).
FINAL_PHASES = ("provisioned", "failed")
#: Which check confirmed the runtime before the label: containerd over CRI alone (the Node has no
#: ``status.runtimeHandlers``), or CRI and then the kubelet's ``status.runtimeHandlers``.
Check = Literal["cri", "kubelet"]


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


def runtime_handlers(node: JSON) -> list[str] | None:
    """Takes a Node object; returns the handler names the kubelet reports in
    ``status.runtimeHandlers``, or None when the Node reports none.

    The field exists from Kubernetes 1.30 (KEP-3857, ``NodeRuntimeHandler{name, features}``)
    and the kubelet fills it only from a runtime that lists its handlers in CRI
    ``RuntimeStatus`` (containerd 2.0 and later); an older kubelet or runtime leaves it out,
    which is why an absent or empty list means "not reported", not "no handlers".
    """
    status = node.get("status") or {}
    entries = status.get("runtimeHandlers") if isinstance(status, dict) else None
    if not isinstance(entries, list) or not entries:
        return None
    return [str(e.get("name", "")) for e in entries if isinstance(e, dict)]


def kubelet_missing(node: JSON, handlers: Sequence[str]) -> list[str] | None:
    """Takes a Node and the handlers just installed; returns those the kubelet does not yet
    report (empty: all confirmed), or None when the Node reports no runtime handlers at all
    (CRI verification alone decides)."""
    reported = runtime_handlers(node)
    if reported is None:
        return None
    return [h for h in handlers if h not in reported]


def phase_status(
    previous: JSON,
    *,
    phase: Phase,
    now: str,
    runtimes: Sequence[Runtime] = (),
    shims: Sequence[JSON] = (),
    check: Check | None = None,
    step: str = "",
    reason: str = "",
) -> str:
    """Takes the status annotation so far (:func:`status_of`), the phase entered and its
    time, and what is known: the runtimes a verified install reported, the shims (handler,
    version, sha256), the check that confirmed them, or the failed step and its reason.
    Returns the new annotation: ``phase``, ``time`` (of this phase), ``phases`` (phase ->
    time entered, for this round: a new round starts after provisioned or failed), ``ok``
    (true only when provisioned) and whichever of ``runtimes``, ``shims``, ``check``,
    ``step``, ``reason`` apply."""
    before = previous.get("phase")
    fresh = (
        before in FINAL_PHASES
        or phase in ("waiting", "removing")
        or (phase == "installing" and before != "waiting")
    )
    kept = previous.get("phases")
    phases = {} if fresh or not isinstance(kept, dict) else dict(kept)
    doc: JSON = {
        "ok": phase == "provisioned",
        "phase": phase,
        "time": now,
        "phases": {**phases, phase: now},
    }
    if runtimes:
        doc["runtimes"] = [r.to_json() for r in runtimes]
    if shims:
        doc["shims"] = [dict(s) for s in shims]
    if check:
        doc["check"] = check
    if step:
        doc["step"] = step
        doc["reason"] = reason
    return json.dumps(doc, sort_keys=True)


def shim_entries(runtimes: Sequence[Runtime], versions: Mapping[str, str]) -> list[JSON]:
    """Takes the installed runtimes and the known shim versions (handler -> version, from the
    shim catalog or the image's record); returns per runtime its handler, version ("" when
    unknown) and sha256."""
    return [
        {"handler": r.handler, "version": versions.get(r.handler, ""), "sha256": r.sha256} for r in runtimes
    ]


def condition_of(node: JSON) -> JSON | None:
    """Takes a Node; returns its ``KwasmProvisioned`` condition, None when it has none."""
    status = node.get("status") or {}
    for cond in status.get("conditions") or [] if isinstance(status, dict) else []:
        if isinstance(cond, dict) and cond.get("type") == CONDITION_TYPE:
            return cond
    return None


def condition_patch(node: JSON, *, phase: Phase, message: str, now: str) -> JSON:
    """Takes the Node (for the condition it has), the phase and a message, and the time
    (RFC 3339, seconds); returns the strategic-merge patch for ``nodes/status`` that sets the
    ``KwasmProvisioned`` condition: ``True`` when provisioned, ``False`` otherwise, the reason
    the phase (``Provisioned``, ``Failed``, ...); ``lastTransitionTime`` moves only when the
    status does. Conditions merge by ``type``, so the kubelet's are left alone."""
    status = "True" if phase == "provisioned" else "False"
    old = condition_of(node)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    cond = {
        "type": CONDITION_TYPE,
        "status": status,
        "reason": phase.capitalize(),
        "message": message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": since or now,
    }
    return {"status": {"conditions": [cond]}}


def condition_delete_patch() -> JSON:
    """Takes nothing; returns the strategic-merge patch for ``nodes/status`` that removes the
    ``KwasmProvisioned`` condition (the node opted out)."""
    return {"status": {"conditions": [{"type": CONDITION_TYPE, "$patch": "delete"}]}}


@dataclass(frozen=True)
class NodeRow:
    """One line of `kwasm-py status`."""

    name: str
    opted_in: bool
    provisioned: bool
    runtimes: list[JSON] = field(default_factory=list)
    time: str = ""
    reason: str = ""
    phase: str = ""
    step: str = ""
    phases: dict[str, str] = field(default_factory=dict)
    shims: list[JSON] = field(default_factory=list)
    check: str = ""
    kubelet: list[str] | None = None  # the kubelet's status.runtimeHandlers, None: not reported

    @property
    def failed(self) -> bool:
        """Whether the agent reported a failure (phase ``failed``, or an old ``ok: false``)."""
        return self.phase == "failed" or bool(self.reason)

    def runtimes_cell(self) -> str:
        """``handler@sha256[:12]`` per runtime, with the shim version where the status has it."""
        versions = {str(s.get("handler")): str(s.get("version") or "") for s in self.shims}
        cells = []
        for x in self.runtimes:
            handler = str(x.get("handler"))
            version = versions.get(handler)
            cells.append(f"{handler}@{str(x.get('sha256', ''))[:12]}" + (f" ({version})" if version else ""))
        return " ".join(cells)

    def kubelet_cell(self) -> str:
        """The kubelet's view: per runtime whether status.runtimeHandlers lists it, or the
        handlers it lists when none is installed; "not reported" without the field."""
        if self.kubelet is None:
            return "not reported"
        handlers = [str(x.get("handler")) for x in self.runtimes]
        if not handlers:
            return ",".join(h or "(default)" for h in self.kubelet)
        return " ".join(h if h in self.kubelet else f"{h} missing" for h in handlers)

    def to_json(self) -> JSON:
        """Takes nothing; returns the row as the JSON object `kwasm-py status -o json` prints."""
        return {
            "name": self.name,
            "opted_in": self.opted_in,
            "provisioned": self.provisioned,
            "runtimes": self.runtimes,
            "time": self.time,
            "reason": self.reason,
            "phase": self.phase,
            "step": self.step,
            "phases": self.phases,
            "shims": self.shims,
            "check": self.check,
            "kubelet_handlers": self.kubelet,
        }


def row(node: JSON) -> NodeRow:
    """Takes a Node object; returns its `kwasm-py status` row (from labels and annotation)."""
    st = status_of(node)
    phase = str(st.get("phase", ""))
    failed = phase == "failed" or (not phase and st.get("ok", True) is False)
    phases = st.get("phases")
    return NodeRow(
        name=name_of(node),
        opted_in=opted_in(node),
        provisioned=provisioned(node),
        runtimes=[r for r in st.get("runtimes") or [] if isinstance(r, dict)],
        time=str(st.get("time", "")),
        reason=str(st.get("reason", "")) if failed else "",
        phase=phase,
        step=str(st.get("step", "")) if failed else "",
        phases={str(k): str(v) for k, v in phases.items()} if isinstance(phases, dict) else {},
        shims=[s for s in st.get("shims") or [] if isinstance(s, dict)],
        check=str(st.get("check", "")),
        kubelet=runtime_handlers(node),
    )
