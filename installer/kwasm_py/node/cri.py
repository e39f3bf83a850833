"""Ask a running containerd, over its CRI socket, what it is and which runtimes it registered.

CRI ``RuntimeService/Version`` and ``Status(verbose=true)`` are called with hand-encoded protobuf
(two tiny messages), so no generated stubs are needed. ``Status`` returns containerd's live CRI
configuration as JSON: the only first-hand answer to "is the runtime registered".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kwasm_py.errors import RestartError
from kwasm_py.model import ContainerdVersion

_APIS = ("runtime.v1", "runtime.v1alpha2")


@dataclass(frozen=True)
class CriStatus:
    """What containerd's CRI plugin says: ready or not, and the runtimes it registered."""

    runtime_ready: bool
    runtimes: dict[str, str] = field(default_factory=dict)  # handler -> runtimeType
    conditions: tuple[dict[str, Any], ...] = ()


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) of a protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value = buf[i : i + size]
            i += size
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, value


def _call(socket: str, method: str, request: bytes, timeout: float) -> bytes:
    import grpc  # heavy; only the commands that talk to containerd pay for it

    last: Exception | None = None
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        for api in _APIS:
            stub = channel.unary_unary(
                f"/{api}.RuntimeService/{method}",
                request_serializer=lambda x: x,
                response_deserializer=lambda x: x,
            )
            try:
                return bytes(stub(request, timeout=timeout))
            except grpc.RpcError as err:
                last = err
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    break
    details = last.details() if isinstance(last, grpc.RpcError) else str(last)
    raise RestartError(f"containerd at {socket} did not answer CRI {method}: {details}")


_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> ContainerdVersion:
    """`1.6.20~ds1` / `v2.1.9` -> ContainerdVersion; raises RestartError when none is in `text`."""
    match = _VERSION_RE.search(text)
    if not match:
        raise RestartError(f"cannot read a containerd version from {text!r}")
    major, minor, patch = (int(g) if g else 0 for g in match.groups())
    return ContainerdVersion(major, minor, patch, raw=text.lstrip("v"))


def version(socket: str, *, timeout: float = 3.0) -> ContainerdVersion:
    """containerd's own version, from CRI Version (runtime_version), asked at `socket`.

    Raises RestartError when nothing answers within `timeout` s, or the runtime is not containerd.
    """
    raw = _call(socket, "Version", b"", timeout)
    fields = {num: val for num, _, val in _fields(raw) if isinstance(val, bytes)}
    name = fields.get(2, b"").decode()
    runtime_version = fields.get(3, b"").decode()
    if name and name != "containerd":
        raise RestartError(f"{socket} is a {name} runtime, not containerd")
    return parse_version(runtime_version)


def status(socket: str, *, timeout: float = 3.0) -> CriStatus:
    """RuntimeReady and the registered runtimes, from CRI Status(verbose=true), asked at `socket`.

    Returns a CriStatus (handler -> runtimeType from the live CRI config, cri.Status `info.config`);
    raises RestartError when nothing answers within `timeout` s.
    """
    raw = _call(socket, "Status", b"\x08\x01", timeout)
    conditions: list[dict[str, Any]] = []
    info: dict[str, str] = {}
    for num, _, value in _fields(raw):
        if num == 1:
            for _, _, cond in _fields(value):
                entry: dict[str, Any] = {}
                for n3, _, x in _fields(cond):
                    key = {1: "type", 2: "status", 3: "reason", 4: "message"}.get(n3, str(n3))
                    entry[key] = x.decode() if isinstance(x, bytes) else bool(x)
                conditions.append(entry)
        elif num == 2:
            kv = {n: x.decode() for n, _, x in _fields(value)}
            info[kv.get(1, "")] = kv.get(2, "")
    ready = any(c.get("type") == "RuntimeReady" and c.get("status") is True for c in conditions)
    runtimes: dict[str, str] = {}
    if "config" in info:
        config = json.loads(info["config"])
        for handler, runtime in (config.get("containerd", {}).get("runtimes") or {}).items():
            runtimes[handler] = runtime.get("runtimeType", "")
    return CriStatus(runtime_ready=ready, runtimes=runtimes, conditions=tuple(conditions))


class CriClient(Protocol):
    """Asks the node's containerd over CRI: the engine's port for it (fakes implement it in tests)."""

    def version(self, socket: str, *, timeout: float) -> ContainerdVersion:
        """containerd's version; raises RestartError when it does not answer."""
        ...

    def status(self, socket: str, *, timeout: float) -> CriStatus:
        """Readiness and registered runtimes; raises RestartError when it does not answer."""
        ...


class GrpcCri:
    """The real CriClient: the module functions `version` and `status` over gRPC."""

    def version(self, socket: str, *, timeout: float) -> ContainerdVersion:
        """See the module function `version`."""
        return version(socket, timeout=timeout)

    def status(self, socket: str, *, timeout: float) -> CriStatus:
        """See the module function `status`."""
        return status(socket, timeout=timeout)
