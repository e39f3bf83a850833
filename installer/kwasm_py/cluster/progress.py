"""EFFECTS: what the agent records on its Node about where it is: the phase in the status
annotation, the labels (``kwasm.sh/kwasm-provisioned`` and one ``kwasm.sh/runtime-<handler>``
per runtime), the ``KwasmProvisioned`` condition (through the ``nodes/status`` subresource), and
the removal of its startup taint once provisioned (:mod:`~kwasm_py.cluster.untaint`).

Each phase (:data:`~kwasm_py.cluster.nodeview.Phase`) is one merge patch of the status
annotation, built by :func:`~kwasm_py.cluster.nodeview.phase_status` from the annotation the
Node carries. The condition is written for outcomes only (provisioned, failed, removed); it
makes the outcome visible in ``kubectl describe node`` next to the kubelet's own conditions (a
strategic-merge patch merges conditions by ``type``).

An outcome is one request: labels, annotation and condition in one strategic-merge patch of
``nodes/status``. The API server's status strategy for Nodes resets only ``spec`` (and
``status.config``), so metadata written there is kept (kubernetes/kubernetes
``pkg/registry/core/node/strategy.go``, ``nodeStatusStrategy.PrepareForUpdate`` and
``GetResetFields``). Where that request is refused as such (403: a role without
``nodes/status``; 404/405: no subresource), the labels and annotation go to the Node itself and
the condition is left out, logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kwasm_py.cluster import nodeview, untaint
from kwasm_py.cluster.agentlog import Logger, micro_time
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.contract import Runtime
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON, PROVISIONED_LABEL, STATUS_ANNOTATION

#: Answers to a ``nodes/status`` patch that refuse the subresource itself (a role without it,
#: an API without it), not the change: the labels then go to the Node alone.
NO_STATUS_WRITE = frozenset({403, 404, 405})


@dataclass
class Progress:
    """Records phases and the condition on the Node ``name`` through ``api``.

    ``versions`` maps handler -> shim version (recorded with the runtimes). ``last`` is the
    status annotation as last written (or read off the Node), so consecutive phases of one
    round keep their times without re-reading the Node. ``floor`` is the time of this
    process's latest write of the annotation (or its removal): see :meth:`stale`.
    """

    api: AgentApi
    name: str
    log: Logger
    versions: Mapping[str, str] = field(default_factory=dict)
    wall_clock: Callable[[], float] = time.time
    last: JSON = field(default_factory=dict)
    floor: str = ""
    _pending: tuple[str, str] = ("", "")

    def stale(self, node: JSON) -> bool:
        """Takes a Node object; returns whether it predates this process's latest write: its
        status annotation is older than ``floor``. The watch delivers the updates our own
        phase patches caused after the fact; acting on one of those (a snapshot from before
        the label) would install again for nothing. A Node without the annotation is never
        stale (it was removed, by us or by someone else, after any write of ours)."""
        when = nodeview.status_of(node).get("time")
        return bool(self.floor) and isinstance(when, str) and bool(when) and when < self.floor

    def seen(self, node: JSON) -> None:
        """Takes a Node object the agent saw; adopts its status annotation when this process has
        written none yet (a restarted agent continues the round the Node records)."""
        if not self.last:
            self.last = nodeview.status_of(node)

    def _annotation(
        self,
        phase: nodeview.Phase,
        *,
        runtimes: Sequence[Runtime] = (),
        check: nodeview.Check | None = None,
        step: str = "",
        reason: str = "",
    ) -> str:
        now = micro_time(self.wall_clock())
        text = nodeview.phase_status(
            self.last,
            phase=phase,
            now=now,
            runtimes=runtimes,
            shims=nodeview.shim_entries(runtimes, self.versions),
            check=check,
            step=step,
            reason=reason,
        )
        self._pending = (text, now)
        return text

    def _written(self) -> None:
        """The patch carrying the annotation built last succeeded: it is what the Node says."""
        text, now = self._pending
        self.last = nodeview.status_of({"metadata": {"annotations": {STATUS_ANNOTATION: text}}})
        self.floor = now

    def phase(self, phase: nodeview.Phase) -> None:
        """Takes an intermediate phase (waiting, installing, verifying, removing); records it in
        the status annotation. Raises KubeError when the patch fails."""
        self.api.patch_node(
            self.name, {"metadata": {"annotations": {STATUS_ANNOTATION: self._annotation(phase)}}}
        )
        self._written()
        self.log("phase", phase=phase)

    def try_phase(self, phase: nodeview.Phase) -> None:
        """As :meth:`phase`, best effort: a failed patch is logged, nothing is raised (the
        outcome is recorded anyway)."""
        try:
            self.phase(phase)
        except KubeError as ex:
            self.log("phase_lost", level="warning", phase=phase, error=ex.message)

    def phase_beside(self, phase: nodeview.Phase) -> Callable[[], None]:
        """As :meth:`try_phase`, in a thread of its own so that the caller's next step (the
        restart) does not wait one API round trip for it; returns the function that waits
        until it is written. Call that before any other write of this Progress."""
        writer = threading.Thread(target=self.try_phase, args=(phase,), name=f"phase-{phase}", daemon=True)
        writer.start()
        return writer.join

    def provisioned(self, node: JSON, runtimes: Sequence[Runtime], *, check: nodeview.Check) -> None:
        """Takes the Node, the verified runtimes and the check that confirmed them; labels the
        Node (provisioned, and one label per handler; handler labels of runtimes no longer
        installed go), records phase provisioned and sets the condition True, in one request
        (:meth:`outcome`), then removes the startup taint. Raises KubeError when the label
        patch fails (nothing is labelled then)."""
        handlers = ",".join(r.handler for r in runtimes)
        how = "containerd and the kubelet" if check == "kubelet" else "containerd"
        self.outcome(
            node,
            "provisioned",
            labels=nodeview.label_patch(node, [r.handler for r in runtimes]),
            annotation=self._annotation("provisioned", runtimes=runtimes, check=check),
            message=f"runtimes {handlers} verified by {how}",
        )
        self.untaint(node)

    def untaint(self, node: JSON) -> bool:
        """Takes the last Node seen; removes the startup taint when it carries it (exactly that
        taint, :mod:`~kwasm_py.cluster.untaint`). Returns whether it did; best effort, nothing
        is raised."""
        return untaint.remove_startup_taint(self.api, self.name, node, log=self.log)

    def failed(self, node: JSON, *, step: str, reason: str) -> None:
        """Takes the Node, the failed step and its reason; removes the provisioned and handler
        labels (those the Node has), records phase failed and sets the condition False, in one
        request (:meth:`outcome`). Raises KubeError when the patch fails."""
        self.outcome(
            node,
            "failed",
            labels=nodeview.unlabel_patch(node),
            annotation=self._annotation("failed", step=step, reason=reason),
            message=f"{step}: {reason}",
        )

    def removed(self, node: JSON) -> None:
        """Takes the Node; removes the labels (provisioned and per handler), status annotation
        and condition (one request). Raises KubeError when the label patch fails."""
        labels = {PROVISIONED_LABEL: None, **nodeview.unlabel_patch(node)}
        meta: JSON = {"metadata": {"labels": labels, "annotations": {STATUS_ANNOTATION: None}}}
        if nodeview.condition_of(node) is None:
            self.api.patch_node(self.name, meta)
        else:
            self._with_status(meta, nodeview.condition_delete_patch(), "removed")
        self.last = {}
        self.floor = micro_time(self.wall_clock())

    def outcome(
        self, node: JSON, phase: nodeview.Phase, *, labels: JSON, annotation: str, message: str
    ) -> None:
        """Takes the Node, an outcome phase, the label patch (value None removes), the status
        annotation built for it and the condition's message; writes labels, annotation and the
        ``KwasmProvisioned`` condition in one ``nodes/status`` request (see the module's text).
        Raises KubeError when the labels and annotation could not be written."""
        now = micro_time(self.wall_clock())[:19] + "Z"  # conditions carry RFC 3339 seconds
        meta: JSON = {"metadata": {"labels": labels, "annotations": {STATUS_ANNOTATION: annotation}}}
        self._with_status(meta, nodeview.condition_patch(node, phase=phase, message=message, now=now), phase)
        self._written()

    def _with_status(self, meta: JSON, status: JSON, what: str) -> None:
        """One ``nodes/status`` patch of `meta` (labels, annotations) and `status` (the
        condition); when the subresource refuses the request as such, `meta` alone to the Node
        (the condition is lost, logged). Raises KubeError when `meta` was not written."""
        try:
            self.api.patch_node_status(self.name, {**meta, **status})
        except KubeError as ex:
            if ex.status not in NO_STATUS_WRITE:
                raise
            self.api.patch_node(self.name, meta)
            self.log("condition_lost", level="warning", phase=what, error=ex.message)
