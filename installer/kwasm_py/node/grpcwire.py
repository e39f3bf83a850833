"""EFFECTS: one unary gRPC call over HTTP/2 on a unix socket, written out by hand: all `cri`
needs to ask containerd its version and status.

gRPC over HTTP/2 (grpc/grpc `doc/PROTOCOL-HTTP2.md`): the request is a HEADERS frame (`:method
POST`, `:scheme http`, `:path /SERVICE/METHOD`, `content-type application/grpc`, `te trailers`,
`grpc-timeout`) and one DATA frame holding the message behind a 5-byte prefix (compressed flag
0, big-endian length), with END_STREAM; the answer is HEADERS, DATA and trailing HEADERS with
`grpc-status` and `grpc-message` (or those trailers alone). Frames are RFC 9113's (HTTP/2),
header blocks HPACK (`hpack`, RFC 7541). The client opens its receive windows to 1 GiB at once
(so no WINDOW_UPDATE is ever due), acknowledges the server's SETTINGS and PINGs, and says
GOAWAY when done.

Why not grpcio: the engine runs in a fresh `kwasm-py node` process for every call the agent
makes, and there `import grpc` took 27 ms (it imports asyncio, for `grpc.aio`) and its first
call 5 ms more, with threads that outlive the channel; a call by hand takes 0.5 to 0.7 ms
against containerd 1.6 and 2.1 here.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import urllib.parse

from kwasm_py.node import hpack

# gRPC status codes (grpc/grpc doc/statuscodes.md)
OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED = 0, 1, 2, 4
UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 12, 13, 14

# HTTP/2 frame types and flags (RFC 9113 section 6)
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = 0, 1, 3, 4, 5, 6, 7
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4
DEFAULT_WINDOW = 65_535
WINDOW = 1 << 30  # bytes the server may send us, per stream and on the connection
STREAM = 1  # the call's stream: the first a client opens


class CallError(Exception):
    """The call failed: `code` is the gRPC status (UNAVAILABLE when containerd cannot be reached,
    DEADLINE_EXCEEDED when it did not answer in time), `details` the message in words."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 9-byte header (24-bit length, type, flags, stream id), then `payload`."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_timeout(seconds: float) -> str:
    """`seconds` as a `grpc-timeout` value: at most 8 digits and a unit (m, S, M or H), rounded up."""
    for unit, scale in (("m", 1000.0), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600)):
        value = max(1, -int(-seconds * scale // 1))
        if value < 10**8:
            return f"{value}{unit}"
    return "99999999H"


def request(path: str, message: bytes, *, timeout: float) -> bytes:
    """What the client sends for a call of `path` with `message`: preface, SETTINGS, the
    connection's WINDOW_UPDATE, the request HEADERS and its one DATA frame (END_STREAM)."""
    settings = struct.pack(">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, WINDOW)
    headers = hpack.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", grpc_timeout(timeout)),
            ("user-agent", "kwasm-py"),
        ]
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return b"".join(
        [
            PREFACE,
            frame(SETTINGS, 0, 0, settings),
            frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", WINDOW - DEFAULT_WINDOW)),
            frame(HEADERS, END_HEADERS, STREAM, headers),
            frame(DATA, END_STREAM, STREAM, body),
        ]
    )


class _Reader:
    """Frames from a socket, each read within what is left of the call's deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.buf = sock, deadline, bytearray()

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise CallError(DEADLINE_EXCEEDED, "Deadline Exceeded")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise CallError(UNAVAILABLE, "the connection closed before the call completed")
            self.buf += chunk

    def frame(self) -> tuple[int, int, int, bytes]:
        """(type, flags, stream id, payload) of the next frame."""
        self._fill(9)
        size = int.from_bytes(self.buf[:3], "big")
        kind, flags = self.buf[3], self.buf[4]
        stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        self._fill(9 + size)
        payload = bytes(self.buf[9 : 9 + size])
        del self.buf[: 9 + size]
        return kind, flags, stream, payload


def _unpad(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise CallError(INTERNAL, "a padded frame with more padding than payload")
    return payload[1 : len(payload) - payload[0]]


def _exchange(sock: socket.socket, deadline: float) -> tuple[dict[str, str], bytes]:
    """Read until our stream ends: (its headers and trailers by name, the DATA bytes)."""
    reader, decoder = _Reader(sock, deadline), hpack.Decoder()
    fields: dict[str, str] = {}
    data = bytearray()
    block: bytearray | None = None  # a header block still awaiting CONTINUATION frames
    block_ends = ended = False
    while not ended:
        kind, flags, stream, payload = reader.frame()
        if block is not None and (kind != CONTINUATION or stream != STREAM):
            raise CallError(INTERNAL, "a header block interrupted by another frame")
        if kind == SETTINGS and not flags & ACK:
            sock.sendall(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            sock.sendall(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if last < STREAM:
                code = int.from_bytes(payload[4:8], "big")
                raise CallError(
                    UNAVAILABLE, f"the server refused the call (GOAWAY, HTTP/2 error code {code})"
                )
        elif kind == PUSH_PROMISE:
            raise CallError(INTERNAL, "the server pushed a stream though push is disabled")
        elif stream != STREAM:
            continue  # WINDOW_UPDATE and PRIORITY frames, frame types we do not know
        elif kind == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            status = {7: UNAVAILABLE, 8: CANCELLED}.get(code, INTERNAL)  # REFUSED_STREAM, CANCEL
            raise CallError(status, f"the server reset the stream (HTTP/2 error code {code})")
        elif kind == DATA:
            data += _unpad(flags, payload)
            ended = bool(flags & END_STREAM)
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                payload = _unpad(flags, payload)
                block, block_ends = (
                    bytearray(payload[5:] if flags & PRIORITY else payload),
                    bool(flags & END_STREAM),
                )
            else:
                assert block is not None
                block += payload
            if flags & END_HEADERS:
                try:
                    fields.update(decoder.decode(bytes(block)))
                except hpack.HpackError as err:
                    raise CallError(INTERNAL, f"a header block that does not decode: {err}") from err
                block, ended = None, block_ends
    return fields, bytes(data)


def _result(fields: dict[str, str], data: bytes) -> bytes:
    """The response message, or CallError for the status the server ended the call with."""
    if "grpc-status" not in fields:  # grpc's mapping of the HTTP status (doc/http-grpc-status-mapping.md)
        status = fields.get(":status", "")
        code = {"404": UNIMPLEMENTED, "502": UNAVAILABLE, "503": UNAVAILABLE, "504": UNAVAILABLE}.get(
            status, UNKNOWN
        )
        raise CallError(code, f"the server ended the call without a grpc-status (HTTP status {status})")
    code = int(fields["grpc-status"]) if fields["grpc-status"].isdigit() else UNKNOWN
    if code != OK:
        raise CallError(code, urllib.parse.unquote(fields.get("grpc-message", "")))
    if len(data) < 5 or data[0] != 0 or int.from_bytes(data[1:5], "big") != len(data) - 5:
        raise CallError(INTERNAL, "the response is not one uncompressed message")
    return data[5:]


def unary(socket_path: str, path: str, message: bytes, *, timeout: float) -> bytes:
    """Call `path` (`/package.Service/Method`) with the serialized `message` at the unix socket
    `socket_path`; returns the serialized response. Raises CallError: UNAVAILABLE when nothing
    listens there or the connection breaks, DEADLINE_EXCEEDED after `timeout` s, and the
    server's own status (e.g. UNIMPLEMENTED) when it fails the call."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(socket_path)
        except TimeoutError:
            raise CallError(DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except OSError as err:
            raise CallError(
                UNAVAILABLE, f"cannot connect to unix:{socket_path}: {err.strerror or err}"
            ) from err
        try:
            sock.sendall(request(path, message, timeout=timeout))
            fields, data = _exchange(sock, deadline)
        except TimeoutError:
            raise CallError(DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except OSError as err:
            raise CallError(UNAVAILABLE, f"the connection to unix:{socket_path} broke: {err}") from err
        finally:
            with contextlib.suppress(OSError):
                sock.sendall(frame(GOAWAY, 0, 0, struct.pack(">II", STREAM, 0)))  # NO_ERROR
    return _result(fields, data)
