"""Talking to the Kubernetes API: the only module that imports `kubernetes`.

Two transports, one error type (:class:`kwasm_py.errors.KubeError`), plain ``dict`` objects:

* :class:`ClientKube` wraps the official client for the CLI: full kubeconfig support (contexts,
  exec credential plugins, auth providers). It reads raw JSON (``_preload_content=False``) so
  patching a thousand nodes does not build a thousand model objects.
* :class:`LeanKube` is a small ``http.client`` transport for the resident agent: importing the
  official client's ``CoreV1Api`` costs about 64 MB of RSS on every node, this costs about 20 MB.
  It understands in-cluster service-account credentials and the plain parts of a kubeconfig
  (server, CA, client certificate, token).

Both implement :class:`NodeApi`; the agent additionally uses events, leases and watches
(:class:`AgentApi`), which only :class:`LeanKube` provides.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kwasm_py.errors import KubeError

JSON = dict[str, Any]

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class NodeApi(Protocol):
    """What the CLI needs: nodes as plain dicts."""

    def list_nodes(self, *, label_selector: str = "") -> list[JSON]: ...

    def get_node(self, name: str) -> JSON: ...

    def patch_node(self, name: str, patch: JSON) -> None: ...

    def close(self) -> None: ...


class AgentApi(Protocol):
    """What the agent needs: its Node, a watch on it, Node events and restart Leases."""

    def get_node(self, name: str) -> JSON: ...

    def patch_node(self, name: str, patch: JSON) -> None: ...

    def watch_node(self, name: str, *, resource_version: str, timeout_seconds: int) -> Iterator[JSON]: ...

    def create_event(self, namespace: str, event: JSON) -> None: ...

    def get_lease(self, namespace: str, name: str) -> JSON | None: ...

    def create_lease(self, namespace: str, lease: JSON) -> JSON: ...

    def replace_lease(self, namespace: str, lease: JSON) -> JSON: ...


def status_hint(status: int | None) -> str:
    """What to do about an API status code, in words."""
    return {
        401: "the credentials were rejected: refresh the kubeconfig or the service account token",
        403: "RBAC forbids this: apply manifests/installer.yaml or use a context with more rights",
        404: "check the name (kubectl get nodes lists them)",
        409: "the object changed meanwhile: retry",
    }.get(status or 0, "")


def _status_message(body: bytes) -> str:
    """The ``message`` of a Kubernetes Status body, or the start of the raw body."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:200]
    if isinstance(doc, dict) and doc.get("message"):
        return str(doc["message"])
    return body.decode("utf-8", "replace").strip()[:200]


def api_error(what: str, status: int | None, reason: str, body: bytes = b"") -> KubeError:
    """Build the one-line KubeError for a failed request."""
    detail = _status_message(body) if body else ""
    label = f"{status} {reason}".strip() if status else reason
    msg = f"{what}: {label}" + (f": {detail}" if detail and detail not in label else "")
    return KubeError(msg, hint=status_hint(status), status=status)


# --------------------------------------------------------------------------------------------
# Lean transport (agent)


@dataclass(frozen=True)
class Endpoint:
    """Where the API server is and how to authenticate to it."""

    server: str  # scheme://host:port
    token: str | None = None
    token_file: str | None = None  # re-read on every request (projected tokens rotate)
    ca_data: str | None = None  # PEM
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    insecure: bool = False
    namespace: str = "default"  # the pod's namespace in-cluster, the context's otherwise


def in_cluster_endpoint(sa_dir: Path = SA_DIR) -> Endpoint | None:
    """The pod's own API endpoint and service-account credentials, or None outside a pod."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (sa_dir / "token").exists():
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    ns_file = sa_dir / "namespace"
    ca = sa_dir / "ca.crt"
    return Endpoint(
        server=f"https://{host}:{port}",
        token_file=str(sa_dir / "token"),
        ca_data=ca.read_text() if ca.exists() else None,
        namespace=ns_file.read_text().strip() if ns_file.exists() else "default",
    )


def _b64(value: str, what: str, path: str) -> bytes:
    try:
        return base64.b64decode(value, validate=False)
    except ValueError as ex:
        raise KubeError(f"bad kubeconfig {path}: {what} is not base64") from ex


def kubeconfig_endpoint(path: str | None = None, context: str | None = None) -> Endpoint:
    """Read server and credentials of one context from a kubeconfig file (no exec plugins)."""
    import yaml  # only local runs need YAML; the in-cluster agent never imports it

    if path is None:
        env = os.environ.get("KUBECONFIG", "")
        path = env.split(os.pathsep)[0] if env else str(Path.home() / ".kube" / "config")
    where = f"bad kubeconfig {path}"
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as ex:
        raise KubeError(
            f"cannot read kubeconfig {path}: {ex.strerror}",
            hint="pass --kubeconfig or set KUBECONFIG",
        ) from ex
    except yaml.YAMLError as ex:
        raise KubeError(f"{where}: not YAML ({str(ex).splitlines()[0]})") from ex
    if not isinstance(doc, dict):
        raise KubeError(f"{where}: not a kubeconfig mapping")

    def named(section: str, name: str) -> JSON:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") == name:
                inner = item.get(section[:-1])
                return inner if isinstance(inner, dict) else {}
        raise KubeError(f"{where}: no {section[:-1]} named {name!r}")

    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise KubeError(f"{where}: no current-context", hint="pass --context")
    ctx = named("contexts", str(ctx_name))
    cluster = named("clusters", str(ctx.get("cluster", "")))
    user = named("users", str(ctx.get("user", ""))) if ctx.get("user") else {}
    server = cluster.get("server")
    if not server:
        raise KubeError(f"{where}: cluster {ctx.get('cluster')!r} has no server")
    if "exec" in user or "auth-provider" in user:
        raise KubeError(
            f"{where}: user {ctx.get('user')!r} uses an exec/auth-provider plugin,"
            " which the agent's lean client does not run",
            hint="run the agent in-cluster, or use a token/certificate kubeconfig",
        )
    base = Path(path).parent

    def file_or_data(key: str) -> tuple[str | None, bytes | None]:
        src = {**cluster, **user}
        if src.get(f"{key}-data"):
            return None, _b64(str(src[f"{key}-data"]), f"{key}-data", path)
        if src.get(key):
            return str(base / str(src[key])), None
        return None, None

    ca_file, ca_bytes = file_or_data("certificate-authority")
    cert_file, cert_data = file_or_data("client-certificate")
    key_file, key_data = file_or_data("client-key")
    ca_data = ca_bytes.decode() if ca_bytes else (Path(ca_file).read_text() if ca_file else None)
    token_file = user.get("tokenFile")
    return Endpoint(
        server=str(server).rstrip("/"),
        token=str(user["token"]) if user.get("token") else None,
        token_file=str(base / str(token_file)) if token_file else None,
        ca_data=ca_data,
        cert_file=cert_file,
        key_file=key_file,
        cert_data=cert_data,
        key_data=key_data,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=str(ctx.get("namespace") or "default"),
    )


_PLAIN_USER = frozenset(
    {"token", "tokenFile", "client-certificate", "client-certificate-data", "client-key", "client-key-data"}
)
_PLAIN_CLUSTER = frozenset(
    {
        "server",
        "certificate-authority",
        "certificate-authority-data",
        "insecure-skip-tls-verify",
        "extensions",
    }
)


def _plain_kubeconfig(path: str | None, context: str | None) -> bool:
    """Whether the kubeconfig's context needs nothing beyond a token/certificate and a CA.

    Exec and auth-provider plugins, basic auth, proxies, TLS server names and merged
    KUBECONFIG lists are left to the official client.
    """
    import yaml

    env = os.environ.get("KUBECONFIG", "")
    if path is None and os.pathsep in env:
        return False
    path = path or (env or str(Path.home() / ".kube" / "config"))
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the official client gives the precise error
    if not isinstance(doc, dict):
        return False

    def named(section: str, name: object) -> dict[str, Any] | None:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") == name:
                inner = item.get(section[:-1])
                return inner if isinstance(inner, dict) else None
        return None

    ctx = named("contexts", context or doc.get("current-context"))
    if ctx is None:
        return False
    cluster = named("clusters", ctx.get("cluster"))
    user = named("users", ctx.get("user")) if ctx.get("user") else {}
    return (
        cluster is not None
        and user is not None
        and set(cluster) <= _PLAIN_CLUSTER
        and set(user) <= _PLAIN_USER
    )


def connect_cli(kubeconfig: str | None = None, context: str | None = None, *, pool_size: int = 8) -> NodeApi:
    """The CLI's node API: the lean client for in-cluster and plain kubeconfigs (no 300 ms
    import of the official client), the official client for everything else."""
    in_cluster = kubeconfig is None and context is None and not os.environ.get("KUBECONFIG")
    if (in_cluster and in_cluster_endpoint() is not None) or _plain_kubeconfig(kubeconfig, context):
        try:
            return LeanKube(load_endpoint(kubeconfig, context))
        except KubeError:
            pass  # let the official client say what is wrong with it
    return connect(kubeconfig, context, pool_size=pool_size)


def load_endpoint(kubeconfig: str | None = None, context: str | None = None) -> Endpoint:
    """In-cluster credentials when running in a pod (and no kubeconfig given), else a kubeconfig."""
    if kubeconfig is None and context is None and not os.environ.get("KUBECONFIG"):
        found = in_cluster_endpoint()
        if found is not None:
            return found
    return kubeconfig_endpoint(kubeconfig, context)


def _body(body: Any) -> bytes | None:
    return json.dumps(body).encode() if body is not None else None


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
        ctx = ssl.create_default_context(cadata=ep.ca_data) if ep.ca_data else None
        if ctx is None:
            ctx = ssl.create_default_context()
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
        return self.request("GET", f"/api/v1/nodes/{urllib.parse.quote(name)}")

    def list_nodes(self, *, label_selector: str = "") -> list[JSON]:
        query = {"labelSelector": label_selector} if label_selector else None
        items = self.request("GET", "/api/v1/nodes", query=query).get("items") or []
        return [i for i in items if isinstance(i, dict)]

    def patch_node(self, name: str, patch: JSON) -> None:
        self.request("PATCH", f"/api/v1/nodes/{urllib.parse.quote(name)}", body=patch, content_type=MERGE)

    def watch_node(self, name: str, *, resource_version: str, timeout_seconds: int) -> Iterator[JSON]:
        """Stream watch events of one Node; an ERROR event raises KubeError (410 when stale)."""
        query = {
            "watch": "true",
            "fieldSelector": f"metadata.name={name}",
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "true",
        }
        if resource_version:
            query["resourceVersion"] = resource_version
        conn, resp = self._open("GET", "/api/v1/nodes", query=query, timeout=timeout_seconds + 15.0)
        try:
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as ex:
                    raise KubeError(f"watch of node {name}: connection lost: {ex}") from ex
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as ex:
                    raise KubeError(f"watch of node {name}: bad event line") from ex
                if event.get("type") == "ERROR":
                    obj = event.get("object") or {}
                    code = obj.get("code")
                    raise KubeError(
                        f"watch of node {name}: {code} {obj.get('reason', '')}: {obj.get('message', '')}",
                        status=int(code) if isinstance(code, int) else None,
                    )
                yield event
        finally:
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

    def replace_lease(self, namespace: str, lease: JSON) -> JSON:
        name = lease["metadata"]["name"]
        return self.request("PUT", self._lease_path(namespace, name), body=lease)


# --------------------------------------------------------------------------------------------
# Official client (CLI)


class ClientKube:
    """The official kubernetes client behind :class:`NodeApi`, for the CLI."""

    def __init__(self, api_client: Any, *, server: str) -> None:
        from kubernetes import client

        self.server = server
        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _preload_content=False, **kwargs)
        except ApiException as ex:
            body = ex.body.encode() if isinstance(ex.body, str) else (ex.body or b"")
            raise api_error(what, ex.status, str(ex.reason or ""), body) from ex
        except HTTPError as ex:
            why = str(getattr(ex, "reason", "") or ex)
            if "refused" in why.lower():
                why = "connection refused"
            raise KubeError(
                f"{what}: cannot reach the API server {self.server}: {why}",
                hint="check the kubeconfig's server and that the cluster is up",
            ) from ex

    def _json(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> JSON:
        resp = self._call(what, fn, *args, **kwargs)
        try:
            raw = resp.data
        finally:
            resp.release_conn()
        try:
            doc = json.loads(raw)
        except ValueError as ex:
            raise KubeError(f"{what}: the API server sent no JSON") from ex
        return doc if isinstance(doc, dict) else {}

    def close(self) -> None:
        self._api_client.close()

    def list_nodes(self, *, label_selector: str = "") -> list[JSON]:
        doc = self._json("list nodes", self._core.list_node, label_selector=label_selector)
        return [i for i in doc.get("items") or [] if isinstance(i, dict)]

    def get_node(self, name: str) -> JSON:
        return self._json(f"node {name}", self._core.read_node, name)

    def patch_node(self, name: str, patch: JSON) -> None:
        # kubernetes 35 sends a dict body as a strategic merge patch: for maps that is a merge,
        # and a None value deletes the key.
        self._json(f"node {name}", self._core.patch_node, name, patch)


def connect(kubeconfig: str | None = None, context: str | None = None, *, pool_size: int = 8) -> ClientKube:
    """Load credentials (kubeconfig, else in-cluster) into the official client."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    conf = client.Configuration()
    try:
        use_incluster = (
            kubeconfig is None
            and context is None
            and not os.environ.get("KUBECONFIG")
            and not (Path.home() / ".kube" / "config").exists()
            and in_cluster_endpoint() is not None
        )
        if use_incluster:
            config.load_incluster_config(client_configuration=conf)
        else:
            path = kubeconfig
            if path is not None and not Path(path).exists():
                raise KubeError(
                    f"cannot read kubeconfig {path}: no such file",
                    hint="pass --kubeconfig or set KUBECONFIG",
                )
            config.load_kube_config(config_file=path, context=context, client_configuration=conf)
    except ConfigException as ex:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise KubeError(f"bad kubeconfig {where}: {first}", hint="pass --kubeconfig and --context") from ex
    except (OSError, ValueError) as ex:
        raise KubeError(f"bad kubeconfig {kubeconfig or '~/.kube/config'}: {ex}") from ex
    conf.retries = 0  # a refused connection is one clear error, not three silent retries
    conf.connection_pool_maxsize = max(pool_size, 4)
    return ClientKube(client.ApiClient(conf), server=str(conf.host))
