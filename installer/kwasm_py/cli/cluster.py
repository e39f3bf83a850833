"""Cluster-side commands: annotate-node, status, wait, manifests, agent (placeholder)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the cluster-side commands to the root app."""
    del app
