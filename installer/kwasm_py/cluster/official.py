"""The CLI's Kubernetes transport: the official client where a kubeconfig needs it.

The only module that imports ``kubernetes``. :func:`connect_cli` picks the lean transport for
in-cluster and plain kubeconfigs (no 300 ms import of the official client), the official client
for everything else. :class:`ClientKube` reads raw JSON (``_preload_content=False``) so patching
a thousand nodes does not build a thousand model objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kwasm_py.cluster.kube import (
    KUBECONFIG_HINT,
    NodeApi,
    api_error,
    in_cluster_endpoint,
    load_endpoint,
    read_kubeconfig,
)
from kwasm_py.cluster.lean import LeanKube
from kwasm_py.errors import KubeError
from kwasm_py.model import JSON

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
    env = os.environ.get("KUBECONFIG", "")
    if path is None and os.pathsep in env:
        return False
    path = path or (env or str(Path.home() / ".kube" / "config"))
    try:
        doc = read_kubeconfig(path)
    except KubeError:
        return False  # `connect` says what is wrong with it, in one line

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

    def delete_path(self, path: str) -> bool:
        """Takes an object's API path; deletes it; returns False on 404. Raises KubeError."""
        try:
            resp = self._call(
                f"DELETE {path}",
                self._api_client.call_api,
                path,
                "DELETE",
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
            )
        except KubeError as ex:
            if ex.status == 404:
                return False
            raise
        resp.release_conn()
        return True


def connect(kubeconfig: str | None = None, context: str | None = None, *, pool_size: int = 8) -> ClientKube:
    """Load credentials (kubeconfig, else in-cluster) into the official client."""
    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    conf = client.Configuration()
    where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
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
            for one in _kubeconfig_files(path):
                read_kubeconfig(one)  # a wrong shape is one line here, not a TypeError in the client
            config.load_kube_config(config_file=path, context=context, client_configuration=conf)
    except ConfigException as ex:
        raise KubeError(
            f"bad kubeconfig {where}: {_first_line(ex)}", hint="pass --kubeconfig and --context"
        ) from ex
    except (OSError, ValueError) as ex:
        raise KubeError(f"bad kubeconfig {where}: {_first_line(ex)}", hint=KUBECONFIG_HINT) from ex
    except (TypeError, AttributeError, KeyError, yaml.YAMLError) as ex:
        # What the shape check above does not foresee still ends as one line: the client's
        # loader indexes the document without checking types.
        raise KubeError(
            f"bad kubeconfig {where}: the kubernetes client cannot read it"
            f" ({type(ex).__name__}: {_first_line(ex)})",
            hint=KUBECONFIG_HINT,
        ) from ex
    conf.retries = 0  # a refused connection is one clear error, not three silent retries
    conf.connection_pool_maxsize = max(pool_size, 4)
    return ClientKube(client.ApiClient(conf), server=str(conf.host))


def _kubeconfig_files(path: str | None) -> list[str]:
    """The kubeconfig files the official client will read: `path`, else every existing file of
    KUBECONFIG, else ~/.kube/config when it exists."""
    if path is not None:
        return [path]
    env = os.environ.get("KUBECONFIG", "")
    if env:
        return [p for p in env.split(os.pathsep) if p and Path(p).exists()]
    default = Path.home() / ".kube" / "config"
    return [str(default)] if default.exists() else []


def _first_line(ex: BaseException) -> str:
    text = str(ex).strip()
    return text.splitlines()[0] if text else type(ex).__name__
