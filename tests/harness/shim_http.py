"""Test helpers for shim fetching: an in-process HTTP(S) server on 127.0.0.1, a recording forward
proxy, tar.gz builders and catalog text. Every server runs in a thread and is shut down by its
context manager."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import shutil
import ssl
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Member:
    """One tar member to build: kind is file|dir|symlink|hardlink|chardev|fifo."""

    name: str
    data: bytes = b""
    kind: str = "file"
    target: str = ""
    mode: int = 0o755


def make_tar(members: list[Member]) -> bytes:
    """A tar.gz holding ``members``, built in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mode = m.mode
            if m.kind == "file":
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "chardev": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[m.kind]
            info.linkname = m.target
            tf.addfile(info)
    return buf.getvalue()


def shim_tar(binary: str = "containerd-shim-spin-v2", payload: bytes = b"") -> tuple[bytes, bytes]:
    """(archive bytes, binary bytes) for a release-like archive holding one shim binary."""
    body = payload or (b"\x7fELF fake shim " + binary.encode() + b"\n") * 100
    return make_tar([Member(binary, body)]), body


@dataclass
class Route:
    data: bytes = b""
    status: int = 200
    fail_first: int = 0  # answer fail_status this many times first
    fail_status: int = 503
    truncate_first: int = 0  # send half the body (with the full Content-Length) this many times
    always_truncate: bool = False
    redirect: str = ""  # answer 302 to this path
    length: str | None = None  # Content-Length to send instead of the real one; "" sends none
    hits: int = 0


@dataclass
class ShimServer:
    """HTTP server for tests: routes by path, records every request line."""

    routes: dict[str, Route] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    port: int = 0
    scheme: str = "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def add(self, path: str, **kw: object) -> Route:
        route = Route(**kw)  # type: ignore[arg-type]
        self.routes[path] = route
        return route

    def hits(self, path: str) -> int:
        return sum(1 for line in self.log if line == path)


def _handler(server: ShimServer) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            with lock:
                server.log.append(path)
                route = server.routes.get(path)
                if route is not None:
                    route.hits += 1
                    n = route.hits
            if route is None:
                self.send_error(404, "Not Found")
                return
            if route.redirect:
                self.send_response(302)
                self.send_header("Location", route.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if n <= route.fail_first:
                self.send_error(route.fail_status)
                return
            if route.status != 200:
                self.send_error(route.status)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            length = str(len(route.data)) if route.length is None else route.length
            if length:
                self.send_header("Content-Length", length)
            self.end_headers()
            if route.always_truncate or n <= route.fail_first + route.truncate_first:
                self.wfile.write(route.data[: len(route.data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(route.data)

    return Handler


@contextlib.contextmanager
def serve(tls: tuple[Path, Path] | None = None) -> Iterator[ShimServer]:
    """Run a ShimServer on 127.0.0.1 (HTTPS when ``tls`` = (cert, key)) until the block ends."""
    state = ShimServer(scheme="https" if tls else "http")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    state.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    t.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=10)


@dataclass
class Proxy:
    port: int = 0
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def forward_proxy() -> Iterator[Proxy]:
    """A plain-HTTP forward proxy that records each absolute request URL and relays it."""
    state = Proxy()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.requests.append(self.path)
            target = urlsplit(self.path)
            conn = http.client.HTTPConnection(target.hostname or "", target.port or 80, timeout=10)
            try:
                conn.request("GET", target.path or "/")
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() in ("content-type", "location"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    t.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=10)


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server cert, server key) for 127.0.0.1, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl")
    d = directory

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=kwasm-py test CA")  # fmt: skip
    run("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return d / "ca.pem", d / "srv.pem", d / "srv.key"


def catalog_text(shims: dict[str, dict[str, object]], *, max_archive_bytes: int | None = None) -> str:
    """Catalog TOML for tests. shims: name -> {url, archive_sha256, binary_sha256?, arch?,
    default?, binary?, handler?, max_archive_bytes?}; the top-level cap when given."""
    out = ["schema = 1", ""]
    if max_archive_bytes is not None:
        out[1:1] = [f"max_archive_bytes = {max_archive_bytes}"]
    for name, spec in shims.items():
        binary = spec.get("binary", f"containerd-shim-{name}-v2")
        out += [
            f"[shims.{name}]",
            f'handler = "{spec.get("handler", name)}"',
            f'runtime_type = "io.containerd.{name}.v2"',
            f'binary = "{binary}"',
            f'version = "{spec.get("version", "v1.2.3")}"',
            f"default = {'true' if spec.get('default', True) else 'false'}",
            "",
        ]
        arches = spec.get("arches", {spec.get("arch", "amd64"): spec})
        assert isinstance(arches, dict)
        for arch, a in arches.items():
            out += [
                f"[shims.{name}.arch.{arch}]",
                f'url = "{a["url"]}"',
                f'archive_sha256 = "{a["archive_sha256"]}"',
                f'binary_sha256 = "{a.get("binary_sha256", "unpublished")}"',
                *([f"max_archive_bytes = {a['max_archive_bytes']}"] if "max_archive_bytes" in a else []),
                "",
            ]
    return "\n".join(out)
