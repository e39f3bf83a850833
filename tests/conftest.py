"""Shared fixtures: the CLI as a subprocess, and real private containerd daemons."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.containerd_node import REPO, PrivateContainerd, available, fake_shim

SHARED_CONFIGS = REPO.parent / "shared" / "containerd-configs"

Kwasm = Callable[..., subprocess.CompletedProcess[str]]


def run_kwasm(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `kwasm-py ARGS` from this source tree as a separate process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "installer"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kwasm_py", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def kwasm() -> Kwasm:
    """The CLI, run as a subprocess exactly as a user would."""
    return run_kwasm


def _containerd(generation: str, **kwargs: object) -> Iterator[PrivateContainerd]:
    reason = available(generation)
    if reason:
        pytest.skip(reason)
    ctd = PrivateContainerd(generation, **kwargs)  # type: ignore[arg-type]
    try:
        ctd.start()
        yield ctd
    finally:
        ctd.cleanup()


@pytest.fixture(params=["1.6", "2.x"])
def ctd(request: pytest.FixtureRequest) -> Iterator[PrivateContainerd]:
    """A running private containerd of each generation (1.6 from bookworm, 2.x from sid)."""
    yield from _containerd(request.param)


@pytest.fixture
def ctd16() -> Iterator[PrivateContainerd]:
    """A running private containerd 1.6."""
    yield from _containerd("1.6")


@pytest.fixture
def ctd16b() -> Iterator[PrivateContainerd]:
    """A second running private containerd 1.6 (a second node)."""
    yield from _containerd("1.6")


@pytest.fixture
def ctd2() -> Iterator[PrivateContainerd]:
    """A running private containerd 2.x."""
    yield from _containerd("2.x")


@pytest.fixture
def shim(tmp_path: Path) -> Path:
    """A fake containerd-shim-spin-v2 that logs its argv and exits 3."""
    return fake_shim(tmp_path / "shims")


def tree_hash(root: Path) -> dict[str, tuple[str, int]]:
    """Content and mode of every file under root (sockets and mount contents left out)."""
    import hashlib

    out: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.startswith(("lib", "run", "opt")) or path.is_socket() or path.name.endswith(".log"):
            continue
        if path.is_symlink():
            out[rel] = ("link:" + os.readlink(path), 0)
        elif path.is_file():
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
        elif path.is_dir():
            out[rel] = ("dir", path.stat().st_mode)
    return out
