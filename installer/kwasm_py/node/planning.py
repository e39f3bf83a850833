"""The install plan as the engine makes it: the shims' digests, the mode (edit or drop-in), the
files read from the node and the pre-flight verdict; `plan_only` is `node plan`. Writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath

from kwasm_py.containerd import config as cc
from kwasm_py.containerd import dropin, effective, template
from kwasm_py.errors import (
    ChecksumError,
    KwasmError,
    UsageError,
)
from kwasm_py.model import (
    ConfigKind,
    CriSchema,
    InstallMode,
    ShimSpec,
)
from kwasm_py.node import cri, ownership, plan, preflight, sources
from kwasm_py.node import state as st
from kwasm_py.node.context import Node, NodeOptions, fingerprint, open_node
from kwasm_py.node.hostfs import file_sha256
from kwasm_py.node.procfs import ProcFS


def _shim_digests(opts: NodeOptions, state: st.State | None = None) -> list[tuple[ShimSpec, str]]:
    """Each shim with its sha256; a source whose fingerprint the state file recorded is not
    hashed again (a no-op re-run with a 50 MB shim would otherwise spend ~0.1 s on it)."""
    out = []
    for shim in opts.shims:
        path = Path(shim.source)
        if not path.is_file():
            raise UsageError(f"shim {path} does not exist or is not a file")
        if not os.access(path, os.X_OK):
            raise UsageError(f"shim {path} is not executable", hint=f"chmod +x {path}")
        record = state.runtime(shim.handler) if state is not None else None
        known = record is not None and record.source == str(path) and record.source_stat is not None
        if known and record is not None and record.source_stat == fingerprint(path):
            digest: str | None = record.sha256
        else:
            digest = file_sha256(path)
        assert digest is not None
        if shim.sha256 and shim.sha256.lower() != digest:
            raise ChecksumError(
                f"shim {path} has sha256 {digest}, expected {shim.sha256.lower()}",
                hint="the file is not the release you meant; fetch it again",
            )
        out.append((shim, digest))
    return out


def choose_mode(node: Node) -> dropin.ModeChoice:
    """Resolve `--mode` for this node and point `node.layout` at the file to write.

    A node kwasm-py already installed on keeps the file its state names (auto), or is refused
    a different explicit mode with a hint (move it with uninstall + install). Otherwise the
    main config as containerd reads it (a template's render) and the containerd version decide,
    see `containerd.dropin.choose`. Returns the choice (also kept in `node.mode`); raises
    UsageError where the asked mode cannot work on this node, and ConfigError when the main
    config is a raw template of another tool (`plan.refuse_raw_template`).
    """
    if node.mode is not None:
        return node.mode
    lay, requested = node.layout, node.opts.mode
    if node.state is not None:
        kept = InstallMode.DROPIN if lay.kind is ConfigKind.DROP_IN else InstallMode.EDIT
        if requested not in (InstallMode.AUTO, kept) and lay.name != "k0s":
            raise UsageError(
                f"kwasm-py installed into {lay.config_path} ({kept.value}); --mode {requested.value} "
                "would move the runtime",
                hint=f"`kwasm-py node install --mode {requested.value}` moves it (one restart)",
            )
        node.mode = dropin.ModeChoice(kept, lay, f"{kept.value}: kwasm-py installed into {lay.config_path}")
        return node.mode
    main = lay.rendered_path if lay.kind is not ConfigKind.CONFIG else lay.config_path
    text = node.fs.read_text(main) if main is not None else None
    plan.refuse_raw_template(lay, text)  # before any mode is weighed: no mode can edit it
    try:
        data = cc.load(text, source=str(main)).data if text else {}
    except KwasmError:
        data = {}  # the plan reports what is wrong with the file itself
    node.mode = dropin.choose(requested, layout=lay, main_data=data, containerd=node.containerd_version())
    node.layout = node.mode.layout
    return node.mode


def _main_edit(node: Node, choice: dropin.ModeChoice) -> plan.MainEdit | None:
    """The `imports` entry `--mode dropin` adds to the main config (None: nothing to add)."""
    entry = choice.add_import
    if entry is None:
        if node.state is not None and node.state.config.imports_added and node.state.config.main:
            kept = PurePosixPath(node.state.config.main)  # still ours: keep recording it
            text = node.fs.read_text(kept) or ""
            return plan.MainEdit(kept, text, text, node.state.config.imports_added)
        return None
    main = choice.layout.rendered_path
    assert main is not None
    old = node.fs.read_text(main)
    new = dropin.add_import(old or "", entry, source=str(main))
    return plan.MainEdit(main, old, new, entry)


def make_plan(node: Node, shims: list[tuple[ShimSpec, str]]) -> plan.Plan:
    """The install plan for `node` and the shims with their sha256 (see `plan.make_plan`).

    Reads the config, the rendered file, imported files and the installed binaries, asks
    containerd its version; raises what `plan.make_plan` raises, and ConflictError for a runtime
    of the same handler in an imported file. Writes nothing.
    """
    choice = choose_mode(node)
    main_edit = _main_edit(node, choice)
    fs, lay = node.fs, node.layout
    own = fs.read_text(lay.config_path)
    reference = fs.read_text(lay.rendered_path) if lay.rendered_path is not None else None
    if main_edit is not None:
        reference = main_edit.new_text  # what containerd reads once our imports entry is in
    eff = sources.effective_config(node.fs, lay, own, reference, containerd=node.containerd_version())
    bin_dir = plan.shim_dir(lay, node.install_dir)
    ours = {s.handler: str(bin_dir / s.binary_name) for s, _ in shims}
    # A template's render and k0s's generated CRI file carry a copy of our table.
    merged = None if lay.kind is ConfigKind.CONFIG else ours
    if eff is not None and lay.kind is not ConfigKind.TEMPLATE:
        effective.check_handlers(eff, list(ours), edited=str(lay.config_path), merged_ours=merged)
    containerd = node.containerd_version()
    if containerd is None and node.state is not None and node.state.containerd:
        containerd = cri.parse_version(node.state.containerd)
    installed = {bin_dir / s.binary_name: fs.sha256(bin_dir / s.binary_name) for s, _ in shims}
    base_digests = None
    if reference is not None and lay.kind is ConfigKind.TEMPLATE:
        found = template.base_binaries(
            reference, [s.handler for s, _ in shims], [c.runtimes_path() for c in CriSchema]
        )
        base_digests = {p: fs.sha256(PurePosixPath(p)) for p in found}
    the_plan = plan.make_plan(
        base_digests=base_digests,
        layout=lay,
        own_text=own,
        reference_text=reference,
        containerd=containerd,
        shims=shims,
        installed=installed,
        install_dir=node.install_dir,
        state=ownership.rebase(node.state, str(lay.config_path), fs.sha256(lay.config_path)),
        force=node.opts.force,
        effective=sources.decision_data(eff, lay),
    )
    text, dropped, notes = ownership.drop_unrequested(
        the_plan.new_text,
        node.state,
        path=str(lay.config_path),
        handlers={s.handler for s, _ in shims},
        install_dir=node.install_dir,
    )
    the_plan = replace(
        the_plan,
        new_text=text,
        dropped=dropped,
        notes=(f"mode {choice.mode.value}: {choice.reason}", *the_plan.notes, *notes),
        main_edit=main_edit,
    )
    if eff is None:
        return the_plan
    if lay.kind is ConfigKind.TEMPLATE:  # after the plan: its base-render check names the cause
        # a base-render runtime the plan adopted (it runs the very shim asked for) is no conflict
        added = [e.handler for e in the_plan.entries if e.runtime_type == ours.get(e.handler)]
        effective.check_handlers(eff, added, edited=str(lay.config_path), merged_ours=merged)
    if lay.kind is not ConfigKind.DROP_IN:  # k0s merges its drop-ins itself
        effective.check_takes_effect(eff, the_plan.schema, edited=str(eff.main))
    if not eff.imports:
        return the_plan
    loads = "containerd loads " + ", ".join(s.path for s in eff.sources)
    return replace(the_plan, notes=(*the_plan.notes, loads, eff.describe(the_plan.schema.plugin_id)))


@contextmanager
def _preflight_ahead(node: Node) -> Iterator[preflight.Ahead | None]:
    """Pre-flight's dump of today's config, started now (`preflight.dump_ahead`) to run while
    the plan is made; joined when the block ends."""
    pid = node.opts.pid if node.pid_ok else None
    with preflight.dump_ahead(node.fs, node.layout, pid=pid, proc=node.proc) as ahead:
        yield ahead


def _preflight(node: Node, the_plan: plan.Plan, ahead: preflight.Ahead | None = None) -> str:
    """The node's own containerd on what it would load (raises PreflightError); `ahead`: from
    `_preflight_ahead`."""
    pid = node.opts.pid if node.pid_ok else None
    return preflight.run(
        node.fs, the_plan=the_plan, pid=pid, containerd=node.containerd_version(), proc=node.proc, ahead=ahead
    )


def plan_only(
    opts: NodeOptions, *, cri_client: cri.CriClient | None = None, proc: ProcFS | None = None
) -> tuple[Node, plan.Plan]:
    """What `install` would do, changing nothing: the Node and the install Plan.

    Raises UsageError without --shim or for a bad shim, ChecksumError for a wrong --sha256, and
    what `open_node` and `make_plan` raise.
    """
    node = open_node(opts, cri_client=cri_client, proc=proc)
    if not opts.shims:
        raise UsageError("no --shim given")
    shims = _shim_digests(opts)
    with _preflight_ahead(node) as ahead:
        the_plan = make_plan(node, shims)
        try:
            verdict = _preflight(node, the_plan, ahead)
        except preflight.PreflightError as err:
            return node, replace(the_plan, preflight=f"REFUSED: {err.message}")
    return node, replace(the_plan, preflight=verdict)
