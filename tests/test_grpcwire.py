"""The hand-written unary gRPC call (node/grpcwire.py) and its HPACK decoder (node/hpack.py):
RFC 7541's own examples, and calls answered by grpcio's server (C-core: another HTTP/2 and
HPACK implementation than containerd's grpc-go, which tests/test_real_containerd.py covers)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from kwasm_py.errors import RestartError
from kwasm_py.node import cri, grpcwire, hpack


def test_huffman_code_rebuilt_from_the_lengths_is_the_rfc_s() -> None:
    """The canonical code built from the RFC 7541 Appendix B lengths has the table's codes
    (spot checks: ' ', '0', 'a', and EOS, 30 one bits) and is complete (Kraft sum 1)."""
    codes = {symbol: key for key, symbol in hpack._DECODE.items()}
    assert codes[ord(" ")] == (6, 0x14) and codes[ord("0")] == (5, 0x0) and codes[ord("a")] == (5, 0x3)
    assert codes[ord("\\")] == (19, 0x7FFF0) and codes[hpack.EOS] == (30, 0x3FFFFFFF)
    assert sum(2.0**-bits for bits in hpack.HUFFMAN_BITS) == 1.0


def test_rfc7541_request_examples_with_huffman() -> None:
    """RFC 7541 C.4: three requests on one connection decode, and the dynamic table holds what
    the RFC says after each (sizes 57, 110, 164)."""
    decoder = hpack.Decoder()
    first = decoder.decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))
    assert first == [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ]
    assert decoder.size == 57
    second = decoder.decode(bytes.fromhex("828684be5886a8eb10649cbf"))
    assert second[3:] == [(":authority", "www.example.com"), ("cache-control", "no-cache")]
    assert decoder.size == 110
    third = decoder.decode(bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"))
    assert third[1:] == [
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ]
    assert decoder.size == 164
    assert list(decoder.table) == [
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ]


def test_rfc7541_response_examples_evict_from_a_small_table() -> None:
    """RFC 7541 C.6 (table limit 256 bytes): entries are evicted oldest first, as the RFC shows."""
    decoder = hpack.Decoder(256)
    decoder.decode(
        bytes.fromhex(
            "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad1718"
            "63c78f0b97c8e9ae82ae43d3"
        )
    )
    assert decoder.size == 222
    assert decoder.decode(bytes.fromhex("4883640effc1c0bf"))[0] == (":status", "307")
    third = decoder.decode(
        bytes.fromhex(
            "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b3"
            "35dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"
        )
    )
    assert ("date", "Mon, 21 Oct 2013 20:13:22 GMT") in third
    assert ("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1") in third
    assert decoder.size == 215
    assert [name for name, _ in decoder.table] == ["set-cookie", "content-encoding", "date"]


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        pytest.param(bytes([0x00, 0x81, 0x18, 0x00]), "padding", id="padding-not-ones"),
        pytest.param(bytes([0x00, 0x82, 0x1F, 0xFF, 0x00]), "padding", id="padding-over-7-bits"),
        pytest.param(bytes([0x00, 0x84, 0xFF, 0xFF, 0xFF, 0xFF, 0x00]), "EOS", id="eos-in-string"),
        pytest.param(bytes([0xBE]), "index 62", id="empty-dynamic-table"),
        pytest.param(bytes([0x3F, 0xE2, 0x1F]), "table size", id="size-over-limit"),
        pytest.param(bytes([0x00, 0x05, 0x61]), "inside a string", id="truncated"),
    ],
)
def test_header_blocks_that_do_not_decode(block: bytes, problem: str) -> None:
    """Bad padding, EOS inside a string, an index in neither table, a size update above the
    limit and a cut-off string are compression errors, not garbage headers."""
    with pytest.raises(hpack.HpackError, match=problem):
        hpack.Decoder().decode(block)


def test_our_literals_and_integers_read_back() -> None:
    """What `encode` writes (a 300-byte value: a multi-byte length) decodes to the same headers."""
    headers = [(":path", "/a.B/C"), ("x-long", "v" * 300)]
    assert hpack.Decoder().decode(hpack.encode(headers)) == headers
    assert hpack.decode_int(hpack.encode_int(1337, 5), 0, 5) == (1337, 3)  # RFC 7541 C.1.2


def test_grpc_timeout_has_at_most_eight_digits() -> None:
    """grpc-timeout: milliseconds rounded up, a coarser unit when they need more than 8 digits."""
    assert grpcwire.grpc_timeout(3.0) == "3000m"
    assert grpcwire.grpc_timeout(0.0001) == "1m"
    assert grpcwire.grpc_timeout(200_000.0) == "200000S"


Handler = Callable[[bytes, Any], bytes]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[dict[str, Handler]], str]]:
    """Start a grpcio server on a unix socket answering {"/svc/Method": handler}; returns the path."""
    servers: list[grpc.Server] = []

    def start(methods: dict[str, Handler]) -> str:
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for full, fn in methods.items():
            service, method = full.strip("/").split("/")
            by_service.setdefault(service, {})[method] = grpc.unary_unary_rpc_method_handler(fn)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        for service, handlers in by_service.items():
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
        path = str(tmp_path / f"s{len(servers)}.sock")
        server.add_insecure_port(f"unix:{path}")
        server.start()
        servers.append(server)
        return path

    yield start
    for server in servers:
        server.stop(None)


def test_a_large_answer_arrives_whole(serve: Callable[[dict[str, Handler]], str]) -> None:
    """A 1 MB answer (many DATA frames, past HTTP/2's default 64 KiB window) is returned whole."""
    path = serve({"/t.S/Echo": lambda request, _ctx: request * 100_000})
    assert grpcwire.unary(path, "/t.S/Echo", b"0123456789", timeout=5) == b"0123456789" * 100_000


def test_the_server_s_status_and_message(serve: Callable[[dict[str, Handler]], str]) -> None:
    """A failed call raises the server's status code and its (percent-encoded) message as sent."""

    def fail(_request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no sandbox «p1»: 100% gone")

    path = serve({"/t.S/Fail": fail})
    with pytest.raises(grpcwire.CallError) as info:
        grpcwire.unary(path, "/t.S/Fail", b"", timeout=5)
    assert (info.value.code, info.value.details) == (
        grpc.StatusCode.NOT_FOUND.value[0],
        "no sandbox «p1»: 100% gone",
    )
    with pytest.raises(grpcwire.CallError) as info:
        grpcwire.unary(path, "/t.S/Missing", b"", timeout=5)
    assert info.value.code == grpcwire.UNIMPLEMENTED


def test_deadline_and_nobody_listening(serve: Callable[[dict[str, Handler]], str], tmp_path: Path) -> None:
    """A server that does not answer within the timeout: DEADLINE_EXCEEDED; no socket: UNAVAILABLE."""
    release = threading.Event()

    def stuck(_request: bytes, _context: Any) -> bytes:
        release.wait(timeout=30)
        return b""

    path = serve({"/t.S/Stuck": stuck})
    try:
        with pytest.raises(grpcwire.CallError) as info:
            grpcwire.unary(path, "/t.S/Stuck", b"", timeout=0.2)
        assert (info.value.code, info.value.details) == (grpcwire.DEADLINE_EXCEEDED, "Deadline Exceeded")
    finally:
        release.set()
    with pytest.raises(grpcwire.CallError) as info:
        grpcwire.unary(str(tmp_path / "none.sock"), "/t.S/Stuck", b"", timeout=1)
    assert info.value.code == grpcwire.UNAVAILABLE and "No such file or directory" in info.value.details


def test_cri_falls_back_to_v1alpha2(serve: Callable[[dict[str, Handler]], str]) -> None:
    """A containerd serving only runtime.v1alpha2 (before 1.7 it may) answers Version through it;
    one answering neither is a RestartError naming the call."""
    answer = b"\x0a\x050.1.0\x12\x0acontainerd\x1a\x0a1.6.20~ds1\x22\x050.1.0"  # VersionResponse
    path = serve({"/runtime.v1alpha2.RuntimeService/Version": lambda _r, _c: answer})
    assert cri.version(path, timeout=5).raw == "1.6.20~ds1"
    with pytest.raises(RestartError, match=r"did not answer CRI Status: .*[Mm]ethod"):
        cri.status(path, timeout=5)
