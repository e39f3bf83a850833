"""The installer image's size against its base image, and its build time (buildah, this machine).

Built like tests/test_image_build.py: images/Dockerfile with SHIMS=none on the local stand-in for
python:3.11-slim-bookworm (see tests/image_build.py), exported as an OCI layout and unpacked.
Needs root, buildah and runc; the first run also builds the base root (~1 min).

    python -m bench --only image [--quick]
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bench._common import row, skipped
from tests.harness import image_build as ib

MIB = 2**20


def run(quick: bool) -> list[dict[str, object]]:
    """Image size (files, gzip layers) over the base image's; build time with the base cached."""
    figures = ("installer image size (files)", "installer image size (gzip layers)", "image build")
    reason = ib.unavailable()
    if reason:
        return [skipped(f, reason) for f in figures]
    builds = []
    for _ in range(1 if quick else 3):
        work = Path(tempfile.mkdtemp(prefix="bench-image-"))
        try:
            builds.append(ib.build_export_unpack(work, "SHIMS=none"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    sizes = [b.sizes() for b in builds]
    note = "stand-in base: debootstrap bookworm + Debian python3 3.11 (not python:3.11-slim-bookworm)"
    return [
        row(
            f"{figures[0]}, SHIMS=none",
            [s["files"] for s in sizes],
            [s["base_files"] for s in sizes],
            unit="MiB",
            floor_name="base image files",
            scale=1 / MIB,
            note=note,
        ),
        row(
            f"{figures[1]}, SHIMS=none",
            [s["gzip"] for s in sizes],
            [s["base_gzip"] for s in sizes],
            unit="MiB",
            floor_name="base image gzip layers",
            scale=1 / MIB,
        ),
        row(
            f"{figures[2]} (buildah bud, base cached, pip from PyPI)",
            [b.timings["build"] for b in builds],
            None,
            unit="s",
            floor_name="none (informs only)",
        ),
    ]
