"""Pre-flight: the node's own containerd reads the config we are about to make it load.

Before any restart, the containerd binary found on the node root runs chrooted into that root
(`chroot ROOT containerd --config FILE config dump`), so `imports` and relative paths resolve as
they do on the node, once on what containerd reads today and once on what it will read after
the change (for a template, its predicted render). The second dump must list every handler we
add with our runtime_type, every runtime of the first unchanged, and the same default runtime.
Where the root has no containerd binary (or it cannot be run), pre-flight is skipped and says so.

The dump of today's file does not depend on the plan: `dump_ahead` starts it as soon as the
node is opened (binary: the running containerd's own), so it runs while the engine asks
containerd its version and plans, and `check` then waits for the second dump only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from kwasm_py.containerd import dropin
from kwasm_py.errors import KwasmError, PreflightError

__all__ = [
    "CANDIDATES",
    "Ahead",
    "PreflightError",
    "Verdict",
    "check",
    "choose_binary",
    "compare",
    "cri_view",
    "dump_ahead",
    "require_read",
    "run",
    "today_file",
]
from kwasm_py.model import ConfigKind, ContainerdVersion, Layout
from kwasm_py.node import nodebinary, plan
from kwasm_py.node.hostfs import HostFS
from kwasm_py.node.nodebinary import CANDIDATES, Runner, choose_binary
from kwasm_py.node.procfs import HOST, ProcFS

CRI_RUNTIMES = (
    ("plugins", "io.containerd.cri.v1.runtime", "containerd"),  # containerd 2.x dumps this
    ("plugins", "io.containerd.grpc.v1.cri", "containerd"),
    ("plugins", "cri", "containerd"),
)
#: What `_dump` returns: (the dump or None, the error, the scratch file's node path or None).
Dumped = tuple[dict[str, Any] | None, str, PurePosixPath | None]


@dataclass(frozen=True)
class Verdict:
    """What pre-flight found: `ran` False when it was skipped (`message` says why)."""

    ran: bool
    ok: bool
    message: str


def cri_view(dump: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(runtimes by handler, default runtime name) of a `config dump`."""
    for path in CRI_RUNTIMES:
        node: Any = dump
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get("runtimes"), dict):
            default = node.get("default_runtime_name")
            return node["runtimes"], default if isinstance(default, str) else None
    return {}, None


def compare(
    before: dict[str, Any] | None,
    after: dict[str, Any],
    *,
    wanted: Mapping[str, str],
    ours: frozenset[str] = frozenset(),
) -> list[str]:
    """What the dump `after` gets wrong: problems as sentences, empty when it is right.

    `wanted` maps each handler we install to its runtime_type; `ours` are other handlers we
    may change (a companion runtime); `before` is the dump of today's config (None: unknown).
    """
    problems = []
    runtimes, default = cri_view(after)
    for handler, runtime_type in wanted.items():
        got = (runtimes.get(handler) or {}).get("runtime_type")
        if got != runtime_type:
            problems.append(f"runtime {handler} has runtime_type {got!r}, not {runtime_type!r}")
    if before is not None:
        old, old_default = cri_view(before)
        for handler, table in old.items():
            if handler in wanted or handler in ours:
                continue
            if runtimes.get(handler) != table:
                problems.append(f"runtime {handler} would change or vanish")
        if old_default != default:
            problems.append(f"default runtime would change from {old_default!r} to {default!r}")
    return problems


def _dump(
    fs: HostFS, binary: PurePosixPath, text: str, *, near: PurePosixPath, runner: Runner, tag: str
) -> Dumped:
    """containerd's dump of `text` written beside `near` on the node: (dump or None, error, file)."""
    directory = near.parent
    if not fs.resolve(directory).is_dir():
        directory = PurePosixPath("/tmp")  # noqa: S108 - the node's /tmp, written through its root
        if not fs.resolve(directory).is_dir():
            return None, f"cannot run {binary}: neither {near.parent} nor /tmp exists on the node root", None
    # Beside the real file, so relative imports resolve the same; not `*.toml`, so an import
    # glob of that directory (`/etc/containerd/*.toml`) cannot pick the scratch file up.
    node_file = directory / f".kwasm-preflight-{os.getpid()}-{tag}.tmp"
    host_file = fs.resolve(node_file)
    try:
        host_file.write_text(text)
        proc = runner(["chroot", str(fs.root), str(binary), "--config", str(node_file), "config", "dump"])
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"cannot run {binary} on the node root: {err}", None
    finally:
        host_file.unlink(missing_ok=True)
    if proc.returncode in (125, 126, 127):  # chroot itself could not run the binary
        return None, f"cannot run {binary} on the node root: {proc.stderr.strip()[-200:]}", None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return None, (lines[-1] if lines else f"exit code {proc.returncode}"), node_file
    try:
        return tomllib.loads(proc.stdout), "", node_file
    except tomllib.TOMLDecodeError as err:
        return None, f"its config dump is not TOML ({err})", None


def today_file(lay: Layout) -> PurePosixPath:
    """The file whose load by the node's containerd today pre-flight dumps first, for a plan on
    `lay` (`run`'s cases: k0s's generated CRI file, a drop-in's main config, else the file
    containerd reads)."""
    if lay.kind is ConfigKind.DROP_IN and lay.name == "k0s":
        return PurePosixPath(dropin.K0S_CRI)
    return lay.rendered_path or lay.config_path


@dataclass(frozen=True)
class Ahead:
    """Today's dump, started before the plan was made (`dump_ahead`): `binary` run on `text`,
    the content of `effective`, through `runner`; `result` is `_dump`'s answer."""

    binary: PurePosixPath
    effective: PurePosixPath
    text: str
    runner: Runner
    result: concurrent.futures.Future[Dumped]

    def matches(self, binary: PurePosixPath, effective: PurePosixPath, text: str, runner: Runner) -> bool:
        """Whether this is the dump `check` would start now (same binary, file, text, runner)."""
        return (self.binary, self.effective, self.text) == (binary, effective, text) and self.runner is runner


@contextlib.contextmanager
def dump_ahead(
    fs: HostFS, lay: Layout, *, pid: int | None, proc: ProcFS = HOST, runner: Runner | None = None
) -> Iterator[Ahead | None]:
    """Start the dump of what the node's containerd loads today (`today_file(lay)`) in a thread,
    for `check` to take (see `Ahead.matches`; a plan that changed the file, or a binary chosen
    otherwise, dumps again). Yields None, starting nothing, when the binary is not the running
    containerd's own (that choice needs containerd's version: `choose_binary`), when `pid` is
    None, or when the file is absent or unreadable (its error comes where it always did). The
    thread is joined on leaving, so no scratch file outlives the block. `runner` runs the dump
    (None: `nodebinary.run_argv`, looked up at the call). Raises nothing itself.
    """
    runner = runner or nodebinary.run_argv
    effective = today_file(lay)
    text = None
    binary = None
    if pid is not None:
        with contextlib.suppress(KwasmError):
            text = fs.read_text(effective)
        if text is not None:
            binary = next((path for cfg, path in nodebinary.running(fs, pid, proc) if cfg == effective), None)
    if text is None or binary is None:
        yield None
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_dump, fs, binary, text, near=effective, runner=runner, tag="now")
        yield Ahead(binary, effective, text, runner, future)


def check(
    fs: HostFS,
    *,
    effective: PurePosixPath,
    before_text: str | None,
    after_text: str,
    wanted: Mapping[str, str],
    ours: frozenset[str] = frozenset(),
    source: str,
    binary: PurePosixPath | None,
    runner: Runner | None = None,
    ahead: Ahead | None = None,
) -> Verdict:
    """Have the node's containerd read `after_text` (what it will load from `effective`).

    `before_text` is what it loads today (None: no file, containerd's defaults); `source` is
    the file we edit, named in the error; `binary` the node's containerd (`choose_binary`);
    `ahead` today's dump if `dump_ahead` started it (used when it matches, else dumped again);
    `runner` runs the dumps (None: `nodebinary.run_argv`).
    Returns a Verdict (skipped when no binary can run);
    raises PreflightError when containerd refuses `after_text` or its dump disagrees.
    """
    if binary is None:
        return Verdict(False, True, "skipped: no containerd binary on the node root")
    runner = runner or nodebinary.run_argv
    before_note = ""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # two dumps at once
        today: concurrent.futures.Future[Dumped]
        if ahead is not None and ahead.matches(binary, effective, before_text or "", runner):
            today = ahead.result
        else:
            if ahead is not None:  # its scratch file has the name of the dump started here
                concurrent.futures.wait([ahead.result])
            today = pool.submit(
                _dump, fs, binary, before_text or "", near=effective, runner=runner, tag="now"
            )
        after, after_err, _f = _dump(fs, binary, after_text, near=effective, runner=runner, tag="next")
        before, err, _f = today.result()
    if before is None and err.startswith("cannot run"):
        return Verdict(False, True, f"skipped: {err}")
    if before is None:
        before_note = f" (today's config does not load either: {err})"
    err = after_err
    if after is None and err.startswith("cannot run"):
        return Verdict(False, True, f"skipped: {err}")
    if after is None:
        raise PreflightError(
            f"the node's containerd ({binary}) refuses the config {source} would give ({effective}): {err}",
            hint="nothing was written and containerd was not restarted; the file as it would be "
            "is shown by `kwasm-py node plan`" + before_note,
        )
    problems = compare(before, after, wanted=wanted, ours=ours)
    if problems:
        raise PreflightError(
            f"the node's containerd ({binary}) reads the config {source} would give "
            f"({effective}) differently: {'; '.join(problems)}",
            hint="nothing was written and containerd was not restarted; another file "
            "(an import or the template's base) decides these runtimes" + before_note,
        )
    runtimes, default = cri_view(after)
    listed = ", ".join(f"{h}={runtimes[h].get('runtime_type')}" for h in wanted)
    return Verdict(
        True, True, f"ok: {binary} on the node loads it: {listed}; default runtime {default}{before_note}"
    )


def _wanted(the_plan: plan.Plan) -> dict[str, str]:
    """The runtimes the plan adds: handler -> runtime_type (what the dump must show)."""
    return {e.handler: e.runtime_type for e in the_plan.entries}


def run(
    fs: HostFS,
    *,
    the_plan: plan.Plan,
    pid: int | None,
    containerd: ContainerdVersion | None,
    proc: ProcFS = HOST,
    ahead: Ahead | None = None,
) -> str:
    """Pre-flight for `the_plan` on the node at `fs`: the verdict line `node plan` prints.

    `pid` is a process of the node (None: not known), `containerd` the version the running
    containerd reported over CRI, `ahead` today's dump started by `dump_ahead` (or None).
    Raises PreflightError when containerd refuses or misreads.
    """
    lay = the_plan.layout
    if pid is not None and lay.name != "k0s":  # k0s's containerd reads k0s's own files
        require_read(fs, lay.rendered_path or lay.config_path, pid=pid, proc=proc)
    if not the_plan.config_changed:
        return "not needed: the config does not change"
    if lay.kind is ConfigKind.DROP_IN and lay.name == "k0s":
        return _run_k0s(fs, the_plan=the_plan, pid=pid, containerd=containerd, proc=proc, ahead=ahead)
    if lay.kind is ConfigKind.DROP_IN and lay.rendered_path is not None:
        return _run_dropin(fs, the_plan=the_plan, pid=pid, containerd=containerd, proc=proc, ahead=ahead)
    if the_plan.effective is None:
        if lay.kind is ConfigKind.TEMPLATE:
            return f"skipped: {lay.rendered_path} is not rendered yet, so the next render is unknown"
        return f"skipped: {lay.name} merges {lay.config_path} itself; not predicted here"
    reads = lay.rendered_path or lay.config_path
    binary, why = nodebinary.for_version(fs, pid=pid, config=reads, containerd=containerd, proc=proc)
    if binary is None:
        return f"skipped: {why}"
    verdict = check(
        fs,
        binary=binary,
        effective=reads,
        before_text=fs.read_text(reads),
        after_text=the_plan.effective,
        wanted=_wanted(the_plan),
        ours=frozenset([the_plan.companion["handler"]] if the_plan.companion else []),
        source=str(lay.config_path),
        ahead=ahead,
    )
    return verdict.message


def require_read(fs: HostFS, reads: PurePosixPath, *, pid: int, proc: ProcFS = HOST) -> None:
    """Raise PreflightError when containerd runs in the PID namespace of `pid` but none of its
    processes reads `reads` (their `--config`, symlinks followed on the node root): a runtime
    put there would never load, and a check of containerd could pass on another file's table.
    Nothing is raised when no containerd is found or a `--config` is relative (unknown)."""
    found = [cfg for cfg, _binary in nodebinary.running(fs, pid, proc)]
    if not found or any(not cfg.is_absolute() for cfg in found):
        return
    if reads in found:
        return
    with contextlib.suppress(KwasmError):
        target = fs.resolve(reads)
        if any(fs.resolve(cfg) == target for cfg in found):
            return
    names = ", ".join(sorted({str(cfg) for cfg in found}))
    raise PreflightError(
        f"containerd on this node reads {names}, not {reads}: a runtime added there would never load",
        hint=f"nothing was written; pass --config {found[0]}, the file containerd reads "
        "(or start containerd with --config pointing at the other file)",
    )


def _run_dropin(
    fs: HostFS,
    *,
    the_plan: plan.Plan,
    pid: int | None,
    containerd: ContainerdVersion | None,
    proc: ProcFS,
    ahead: Ahead | None,
) -> str:
    """Pre-flight of a drop-in install: the main config (with any `imports` entry we add) plus
    our drop-in as it would be, read by the node's containerd.

    The predicted drop-in is written to a scratch file beside the main config (not `*.toml`, so
    no import glob picks it up) and imported by the scratch copy of the main config; containerd
    2.x merges imports deeply, so that reads as the real file would. Raises PreflightError.
    """
    lay = the_plan.layout
    main = lay.rendered_path
    assert main is not None
    binary, why = nodebinary.for_version(fs, pid=pid, config=main, containerd=containerd, proc=proc)
    if binary is None:
        return f"skipped: {why}"
    today = fs.read_text(main)
    edit = the_plan.main_edit
    after_main = edit.new_text if edit is not None else (today or "")
    scratch = main.parent / f".kwasm-preflight-{os.getpid()}-dropin.tmp"
    host = fs.resolve(scratch)
    try:
        host.write_text(the_plan.new_text)
    except OSError as err:
        return f"skipped: cannot write {scratch} on the node root: {err}"
    try:
        verdict = check(
            fs,
            binary=binary,
            effective=main,
            before_text=today,
            after_text=dropin.add_import(after_main, str(scratch), source=str(main)),
            wanted=_wanted(the_plan),
            source=str(lay.config_path),
            ahead=ahead,
        )
    finally:
        host.unlink(missing_ok=True)
    return verdict.message


def _run_k0s(
    fs: HostFS,
    *,
    the_plan: plan.Plan,
    pid: int | None,
    containerd: ContainerdVersion | None,
    proc: ProcFS,
    ahead: Ahead | None,
) -> str:
    """Pre-flight of a k0s drop-in: k0s's next `/run/k0s/containerd-cri.toml` (today's with our
    drop-in merged, `dropin.k0s_render_after`), read by the node's containerd in its place.
    Skipped while k0s has not rendered it yet. Raises PreflightError."""
    cri_file = PurePosixPath(dropin.K0S_CRI)
    today = fs.read_text(cri_file)
    if today is None:
        return f"skipped: k0s has not written {cri_file} yet, so its merge is unknown"
    binary, why = nodebinary.for_version(fs, pid=pid, config=cri_file, containerd=containerd, proc=proc)
    if binary is None:
        return f"skipped: {why}"
    try:
        after = dropin.k0s_render_after(today, the_plan.new_text, source=str(the_plan.layout.config_path))
    except KwasmError as err:
        raise PreflightError(f"k0s cannot merge {the_plan.layout.config_path}: {err}") from err
    return check(
        fs,
        binary=binary,
        effective=cri_file,
        before_text=today,
        after_text=after,
        wanted=_wanted(the_plan),
        source=str(the_plan.layout.config_path),
        ahead=ahead,
    ).message
