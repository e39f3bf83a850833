"""A watch stream that sends valid JSON which is not a watch event: the lean transport calls it a
protocol error (KubeError), and the agent survives it by relisting its Node, not by crashing.

The server here is a few lines of ``http.server`` speaking raw bytes, since the stand-in API only
ever sends well-formed events."""

from __future__ import annotations

import http.server
import io
import json
import threading
import urllib.parse
from collections.abc import Iterator

import pytest

from kwasm_py.cluster.agentlog import Logger
from kwasm_py.cluster.disruption import Backoff
from kwasm_py.cluster.kube import Endpoint
from kwasm_py.cluster.lean import LeanKube
from kwasm_py.cluster.nodewatch import NodeWatch
from kwasm_py.errors import KubeError

NODE = {"kind": "Node", "metadata": {"name": "n1", "uid": "u1", "resourceVersion": "5", "labels": {}}}
GOOD_EVENT = json.dumps(
    {"type": "MODIFIED", "object": {**NODE, "metadata": {**NODE["metadata"], "resourceVersion": "6"}}}
)

# Lines that parse as JSON (or not at all) but are not {type: str, object: {...}}.
BAD_LINES = {
    "a list": "[1, 2]",
    "a string": '"ADDED"',
    "a number": "42",
    "null": "null",
    "no object": '{"type": "ADDED"}',
    "no type": '{"object": {}}',
    "object not a mapping": '{"type": "MODIFIED", "object": [1]}',
    "type not a string": '{"type": 7, "object": {}}',
    "not JSON": "{nope",
}


class RawApi(http.server.ThreadingHTTPServer):
    """GET a Node and watch Nodes: the first watch sends `bad_line`, the second one good event,
    later ones end at once with no event."""

    def __init__(self, bad_line: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bad_line = bad_line
        self.gets = 0
        self.watches = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RawApi

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query)
        if parts.path == "/api/v1/nodes/n1":
            with self.server.lock:
                self.server.gets += 1
            body = json.dumps(NODE).encode()
        elif parts.path.startswith("/api/v1/nodes/"):  # /api/v1/nodes/<a body to answer>
            body = urllib.parse.unquote(parts.path.rsplit("/", 1)[1]).encode()
        elif parts.path == "/api/v1/nodes" and query.get("watch") == ["true"]:
            with self.server.lock:
                self.server.watches += 1
                n = self.server.watches
            body = {1: self.server.bad_line + "\n", 2: GOOD_EVENT + "\n"}.get(n, "").encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(params=list(BAD_LINES), ids=list(BAD_LINES))
def raw_api(request: pytest.FixtureRequest) -> Iterator[RawApi]:
    """A raw API server whose first watch line is one of BAD_LINES; stopped afterwards."""
    server = RawApi(BAD_LINES[request.param])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_lean_watch_calls_a_non_event_line_a_protocol_error(raw_api: RawApi) -> None:
    """Each malformed line ends the watch with one KubeError saying protocol error, no status."""
    api = LeanKube(Endpoint(server=raw_api.url))
    with pytest.raises(KubeError) as info:
        list(api.watch_node("n1", resource_version="5", timeout_seconds=5))
    assert "protocol error" in info.value.message and "\n" not in info.value.message
    assert info.value.status is None
    # The next watch (the server now sends a good event) works on the same client.
    events = list(api.watch_node("n1", resource_version="5", timeout_seconds=5))
    assert [e["type"] for e in events] == ["MODIFIED"]
    api.close()


def test_agent_watch_survives_a_non_event_line_by_relisting(raw_api: RawApi) -> None:
    """The agent's Node watch (its own thread since the watch loop moved out of the main loop)
    logs the protocol error as an API error, reads its Node again (a relist), watches again and
    hands over the good event; nothing escapes the thread."""
    out = io.StringIO()
    api = LeanKube(Endpoint(server=raw_api.url))
    watch = NodeWatch(api, "n1", timeout_seconds=5, log=Logger(out), delay=Backoff(scale=0).delay)
    watch.start()
    seen: list[str] = []
    try:
        # The listed Node (5), the relisted one, then the good event (6); `next` hands over the
        # newest Node seen, so when the thread is quicker than this loop some are superseded.
        for _ in range(3):
            node = watch.next(timeout=10)
            assert node is not None
            seen.append(node["metadata"]["resourceVersion"])
            if seen[-1] == "6":
                break
    finally:
        watch.stop()
        api.close()
    assert seen[0] in ("5", "6") and seen == sorted(seen), seen
    assert seen[-1] == "6", "the good event after the relist was not handed over"
    errors = [line for line in out.getvalue().splitlines() if "event=api_error" in line]
    assert len(errors) == 1 and "protocol error" in errors[0], out.getvalue()
    assert raw_api.gets == 2, "the watch did not relist its Node (once) after the protocol error"
    assert raw_api.watches >= 2, "the watch did not watch again after relisting"


@pytest.mark.parametrize("answer", ["[1, 2]", '"n1"', "{}", '{"metadata": 5}', "null"])
def test_lean_get_node_that_is_not_a_node_is_a_protocol_error(answer: str) -> None:
    """A GET of a Node answered with JSON that is not a Node object is a KubeError (which the
    agent's loop retries), not a KeyError out of the agent."""
    server = RawApi("")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        api = LeanKube(Endpoint(server=server.url))
        with pytest.raises(KubeError, match="protocol error: the answer is not a Node object"):
            api.get_node(answer)
        api.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
