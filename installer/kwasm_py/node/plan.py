"""What an install would change on a node: a pure function of what is there now.

Inputs are plain values gathered by the engine (file texts, hashes, the state file, the
containerd version); the output is a Plan the engine applies step by step and `node plan`
prints. No I/O here, so every branch is a unit test.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kwasm_py.containerd import config as cc
from kwasm_py.containerd import foreign
from kwasm_py.containerd import template as tmpl
from kwasm_py.containerd.redact import redact
from kwasm_py.errors import ConfigError, UsageError
from kwasm_py.model import (
    BIN_DIR_NAME,
    ConfigKind,
    ContainerdVersion,
    CriSchema,
    Layout,
    ShimSpec,
)
from kwasm_py.node.state import INSTALLED, RuntimeRecord, State

BASE_TEMPLATE = '{{ template "base" . }}\n'


@dataclass(frozen=True)
class BinaryStep:
    """One shim binary: where it goes, its sha256, and whether it has to be written."""

    shim: ShimSpec
    dest: PurePosixPath
    sha256: str
    write: bool  # the installed copy is missing or differs


@dataclass(frozen=True)
class MainEdit:
    """The `imports` entry a drop-in install adds to the main config (`--mode dropin`)."""

    path: PurePosixPath  # node path of the main config
    old_text: str | None  # None: the file does not exist
    new_text: str
    entry: str  # the glob added (recorded in the state file, removed on uninstall)

    @property
    def changed(self) -> bool:
        """Whether the main config's text changes."""
        return self.old_text != self.new_text


@dataclass(frozen=True)
class Plan:
    """What an install changes: the config text before and after, the binaries, the runtime
    entries, and what the state file records about them."""

    layout: Layout
    containerd: ContainerdVersion | None
    schema: CriSchema
    notes: tuple[str, ...]
    old_text: str | None
    new_text: str
    binaries: tuple[BinaryStep, ...]
    entries: tuple[cc.RuntimeEntry, ...]
    replaced: dict[str, str | None] = field(default_factory=dict)
    version_added: bool = False
    companion: dict[str, Any] | None = None  # a default runtime table added for containerd 1.x
    effective: str | None = None  # the text containerd will read after the change (None: unknown)
    preflight: str = ""  # the pre-flight verdict, for `node plan`
    main_edit: MainEdit | None = None  # drop-in installs: the imports entry added to the main config
    dropped: tuple[RuntimeRecord, ...] = ()  # our runtimes no longer asked for: tables and binaries go

    @property
    def config_changed(self) -> bool:
        """Whether a config text changes (so containerd has to read it again)."""
        return self.old_text != self.new_text or (self.main_edit is not None and self.main_edit.changed)

    @property
    def writes(self) -> tuple[BinaryStep, ...]:
        """The binaries that have to be written (missing or different on the node)."""
        return tuple(b for b in self.binaries if b.write)

    @property
    def changes(self) -> bool:
        """Whether anything on the node changes (config, binaries, or runtimes to drop)."""
        return self.config_changed or bool(self.writes) or bool(self.dropped)

    def diff(self) -> str:
        """The config change as a unified diff ("" when unchanged; /dev/null for a new file),
        credential values redacted (`containerd.redact`): it is printed and logged."""
        path = str(self.layout.config_path)
        old = redact(self.old_text or "").splitlines(keepends=True)
        new = redact(self.new_text).splitlines(keepends=True)
        fromfile = path if self.old_text is not None else "/dev/null"
        out = "".join(difflib.unified_diff(old, new, fromfile=fromfile, tofile=path))
        edit = self.main_edit
        if edit is not None and edit.changed:
            main = str(edit.path)
            out += "".join(
                difflib.unified_diff(
                    redact(edit.old_text or "").splitlines(keepends=True),
                    redact(edit.new_text).splitlines(keepends=True),
                    fromfile=main if edit.old_text is not None else "/dev/null",
                    tofile=main,
                )
            )
        return out


_SHIM_BINARY = re.compile(r"containerd-shim-(?P<name>[A-Za-z0-9_][A-Za-z0-9_-]*?)-(?P<version>v[0-9]+)")


def parse_shim_binary(binary: str) -> tuple[str, str]:
    """`.../containerd-shim-spin-v2` -> ("spin", "v2"); `containerd-shim-wasmtime-v1` -> ("wasmtime", "v1").

    containerd maps runtime_type `io.containerd.NAME.vN` to the binary `containerd-shim-NAME-vN`
    (source: containerd runtime/v2/shim BinaryName, 1.6 and 2.x); the -vN is the shim's own
    version, not containerd's task API (runwasi's -v1 shims speak the v2 shim API). kwasm-py
    writes the installed binary's absolute path as runtime_type, which both generations exec
    as is. Raises UsageError for any other file name.
    """
    base = PurePosixPath(binary).name
    found = _SHIM_BINARY.fullmatch(base)
    if found is None:
        raise UsageError(
            f"shim {binary!r} is not named containerd-shim-NAME-vN",
            hint="containerd knows shims by that name (runtime_type io.containerd.NAME.vN): "
            "rename the file, e.g. containerd-shim-spin-v2",
        )
    return found["name"], found["version"]


#: Layouts whose distribution scans /opt/kwasm/bin for shims and renders a runtime of its own for
#: each one it finds (k3s since k3s-io/k3s#8751, also rke2): our binaries go elsewhere there, or
#: the next render would define our handler twice (field case 01, spinframework/containerd-shim-spin#227).
SCANNED_BIN_LAYOUTS = frozenset({"k3s", "k3d", "rke2"})
RANCHER_SHIM_DIR = "shims"


def shim_dir(layout: Layout, install_dir: PurePosixPath) -> PurePosixPath:
    """Node directory our shim binaries go to: `<install-dir>/bin`, or `<install-dir>/shims` on
    k3s/rke2 (which would pick binaries in /opt/kwasm/bin up and render its own runtime)."""
    name = RANCHER_SHIM_DIR if layout.name in SCANNED_BIN_LAYOUTS else BIN_DIR_NAME
    return install_dir / name


def shim_name(binary: str) -> str:
    """`containerd-shim-spin-v2` -> `spin` (see parse_shim_binary; raises UsageError)."""
    return parse_shim_binary(binary)[0]


def refuse_raw_template(layout: Layout, text: str | None) -> None:
    """Raise ConfigError when `text`, the file a CONFIG layout's containerd reads as it is, is a
    raw template of another tool (`containerd.foreign`: AgentBaker, nodeadm, Bottlerocket, ...),
    naming its language, the tool and that tool's route to a changed config. Nothing for other
    layouts (k3s/rke2 render Go templates themselves) or a missing file."""
    if layout.kind is not ConfigKind.CONFIG or text is None:
        return
    raw = foreign.recognise(text)
    if raw is None:
        return
    of = f" of {raw.tool}" if raw.tool else ""
    raise ConfigError(
        f"{layout.config_path} is a raw {raw.language} template{of}, not TOML, so containerd "
        f"cannot load it (line {raw.line}: {raw.action})",
        hint=raw.route,
    )


def make_plan(
    *,
    layout: Layout,
    own_text: str | None,
    reference_text: str | None,
    containerd: ContainerdVersion | None,
    shims: list[tuple[ShimSpec, str]],
    installed: dict[PurePosixPath, str | None],
    install_dir: PurePosixPath,
    state: State | None,
    force: bool = False,
    base_digests: dict[str, str | None] | None = None,
    effective: dict[str, Any] | None = None,
) -> Plan:
    """Decide the binaries to write and the config text to have, from what is there now.

    `shims` pairs each shim with its sha256; `installed` maps destination paths to the sha256
    of what is there (None when absent); `base_digests` maps the node paths that a template's
    base render runs for our handlers to their sha256 (a runtime k3s found running the very
    shim we install is adopted, not duplicated). `effective` is what containerd loads in all
    (the read file merged with its imports, see containerd/effective.py); when given, the runc
    cgroup driver and the default runtime are read from it. Returns the Plan; raises
    UsageError for two shims on one handler, ConfigError / ConflictError for a config it
    refuses (see `containerd.config` and `containerd.template`; `refuse_raw_template` for a
    raw template of another tool where containerd's config should be).
    """
    refuse_raw_template(layout, own_text)
    source = str(layout.config_path)
    own_state = state if state is not None and state.config.path == source else None
    base_text = own_text
    version_line: int | None = None
    if own_text is None:
        if layout.kind is ConfigKind.TEMPLATE and layout.name in ("k3s", "k3d", "rke2"):
            base_text = BASE_TEMPLATE  # never freeze a copy of the rendered file
        else:
            base_text = ""
    assert base_text is not None
    doc = cc.load(base_text, source=source)
    reference = None
    if reference_text is not None and layout.kind is not ConfigKind.CONFIG:
        rendered = str(layout.rendered_path)
        reference = cc.load(reference_text, source=rendered).data
    if doc.prelude and reference is None and tmpl.kind(doc.prelude) is tmpl.TemplateKind.GO:
        raise ConfigError(
            f"{source} is a Go template, and {layout.rendered_path or 'its render'} does not exist "
            "yet, so what containerd will read cannot be predicted",
            hint=f"start {layout.name} once so it renders the template, then run kwasm-py again",
        )
    values: dict[str, str] = {}
    if layout.name == "microk8s":  # ${RUNTIME} & co: decide on what the snap will substitute
        values, resolved = tmpl.resolve_placeholders(doc.data, reference)
        reference = tmpl.substitute(reference if reference is not None else doc.data, values)
        notes_pre: tuple[str, ...] = resolved
    else:
        notes_pre = ()
    choice = cc.choose_schema(doc.data, reference=reference, containerd=containerd, source=source)
    notes = list(notes_pre) + list(choice.notes)
    if not doc.data and not doc.prelude:
        if layout.kind is ConfigKind.DROP_IN and reference is not None:
            version_line = cc.config_version(reference)
        elif containerd is not None:
            version_line = 3 if containerd.major >= 2 else 2
            notes.append(f"writing `version = {version_line}` for containerd {containerd}")
        elif layout.kind is ConfigKind.CONFIG:
            raise ConfigError(
                f"{source} has no settings and containerd's version is unknown, so its schema "
                "cannot be chosen",
                hint="start containerd (kwasm-py asks it over CRI), or write `version = 2` "
                "(containerd 1.x) or `version = 3` (2.x) into the file",
            )
    reference_data = reference if reference is not None else doc.data
    if effective is not None:
        reference_data = effective
    systemd = cc.runc_systemd_cgroup(reference_data, choice.schema) or cc.runc_systemd_cgroup(
        doc.data, choice.schema
    )
    bin_dir = shim_dir(layout, install_dir)
    steps: list[BinaryStep] = []
    entries: list[cc.RuntimeEntry] = []
    handlers: set[str] = set()
    for shim, digest in shims:
        if shim.handler in handlers:
            raise UsageError(f"two shims want handler {shim.handler!r}; pass --handler per shim")
        handlers.add(shim.handler)
        dest = bin_dir / shim.binary_name
        steps.append(BinaryStep(shim, dest, digest, write=installed.get(dest) != digest))
        entries.append(cc.RuntimeEntry(shim.handler, str(dest), systemd_cgroup=systemd))
    adopted: dict[str, dict[str, Any]] = {}
    if reference_text is not None and layout.kind is ConfigKind.TEMPLATE and doc.prelude:
        adopted = tmpl.check_base(
            doc.text,
            reference_text,
            [e.handler for e in entries],
            runtimes_path=choice.schema.runtimes_path(),
            ours_prefix=str(bin_dir),
            source=source,
            rendered_source=str(layout.rendered_path),
            wanted={shim.handler: digest for shim, digest in shims},
            digests=base_digests,
        )
        for handler, table in adopted.items():
            notes.append(
                f"runtime {handler} is already in the base render and runs this very shim "
                f"({table.get('runtime_type')}): adopting it, adding no table"
            )
        entries = [
            cc.RuntimeEntry(e.handler, str(adopted[e.handler].get("runtime_type")))
            if e.handler in adopted
            else e
            for e in entries
        ]
    text = doc.text
    replaced: dict[str, str | None] = {}
    version_added = bool(own_state and own_state.config.version_added)
    companion = own_state.companion if own_state else None
    if companion and cc.find_runtime(doc.data, choice.schema, companion["handler"]) != companion["table"]:
        companion = None  # no longer ours as we wrote it
    if companion is None:
        extra = cc.default_runtime_companion(doc.data, reference_data, choice.schema, containerd)
        if extra is not None:
            edit = cc.add_runtime(doc, extra, schema=choice.schema, version_line=version_line, source=source)
            text, version_added = edit.text, version_added or edit.version_added
            version_line = None
            companion = {"handler": extra.handler, "table": extra.as_table()}
            notes.append(
                f"also adding runtime {extra.handler}: containerd {containerd or '1.x'} would otherwise "
                "lose its default runtime"
            )
    for entry in entries:
        if entry.handler in adopted:
            continue
        current = cc.load(text, source=source)
        record = own_state.runtime(entry.handler) if own_state else None
        edit = cc.add_runtime(
            current,
            entry,
            schema=choice.schema,
            owned=record.table if record else None,
            force=force,
            version_line=version_line,
            source=source,
        )
        text = edit.text
        version_added = version_added or edit.version_added
        replaced[entry.handler] = edit.replaced if edit.changed else (record.replaced if record else None)
        if edit.replaced is None and record is not None and edit.changed:
            replaced[entry.handler] = record.replaced
    if own_text is None and text == base_text:
        text = base_text
    if state is not None and state.status != INSTALLED:
        notes.append("a previous run was interrupted: finishing it")
    after = _effective(layout, cc.load(text, source=source), reference_text, values)
    return Plan(
        layout=layout,
        containerd=containerd,
        schema=choice.schema,
        notes=tuple(notes),
        old_text=own_text,
        new_text=text,
        binaries=tuple(steps),
        entries=tuple(entries),
        replaced=replaced,
        version_added=version_added,
        companion=companion,
        effective=after,
    )


def _effective(layout: Layout, doc: cc.ConfigDoc, rendered: str | None, values: dict[str, str]) -> str | None:
    """The config containerd reads once `doc` is in place (a template's predicted render)."""
    if layout.kind is ConfigKind.CONFIG:
        return doc.text
    if layout.kind is not ConfigKind.TEMPLATE:
        return None  # drop-ins are merged by their distribution
    if layout.name == "microk8s":
        return tmpl.substitute_text(doc.text, values)
    if not doc.prelude:
        return doc.text  # a frozen render: rendered verbatim
    if rendered is None:
        return None
    return tmpl.predict_render(doc.text, rendered)[0]
