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
    """Console-script entry point: run the app, turn expected failures into exit codes."""
    try:
        # With standalone_mode=False click *returns* the code of a typer.Exit instead of raising.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except KwasmError as err:
        render_error(err)
        sys.exit(err.exit_code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as ex:
        import click

        if isinstance(ex, click.ClickException):
            ex.show()
            sys.exit(ex.exit_code)
        raise
