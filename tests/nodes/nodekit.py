"""Helpers for real-node tests and benches: node handles, CRI status, the test shim, CLI runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from kwasm_py import sandbox
from tests.harness.cli import run_kwasm

REPO = Path(__file__).resolve().parents[2]
SPIN_RUNTIME_TYPE = "io.containerd.spin.v2"

# The node kinds issue 4 asks for: (suite, flavour).
BOOKWORM = ("bookworm", "containerd")  # containerd 1.6, config version 2, containerd.service
SID = ("sid", "containerd")  # containerd 2.x, containerd.service
K3S = ("sid", "k3s")  # k3s.service stand-in, containerd 2.x: config-v3.toml.tmpl
K3S_AGENT = (
    "bookworm",
    "k3s-agent",
)  # k3s-agent.service stand-in, containerd 1.6: config.toml.tmpl
K3D = ("bookworm", "k3d")  # no systemd: PID 1 restarts containerd when it exits
KINDS = {"bookworm": BOOKWORM, "sid": SID, "k3s": K3S, "k3s-agent": K3S_AGENT, "k3d": K3D}

TEST_SHIM = """#!/bin/sh
# Test shim: logs how containerd called it, then refuses to start (TEST-INFRA.md section 2).
LOG=${KWASM_TEST_SHIM_LOG:-/var/tmp/containerd-shim-spin-v2.log}
{ echo "argv0=$0"; for a in "$@"; do echo "arg=$a"; done; } >> "$LOG"
echo "test shim %(tag)s refusing to start" >&2
exit 3
"""


# ---------------------------------------------------------------------------------------------
# CRI RuntimeService/Status(verbose) over grpcio with raw protobuf bytes (no generated stubs):
# asks the *running* containerd which runtimes it registered. Independent of kwasm_py.node.cri on
# purpose: the tests must not trust the code under test to tell them it worked.


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        if not c & 0x80:
            return result, i
        shift += 7


def _fields(b: bytes) -> Iterator[tuple[int, int, object]]:
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
            yield num, wt, v
        elif wt == 2:
            n, i = _varint(b, i)
            yield num, wt, b[i : i + n]
            i += n
        elif wt == 1:
            yield num, wt, b[i : i + 8]
            i += 8
        elif wt == 5:
            yield num, wt, b[i : i + 4]
            i += 4
        else:
            raise ValueError(f"wire type {wt}")


def cri_info(socket: Path, timeout: float = 5.0) -> dict[str, str]:
    """The `info` map of CRI RuntimeService/Status(verbose=true) from the daemon at SOCKET."""
    import grpc

    with grpc.insecure_channel(f"unix://{socket}") as ch:
        call = ch.unary_unary(
            "/runtime.v1.RuntimeService/Status",
            request_serializer=lambda x: x,
            response_deserializer=lambda x: x,
        )
        raw = call(b"\x08\x01", timeout=timeout)
    info = {}
    for num, _, v in _fields(raw):
        if num == 2 and isinstance(v, bytes):
            kv = {n: x.decode() for n, _, x in _fields(v) if isinstance(x, bytes)}
            info[kv.get(1, "")] = kv.get(2, "")
    return info


def cri_runtimes(socket: Path) -> dict[str, str]:
    """handler -> runtimeType, as the running containerd's CRI plugin reports them."""
    cfg = json.loads(cri_info(socket)["config"])
    return {k: v.get("runtimeType", "") for k, v in cfg["containerd"]["runtimes"].items()}


# ---------------------------------------------------------------------------------------------
# A booted node


class NodeHandle:
    """A booted sandbox node plus what tests ask of it."""

    def __init__(self, node: sandbox.Node) -> None:
        self.node = node
        self.root = Path(node.root)
        self.pid = node.pid
        self.name = node.name
        self.flavor = node.flavor
        self.suite = node.suite

    def __repr__(self) -> str:
        return f"<node {self.name} {self.suite}/{self.flavor} pid={self.pid}>"

    @property
    def config(self) -> str:
        """The config file containerd reads (node path)."""
        return sandbox.flavor(self.flavor).config

    @property
    def installed_shim(self) -> str:
        """Node path of the installed spin shim: <install-dir>/bin, or /shims on k3s-shaped nodes
        (k3s would pick a shim in /opt/kwasm/bin up and render a runtime of its own)."""
        where = "bin" if self.flavor == "containerd" else "shims"
        return f"/opt/kwasm/{where}/containerd-shim-spin-v2"

    @property
    def edited_config(self) -> str:
        """The file an installer must edit (node path): the template on k3s-shaped nodes."""
        if self.flavor == "containerd":
            return self.config
        name = "config-v3.toml.tmpl" if self.containerd_major() >= 2 else "config.toml.tmpl"
        return f"{sandbox.K3S_CONFIG_DIR}/{name}"

    def path(self, node_path: str) -> Path:
        """Where NODE_PATH is on this machine."""
        return self.root / node_path.lstrip("/")

    @property
    def host_socket(self) -> Path:
        return self.node.host_socket

    def run(self, *argv: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ARGV inside the node (nsenter into its namespaces, as a hostPID pod does)."""
        return sandbox.node_run(self.node, *argv, check=check, timeout=timeout)

    def containerd(self) -> tuple[int, int] | None:
        """(host PID, start time) of the node's containerd, None when none runs."""
        return sandbox.containerd_process(self.node)

    def containerd_pid(self) -> int:
        proc = self.containerd()
        assert proc is not None, f"no containerd runs on {self}"
        return proc[0]

    def wait_ready(self, timeout: float = 30) -> tuple[int, int]:
        """Poll (bounded) until containerd answers; return its (PID, start time)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.containerd()
            if proc is not None and sandbox.ready(self.node):
                return proc
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd on {self} not ready after {timeout}s")
            time.sleep(0.05)  # polling a condition with a deadline

    def containerd_starts(self) -> int:
        """How many times containerd has started on this node (its own boot log lines)."""
        if self.node.unit is None:
            log = (Path(self.node.dir) / "nspawn.log").read_text(errors="replace")
        else:
            log = self.run("journalctl", "-u", self.node.unit, "-o", "cat", "--no-pager").stdout
        return log.count("containerd successfully booted")

    @property
    def restart_args(self) -> tuple[str, ...]:
        """Extra CLI args this node needs: none under systemd (auto), a signal restart on k3d."""
        return () if self.node.unit is not None else ("--restart", self.node.restart)

    def containerd_major(self) -> int:
        out = self.run("containerd", "--version", check=True).stdout.split()
        return int(out[2].lstrip("v").split(".")[0])

    def config_dump(self) -> subprocess.CompletedProcess:
        """`containerd -c CONFIG config dump` inside the node: what containerd makes of it."""
        return self.run("containerd", "-c", self.config, "config", "dump")

    def runtimes(self) -> dict[str, str]:
        """handler -> runtime type, from the running containerd (CRI status)."""
        return cri_runtimes(self.host_socket)

    def snapshot(self, *node_paths: str) -> dict[str, bytes | None]:
        """Contents of NODE_PATHS (None when absent), to compare byte for byte later."""
        out: dict[str, bytes | None] = {}
        for p in node_paths:
            hp = self.path(p)
            out[p] = hp.read_bytes() if hp.is_file() else None
        return out

    def kwasm(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess:
        """`python -m kwasm_py ARGS --host-root ROOT --pid PID` (this tree's code)."""
        return run_kwasm(
            *args, "--host-root", str(self.root), "--pid", str(self.pid), env=env, timeout=timeout
        )


def json_out(proc: subprocess.CompletedProcess) -> dict:
    """The one JSON object a `--output json` run printed (fails loudly otherwise)."""
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(
            f"no JSON on stdout (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        ) from None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
