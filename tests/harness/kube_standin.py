"""A stateful stand-in Kubernetes API server for tests (stdlib only, runs in-process).

Serves nodes, core/v1 and events.k8s.io/v1 events, coordination.k8s.io/v1 leases and enough
discovery for real `kubectl`. Semantics that the tests rely on:

* every write bumps a global resourceVersion; PUT or PATCH carrying a stale
  ``metadata.resourceVersion`` gets 409 Conflict, POST of an existing name 409 AlreadyExists;
* PATCH: merge patch (RFC 7386), strategic merge patch (maps merge, ``null`` deletes, lists are
  replaced, except a Node's ``status.conditions``, merged by ``type`` with ``$patch: delete``
  as Kubernetes does), JSON patch (RFC 6902);
* nodes have the ``status`` subresource: writes to ``/nodes/NAME`` keep the stored status, and
  writes to ``/nodes/NAME/status`` change only the status (the API server's node strategies);
  :meth:`StandIn.set_runtime_handlers` plays the kubelet reporting ``status.runtimeHandlers``;
* list and watch honour ``fieldSelector`` (dotted paths, ``=``, ``==``, ``!=``) and
  ``labelSelector`` (``=``, ``==``, ``!=``, exists, ``!key``, ``in``, ``notin``);
* watch streams chunked JSON lines from ``resourceVersion`` (or ADDED for the current state when
  it is empty/"0"), ends after ``timeoutSeconds``; a resourceVersion older than the last
  :meth:`StandIn.compact` gets an ERROR event with code 410;
* :meth:`StandIn.inject` makes the next N matching requests fail with a given status.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

JSON = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
RESOURCES = [
    Resource("", "v1", "nodes", "Node", False, ("no",)),
    Resource("", "v1", "events", "Event", True, ("ev",)),
    Resource("events.k8s.io", "v1", "events", "Event", True, ("ev",)),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
    # What installer.yaml creates (for `kwasm-py uninstall`): stored, listed and deleted as is.
    Resource("", "v1", "namespaces", "Namespace", False, ("ns",)),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    Resource("", "v1", "resourcequotas", "ResourceQuota", True, ("quota",)),
    Resource("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    Resource("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    Resource(
        "admissionregistration.k8s.io",
        "v1",
        "validatingadmissionpolicies",
        "ValidatingAdmissionPolicy",
        False,
    ),
    Resource(
        "admissionregistration.k8s.io",
        "v1",
        "validatingadmissionpolicybindings",
        "ValidatingAdmissionPolicyBinding",
        False,
    ),
    Resource("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",)),
    Resource("node.k8s.io", "v1", "runtimeclasses", "RuntimeClass", False),
]
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


class ApiFailure(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code, "Unknown")


def status_doc(code: int, message: str, reason: str) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also strategic merge for maps: null deletes, lists replace)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):  # strategic-merge directives ($patch, $retainKeys): not modelled
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def merge_conditions(current: Any, patch: Any) -> Any:
    """Strategic merge of a ``conditions`` list (patchMergeKey ``type``): each patch entry
    updates the condition of its type (or is appended); ``$patch: delete`` removes it."""
    result = [copy.deepcopy(c) for c in current or [] if isinstance(c, dict)]
    for entry in patch or []:
        if not isinstance(entry, dict):
            raise ApiFailure(400, "a condition must be an object")
        kind = entry.get("type")
        index = next((i for i, c in enumerate(result) if c.get("type") == kind), None)
        if entry.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append({k: v for k, v in entry.items() if v is not None})
        else:
            result[index] = merge_patch(result[index], entry)
    return result


def strategic_node_patch(current: JSON, patch: JSON) -> JSON:
    """Strategic merge for a Node: as :func:`merge_patch`, but ``status.conditions`` merge by
    ``type`` (the only list merge kwasm-py relies on)."""
    conditions = ((patch.get("status") or {}) if isinstance(patch.get("status"), dict) else {}).get(
        "conditions"
    )
    new = merge_patch(current, patch)
    if conditions is not None:
        new.setdefault("status", {})["conditions"] = merge_conditions(
            (current.get("status") or {}).get("conditions"), conditions
        )
    return new


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiFailure(422, f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        if isinstance(doc, list):
            doc = doc[int(p)]
        elif isinstance(doc, dict):
            doc = doc[p]
        else:
            raise KeyError(p)
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, test, move, copy."""
    if not isinstance(ops, list):
        raise ApiFailure(400, "a JSON patch must be a list")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, parts = op.get("op"), _pointer(op.get("path", ""))
        try:
            if kind == "test":
                if _resolve(doc, parts) != op.get("value"):
                    raise ApiFailure(422, f"test failed at {op.get('path')}")
                continue
            if kind in ("move", "copy"):
                from_parts = _pointer(op.get("from", ""))
                value = copy.deepcopy(_resolve(doc, from_parts))
                if kind == "move":
                    doc = json_patch(doc, [{"op": "remove", "path": op["from"]}])
                doc = json_patch(doc, [{"op": "add", "path": op["path"], "value": value}])
                continue
            if not parts:
                if kind in ("add", "replace"):
                    doc = copy.deepcopy(op.get("value"))
                    continue
                raise ApiFailure(422, "cannot remove the root")
            parent = _resolve(doc, parts[:-1])
            last = parts[-1]
            if kind == "add":
                if isinstance(parent, list):
                    idx = len(parent) if last == "-" else int(last)
                    parent.insert(idx, copy.deepcopy(op.get("value")))
                else:
                    parent[last] = copy.deepcopy(op.get("value"))
            elif kind == "remove":
                if isinstance(parent, list):
                    del parent[int(last)]
                else:
                    del parent[last]
            elif kind == "replace":
                if isinstance(parent, list):
                    parent[int(last)] = copy.deepcopy(op.get("value"))
                else:
                    if last not in parent:
                        raise KeyError(last)
                    parent[last] = copy.deepcopy(op.get("value"))
            else:
                raise ApiFailure(400, f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as ex:
            raise ApiFailure(422, f"JSON patch {kind} {op.get('path')}: no such path") from ex
    return doc


# ---------------------------------------------------------------------------- selectors


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


_SET_RE = re.compile(r"^([^\s!=]+)\s+(in|notin)\s+\((.*)\)$")


def label_match(labels: dict[str, str], selector: str) -> bool:
    for term in _split_top(selector):
        m = _SET_RE.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in" and labels.get(key) not in values:
                return False
            if op == "notin" and key in labels and labels[key] in values:
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.split("=", 1))
            if labels.get(key) != value.lstrip("=").strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_match(obj: JSON, selector: str) -> bool:
    for term in _split_top(selector):
        neg = "!=" in term
        key, value = term.split("!=" if neg else "=", 1)
        value = value.lstrip("=")
        cur: Any = obj
        for part in key.strip().split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        actual = "" if cur is None else str(cur)
        if (actual == value) == neg:
            return False
    return True


# ---------------------------------------------------------------------------- store


@dataclass
class Fault:
    status: int
    count: int
    method: str | None = None
    plural: str | None = None
    name: str | None = None
    watch: bool | None = None
    message: str = "injected fault"

    def matches(self, method: str, plural: str, name: str, watch: bool) -> bool:
        return (
            (self.method is None or self.method == method)
            and (self.plural is None or self.plural == plural)
            and (self.name is None or self.name == name)
            and (self.watch is None or self.watch == watch)
        )


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any = None
    status: int = 0
    at: float = field(default_factory=time.perf_counter)  # when it arrived


@dataclass
class _Event:
    rv: int
    res: Resource
    type: str
    obj: JSON
    _raw: bytes = b""

    def chunk(self) -> bytes:
        """The event as one chunk of a watch stream, encoded once for every watcher."""
        if not self._raw:
            line = json.dumps({"type": self.type, "object": self.obj}).encode() + b"\n"
            self._raw = b"%x\r\n%s\r\n" % (len(line), line)
        return self._raw


@dataclass(eq=False)
class _Watcher:
    """One open watch stream: its filter and the events waiting to be sent. A write wakes only
    the streams it matches (a real API server's watch cache does the same), not every open
    watch: with hundreds of agents in one process, waking them all on every write made the
    stand-in, not the agents, the figure a rollout benchmark measured."""

    res: Resource
    ns: str
    query: dict[str, str]
    backlog: bytearray = field(default_factory=bytearray)  # chunks for the stream's thread
    ready: threading.Event = field(default_factory=threading.Event)
    # Set while the stream is caught up: the writer then sends each event to the socket itself
    # (one non-blocking send, no thread to wake); what does not fit goes to the backlog.
    sock: socket.socket | None = None

    def wants(self, ev: _Event) -> bool:
        return _matches_ns(ev, self.res, self.ns) and StandIn._selected(ev.obj, self.query)

    def offer(self, ev: _Event) -> None:
        """Called by a write (lock held): send the event now or queue it for the thread."""
        raw = ev.chunk()
        if self.sock is not None:
            try:
                sent = self.sock.send(raw, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:  # the client went away: the stream's thread finds out
                sent = 0
            if sent == len(raw):
                return
            raw = raw[sent:]
            self.sock = None
        self.backlog += raw
        self.ready.set()


@dataclass
class StandIn:
    """The API state plus the HTTP server; use as a context manager."""

    objects: dict[tuple[Resource, str, str], JSON] = field(default_factory=dict)
    rv: int = 100
    oldest_rv: int = 0
    history: list[_Event] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    max_history: int = 200_000
    cond: threading.Condition = field(default_factory=threading.Condition)
    stopping: bool = False
    watch_epoch: int = 0
    watchers: dict[Resource, list[_Watcher]] = field(default_factory=dict)
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None
    # Called as on_write(resource, kind, obj) before a write is stored (lock held): lets a test
    # check the world (e.g. containerd) at the exact moment an object changes.
    on_write: Any = None
    # Seconds each request waits before it is served: benchmarks use it to stand in for a real
    # API server's round trip (network + admission + etcd write), which is never ~0.
    latency: float = 0.0

    # -- lifecycle

    def start(self) -> StandIn:
        standin = self

        class Handler(_Handler):
            api = standin

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self._wake_watchers()
            self.cond.notify_all()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.thread is not None:
            self.thread.join(10)

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """Write a kubeconfig pointing at this server (plain HTTP, a dummy token)."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": "standin-token"}}],
                    "contexts": [
                        {
                            "name": "standin",
                            "context": {
                                "cluster": "standin",
                                "user": "tester",
                                "namespace": namespace,
                            },
                        }
                    ],
                    "current-context": "standin",
                }
            )
        )
        return path

    # -- state helpers for tests (thread-safe)

    def _store(self, res: Resource, obj: JSON, kind: str) -> JSON:
        """Write obj with a new resourceVersion and record a watch event (cond held)."""
        if self.on_write is not None:
            self.on_write(res, kind, obj)
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.rv)
        ns = meta.get("namespace", "") if res.namespaced else ""
        key = (res, ns, meta["name"])
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        event = _Event(self.rv, res, kind, copy.deepcopy(obj))
        self.history.append(event)
        for watcher in self.watchers.get(res, ()):
            if watcher.wants(event):
                watcher.offer(event)
        if len(self.history) > self.max_history:
            drop = len(self.history) - self.max_history
            self.oldest_rv = self.history[drop - 1].rv
            del self.history[:drop]
        self.cond.notify_all()
        return obj

    def _new(self, res: Resource, obj: JSON, namespace: str) -> JSON:
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", res.api_version)
        obj.setdefault("kind", res.kind)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiFailure(422, "metadata.name: Required value")
        if res.namespaced:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        return obj

    def add_node(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        taints: list[JSON] | None = None,
    ) -> JSON:
        """Seed a complete Node (all NodeSystemInfo fields, a Ready condition, the taints)."""
        node = {
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    **(labels or {}),
                },
                "annotations": dict(annotations or {}),
            },
            "spec": {"taints": list(taints)} if taints else {},
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": now_rfc3339(),
                        "lastTransitionTime": now_rfc3339(),
                    }
                ],
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": "b",
                    "containerRuntimeVersion": "containerd://1.6.20",
                    "kernelVersion": "6.1.0",
                    "kubeProxyVersion": "",
                    "kubeletVersion": "v1.32.0",
                    "machineID": "m",
                    "operatingSystem": "linux",
                    "osImage": "Debian GNU/Linux 12 (bookworm)",
                    "systemUUID": "u",
                },
            },
        }
        with self.cond:
            return copy.deepcopy(self._store(RESOURCES[0], self._new(RESOURCES[0], node, ""), "ADDED"))

    def node(self, name: str) -> JSON:
        with self.cond:
            return copy.deepcopy(self.objects[(RESOURCES[0], "", name)])

    def patch_node(self, name: str, patch: JSON) -> JSON:
        """Merge-patch a node server-side, as another actor would (emits a watch event)."""
        with self.cond:
            obj = self.objects[(RESOURCES[0], "", name)]
            new = merge_patch(obj, patch)
            return copy.deepcopy(self._store(RESOURCES[0], new, "MODIFIED"))

    def set_runtime_handlers(self, name: str, handlers: list[str] | None) -> JSON:
        """Play the kubelet: report ``handlers`` in the Node's ``status.runtimeHandlers`` as a
        1.30+ kubelet on containerd 2.x does (None removes the field, as older ones have it)."""
        entries = None
        if handlers is not None:
            entries = [
                {"name": h, "features": {"recursiveReadOnlyMounts": True, "userNamespaces": True}}
                for h in handlers
            ]
        return self.patch_node(name, {"status": {"runtimeHandlers": entries}})

    def delete_node(self, name: str) -> None:
        with self.cond:
            obj = self.objects[(RESOURCES[0], "", name)]
            self._store(RESOURCES[0], copy.deepcopy(obj), "DELETED")

    def list_of(self, plural: str, group: str = "") -> list[JSON]:
        with self.cond:
            return [
                copy.deepcopy(o)
                for (res, _, _), o in sorted(self.objects.items(), key=lambda kv: kv[0][1:])
                if res.plural == plural and res.group == group
            ]

    def events(self, reason: str | None = None, node: str | None = None) -> list[JSON]:
        """core/v1 and events.k8s.io/v1 events, optionally filtered by reason and node."""
        out = []
        for ev in self.list_of("events") + self.list_of("events", "events.k8s.io"):
            target = ev.get("involvedObject") or ev.get("regarding") or {}
            if reason is not None and ev.get("reason") != reason:
                continue
            if node is not None and target.get("name") != node:
                continue
            out.append(ev)
        return out

    def leases(self) -> list[JSON]:
        return self.list_of("leases", "coordination.k8s.io")

    def compact(self) -> None:
        """Forget watch history: a watch from any older resourceVersion now gets 410."""
        with self.cond:
            self.oldest_rv = self.rv
            self.history.clear()

    def drop_watches(self) -> None:
        """End every open watch stream now (like an API server restart)."""
        with self.cond:
            self.watch_epoch += 1
            self._wake_watchers()
            self.cond.notify_all()

    def _wake_watchers(self) -> None:
        for watchers in self.watchers.values():
            for watcher in watchers:
                watcher.ready.set()

    def inject(
        self,
        status: int,
        count: int = 1,
        *,
        method: str | None = None,
        plural: str | None = None,
        name: str | None = None,
        watch: bool | None = None,
        message: str = "injected fault",
    ) -> Fault:
        """Fail the next `count` matching requests with `status`."""
        fault = Fault(status, count, method, plural, name, watch, message)
        with self.cond:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.cond:
            self.faults.clear()

    def recorded(self, method: str | None = None, plural: str | None = None) -> list[Request]:
        with self.cond:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (plural is None or f"/{plural}" in r.path)
            ]

    def wait_for(self, predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
        """Block until predicate() is true after a state change (bounded; no polling sleeps)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if predicate():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self.cond.wait(min(left, 0.5))

    # -- request handling (called by the HTTP handler)

    def take_fault(self, method: str, plural: str, name: str, watch: bool) -> Fault | None:
        with self.cond:
            for f in self.faults:
                if f.count > 0 and f.matches(method, plural, name, watch):
                    f.count -= 1
                    return f
        return None

    def get(self, res: Resource, ns: str, name: str) -> JSON:
        with self.cond:
            obj = self.objects.get((res, ns, name))
            if obj is None:
                raise ApiFailure(404, f'{res.plural} "{name}" not found')
            return copy.deepcopy(obj)

    def list(self, res: Resource, ns: str, query: dict[str, str]) -> JSON:
        with self.cond:
            items = [
                copy.deepcopy(o)
                for (r, o_ns, _), o in sorted(self.objects.items(), key=lambda kv: kv[0][1:])
                if r == res and (not ns or o_ns == ns) and self._selected(o, query)
            ]
            rv = self.rv
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": {"resourceVersion": str(rv)},
            "items": items,
        }

    def list_raw(self, res: Resource, ns: str, query: dict[str, str]) -> bytes:
        """As :meth:`list`, encoded as the response body (under the lock, without copying
        every item first: a LIST of hundreds of Leases was mostly deepcopy)."""
        with self.cond:
            items = [
                o
                for (r, o_ns, _), o in sorted(self.objects.items(), key=lambda kv: kv[0][1:])
                if r == res and (not ns or o_ns == ns) and self._selected(o, query)
            ]
            doc = {
                "kind": f"{res.kind}List",
                "apiVersion": res.api_version,
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
            return json.dumps(doc).encode()

    @staticmethod
    def _selected(obj: JSON, query: dict[str, str]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return label_match(labels, query.get("labelSelector", "")) and field_match(
            obj, query.get("fieldSelector", "")
        )

    def create(self, res: Resource, ns: str, body: JSON) -> JSON:
        with self.cond:
            obj = self._new(res, body, ns)
            key = (res, ns, obj["metadata"]["name"])
            if key in self.objects:
                name = obj["metadata"]["name"]
                raise ApiFailure(409, f'{res.plural} "{name}" already exists', "AlreadyExists")
            return copy.deepcopy(self._store(res, obj, "ADDED"))

    def _check_rv(self, res: Resource, name: str, current: JSON, body: Any) -> None:
        want = ((body or {}).get("metadata") or {}).get("resourceVersion")
        have = current["metadata"]["resourceVersion"]
        if want and want != have:
            raise ApiFailure(
                409,
                f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )

    def update(self, res: Resource, ns: str, name: str, body: JSON) -> JSON:
        with self.cond:
            current = self.objects.get((res, ns, name))
            if current is None:
                raise ApiFailure(404, f'{res.plural} "{name}" not found')
            self._check_rv(res, name, current, body)
            obj = copy.deepcopy(body)
            obj.setdefault("apiVersion", res.api_version)
            obj.setdefault("kind", res.kind)
            meta = obj.setdefault("metadata", {})
            for k in ("uid", "creationTimestamp", "name"):
                meta[k] = current["metadata"][k]
            if res.namespaced:
                meta["namespace"] = ns
            return copy.deepcopy(self._store(res, obj, "MODIFIED"))

    def patch(
        self, res: Resource, ns: str, name: str, body: Any, content_type: str, *, subresource: str = ""
    ) -> JSON:
        with self.cond:
            current = self.objects.get((res, ns, name))
            if current is None:
                raise ApiFailure(404, f'{res.plural} "{name}" not found')
            ctype = content_type.split(";", maxsplit=1)[0].strip()
            if ctype == "application/json-patch+json":
                new = json_patch(current, body)
            elif ctype in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                if not isinstance(body, dict):
                    raise ApiFailure(400, "a merge patch must be an object")
                self._check_rv(res, name, current, body)
                if res.plural == "nodes" and ctype == "application/strategic-merge-patch+json":
                    new = strategic_node_patch(current, body)
                else:
                    new = merge_patch(current, body)
            else:
                raise ApiFailure(415, f"unsupported patch type {ctype!r}", "UnsupportedMediaType")
            if res.plural == "nodes" and subresource == "status":
                new = {**copy.deepcopy(current), "status": new.get("status") or {}}
            elif res.plural == "nodes":
                new["status"] = copy.deepcopy(current.get("status") or {})
            meta = new.setdefault("metadata", {})
            meta["name"], meta["uid"] = name, current["metadata"]["uid"]
            if new == current:  # a no-op patch does not bump the resourceVersion
                return copy.deepcopy(current)
            return copy.deepcopy(self._store(res, new, "MODIFIED"))

    def delete(self, res: Resource, ns: str, name: str) -> JSON:
        with self.cond:
            current = self.objects.get((res, ns, name))
            if current is None:
                raise ApiFailure(404, f'{res.plural} "{name}" not found')
            return copy.deepcopy(self._store(res, copy.deepcopy(current), "DELETED"))


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops the SYNs of a burst of parallel clients, which
    # then retry a second later: an artefact that would dominate every parallel figure.
    request_queue_size = 128


def _matches_ns(ev: _Event, res: Resource, ns: str) -> bool:
    return ev.res == res and (not ns or (ev.obj.get("metadata") or {}).get("namespace") == ns)


class _Handler(BaseHTTPRequestHandler):
    api: StandIn
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY a keep-alive client waits
    # out a delayed ACK (~40 ms) per request, a stand-in artefact no real API server has.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing

    def _send(self, code: int, doc: Any) -> None:
        self._send_raw(code, json.dumps(doc).encode())

    def _send_raw(self, code: int, raw: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _fail(self, code: int, message: str, reason: str | None = None) -> None:
        self._send(code, status_doc(code, message, reason or REASONS.get(code, "Unknown")))

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as ex:
            raise ApiFailure(400, "request body is not JSON") from ex

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- routing

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        path = parsed.path.rstrip("/") or "/"
        rec = Request(method, path, query, self.headers.get("Content-Type", ""))
        try:
            rec.body = self._body()
        except ApiFailure as ex:
            self._fail(ex.code, ex.message)
            return
        with self.api.cond:
            self.api.requests.append(rec)
        if self.api.latency:
            time.sleep(self.api.latency)
        try:
            if self._discovery(method, path):
                rec.status = 200
                return
            res, ns, name, sub = self._route(path)
            watch = method == "GET" and not name and query.get("watch") in ("true", "True", "1")
            fault = self.api.take_fault(method, f"{res.plural}/{sub}" if sub else res.plural, name, watch)
            if fault is not None:
                raise ApiFailure(fault.status, fault.message)
            if watch:
                rec.status = 200
                self._watch(res, ns, query)
                return
            rec.status = 200
            if sub and method not in ("GET", "PATCH"):  # only these are modelled on nodes/status
                raise ApiFailure(405, f"{method} not allowed on {path}", "MethodNotAllowed")
            if method == "GET" and not name:
                self._send_raw(rec.status, self.api.list_raw(res, ns, query))
                return
            if method == "GET":
                doc = self.api.get(res, ns, name)
            elif method == "POST" and not name:
                doc = self.api.create(res, ns, rec.body or {})
                rec.status = 201
            elif method == "PUT" and name:
                doc = self.api.update(res, ns, name, rec.body or {})
            elif method == "PATCH" and name:
                doc = self.api.patch(res, ns, name, rec.body, rec.content_type, subresource=sub)
            elif method == "DELETE" and name:
                doc = self.api.delete(res, ns, name)
            else:
                raise ApiFailure(405, f"{method} not allowed on {path}", "MethodNotAllowed")
            self._send(rec.status, doc)
        except ApiFailure as ex:
            rec.status = ex.code
            self._fail(ex.code, ex.message, ex.reason)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, path: str) -> tuple[Resource, str, str, str]:
        """(resource, namespace, name, subresource) of an API path; only nodes/NAME/status is
        a subresource here."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiFailure(404, f"the server could not find the requested resource ({path})")
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        sub = ""
        if len(rest) == 3 and rest[0] == "nodes" and rest[2] == "status" and group == "":
            rest, sub = rest[:2], "status"
        if not rest or len(rest) > 2:
            raise ApiFailure(404, f"the server could not find the requested resource ({path})")
        res = BY_PATH.get((group, version, rest[0]))
        if res is None:
            raise ApiFailure(404, f"the server could not find the requested resource ({path})")
        if res.namespaced and len(rest) == 2 and not ns:
            raise ApiFailure(404, f"{res.plural} is namespaced ({path})")
        return res, ns, rest[1] if len(rest) == 2 else "", sub

    def _follow(self, watcher: _Watcher | None, deadline: float, epoch: int) -> None:
        """Stream the watcher's events until the deadline, a stop or a dropped watch: flush
        the backlog, then let writers send directly until something does not fit."""
        api = self.api
        behind = True  # the backlog may hold something: look before waiting
        while watcher is not None:
            if not behind:
                left = deadline - time.monotonic()
                if left <= 0 or not watcher.ready.wait(left):
                    break
            with api.cond:
                if api.stopping or api.watch_epoch != epoch:
                    break
                data = bytes(watcher.backlog)
                watcher.backlog.clear()
                watcher.ready.clear()
                watcher.sock = None if data else self.connection
                behind = bool(data)
            if data:
                self.wfile.write(data)
                self.wfile.flush()
        if watcher is not None:
            with api.cond:  # the end: nothing is sent directly any more; flush what is left
                watcher.sock = None
                data = bytes(watcher.backlog)
                watcher.backlog.clear()
            self.wfile.write(data)

    def _discovery(self, method: str, path: str) -> bool:
        if method != "GET":
            return False
        host = f"127.0.0.1:{self.server.server_address[1]}"
        if path == "/version":
            self._send(
                200,
                {
                    "major": "1",
                    "minor": "32",
                    "gitVersion": "v1.32.0-standin",
                    "gitCommit": "0" * 40,
                    "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.23",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                },
            )
            return True
        if path == "/api":
            self._send(
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
                },
            )
            return True
        groups: dict[str, list[str]] = {}
        for r in RESOURCES:
            if r.group and r.version not in groups.setdefault(r.group, []):
                groups[r.group].append(r.version)
        if path == "/apis":
            self._send(
                200,
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": g,
                            "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                            "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                        }
                        for g, vs in groups.items()
                    ],
                },
            )
            return True
        parts = path.strip("/").split("/")
        if parts == ["api", "v1"] or (parts[0] == "apis" and len(parts) == 3):
            group, version = ("", "v1") if parts[0] == "api" else (parts[1], parts[2])
            rs = [r for r in RESOURCES if r.group == group and r.version == version]
            if not rs:
                return False
            self._send(
                200,
                {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": rs[0].api_version,
                    "resources": [
                        {
                            "name": r.plural,
                            "singularName": r.kind.lower(),
                            "namespaced": r.namespaced,
                            "kind": r.kind,
                            "verbs": VERBS,
                            **({"shortNames": list(r.short)} if r.short else {}),
                        }
                        for r in rs
                    ],
                },
            )
            return True
        if parts[0] == "apis" and len(parts) == 2 and parts[1] in groups:
            g = parts[1]
            vs = groups[g]
            self._send(
                200,
                {
                    "kind": "APIGroup",
                    "apiVersion": "v1",
                    "name": g,
                    "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                    "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                },
            )
            return True
        return False

    # -- watch

    def _watch(self, res: Resource, ns: str, query: dict[str, str]) -> None:
        api = self.api
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        start_rv = query.get("resourceVersion", "")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pending: list[bytes] = []
        watcher: _Watcher | None = _Watcher(res, ns, query)
        with api.cond:
            epoch = api.watch_epoch
            if start_rv in ("", "0"):
                for (r, o_ns, _), o in sorted(api.objects.items(), key=lambda kv: kv[0][1:]):
                    if r == res and (not ns or o_ns == ns) and api._selected(o, query):
                        pending.append(_Event(0, r, "ADDED", o).chunk())
            else:
                try:
                    last = int(start_rv)
                except ValueError:
                    last = -1
                if last < api.oldest_rv:
                    why = f"too old resource version: {start_rv} ({api.oldest_rv})"
                    gone = status_doc(410, why, "Expired")
                    pending.append(_Event(0, res, "ERROR", gone).chunk())
                    watcher = None
                elif api.rv > last:
                    old = api.history[-(api.rv - last) :]
                    assert watcher is not None
                    pending.extend(e.chunk() for e in old if e.rv > last and watcher.wants(e))
            if watcher is not None:
                api.watchers.setdefault(res, []).append(watcher)
        try:
            for raw in pending:
                self.wfile.write(raw)
            self.wfile.flush()
            self._follow(watcher, deadline, epoch)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            if watcher is not None:
                with api.cond:
                    watcher.sock = None
                    api.watchers[res].remove(watcher)
        self.close_connection = True
