"""The `kwasm-py` command line: one typer app, sub-apps per area, errors rendered once here.

Sub-modules register their commands when `build` imports them; each keeps heavy imports
(kubernetes, grpc, requests) inside the command functions so `kwasm-py --help` stays fast.
`kwasm-py node ...`, which the agent runs for every engine call, registers the node area alone
(the same typer definitions, so its help, options and environment variables are the same) and
ends with `os._exit` once its output is flushed (see `main`).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer

from kwasm_py.errors import KwasmError


def _version(value: bool) -> None:
    if value:
        import kwasm_py

        print(f"kwasm-py {kwasm_py.__version__}")
        raise typer.Exit


def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Make Kubernetes nodes run WebAssembly (Spin) workloads with containerd."""


def build(*, node_only: bool = False) -> typer.Typer:
    """The root app with every area registered, in the order of `--help`.

    `node_only`: the `node` area alone, all that `kwasm-py node ...` can reach (its commands and
    their help are the same typer objects); the other areas' modules are then not imported.
    """
    app = typer.Typer(
        name="kwasm-py",
        help="Make Kubernetes nodes run WebAssembly (Spin) workloads with containerd.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,  # kubeconfigs and tokens must never reach a terminal
        add_completion=False,
    )
    app.callback()(_root)
    from kwasm_py.cli import node

    app.add_typer(node.app, name="node")
    if node_only:
        return app
    from kwasm_py.cli import cluster, sandbox, shims

    app.add_typer(sandbox.app, name="sandbox")
    app.add_typer(shims.app, name="shims")
    cluster.register(app)
    return app


def __getattr__(name: str) -> typer.Typer:
    """`kwasm_py.cli.app`: the whole app (`build()`), built on first use (PEP 562)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = build()
    globals()["app"] = app
    return app


def render_error(err: KwasmError) -> None:
    """Print a KwasmError as one line plus an optional hint, on stderr."""
    print(f"error: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)


def main() -> None:
    """Console-script entry point: run the app, turn expected failures into exit codes.

    typer/click handle usage errors themselves (exit 2 with the usage line); KwasmError is
    the one family of expected failures and is rendered here once; anything else is a bug
    (its traceback, through the normal exit).

    `kwasm-py node ...` builds the node area alone and, once stdout and stderr are flushed,
    leaves with `os._exit`: interpreter teardown (grpc's threads, module finalisers) would
    add tens of milliseconds to every engine call the agent makes, and nothing of the node
    engine is left to finish by then: every file it writes is fsynced and closed before
    `atomic_write` returns, its lock is released when `install` returns, and its child
    processes have been waited for.
    """
    node_only = sys.argv[1:2] == ["node"]
    code: str | int | None
    try:
        build(node_only=node_only)()
    except SystemExit as done:
        code = done.code
    except KwasmError as err:
        render_error(err)
        code = err.exit_code
    except KeyboardInterrupt:
        code = 130
    else:
        code = 0
    if node_only:
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: str | int | None) -> NoReturn:
    """End the process with `code` (an int or None, as `sys.exit` takes it) without interpreter
    teardown, once stdout and stderr are flushed. Anything else (a message as exit code), or a
    flush that fails (a closed pipe), takes the ordinary `sys.exit` path, which reports it."""
    if code is not None and not isinstance(code, int):  # a message: printed by the normal exit
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code or 0)
