"""Fetch throughput: `artifacts.fetch_shims` (download + sha256 + safe tar check + extract +
atomic place) against a plain `requests` download of the same archive, same server, same run.

    python -m bench --only shims [--quick]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import requests

from bench._common import row
from kwasm_py.shims import catalog as shim_catalog
from kwasm_py.shims import fetch as artifacts
from tests.harness.shim_http import catalog_text, serve, sha, shim_tar


def _plain(url: str, out: Path) -> None:
    with requests.get(url, stream=True, timeout=30) as r, out.open("wb") as f:
        r.raise_for_status()
        for chunk in r.iter_content(256 * 1024):
            f.write(chunk)


def run(quick: bool) -> list[dict[str, object]]:
    """Throughput (MB/s per round) of a verified fetch vs a plain download."""
    size = (8 if quick else 64) * 1_000_000
    rounds = 3 if quick else 7
    for var in ("http_proxy", "HTTP_PROXY"):
        os.environ.pop(var, None)
    archive, _ = shim_tar(payload=os.urandom(size))  # random: gzip cannot shrink it
    mb = len(archive) / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench-shims-"))
    try:
        with serve() as srv:
            srv.add("/a.tar.gz", data=archive)
            url = srv.url("/a.tar.gz")
            shims = shim_catalog.parse(
                catalog_text({"spin": {"url": url, "archive_sha256": sha(archive)}})
            ).select()
            plain, fetch = [], []
            for i in range(rounds):
                t = time.perf_counter()
                _plain(url, work / f"plain-{i}")
                plain.append(mb / (time.perf_counter() - t))
                (work / f"plain-{i}").unlink()
                t = time.perf_counter()
                artifacts.fetch_shims(shims, "amd64", work / f"fetch-{i}")
                fetch.append(mb / (time.perf_counter() - t))
                shutil.rmtree(work / f"fetch-{i}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        row(
            f"shims fetch throughput ({mb:.0f} MB archive, verify + extract + place)",
            fetch,
            plain,
            unit="MB/s",
            floor_name="plain download of the same archive (requests)",
            compare="ratio",
        )
    ]
