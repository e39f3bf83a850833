"""The `kwasm-py` CLI for tests, two ways: as a subprocess (`run_kwasm`) and in process (`invoke`).

Both run this tree's code, and both keep the caller's `KWASM_*` variables out (a developer's
`KWASM_HOST_ROOT=/` must never reach a test run); only `KWASM_CACHE`, the machine's cache of
node roots and containerd builds, passes through. Pass the variables a test means in `env`.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
#: The argv that starts this tree's CLI; `python -m kwasm_py` with `child_env()`'s PYTHONPATH.
KWASM_ARGV = (sys.executable, "-m", "kwasm_py")
#: Variables passed through although they start with KWASM_: they locate caches, not inputs.
PASSED_THROUGH = frozenset({"KWASM_CACHE"})
LOCAL = "127.0.0.1,localhost"

Kwasm = Callable[..., subprocess.CompletedProcess[str]]


def _foreign(name: str) -> bool:
    return name.startswith("KWASM_") and name not in PASSED_THROUGH


def child_env(env: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child running this tree's code.

    Takes `env` and `extra`, the variables the test sets (they win). Returns os.environ without
    the caller's KWASM_* variables, with PYTHONPATH pointing at this tree's `installer/` and
    repository root, and 127.0.0.1 and localhost added to no_proxy (tests serve locally).
    """
    out = {k: v for k, v in os.environ.items() if not _foreign(k)}
    out["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "installer"), str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    for var in ("no_proxy", "NO_PROXY"):
        out[var] = ",".join(p for p in (os.environ.get(var), LOCAL) if p)
    out.update(env or {})
    out.update(extra)
    return out


def run_kwasm(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `kwasm-py ARGS` from this tree as a separate process, exactly as a user would.

    Takes the arguments, extra environment variables (see `child_env`), a timeout in seconds
    and a working directory. Returns the completed process with text stdout and stderr; it
    never checks the exit code. Raises subprocess.TimeoutExpired after `timeout`.
    """
    return subprocess.run(
        [*KWASM_ARGV, *args],
        capture_output=True,
        text=True,
        env=child_env(env),
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def start_kwasm(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
    """Start `kwasm-py ARGS` from this tree without waiting (concurrent runs, signals).

    Takes the arguments, extra environment variables (see `child_env`) and Popen keywords
    (stdout and stderr default to pipes, text mode). Returns the running process; the caller
    waits for it (`communicate`) or ends it.
    """
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([*KWASM_ARGV, *args], env=child_env(env), text=True, **popen)


@dataclass
class CliResult:
    """What an in-process run printed and its exit code."""

    code: int
    out: str
    err: str


def invoke(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run `kwasm-py ARGS` in this process with typer's CliRunner, errors rendered as `main()` does.

    Takes the arguments and extra environment variables (the caller's KWASM_* are unset for
    the run). Returns the exit code, stdout and stderr. A KwasmError becomes the product's own
    `error:`/`hint:` lines and its exit code, like the console script; any other exception is
    re-raised, since it is a bug.
    """
    from typer.testing import CliRunner

    from kwasm_py.cli import app, render_error
    from kwasm_py.errors import KwasmError

    cleared: dict[str, str | None] = {k: None for k in os.environ if _foreign(k)}
    result = CliRunner().invoke(app, list(args), env={**cleared, **(env or {})}, catch_exceptions=True)
    err = result.stderr
    code = result.exit_code
    if isinstance(result.exception, KwasmError):
        rendered = io.StringIO()
        with contextlib.redirect_stderr(rendered):
            render_error(result.exception)
        err, code = err + rendered.getvalue(), result.exception.exit_code
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(code, result.stdout, err)
