"""Fixtures for the cluster-side tests: the stand-in API, kubeconfigs, agent processes.

Test modules load them with ``pytest_plugins = ["tests.cluster_fixtures"]``, so this file does not
depend on (or clash with) a shared conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_helpers import NAMESPACE, AgentFactory
from tests.kube_standin import StandIn


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
