"""A stateful stand-in Kubernetes API server for tests (stdlib only, runs in-process).

Serves nodes, core/v1 and events.k8s.io/v1 events, coordination.k8s.io/v1 leases and enough
discovery for real `kubectl`. Semantics that the tests rely on:

* every write bumps a global resourceVersion; PUT or PATCH carrying a stale
  ``metadata.resourceVersion`` gets 409 Conflict, POST of an existing name 409 AlreadyExists;
* PATCH: merge patch (RFC 7386), strategic merge patch (maps merge, ``null`` deletes, lists are
  replaced, except a Node's ``status.conditions``, merged by ``type`` with ``$patch: delete``
  as Kubernetes does), JSON patch (RFC 6902);
* nodes have the ``status`` subresource: writes to ``/nodes/NAME`` keep the stored status, and
  writes to ``/nodes/NAME/status`` keep the stored spec, metadata and status changing as patched
  (the API server's node strategies: ``nodeStatusStrategy`` resets only ``spec``,
  kubernetes/kubernetes ``pkg/registry/core/node/strategy.go``);
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
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness.standin_rules import (  # noqa: F401 - re-exported: tests import them from here
    _SET_RE,
    REASONS,
    ApiFailure,
    _pointer,
    _resolve,
    _split_top,
    field_match,
    json_patch,
    label_match,
    merge_conditions,
    merge_patch,
    now_rfc3339,
    status_doc,
    strategic_node_patch,
)

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

        from tests.harness.standin_http import _Handler, _Server  # the HTTP side imports this module

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
        """The List document a GET of the collection answers (its own copy of every item)."""
        return json.loads(self.list_raw(res, ns, query))  # type: ignore[no-any-return]

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
            if res.plural == "nodes" and subresource == "status":  # the spec is reset, not metadata
                new.pop("spec", None)
                if "spec" in current:
                    new["spec"] = copy.deepcopy(current["spec"])
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


def _matches_ns(ev: _Event, res: Resource, ns: str) -> bool:
    return ev.res == res and (not ns or (ev.obj.get("metadata") or {}).get("namespace") == ns)
