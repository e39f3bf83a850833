"""CRI RunPodSandbox with a hand-encoded request: what the kubelet does for a RuntimeClass pod."""

from __future__ import annotations


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def _field(num: int, value: int | str | bytes) -> bytes:
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    if isinstance(value, str):
        value = value.encode()
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def run_pod(socket: str, handler: str, name: str = "p1", timeout: float = 30) -> tuple[bool, str]:
    """RunPodSandbox(handler) with host networking (no CNI needed): (ok, id or error)."""
    import grpc

    meta = _field(1, name) + _field(2, name + "-uid") + _field(3, "default") + _field(4, 0)
    linux = _field(2, _field(1, _field(1, 2)))  # security_context.namespace_options.network = NODE
    request = _field(1, _field(1, meta) + _field(8, linux)) + _field(2, handler)
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary(
            "/runtime.v1.RuntimeService/RunPodSandbox",
            request_serializer=lambda x: x,
            response_deserializer=lambda x: x,
        )
        try:
            return True, call(request, timeout=timeout)[2:].decode()
        except grpc.RpcError as err:
            return False, f"{err.code().name}: {err.details()}"
