"""`kwasm-py node ...`: the node engine's commands (placeholder)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Install or remove shims on this node.")
