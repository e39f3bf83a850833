"""Fixtures for the cluster-side tests: the stand-in API, kubeconfigs, agent processes.

Registered for every test by tests/conftest.py (``pytest_plugins``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cluster import NAMESPACE, AgentFactory
from tests.harness.kube_standin import StandIn


@pytest.fixture
def standin() -> Iterator[StandIn]:
    """A fresh stand-in API server for one test."""
    with StandIn() as api:
        yield api


@pytest.fixture
def kubeconfig(standin: StandIn, tmp_path: Path) -> Path:
    """A kubeconfig file pointing at the stand-in."""
    return standin.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)


@pytest.fixture
def agents(kubeconfig: Path, tmp_path: Path) -> Iterator[AgentFactory]:
    """Start `kwasm-py agent` subprocesses against the stand-in; all are killed at the end."""
    factory = AgentFactory(kubeconfig, tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()
