"""The `kwasm-py` command line: one typer app, sub-apps per area, errors rendered once here.

Sub-modules register their commands on import; each keeps heavy imports (kubernetes, grpc,
requests) inside the command functions so `kwasm-py --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

from kwasm_py.errors import KwasmError

app = typer.Typer(
    name="kwasm-py",
    help="Make Kubernetes nodes run WebAssembly (Spin) workloads with containerd.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # kubeconfigs and tokens must never reach a terminal
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        import kwasm_py

        print(f"kwasm-py {kwasm_py.__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Make Kubernetes nodes run WebAssembly (Spin) workloads with containerd."""


# Registration order is the order of `--help`.
from kwasm_py.cli import cluster, node, sandbox, shims  # noqa: E402

app.add_typer(node.app, name="node")
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(shims.app, name="shims")
cluster.register(app)


def render_error(err: KwasmError) -> None:
    """Print a KwasmError as one line plus an optional hint, on stderr."""
    print(f"error: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)


def main() -> None:
    """Console-script entry point: run the app, turn expected failures into exit codes.

    typer/click handle usage errors themselves (exit 2 with the usage line); KwasmError is
    the one family of expected failures and is rendered here once; anything else is a bug.
    """
    try:
        app()
    except KwasmError as err:
        render_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
