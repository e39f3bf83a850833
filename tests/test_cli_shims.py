"""`kwasm-py shims fetch|list` as a user runs them: a subprocess against an in-process server."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path

from tests.harness.cli import KWASM_ARGV, child_env, run_kwasm
from tests.harness.shim_http import catalog_text, serve, sha, shim_tar

BIN = "containerd-shim-spin-v2"


def write_catalog(tmp_path: Path, url: str, archive: bytes) -> Path:
    p = tmp_path / "shims.toml"
    p.write_text(catalog_text({"spin": {"url": url, "archive_sha256": sha(archive)}}))
    return p


def test_fetch_plain_output_when_not_a_terminal(tmp_path):
    """Without a terminal, fetch prints one plain line per shim and no progress bar."""
    archive, body = shim_tar()
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        cat = write_catalog(tmp_path, srv.url("/a.tar.gz"), archive)
        r = run_kwasm("shims", "fetch", "--catalog", str(cat), "--arch", "amd64",
                  "--dest", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"spin v1.2.3 amd64: {tmp_path / 'out' / BIN} sha256 {sha(body)}")
    assert r.stderr == ""
    assert (tmp_path / "out" / BIN).read_bytes() == body


def test_fetch_json_output(tmp_path):
    """--output json prints one object with each shim's path and sha256."""
    archive, body = shim_tar()
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        cat = write_catalog(tmp_path, srv.url("/a.tar.gz"), archive)
        r = run_kwasm("shims", "fetch", "spin", "--catalog", str(cat), "--arch", "x86_64",
                  "--dest", str(tmp_path / "out"), "-o", "json")  # fmt: skip
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert [(s["name"], s["arch"], s["sha256"]) for s in doc["shims"]] == [("spin", "amd64", sha(body))]


def test_fetch_progress_bar_on_a_terminal(tmp_path):
    """On a terminal, fetch draws a rich progress bar with size and speed on stderr."""
    archive, _ = shim_tar(payload=os.urandom(2_000_000))  # several chunks: a measurable speed
    with serve() as srv:
        srv.add("/a.tar.gz", data=archive)
        cat = write_catalog(tmp_path, srv.url("/a.tar.gz"), archive)
        master, slave = pty.openpty()
        try:
            p = subprocess.Popen(
                [*KWASM_ARGV, "shims", "fetch", "--catalog", str(cat),
                 "--arch", "amd64", "--dest", str(tmp_path / "out")],
                stdout=subprocess.PIPE, stderr=slave, env=child_env(COLUMNS="120"),
            )  # fmt: skip
            os.close(slave)
            chunks = []
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            p.communicate(timeout=60)
        finally:
            os.close(master)
    drawn = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0
    assert "shim spin v1.2.3 (amd64)" in drawn
    assert re.search(r"2\.0/2\.0 MB", drawn), drawn  # size
    assert re.search(r"[0-9.]+ [kMG]?B/s", drawn), drawn  # speed


def test_fetch_404_is_one_clear_error(tmp_path):
    """A missing asset exits 1 with an error line naming the URL and the shim, no traceback."""
    archive, _ = shim_tar()
    with serve() as srv:
        url = srv.url("/gone.tar.gz")
        cat = write_catalog(tmp_path, url, archive)
        r = run_kwasm("shims", "fetch", "--catalog", str(cat), "--arch", "amd64",
                  "--dest", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: shim spin v1.2.3 (amd64): " + url)
    assert lines[1].startswith("hint: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_fetch_unknown_shim_and_arch_exit_2(tmp_path):
    """Unknown shim names and architectures are usage errors (exit 2), nothing fetched."""
    r = run_kwasm("shims", "fetch", "nope", "--dest", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown shim 'nope'" in r.stderr
    r = run_kwasm("shims", "fetch", "--arch", "ppc64le", "--dest", str(tmp_path / "o"))
    assert r.returncode == 2 and "ppc64le" in r.stderr
    assert not (tmp_path / "o").exists()


def test_list_shows_catalog_and_node_state(tmp_path):
    """list shows the catalog, and with --host-root the installed shims against the state file."""
    root = tmp_path / "node"
    (root / "opt/kwasm/bin").mkdir(parents=True)
    (root / "opt/kwasm/bin" / BIN).write_bytes(b"spin")
    (root / "opt/kwasm/kwasm-state.json").write_text(
        json.dumps({"runtimes": [{"handler": "spin", "shim": f"/opt/kwasm/bin/{BIN}",
                                  "sha256": sha(b"spin")}]})
    )  # fmt: skip
    r = run_kwasm("shims", "list", "--host-root", str(root))
    assert r.returncode == 0, r.stderr
    assert "spin       handler=spin       v0.25.1  [amd64,arm64] (default)" in r.stdout
    assert f"{BIN}  sha256 {sha(b'spin')} handler=spin  matches state file" in r.stdout
    (root / "opt/kwasm/bin" / BIN).write_bytes(b"changed")
    doc = json.loads(run_kwasm("shims", "list", "--host-root", str(root), "-o", "json").stdout)
    assert [c["name"] for c in doc["catalog"]] == ["spin", "wasmtime"]
    inst = doc["installed"][0]
    assert inst["sha256"] == sha(b"changed") and inst["state_sha256"] == sha(b"spin")


def test_list_bad_host_root_is_usage_error(tmp_path):
    """A --host-root that is not a directory exits 2 with one error line."""
    r = run_kwasm("shims", "list", "--host-root", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.startswith("error: --host-root")


def test_output_format_is_checked_by_the_shared_choice(tmp_path):
    """-o accepts text|json only (model.OutputFormat): anything else is a usage error, exit 2."""
    r = run_kwasm("shims", "list", "-o", "yaml")
    assert r.returncode == 2 and "'yaml' is not one of 'text', 'json'" in r.stderr
    r = run_kwasm("shims", "list", "--host-root", str(tmp_path / "none"), "-o", "json")
    assert r.returncode == 2 and r.stderr.startswith("error: --host-root") and "hint: " in r.stderr
