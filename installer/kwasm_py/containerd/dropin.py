"""Drop-in installs: where our own file goes, and whether containerd merges it (pure).

containerd 2.x merges every imported file deeply into the main config, so a file holding only
our runtime tables adds them and changes nothing else. containerd 1.x replaces a plugin's whole
table with the imported file's table for that plugin, so the same file would wipe the main
config's CRI settings: there we edit the main config instead. Facts:

- containerd 2.x ``imports`` merge: containerd ``cmd/containerd/server/config`` (``mergeConfig``
  uses mergo with ``WithOverride`` + ``WithAppendSlice``); 1.x merges per plugin table
  (``config.go``: ``for k, v := range src.Plugins { dst.Plugins[k] = v }``). Both are checked
  against the real binaries in ``tests/test_dropin_real.py``.
- k3s/rke2 render ``imports = [".../config.toml.d/*.toml"]`` (v2) or ``config-v3.toml.d``
  (v3) into their base config since k3s-io/k3s#13680 (2026); k0s merges
  ``/etc/k0s/containerd.d/*.toml`` itself (a ``DROP_IN`` layout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import tomlkit

from kwasm_py.containerd import config as cc
from kwasm_py.containerd import effective
from kwasm_py.errors import ConfigError, UsageError
from kwasm_py.model import ConfigKind, ContainerdVersion, InstallMode, Layout

DROPIN_NAME = "kwasm-py.toml"
DEFAULT_DROPIN_DIR = "conf.d"  # containerd 2.2's default: /etc/containerd/conf.d/*.toml
_DIR_GLOB = re.compile(r"^(?P<dir>.+)/\*\.toml$")


Mode = InstallMode  # the name used here


@dataclass(frozen=True)
class ModeChoice:
    """The resolved mode and, for drop-ins, the file and any ``imports`` entry to add.

    ``layout`` is the layout the engine works on: the detected one for edits, a ``DROP_IN``
    layout whose ``config_path`` is our file and ``rendered_path`` the main config otherwise.
    ``add_import`` is the glob to append to the main config's ``imports`` (``dropin`` mode on a
    config that imports no directory), else None. ``reason`` says why, in words, for ``plan``.
    """

    mode: Mode
    layout: Layout
    reason: str
    add_import: str | None = None


def import_dirs(data: dict[str, Any], main: PurePosixPath) -> list[tuple[str, PurePosixPath]]:
    """The directories a config imports whole: ``[(entry, dir)]`` for entries ``DIR/*.toml``.

    Takes the parsed main config and its node path (relative entries resolve against its
    directory, as containerd resolves them). Other entries (single files, other globs) are
    left out: we never guess which file name such a glob would accept. Raises ConfigError when
    ``imports`` is not a list of strings.
    """
    entries = data.get("imports", [])
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"{main}: `imports` must be a list of file paths")
    out: list[tuple[str, PurePosixPath]] = []
    for entry in entries:
        match = _DIR_GLOB.match(entry)
        if match is None or any(c in match["dir"] for c in "*?["):
            continue
        folder = PurePosixPath(match["dir"])
        out.append((entry, folder if folder.is_absolute() else main.parent / folder))
    return out


def merges_deeply(containerd: ContainerdVersion | None, data: dict[str, Any]) -> bool | None:
    """Whether this containerd merges imported files deeply: 2.x yes, 1.x no, None unknown.

    Without a running containerd to ask, a ``version = 3``/``4`` main config can only be read
    by 2.x, so it answers yes; a version 2 file may be read by either.
    """
    if containerd is not None:
        return containerd.major >= 2
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version >= 3:
        return True
    return None


def choose(
    requested: Mode,
    *,
    layout: Layout,
    main_data: dict[str, Any],
    containerd: ContainerdVersion | None,
) -> ModeChoice:
    """Resolve ``--mode`` for a node: edit the main config, or write a drop-in of our own.

    Takes the requested mode, the detected layout, the parsed main config as containerd reads
    it (for templates: the rendered file) and the node's containerd version (None: unknown).
    ``auto`` picks a drop-in only when containerd already reads a directory of the main config
    and merges it deeply; ``dropin`` may add an ``imports`` entry to a plain main config.
    Returns the choice; raises UsageError when ``dropin`` cannot work on this node (containerd
    1.x, a template layout without a drop-in directory) or ``edit`` is asked of k0s.
    """
    if layout.kind is ConfigKind.DROP_IN:
        if requested is Mode.EDIT:
            raise UsageError(
                f"{layout.name} regenerates its containerd config and merges drop-ins itself",
                hint="use --mode auto or dropin on this node",
            )
        return ModeChoice(Mode.DROPIN, layout, f"{layout.name} merges its drop-in directory itself")
    if requested is Mode.EDIT:
        return ModeChoice(Mode.EDIT, layout, "--mode edit")
    main = layout.rendered_path if layout.kind is ConfigKind.TEMPLATE else layout.config_path
    assert main is not None
    deep = merges_deeply(containerd, main_data)
    if deep is not True:
        why = (
            f"containerd {containerd} replaces a plugin's whole table with an imported file's, "
            "so a drop-in holding only our runtime would drop the main config's CRI settings"
            if deep is False
            else "containerd's version is unknown, so whether it merges imports deeply is too"
        )
        if requested is Mode.DROPIN:
            raise UsageError(f"--mode dropin: {why}", hint="use --mode auto or edit on this node")
        return ModeChoice(Mode.EDIT, layout, f"editing {layout.config_path}: {why}")
    dirs = import_dirs(main_data, main)
    if dirs:
        entry, folder = dirs[0]
        return ModeChoice(
            Mode.DROPIN,
            _dropin_layout(layout, folder / DROPIN_NAME, main),
            f"{main} imports {entry} and containerd {containerd or '2.x'} merges it deeply",
        )
    if requested is Mode.AUTO:
        return ModeChoice(Mode.EDIT, layout, f"editing {layout.config_path}: {main} imports no directory")
    if layout.kind is ConfigKind.TEMPLATE:
        raise UsageError(
            f"--mode dropin: {main} (rendered from {layout.config_path}) imports no directory",
            hint="use --mode edit, or a distribution version whose base config imports a drop-in directory",
        )
    folder = main.parent / DEFAULT_DROPIN_DIR
    entry = f"{folder}/*.toml"
    return ModeChoice(
        Mode.DROPIN,
        _dropin_layout(layout, folder / DROPIN_NAME, main),
        f'--mode dropin: adding `imports = ["{entry}"]` to {main}',
        add_import=entry,
    )


def _dropin_layout(layout: Layout, path: PurePosixPath, main: PurePosixPath) -> Layout:
    return Layout(
        name=layout.name,
        config_path=path,
        kind=ConfigKind.DROP_IN,
        restart=layout.restart,
        socket=layout.socket,
        rendered_path=main,
        evidence=(*layout.evidence, f"writing drop-in {path} (imported by {main})"),
    )


_TABLE_HEADER = re.compile(r"^\s*\[")
_VERSION_LINE = re.compile(r"^\s*version\s*=")
_IMPORTS_LINE = re.compile(r"^(?P<head>\s*imports\s*=\s*\[)(?P<items>[^\]\n]*)(?P<tail>\]\s*(#.*)?)$")


def add_import(text: str, entry: str, *, source: str) -> str:
    """The main config's text with ``entry`` appended to its top-level ``imports``.

    Takes the file's text (TOML), the glob and the file's name for errors. A file without
    ``imports`` gets one line ``imports = ["ENTRY"]`` after its ``version`` line (or before its
    first table); a one-line ``imports = [...]`` gets the entry appended; every other byte
    stays. Returns the new text (unchanged when the entry is there). Raises ConfigError when the
    edit would not mean exactly "the same config plus this import" (a multi-line array, say).
    """
    import tomllib

    data = tomllib.loads(text)
    current = data.get("imports", [])
    if entry in current:
        return text
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    out: list[str] | None = None
    if "imports" in data:
        for i, line in enumerate(lines):
            m = _IMPORTS_LINE.match(line.rstrip("\r\n"))
            if m and _before_first_table(lines, i):
                items = m["items"].rstrip()
                sep = ", " if items.strip() and not items.endswith(",") else (" " if items.strip() else "")
                body = f'{m["head"]}{items}{sep}"{entry}"{m["tail"]}'
                out = [*lines[:i], body + line[len(line.rstrip("\r\n")) :], *lines[i + 1 :]]
                break
    else:
        at = 0
        for i, line in enumerate(lines):
            if _TABLE_HEADER.match(line):
                break
            if _VERSION_LINE.match(line):
                at = i + 1
                break
        else:
            at = len(lines)
        if at == len(lines) and lines and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += newline
        out = [*lines[:at], f'imports = ["{entry}"]{newline}', *lines[at:]]
    new = "".join(out) if out is not None else None
    expected = {**data, "imports": [*current, entry]}
    if new is None or _loads(new) != expected:
        raise ConfigError(
            f"{source}: cannot add {entry!r} to its `imports` without changing anything else",
            hint=f'add `"{entry}"` to `imports` yourself, or use --mode edit',
        )
    return new


def remove_import(text: str, entry: str, *, source: str) -> str:
    """The inverse of :func:`add_import`: the text without ``entry`` in ``imports``.

    Removes the whole ``imports`` line when ``entry`` was its only item (as :func:`add_import`
    wrote it), else just that item. Returns the text unchanged when the entry is absent.
    Raises ConfigError when the result would differ in any other way.
    """
    import tomllib

    data = tomllib.loads(text)
    current = data.get("imports", [])
    if entry not in current:
        return text
    lines = text.splitlines(keepends=True)
    new: str | None = None
    for i, line in enumerate(lines):
        m = _IMPORTS_LINE.match(line.rstrip("\r\n"))
        if not m:
            continue
        items = [x.strip() for x in m["items"].split(",") if x.strip()]
        quoted = [x for x in items if x.strip("\"'") == entry]
        if not quoted:
            continue
        rest = [x for x in items if x not in quoted]
        if not rest and line.rstrip("\r\n") == f'imports = ["{entry}"]':
            new = "".join([*lines[:i], *lines[i + 1 :]])  # the line add_import wrote
        else:
            body = f"{m['head']}{', '.join(rest)}{m['tail']}"
            new = "".join([*lines[:i], body + line[len(line.rstrip("\r\n")) :], *lines[i + 1 :]])
        break
    remaining = [e for e in current if e != entry]
    rest_of = {k: v for k, v in data.items() if k != "imports"}
    got = _loads(new) if new is not None else None
    if (
        new is None
        or got is None
        or got.get("imports", []) != remaining
        or {k: v for k, v in got.items() if k != "imports"} != rest_of
    ):
        raise ConfigError(
            f"{source}: cannot remove {entry!r} from its `imports` without changing anything else",
            hint=f'remove `"{entry}"` from `imports` yourself',
        )
    return new


def _before_first_table(lines: list[str], index: int) -> bool:
    return not any(_TABLE_HEADER.match(line) for line in lines[:index])


def _loads(text: str) -> dict[str, Any] | None:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


#: Where k0s (<= 1.35) writes its CRI config, merged from its defaults and the CRI drop-ins.
K0S_CRI = "/run/k0s/containerd-cri.toml"


def k0s_render_after(current: str, ours: str, *, source: str) -> str:
    """Takes k0s's current `/run/k0s/containerd-cri.toml` and our drop-in's text; returns that
    file as k0s will write it with our drop-in merged in.

    k0s v1.35.7 (k0sproject/k0s 175316edce42c2d7323d1c0835a40e90559689a3,
    `pkg/component/worker/containerd/configurer.go` `handleImports`) merges every
    `/etc/k0s/containerd.d/*.toml` with a `plugins."io.containerd.grpc.v1.cri"` table into
    its default CRI config, deeply, in glob order, and writes the result there; the main
    `/etc/k0s/containerd.toml` only imports it. Merging ours onto today's render is that, as
    long as no CRI drop-in sorting after ours sets the same keys. Raises ConfigParseError.
    """
    base = cc.load(current, source=K0S_CRI).data
    patch = cc.load(ours, source=source).data
    merged = effective.merge([base, {k: v for k, v in patch.items() if k != "version"}], major=2)
    return tomlkit.dumps(merged)
