"""Kubernetes API ports and credentials: the protocols, the error mapping, endpoints.

Two transports implement these ports, one error type (:class:`kwasm_py.errors.KubeError`),
plain ``dict`` objects:

* :mod:`kwasm_py.cluster.lean` (:class:`~kwasm_py.cluster.lean.LeanKube`), a small
  ``http.client`` transport for the resident agent: importing the official client's
  ``CoreV1Api`` costs about 64 MB of RSS on every node, this costs about 20 MB. It understands
  in-cluster service-account credentials and the plain parts of a kubeconfig (server, CA,
  client certificate, token).
* :mod:`kwasm_py.cluster.official` wraps the official client for the CLI (contexts, exec
  credential plugins, auth providers); the only module that imports ``kubernetes``.

Both implement :class:`NodeApi`; the agent additionally uses events, leases and watches
(:class:`AgentApi`), which only the lean transport provides.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kwasm_py.errors import KubeError
from kwasm_py.model import JSON

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


class ObjectApi(Protocol):
    """What `kwasm-py uninstall` needs beyond nodes: delete an object by its API path."""

    def delete_path(self, path: str) -> bool:
        """Takes an object's API path; deletes it; returns False when it did not exist.
        Raises KubeError for any other failure."""
        ...


class AgentApi(Protocol):
    """What the agent needs: its Node (and its ``nodes/status`` subresource, strategic merge),
    a watch on it, Node events and the Leases of its namespace (restart slots and their queue)."""

    def get_node(self, name: str) -> JSON: ...

    def patch_node(self, name: str, patch: JSON) -> None: ...

    def patch_node_status(self, name: str, patch: JSON) -> None: ...

    def watch_node(self, name: str, *, resource_version: str, timeout_seconds: int) -> Iterator[JSON]: ...

    def create_event(self, namespace: str, event: JSON) -> None: ...

    def get_lease(self, namespace: str, name: str) -> JSON | None: ...

    def create_lease(self, namespace: str, lease: JSON) -> JSON: ...

    def replace_lease(self, namespace: str, lease: JSON) -> JSON: ...

    def list_leases(self, namespace: str) -> tuple[list[JSON], str]: ...

    def watch_leases(
        self, namespace: str, *, resource_version: str, timeout_seconds: int
    ) -> Iterator[JSON]: ...

    def delete_lease(self, namespace: str, name: str) -> bool: ...


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


KUBECONFIG_HINT = "fix the kubeconfig (kubectl config view shows it), or pass another with --kubeconfig"

# Kubeconfig keys whose values must be strings when present, per section entry
# (https://kubernetes.io/docs/reference/config-api/kubeconfig.v1/).
_STRING_KEYS = {
    "clusters": (
        "server",
        "certificate-authority",
        "certificate-authority-data",
        "tls-server-name",
        "proxy-url",
    ),
    "users": (
        "token",
        "tokenFile",
        "client-certificate",
        "client-certificate-data",
        "client-key",
        "client-key-data",
    ),
    "contexts": ("cluster", "user", "namespace"),
}


def _bad(where: str, what: str) -> KubeError:
    return KubeError(f"{where}: {what}", hint=KUBECONFIG_HINT)


def check_kubeconfig(doc: object, where: str) -> JSON:
    """Check the shape of a parsed kubeconfig before any client reads it.

    Takes the parsed YAML and a label (``bad kubeconfig PATH``). Returns the document as a
    mapping. Raises KubeError (one line) when it is not a mapping, when ``contexts``,
    ``clusters`` or ``users`` is not a list of ``{name, context|cluster|user}`` mappings, or when
    a field read as text (server, CA, token, certificate paths and data) is not a string. The
    official client would otherwise fail on these with a TypeError or AttributeError deep inside.
    """
    if doc is None:
        raise _bad(where, "the file is empty")
    if not isinstance(doc, dict):
        raise _bad(where, f"not a kubeconfig mapping (a YAML {type(doc).__name__})")
    current = doc.get("current-context")
    if current is not None and not isinstance(current, str):
        raise _bad(where, "current-context is not a string")
    for section, keys in _STRING_KEYS.items():
        items = doc.get(section)
        if items is None:
            continue
        if not isinstance(items, list):
            raise _bad(where, f"{section} is not a list")
        inner_key = section[:-1]
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise _bad(where, f"{section}[{i}] is not a mapping with a name")
            inner = item.get(inner_key)
            if inner is None:
                continue
            if not isinstance(inner, dict):
                raise _bad(where, f"{section}[{i}] ({item['name']!r}): {inner_key} is not a mapping")
            for key in keys:
                if key in inner and inner[key] is not None and not isinstance(inner[key], str):
                    raise _bad(where, f"{section}[{i}] ({item['name']!r}): {key} is not a string")
    return doc


def read_kubeconfig(path: str) -> JSON:
    """Read and shape-check one kubeconfig file (see :func:`check_kubeconfig`).

    Returns the document. Raises KubeError when the file cannot be read, is not UTF-8, is not
    YAML or has the wrong shape; the message is one line naming the file.
    """
    import yaml  # only local runs need YAML; the in-cluster agent never imports it

    where = f"bad kubeconfig {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as ex:
        raise _bad(where, "not UTF-8 text") from ex
    except OSError as ex:
        raise KubeError(
            f"cannot read kubeconfig {path}: {ex.strerror or ex}",
            hint="pass --kubeconfig or set KUBECONFIG",
        ) from ex
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as ex:
        raise _bad(where, f"not YAML ({str(ex).splitlines()[0]})") from ex
    return check_kubeconfig(doc, where)


def _b64(value: str, what: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except ValueError as ex:
        raise _bad(where, f"{what} is not base64") from ex


def _pem(data: bytes, what: str, where: str) -> str:
    """The decoded ``*-data`` value as PEM text; KubeError when it is not one."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as ex:
        raise _bad(where, f"{what} is not a PEM certificate") from ex
    if "-----BEGIN " not in text:
        raise _bad(where, f"{what} is not a PEM certificate")
    return text


def kubeconfig_endpoint(path: str | None = None, context: str | None = None) -> Endpoint:
    """Read server and credentials of one context from a kubeconfig file (no exec plugins).

    Takes the file (default: the first of KUBECONFIG, else ~/.kube/config) and a context name
    (default: current-context). Returns the Endpoint. Raises KubeError, one line, for every
    malformed file (see :func:`read_kubeconfig`), a missing context, cluster or server, bad
    base64 or PEM data, an unreadable CA file, or a user that needs an exec/auth-provider plugin.
    """
    if path is None:
        env = os.environ.get("KUBECONFIG", "")
        path = env.split(os.pathsep)[0] if env else str(Path.home() / ".kube" / "config")
    where = f"bad kubeconfig {path}"
    doc = read_kubeconfig(path)

    def named(section: str, name: str) -> JSON:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") == name:
                inner = item.get(section[:-1])
                return inner if isinstance(inner, dict) else {}
        raise _bad(where, f"no {section[:-1]} named {name!r}")

    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise KubeError(f"{where}: no current-context", hint="pass --context")
    ctx = named("contexts", str(ctx_name))
    cluster = named("clusters", str(ctx.get("cluster", "")))
    user = named("users", str(ctx.get("user", ""))) if ctx.get("user") else {}
    server = cluster.get("server")
    if not server:
        raise _bad(where, f"cluster {ctx.get('cluster')!r} has no server")
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
            return None, _b64(str(src[f"{key}-data"]), f"{key}-data", where)
        if src.get(key):
            return str(base / str(src[key])), None
        return None, None

    ca_file, ca_bytes = file_or_data("certificate-authority")
    cert_file, cert_data = file_or_data("client-certificate")
    key_file, key_data = file_or_data("client-key")
    ca_data = _pem(ca_bytes, "certificate-authority-data", where) if ca_bytes else None
    if ca_file:
        try:
            ca_data = Path(ca_file).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as ex:
            why = getattr(ex, "strerror", None) or "not PEM text"
            raise _bad(where, f"cannot read certificate-authority {ca_file}: {why}") from ex
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
        insecure=cluster.get("insecure-skip-tls-verify") is True,  # not the string "false"
        namespace=str(ctx.get("namespace") or "default"),
    )


def load_endpoint(kubeconfig: str | None = None, context: str | None = None) -> Endpoint:
    """In-cluster credentials when running in a pod (and no kubeconfig given), else a kubeconfig."""
    if kubeconfig is None and context is None and not os.environ.get("KUBECONFIG"):
        found = in_cluster_endpoint()
        if found is not None:
            return found
    return kubeconfig_endpoint(kubeconfig, context)
