"""The agent's Kubernetes transport: JSON over ``http.client``, no official client."""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kwasm_py.cluster.kube import MERGE, STRATEGIC, Endpoint, api_error
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON


def _body(body: Any) -> bytes | None:
    return json.dumps(body).encode() if body is not None else None


def _watch_event(line: bytes, what: str) -> JSON:
    """One line of a watch stream as a ``{type, object}`` event.

    Raises KubeError (a protocol error, no status) when the line is not JSON, not a JSON
    object, or lacks a string ``type`` or an object ``object``: the caller drops the stream and
    relists, as it does for any failed watch. The event shape is the API's WatchEvent
    (https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes).
    """
    try:
        event = json.loads(line)
    except ValueError as ex:
        raise KubeError(f"watch of {what}: protocol error: an event line is not JSON") from ex
    if not isinstance(event, dict):
        kind = type(event).__name__
        raise KubeError(f"watch of {what}: protocol error: an event is a JSON {kind}, not an object")
    if not isinstance(event.get("type"), str) or not isinstance(event.get("object"), dict):
        raise KubeError(f"watch of {what}: protocol error: an event lacks its type or object")
    return event


class LeanKube:
    """A small JSON-over-HTTP client for the agent; one connection per request or watch."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        parsed = urllib.parse.urlsplit(endpoint.server)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise KubeError(f"bad API server URL {endpoint.server!r}")
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port or (443 if self._https else 80)
        self._prefix = parsed.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = self._ssl_context() if self._https else None
        self._lock = threading.Lock()
        self._local = threading.local()  # one kept-alive connection per thread for requests
        self._kept: list[http.client.HTTPConnection] = []  # all of them, for close()

    def _ssl_context(self) -> ssl.SSLContext:
        ep = self.endpoint
        try:
            ctx = (
                ssl.create_default_context(cadata=ep.ca_data) if ep.ca_data else ssl.create_default_context()
            )
        except (ssl.SSLError, ValueError) as ex:
            raise KubeError(
                f"cannot load the API server's CA certificate: {ex}",
                hint="the kubeconfig's certificate-authority(-data) must be a PEM certificate",
            ) from ex
        if ep.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            if ep.cert_data is not None and ep.key_data is not None:
                # load_cert_chain wants files: write them privately, load, delete at once.
                with tempfile.TemporaryDirectory(prefix="kwasm-cert-") as tmp:
                    cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
                    cert.write_bytes(ep.cert_data)
                    key.touch(mode=0o600)
                    key.write_bytes(ep.key_data)
                    ctx.load_cert_chain(str(cert), str(key))
            elif ep.cert_file and ep.key_file:
                ctx.load_cert_chain(ep.cert_file, ep.key_file)
        except (OSError, ssl.SSLError) as ex:
            raise KubeError(f"cannot load the client certificate: {ex}") from ex
        return ctx

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "kwasm-py-agent"}
        if content_type:
            headers["Content-Type"] = content_type
        token = self.endpoint.token
        if self.endpoint.token_file:
            try:
                token = Path(self.endpoint.token_file).read_text().strip()
            except OSError as ex:
                raise KubeError(f"cannot read token {self.endpoint.token_file}: {ex}") from ex
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _url(self, path: str, query: dict[str, str] | None) -> str:
        return self._prefix + path + ("?" + urllib.parse.urlencode(query) if query else "")

    def _unreachable(self, method: str, path: str, ex: Exception) -> KubeError:
        why = getattr(ex, "strerror", None) or str(ex) or type(ex).__name__
        if isinstance(ex, ConnectionRefusedError):
            why = "connection refused"
        return KubeError(
            f"{method} {path}: cannot reach the API server {self.endpoint.server}: {why}",
            hint="check the server address and that the API server is up",
        )

    def _open(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        url, data = self._url(path, query), _body(body)
        conn = self._connect(timeout or self.timeout)
        try:
            conn.request(method, url, body=data, headers=self._headers(content_type))
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as ex:
            conn.close()
            raise self._unreachable(method, path, ex) from ex
        if resp.status >= 400:
            raw = resp.read()
            conn.close()
            raise api_error(f"{method} {path}", resp.status, resp.reason, raw)
        return conn, resp

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> JSON:
        """One request, JSON in and out, on this thread's kept-alive connection.

        HTTP errors become KubeError with the status. A connection the server closed while idle
        is reopened once (label and annotation patches are idempotent).
        """
        url, data = self._url(path, query), _body(body)
        headers = self._headers(content_type)
        for attempt in (1, 2):
            conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self._connect(self.timeout)
                self._local.conn = conn
                with self._lock:
                    self._kept.append(conn)
            try:
                conn.request(method, url, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as ex:
                conn.close()
                self._local.conn = None
                if attempt == 1 and not fresh:
                    continue  # the server dropped an idle keep-alive connection
                raise self._unreachable(method, path, ex) from ex
            if resp.will_close:
                conn.close()
                self._local.conn = None
            break
        if resp.status >= 400:
            raise api_error(f"{method} {path}", resp.status, resp.reason, raw)
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError as ex:
            raise KubeError(f"{method} {path}: the API server sent no JSON") from ex
        return doc if isinstance(doc, dict) else {}

    def __del__(self) -> None:
        # Kept-alive sockets must not outlive the client (ResourceWarning at collection).
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Close every kept-alive connection (any thread's)."""
        with self._lock:
            kept, self._kept = self._kept, []
        for conn in kept:
            conn.close()
        self._local = threading.local()

    # -- nodes

    def get_node(self, name: str) -> JSON:
        """The Node object; KubeError (a protocol error) when the answer is not an object with
        ``metadata``, so the agent's relist retries instead of failing on a missing key."""
        node = self.request("GET", f"/api/v1/nodes/{urllib.parse.quote(name)}")
        if not isinstance(node.get("metadata"), dict):
            raise KubeError(f"GET node {name}: protocol error: the answer is not a Node object")
        return node

    def list_nodes(self, *, label_selector: str = "") -> list[JSON]:
        query = {"labelSelector": label_selector} if label_selector else None
        items = self.request("GET", "/api/v1/nodes", query=query).get("items") or []
        return [i for i in items if isinstance(i, dict)]

    def patch_node(self, name: str, patch: JSON) -> None:
        self.request("PATCH", f"/api/v1/nodes/{urllib.parse.quote(name)}", body=patch, content_type=MERGE)

    def patch_node_status(self, name: str, patch: JSON) -> None:
        """Takes a node name and a strategic-merge patch of its status; sends it to the
        ``nodes/status`` subresource (conditions merge by ``type``). Raises KubeError."""
        path = f"/api/v1/nodes/{urllib.parse.quote(name)}/status"
        self.request("PATCH", path, body=patch, content_type=STRATEGIC)

    def delete_path(self, path: str) -> bool:
        """Takes an object's API path; deletes it; returns False on 404. Raises KubeError."""
        try:
            self.request("DELETE", path)
        except KubeError as ex:
            if ex.status == 404:
                return False
            raise
        return True

    def watch_node(self, name: str, *, resource_version: str, timeout_seconds: int) -> Iterator[JSON]:
        """Stream watch events of one Node; an ERROR event raises KubeError (410 when stale)."""
        query = {"fieldSelector": f"metadata.name={name}"}
        return self._watch("/api/v1/nodes", query, f"node {name}", resource_version, timeout_seconds)

    def _watch(
        self, path: str, query: dict[str, str], what: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[JSON]:
        query = {
            **query,
            "watch": "true",
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "true",
        }
        if resource_version:
            query["resourceVersion"] = resource_version
        conn, resp = self._open("GET", path, query=query, timeout=timeout_seconds + 15.0)
        try:
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as ex:
                    raise KubeError(f"watch of {what}: connection lost: {ex}") from ex
                if not line:
                    return
                if not line.strip():
                    continue
                event = _watch_event(line, what)
                if event["type"] == "ERROR":
                    obj = event["object"]
                    code = obj.get("code")
                    raise KubeError(
                        f"watch of {what}: {code} {obj.get('reason', '')}: {obj.get('message', '')}",
                        status=int(code) if isinstance(code, int) else None,
                    )
                yield event
        finally:
            resp.close()  # an HTTP/1.0 answer detaches from `conn`: close both
            conn.close()

    # -- events and leases

    def create_event(self, namespace: str, event: JSON) -> None:
        self.request("POST", f"/api/v1/namespaces/{namespace}/events", body=event)

    def _lease_path(self, namespace: str, name: str = "") -> str:
        base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return f"{base}/{name}" if name else base

    def get_lease(self, namespace: str, name: str) -> JSON | None:
        try:
            return self.request("GET", self._lease_path(namespace, name))
        except KubeError as ex:
            if ex.status == 404:
                return None
            raise

    def create_lease(self, namespace: str, lease: JSON) -> JSON:
        return self.request("POST", self._lease_path(namespace), body=lease)

    def list_leases(self, namespace: str) -> tuple[list[JSON], str]:
        """Takes a namespace; returns its Leases and the list's resourceVersion (to watch from).
        Raises KubeError."""
        doc = self.request("GET", self._lease_path(namespace))
        items = [i for i in doc.get("items") or [] if isinstance(i, dict)]
        return items, str((doc.get("metadata") or {}).get("resourceVersion", ""))

    def watch_leases(self, namespace: str, *, resource_version: str, timeout_seconds: int) -> Iterator[JSON]:
        """Stream watch events of the Leases in `namespace`; an ERROR event raises KubeError
        (410 when `resource_version` is too old)."""
        path = self._lease_path(namespace)
        return self._watch(path, {}, f"leases in {namespace}", resource_version, timeout_seconds)

    def delete_lease(self, namespace: str, name: str) -> bool:
        """Takes a namespace and Lease name; deletes it; returns False when it was not there.
        Raises KubeError."""
        return self.delete_path(self._lease_path(namespace, name))

    def replace_lease(self, namespace: str, lease: JSON) -> JSON:
        name = lease["metadata"]["name"]
        return self.request("PUT", self._lease_path(namespace, name), body=lease)
