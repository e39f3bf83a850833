"""EFFECTS: remove the startup taint ``kwasm.sh/kwasm-not-ready:NoSchedule`` (issue 13.4).

Autoscaled nodes can be created with this taint from their node template so that no pod lands
before the runtime is there; the agent removes exactly that taint (key and effect) once the node
is provisioned, and never another one. The patch replaces ``spec.taints`` (a merge patch cannot
remove one list item), so it carries the Node's resourceVersion: a taint someone added since the
agent read the Node turns it into a 409, and the agent re-reads and tries again.
"""

from __future__ import annotations

from kwasm_py.cluster import nodeview, policy
from kwasm_py.cluster.agentlog import Logger
from kwasm_py.cluster.kube import AgentApi
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON

CONFLICT_RETRIES = 3


def remove_startup_taint(api: AgentApi, name: str, node: JSON, *, log: Logger) -> bool:
    """Takes the API, the Node's name and the last Node object seen; removes the startup taint
    if the Node carries it, re-reading the Node after a conflict (at most CONFLICT_RETRIES
    times). Returns whether a taint was removed. Best effort: other API errors are logged and
    the next Node event tries again (the provisioned label is already set), nothing is raised."""
    current = node
    for attempt in range(CONFLICT_RETRIES + 1):
        patch = nodeview.untaint_patch(current)
        if patch is None:
            return False
        try:
            api.patch_node(name, patch)
        except KubeError as ex:
            if ex.status != 409 or attempt == CONFLICT_RETRIES:
                log("untaint_failed", level="warning", error=ex.message, status=ex.status)
                return False
            log("untaint_conflict", attempt=attempt + 1)
            try:
                current = api.get_node(name)
            except KubeError as again:
                log("untaint_failed", level="warning", error=again.message, status=again.status)
                return False
            continue
        log("untainted", taint=f"{policy.STARTUP_TAINT_KEY}:{nodeview.STARTUP_TAINT_EFFECT}")
        return True
    return False
