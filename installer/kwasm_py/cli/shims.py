"""`kwasm-py shims fetch|list`: get verified shim binaries, and see what a node has installed.

``requests`` (through kwasm_py.shims.fetch) is imported inside ``fetch`` only, so ``--help`` and
``list`` stay fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated

import typer

from kwasm_py.errors import UsageError
from kwasm_py.model import CATALOG_ENV, DEFAULT_INSTALL_DIR, JSON, OutputFormat

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

    from kwasm_py.shims.fetch import Fetched

app = typer.Typer(
    no_args_is_help=True,
    help="Fetch verified containerd shims from the catalog; list what a node has installed.",
)


CatalogOpt = Annotated[
    Path | None,
    typer.Option(
        "--catalog",
        envvar=CATALOG_ENV,
        help="Shim catalog TOML (default: the copy shipped with kwasm-py = images/shims.toml).",
        show_default=False,
    ),
]
OutputOpt = Annotated[OutputFormat, typer.Option("--output", "-o", help="text or json on stdout.")]


class _RichSink:
    """artifacts.Progress drawn as one rich bar per shim (size, speed, time left)."""

    def __init__(self, progress: RichProgress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def start(self, label: str, total: int | None) -> None:
        if self._task is None:
            self._task = self._progress.add_task(label, total=total)
        else:  # a retry starts over
            self._progress.reset(self._task, total=total, description=label)

    def advance(self, nbytes: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=nbytes)

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - loop always returns


@app.command("fetch")
def fetch(  # typer passes keywords; the many options mirror the CLI flags
    *,
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Shim names from the catalog (default: the catalog's default shims)."),
    ] = None,
    arch: Annotated[
        str, typer.Option("--arch", envvar="KWASM_ARCH", help="amd64, arm64 or auto (this host).")
    ] = "auto",
    dest: Annotated[
        Path | None,
        typer.Option(
            "--dest",
            help="Directory for the binaries (created; default ./shims/<arch>).",
            show_default=False,
        ),
    ] = None,
    mirror: Annotated[
        str | None,
        typer.Option(
            "--mirror",
            envvar="KWASM_SHIM_MIRROR",
            help="Air-gapped: http(s) base URL or local directory with the same archive names.",
            show_default=False,
        ),
    ] = None,
    ca_bundle: Annotated[
        Path | None,
        typer.Option(
            "--ca-bundle",
            envvar="KWASM_CA_BUNDLE",
            help="PEM CA bundle for TLS (REQUESTS_CA_BUNDLE is honoured too).",
            show_default=False,
        ),
    ] = None,
    retries: Annotated[int, typer.Option("--retries", min=0, max=20)] = 4,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Connect and per-read timeout, seconds.")
    ] = 30.0,
    keep_archives: Annotated[
        bool,
        typer.Option("--keep-archives", help="Also keep the verified archives (seed a mirror)."),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Download even if dest already holds the binary.")
    ] = False,
    catalog: CatalogOpt = None,
    output: OutputOpt = OutputFormat.TEXT,
) -> None:
    """Download, verify (sha256) and unpack shims into --dest: all of them, or none."""
    from kwasm_py.shims import fetch as artifacts
    from kwasm_py.shims import source as shim_source

    cat = shim_source.read_catalog(catalog)
    a = shim_source.resolve_arch(arch)
    shims = cat.select(names or [])
    target = dest if dest is not None else Path("shims") / a
    options = artifacts.FetchOptions(
        mirror=mirror,
        ca_bundle=str(ca_bundle) if ca_bundle else None,
        retries=retries,
        connect_timeout=min(timeout, 30.0),
        read_timeout=timeout,
        keep_archives=keep_archives,
        force=force,
    )
    if sys.stderr.isatty() and output is OutputFormat.TEXT:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        ) as bar:
            results = artifacts.fetch_shims(
                shims, a, target, options=options, progress=lambda: _RichSink(bar)
            )
    else:
        results = artifacts.fetch_shims(shims, a, target, options=options)
    _print_fetched(results, output)


def _print_fetched(results: list[Fetched], output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        doc = [
            {
                "name": r.name,
                "version": r.version,
                "arch": r.arch,
                "handler": r.handler,
                "runtime_type": r.runtime_type,
                "path": str(r.path),
                "sha256": r.binary_sha256,
                "archive_sha256": r.archive_sha256,
                "source": r.source,
                "bytes": r.size,
                "skipped": r.skipped,
            }
            for r in results
        ]
        print(json.dumps({"ok": True, "shims": doc}))
        return
    for r in results:
        if r.skipped:
            how = "already present"
        else:
            speed = r.size / r.seconds if r.seconds > 0 else 0.0
            how = f"{_human(r.size)} in {r.seconds:.1f} s ({_human(speed)}/s) from {r.source}"
        print(f"{r.name} {r.version} {r.arch}: {r.path} sha256 {r.binary_sha256} ({how})")


@app.command("list")
def list_(
    *,
    host_root: Annotated[
        Path | None,
        typer.Option(
            "--host-root",
            envvar="KWASM_HOST_ROOT",
            help="Where the node's / is; also show the shims installed there.",
            show_default=False,
        ),
    ] = None,
    install_dir: Annotated[
        str, typer.Option("--install-dir", envvar="KWASM_INSTALL_DIR", help="Node path.")
    ] = str(DEFAULT_INSTALL_DIR),
    catalog: CatalogOpt = None,
    output: OutputOpt = OutputFormat.TEXT,
) -> None:
    """Show the catalog's shims and, with --host-root, what is installed on that node."""
    from kwasm_py.shims import source as shim_source

    cat = shim_source.read_catalog(catalog)
    inst_dir = PurePosixPath(install_dir)
    if not inst_dir.is_absolute():
        raise UsageError(
            f"--install-dir {install_dir} must be an absolute node path",
            hint=f"the default is {DEFAULT_INSTALL_DIR}",
        )
    if host_root is not None and not host_root.is_dir():
        raise UsageError(
            f"--host-root {host_root} is not a directory", hint="give the directory where the node's / is"
        )
    installed = (
        shim_source.installed_shims(host_root, cat, install_dir=inst_dir) if host_root is not None else None
    )
    if output is OutputFormat.JSON:
        doc: JSON = {
            "catalog": [
                {
                    "name": s.name,
                    "handler": s.handler,
                    "runtime_type": s.runtime_type,
                    "binary": s.binary,
                    "version": s.version,
                    "default": s.default,
                    "arches": sorted(s.artifacts),
                }
                for s in cat.shims
            ]
        }
        if installed is not None:
            doc["installed"] = [
                {
                    "binary": i.binary,
                    "path": str(i.path),
                    "sha256": i.sha256,
                    "state_sha256": i.state_sha256,
                    "handlers": list(i.state_handlers),
                    "catalog": i.catalog_name,
                    "catalog_match": i.catalog_match,
                }
                for i in installed
            ]
        print(json.dumps(doc))
        return
    print(f"available ({cat.source}):")
    for s in cat.shims:
        mark = " (default)" if s.default else ""
        arches = ",".join(sorted(s.artifacts))
        print(f"  {s.name:<10} handler={s.handler:<10} {s.version}  [{arches}]{mark}")
    if installed is None:
        return
    where = host_root / inst_dir.relative_to("/") / "bin" if host_root else inst_dir
    print(f"installed ({where}):")
    if not installed:
        print("  none")
    for i in installed:
        if i.state_sha256 is None:
            state = "not in state file"
        elif i.state_sha256 == i.sha256:
            state = "matches state file"
        else:
            state = f"DIFFERS from state file ({i.state_sha256[:12]})"
        handlers = f" handler={','.join(i.state_handlers)}" if i.state_handlers else ""
        cat_note = f" catalog={i.catalog_name}:{i.catalog_match}" if i.catalog_name else ""
        print(f"  {i.binary}  sha256 {i.sha256}{handlers}  {state}{cat_note}")
