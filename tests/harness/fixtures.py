"""Shared pytest fixtures: the CLI as a subprocess, real private containerd daemons, a fake shim.

Registered for every test by tests/conftest.py (``pytest_plugins``); the cluster-side fixtures
(stand-in API, kubeconfig, agents) are in cluster_fixtures.py, registered the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cli import Kwasm, run_kwasm
from tests.harness.containerd import PrivateContainerd, available, fake_shim


@pytest.fixture
def kwasm() -> Kwasm:
    """The CLI, run as a subprocess exactly as a user would (`run_kwasm`)."""
    return run_kwasm


def _containerd(generation: str) -> Iterator[PrivateContainerd]:
    reason = available(generation)
    if reason:
        pytest.skip(reason)
    ctd = PrivateContainerd(generation)
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
