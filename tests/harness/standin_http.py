"""The stand-in API's HTTP side: routing, the verbs, discovery for kubectl and watch streams
(chunked JSON lines). The state and its rules are :class:`tests.harness.kube_standin.StandIn`."""

from __future__ import annotations

import json
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.harness.kube_standin import (
    BY_PATH,
    REASONS,
    RESOURCES,
    VERBS,
    ApiFailure,
    Request,
    Resource,
    StandIn,
    _Event,
    _Watcher,
    status_doc,
)


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops the SYNs of a burst of parallel clients, which
    # then retry a second later: an artefact that would dominate every parallel figure.
    request_queue_size = 128


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
