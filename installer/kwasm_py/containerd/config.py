"""Editing containerd configs: pure functions from text to text.

Decisions are made on the parsed document (tomllib for meaning, ``tomlscan`` for positions,
tomlkit for inline tables), never by searching for substrings. An added runtime is one
self-contained block of fully qualified table headers inserted after the runtimes the file
already has, so every other byte stays where it was, and removing it gives the original back.
Every edit is checked afterwards: the new document must mean exactly the old one plus (or
minus) our runtime, or the edit is refused.
"""

from __future__ import annotations

import copy
import json
import tomllib
from dataclasses import dataclass, field
from typing import Any

from kwasm_py.containerd import template, tomlscan
from kwasm_py.errors import ConfigError, ConflictError, VersionMismatch
from kwasm_py.model import ContainerdVersion, CriSchema

MARKER_COMMENT = "# added by kwasm-py; `kwasm-py node uninstall` removes this runtime"
CRI_PLUGIN_NAMES = frozenset({"cri", CriSchema.V2.value, CriSchema.V3.value})


@dataclass(frozen=True)
class RuntimeEntry:
    """What we put into containerd's config for one handler."""

    handler: str
    runtime_type: str
    systemd_cgroup: bool = False

    def as_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {"runtime_type": self.runtime_type}
        if self.systemd_cgroup:
            table["options"] = {"SystemdCgroup": True}
        return table


@dataclass(frozen=True)
class ConfigDoc:
    """A containerd config (or template) split into a template prelude and its TOML body."""

    text: str
    prelude: str  # leading Go-template lines such as {{ template "base" . }}
    body: str
    data: dict[str, Any]

    @property
    def newline(self) -> str:
        return "\r\n" if "\r\n" in self.text else "\n"


@dataclass(frozen=True)
class SchemaChoice:
    schema: CriSchema
    version: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Edit:
    """The result of adding or removing a runtime."""

    text: str
    changed: bool
    schema: CriSchema
    notes: tuple[str, ...] = ()
    replaced: str | None = None  # the foreign table text that --force took over
    version_added: bool = False  # we wrote the `version` line of a config that had none
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Parsing


def split_prelude(text: str) -> tuple[str, str]:
    """Separate a template's text up to its last Go action from the TOML after it."""
    return template.split(text)


def load(text: str, *, source: str) -> ConfigDoc:
    """Parse a config or template; raise ConfigError naming `source` when it is not TOML."""
    if text.startswith("\ufeff"):
        raise ConfigError(f"{source} starts with a byte-order mark; containerd cannot read it")
    prelude, body = split_prelude(text)
    try:
        data = tomllib.loads(body)
    except tomllib.TOMLDecodeError as err:
        hint = "fix the file (containerd would refuse it too), or point --config at another file"
        if prelude:
            hint = "the text after the template's last {{ ... }} action is not TOML; fix it there"
        raise ConfigError(f"{source} is not valid TOML: {err}", hint=hint) from err
    return ConfigDoc(text=text, prelude=prelude, body=body, data=data)


def config_version(data: dict[str, Any], *, source: str = "config") -> int:
    """The schema version a config declares (1 when absent)."""
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"{source}: `version = {version!r}` is not an integer")
    if version not in (1, 2, 3, 4):
        raise ConfigError(
            f"{source}: unknown containerd config `version = {version}`",
            hint="kwasm-py knows versions 1 to 4 (containerd 1.x writes 2, 2.x writes 3, 2.3+ 4)",
        )
    return version


def lookup(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def plugins_present(data: dict[str, Any]) -> set[CriSchema]:
    plugins = data.get("plugins")
    if not isinstance(plugins, dict):
        return set()
    return {schema for schema in CriSchema if schema.value in plugins}


def has_runtimes(data: dict[str, Any], schema: CriSchema) -> bool:
    return isinstance(lookup(data, schema.runtimes_path()), dict)


def max_config_version(containerd: ContainerdVersion) -> int:
    if containerd.major < 2:
        return 2
    if (containerd.major, containerd.minor) < (2, 3):
        return 3
    return 4


def check_cri_enabled(data: dict[str, Any], *, source: str) -> None:
    disabled = data.get("disabled_plugins") or []
    if isinstance(disabled, list):
        hit = sorted(CRI_PLUGIN_NAMES.intersection(str(x) for x in disabled))
        if hit:
            raise ConfigError(
                f"{source} disables containerd's CRI plugin (disabled_plugins contains "
                f"{', '.join(repr(h) for h in hit)}), so Kubernetes cannot use this containerd",
                hint="remove it from disabled_plugins (Docker's containerd.io package ships it "
                "disabled); kwasm-py will not re-enable CRI on its own",
            )


def choose_schema(
    own: dict[str, Any],
    *,
    reference: dict[str, Any] | None = None,
    containerd: ContainerdVersion | None = None,
    source: str = "config",
) -> SchemaChoice:
    """Pick the table the runtime belongs in.

    `own` is the file we edit; `reference` is what containerd actually reads when that differs
    (the rendered config of a template, the main config of a drop-in). The `version` line
    alone does not decide: the tables the files already use, and the containerd the node runs,
    do. Mismatches that containerd would silently ignore are refused.
    """
    ref = reference if reference is not None else own
    version = config_version(ref, source=source)
    notes: list[str] = []
    check_cri_enabled(ref, source=source)
    if reference is not None:
        check_cri_enabled(own, source=source)
    if containerd is not None:
        if (containerd.major, containerd.minor) < (1, 6):
            raise VersionMismatch(
                f"containerd {containerd} is too old: kwasm-py needs 1.6 or newer",
                hint="absolute shim paths in runtime_type need containerd >= 1.6",
            )
        limit = max_config_version(containerd)
        if version > limit:
            raise VersionMismatch(
                f"{source} says `version = {version}` but the node runs containerd {containerd}, "
                f"which reads at most version {limit}"
                + (" and silently ignores the plugin settings of newer files" if limit == 2 else ""),
                hint="the config does not match the containerd binary; fix one of them first "
                "(containerd 1.x needs `version = 2` with io.containerd.grpc.v1.cri tables)",
            )
    present = plugins_present(own) | plugins_present(ref)
    if version >= 3:
        schema = CriSchema.V3
        if CriSchema.V2 in present and (has_runtimes(own, CriSchema.V2) or has_runtimes(ref, CriSchema.V2)):
            notes.append(
                "the file also has runtimes under io.containerd.grpc.v1.cri, which a version "
                f"{version} config does not read"
            )
    elif version == 2:
        uses_v3 = has_runtimes(own, CriSchema.V3) or has_runtimes(ref, CriSchema.V3)
        uses_v2 = has_runtimes(own, CriSchema.V2) or has_runtimes(ref, CriSchema.V2)
        v3_only = CriSchema.V3 in present and CriSchema.V2 not in present
        if containerd is not None and containerd.major < 2:
            schema = CriSchema.V2
            if CriSchema.V3 in present:
                notes.append(
                    f"containerd {containerd} ignores the io.containerd.cri.v1.* tables in this file"
                )
        elif (uses_v3 and not uses_v2) or v3_only:
            schema = CriSchema.V3
            notes.append("version = 2 file that already uses containerd 2.x plugin IDs: following them")
        else:
            schema = CriSchema.V2
    else:
        if containerd is not None and containerd.major >= 2 and own:
            raise VersionMismatch(
                f"{source} has no `version` line (config version 1), which containerd "
                f"{containerd} no longer reads",
                hint="migrate it with `containerd config migrate` first",
            )
        if CriSchema.V1 not in present and CriSchema.V2 in present:
            if reference is None and containerd is not None:
                # containerd 1.x reads a version-1 file's plugins by short name (plugins.cri) and
                # silently ignores io.containerd.grpc.v1.cri tables there (checked on 1.6.20).
                raise VersionMismatch(
                    f"{source} has no `version` line but io.containerd.grpc.v1.cri tables, which "
                    f"containerd {containerd} ignores in a version 1 config",
                    hint="add `version = 2` at the top of the file (its tables are already version 2)",
                )
            schema = CriSchema.V2
            notes.append("no `version` line but io.containerd.grpc.v1.cri tables (a drop-in): following them")
        elif not own and containerd is not None:
            schema = CriSchema.V3 if containerd.major >= 2 else CriSchema.V2
        elif CriSchema.V1 not in present and CriSchema.V3 in present:
            schema = CriSchema.V3
        else:
            schema = CriSchema.V1
    return SchemaChoice(schema=schema, version=version, notes=tuple(notes))


def runc_systemd_cgroup(data: dict[str, Any], schema: CriSchema) -> bool:
    """Whether the node's runc runtime uses the systemd cgroup driver."""
    cri = lookup(data, ("plugins", schema.value)) or {}
    runtimes = lookup(cri, ("containerd", "runtimes")) or {}
    default = lookup(cri, ("containerd", "default_runtime_name")) or "runc"
    for name in (default, "runc"):
        options = lookup(runtimes, (name, "options"))
        if isinstance(options, dict) and "SystemdCgroup" in options:
            return options["SystemdCgroup"] is True
    return lookup(cri, ("systemd_cgroup",)) is True


def default_runtime_name(data: dict[str, Any], schema: CriSchema) -> str:
    name = lookup(data, ("plugins", schema.value, "containerd", "default_runtime_name"))
    return name if isinstance(name, str) and name else "runc"


def default_runtime_companion(
    own: dict[str, Any],
    reference: dict[str, Any],
    schema: CriSchema,
    containerd: ContainerdVersion | None,
) -> RuntimeEntry | None:
    """The default runtime's table, when adding ours would make containerd 1.x lose it.

    containerd 1.x decodes `containerd.runtimes` from the file *instead of* its built-in map:
    a file that declares only `runtimes.spin` leaves no `runc`, and the CRI plugin then refuses
    to load ("no corresponding runtime configured ... default_runtime_name"). Debian's packaged
    config is such a file. containerd 2.x merges the defaults, so it needs nothing.
    """
    if schema is CriSchema.V3 or (containerd is not None and containerd.major >= 2):
        return None
    default = default_runtime_name(reference, schema)
    if find_runtime(reference, schema, default) or find_runtime(own, schema, default):
        return None
    if default != "runc":
        raise ConfigError(
            f"the default runtime {default!r} has no table, and containerd 1.x would refuse a "
            "runtimes map without it",
            hint=f'add [plugins."{schema.value}".containerd.runtimes.{default}] to the config first',
        )
    return RuntimeEntry("runc", "io.containerd.runc.v2")


def covers(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Every key of `wanted` (recursively) has the same value in `existing`."""
    for key, value in wanted.items():
        have = existing.get(key)
        if isinstance(value, dict):
            if not isinstance(have, dict) or not covers(have, value):
                return False
        elif have != value:
            return False
    return True


def find_runtime(data: dict[str, Any], schema: CriSchema, handler: str) -> dict[str, Any] | None:
    found = lookup(data, (*schema.runtimes_path(), handler))
    return found if isinstance(found, dict) else None


# ---------------------------------------------------------------------------------------------
# Editing


def add_runtime(
    doc: ConfigDoc,
    entry: RuntimeEntry,
    *,
    schema: CriSchema,
    owned: dict[str, Any] | None = None,
    force: bool = False,
    version_line: int | None = None,
    source: str = "config",
) -> Edit:
    """Return `doc` with `entry` configured under `schema`.

    `owned` is the table kwasm-py wrote last time (from its state file): a table with its
    runtime_type is ours (left alone when it still says everything `entry` wants, else
    replaced). Any other table of the same handler is refused unless `force`.
    `version_line`, for a config that has no settings at all, writes `version = N` first.
    """
    path = (*schema.runtimes_path(), entry.handler)
    wanted = entry.as_table()
    existing = find_runtime(doc.data, schema, entry.handler)
    # Ours by key: the runtime_type we recorded, whatever defaults a `config dump` rewrite added.
    ours = (
        existing is not None
        and owned is not None
        and existing.get("runtime_type") == owned.get("runtime_type")
    )
    if existing == wanted or (ours and existing is not None and covers(existing, wanted)):
        return Edit(text=doc.text, changed=False, schema=schema)
    replaced: str | None = None
    current = doc
    if existing is not None:
        if not ours and not force:
            raise ConflictError(
                f"{source} already has a runtime `{entry.handler}` that kwasm-py did not add "
                f"(runtime_type = {existing.get('runtime_type')!r})",
                hint="use --force to replace it (uninstall puts it back), or pick another --handler",
            )
        removal = _remove(current, path, source=source)
        if not ours:
            replaced = removal.extra.get("removed_text")
        current = load(removal.text, source=source)
    version_added = False
    body = current.body
    if version_line is not None and not current.data:
        body = f"{body}{'' if not body or body.endswith(current.newline) else current.newline}"
        body += f"version = {version_line}{current.newline}"
        version_added = True
        current = load(current.prelude + body, source=source)
    new_body = _insert_block(current, path, wanted, source=source)
    expected = copy.deepcopy(current.data)
    _set(expected, path, wanted)
    _check_meaning(new_body, expected, source=source, what=f"adding runtime {entry.handler}")
    return Edit(
        text=current.prelude + new_body,
        changed=True,
        schema=schema,
        replaced=replaced,
        version_added=version_added,
    )


def remove_runtime(
    doc: ConfigDoc,
    handler: str,
    *,
    schema: CriSchema,
    restore: str | None = None,
    version_added: bool = False,
    source: str = "config",
) -> Edit:
    """Return `doc` without the runtime `handler` (putting back `restore`, a table we replaced)."""
    path = (*schema.runtimes_path(), handler)
    if find_runtime(doc.data, schema, handler) is None:
        return Edit(text=doc.text, changed=False, schema=schema)
    edit = _remove(doc, path, source=source)
    text = edit.text
    if restore:
        after = load(text, source=source)
        restored = _insert_text(after, path, restore)
        text = after.prelude + restored
    if version_added:
        text = _drop_version_line(load(text, source=source), source=source)
    return Edit(text=text, changed=text != doc.text, schema=schema)


def _remove(doc: ConfigDoc, path: tuple[str, ...], *, source: str) -> Edit:
    expected = copy.deepcopy(doc.data)
    _delete(expected, path)
    try:
        sc = _scan(doc.body)
        ours = [i for i, h in enumerate(sc.headers) if h.path[: len(path)] == path]
        if not ours:
            raise tomlscan.ScanError("runtime is not written as table headers")
        if ours != list(range(ours[0], ours[-1] + 1)):
            raise tomlscan.ScanError("runtime tables are not contiguous")
        if any(h.path[: len(path) - 1] != path[:-1] for h in sc.headers if h.path[: len(path)] == path):
            raise tomlscan.ScanError("unexpected header")
        first_line = sc.headers[ours[0]].line
        last_line = sc.header_end_line(ours[-1])
        start = sc.lines[first_line].start
        end = sc.lines[last_line].end
        # Comments directly above our header belong to it only if they are our marker.
        nl = sc.newline
        if first_line > 0 and sc.lines[first_line - 1].kind is tomlscan.LineKind.BLANK:
            start = sc.lines[first_line - 1].start
        removed = doc.body[start:end]
        body = doc.body[:start] + doc.body[end:]
        if end == len(doc.body) and start > 0 and not body.endswith(nl) and doc.body.endswith(nl):
            body += nl
        _check_meaning(body, expected, source=source, what="removing the runtime")
        return Edit(
            text=doc.prelude + body,
            changed=True,
            schema=CriSchema(path[1]),
            extra={"removed_text": removed.strip("\r\n") + nl},
        )
    except (tomlscan.ScanError, ConfigError):
        pass
    # Inline tables or dotted keys: edit structurally with tomlkit (imported only here).
    import tomlkit
    import tomlkit.items

    tdoc = _tomlkit_parse(doc.body, source=source)
    node: Any = tdoc
    for key in path[:-1]:
        node = node[key]
    removed_table = lookup(doc.data, path)
    body = ""
    if isinstance(node, tomlkit.items.InlineTable):
        try:
            body = _inline_splice(doc.body, node.as_string(), path[-1], removed_table, add=False)
            _check_meaning(body, expected, source=source, what="removing the runtime")
        except ConfigError:
            body = ""
    if not body:
        del node[path[-1]]
        body = tomlkit.dumps(tdoc)
    _check_meaning(body, expected, source=source, what="removing the runtime")
    return Edit(
        text=doc.prelude + body,
        changed=True,
        schema=CriSchema(path[1]),
        extra={"removed_text": _render_block(tomlscan.scan(""), path, removed_table)},
    )


def _insert_block(doc: ConfigDoc, path: tuple[str, ...], table: dict[str, Any], *, source: str) -> str:
    """Insert `table` at `path`: as a header block when possible, else structurally."""
    expected = copy.deepcopy(doc.data)
    _set(expected, path, table)
    try:
        sc = _scan(doc.body)
        block = _render_block(sc, path, table)
        body = _splice(sc, path, block)
        _check_meaning(body, expected, source=source, what="adding the runtime")
        return body
    except (tomlscan.ScanError, ConfigError):
        pass
    import tomlkit
    import tomlkit.items

    tdoc = _tomlkit_parse(doc.body, source=source)
    node: Any = tdoc
    for key in path[:-1]:
        if key not in node:
            node[key] = tomlkit.table(is_super_table=True)
        node = node[key]
    if isinstance(node, tomlkit.items.InlineTable):
        body = _inline_splice(doc.body, node.as_string(), path[-1], table, add=True)
    else:
        node[path[-1]] = table
        body = tomlkit.dumps(tdoc)
    _check_meaning(body, expected, source=source, what="adding the runtime")
    return body


def _inline_entry(key: str, table: dict[str, Any]) -> str:
    parts = [f"{k} = {_inline_entry_value(v)}" for k, v in table.items()]
    name = tomlscan.format_key((key,), '"')
    return name + " = { " + ", ".join(parts) + " }"


def _inline_entry_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_inline_entry_value(v)}" for k, v in value.items()) + " }"
    return _value(value, '"')


def _inline_splice(body: str, inline: str, key: str, table: dict[str, Any], *, add: bool) -> str:
    """Add (or take out) `, key = {...}` inside an inline table, touching nothing else."""
    if body.count(inline) != 1:
        raise ConfigError("the runtimes inline table cannot be located unambiguously; refusing")
    piece = ", " + _inline_entry(key, table)
    if add:
        close = inline.rstrip().rfind("}")
        head = inline[:close].rstrip()
        if head == "{":
            new_inline = "{ " + piece[2:] + " }" + inline[close + 1 :]
        else:
            new_inline = head + piece + inline[len(head) :]
    elif inline.count(piece) == 1:
        new_inline = inline.replace(piece, "")
    elif inline.count(piece[2:]) == 1:
        new_inline = inline.replace(piece[2:], "").replace("{  }", "{}")
    else:
        raise ConfigError("our runtime in the inline table was changed by hand; refusing")
    return body.replace(inline, new_inline)


def _tomlkit_parse(body: str, *, source: str) -> Any:
    import tomlkit

    try:
        return tomlkit.parse(body)
    except Exception as err:  # tomlkit raises AttributeError on some valid inputs
        raise ConfigError(
            f"{source}: this table layout cannot be edited safely ({err})",
            hint="reorder the file so each table follows its parent, or add the runtime by hand",
        ) from err


def _scan(body: str) -> tomlscan.Scan:
    """Map the body's lines, and check the map against tomlkit's own parse of the same text."""
    import tomlkit
    import tomlkit.items

    sc = tomlscan.scan(body)

    def walk(container: Any, prefix: tuple[str, ...], out: list[tuple[str, ...]]) -> None:
        for key, item in container.body:
            if key is None:
                continue
            parts = tuple(k.key for k in key) if hasattr(key, "__iter__") else (key.key,)
            if isinstance(item, tomlkit.items.Table):
                if not item.is_super_table():
                    out.append(prefix + parts)
                walk(item.value, prefix + parts, out)

    try:
        parsed = tomlkit.parse(body)
    except Exception:  # noqa: BLE001 - tomlkit raises AttributeError on some valid inputs
        # tomlkit 0.15 cannot parse some valid files (a sub-table before its parent, then a
        # deeper one); tomllib parsed it, and every edit is checked by meaning anyway.
        return sc
    expected: list[tuple[str, ...]] = []
    walk(parsed, (), expected)
    found = [h.path for h in sc.headers if not h.array]
    if sorted(found) != sorted(expected):
        raise tomlscan.ScanError("line map disagrees with tomlkit's parse")
    return sc


def _insert_text(doc: ConfigDoc, path: tuple[str, ...], block: str) -> str:
    sc = tomlscan.scan(doc.body)
    return _splice(sc, path, block)


def _splice(sc: tomlscan.Scan, path: tuple[str, ...], block: str) -> str:
    """Put `block` after the last table that shares the longest prefix with `path`."""
    text, nl = sc.text, sc.newline
    anchor = -1
    for depth in range(len(path) - 1, 0, -1):
        prefix = path[:depth]
        hits = [i for i, h in enumerate(sc.headers) if h.path[:depth] == prefix]
        if hits:
            anchor = hits[-1]
            break
    last_line = sc.header_end_line(anchor) if anchor >= 0 else sc.last_content_line()
    if last_line < 0:
        pos = len(text)
        lead = "" if not text or text.endswith(nl) else nl
        sep = nl if text.strip() else ""
        return text + lead + sep + block if text else block
    pos = sc.lines[last_line].end
    lead = "" if text[:pos].endswith(nl) or pos == 0 else nl
    return text[:pos] + lead + nl + block + text[pos:]


def _render_block(sc: tomlscan.Scan, path: tuple[str, ...], table: dict[str, Any]) -> str:
    """Render `table` as fully qualified headers in the file's own style (quotes, indents)."""
    nl = sc.newline
    quote = next((h.quote for h in sc.headers if h.quote), '"')
    parent = path[:-1]
    sibling = next((h for h in sc.headers if len(h.path) == len(path) and h.path[:-1] == parent), None)
    sub = next((h for h in sc.headers if len(h.path) == len(path) + 1 and h.path[:-2] == parent), None)
    indented = any(line.indent for line in sc.lines if line.kind is tomlscan.LineKind.VALUE)
    step = "  " if indented else ""
    if sibling is not None:
        header_indent = sibling.indent
    else:
        ancestors = [h for h in sc.headers if path[: len(h.path)] == h.path]
        closest = max(ancestors, key=lambda h: len(h.path), default=None)
        header_indent = closest.indent + step if closest is not None else ""
    key_indent = _key_indent(sc, sibling) if sibling is not None else header_indent + step
    sub_indent = sub.indent if sub is not None else key_indent
    sub_key_indent = _key_indent(sc, sub) if sub is not None else sub_indent + step
    lines = [
        f"{header_indent}[{tomlscan.format_key(path, quote)}]",
        f"{key_indent}{MARKER_COMMENT}",
    ]
    subtables = []
    for key, value in table.items():
        if isinstance(value, dict):
            subtables.append((key, value))
        else:
            lines.append(f"{key_indent}{key} = {_value(value, quote)}")
    for key, value in subtables:
        lines.append(f"{sub_indent}[{tomlscan.format_key((*path, key), quote)}]")
        lines.extend(f"{sub_key_indent}{k} = {_value(v, quote)}" for k, v in value.items())
    return nl.join(lines) + nl


def _key_indent(sc: tomlscan.Scan, header: tomlscan.Header) -> str:
    for line in sc.lines[header.line + 1 :]:
        if line.kind is tomlscan.LineKind.VALUE:
            return line.indent
        if line.kind is tomlscan.LineKind.HEADER:
            break
    return header.indent + "  " if header.indent else ""


def _value(value: Any, quote: str) -> str:
    """A TOML scalar: literal string in a single-quote file, else basic string; bool; int."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(f"cannot write {value!r} into a containerd config")
    if quote == "'" and "'" not in value and not any(ord(c) < 32 for c in value):
        return f"'{value}'"
    return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML


def _drop_version_line(doc: ConfigDoc, *, source: str) -> str:
    sc = tomlscan.scan(doc.body)
    expected = copy.deepcopy(doc.data)
    expected.pop("version", None)
    for line in sc.lines:
        if line.kind is tomlscan.LineKind.HEADER:
            break
        if (
            line.kind is tomlscan.LineKind.VALUE
            and doc.body[line.start : line.end].split("=")[0].strip() == "version"
        ):
            body = doc.body[: line.start] + doc.body[line.end :]
            _check_meaning(body, expected, source=source, what="removing the version line")
            return doc.prelude + body
    return doc.text


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = copy.deepcopy(value)


def _delete(data: dict[str, Any], path: tuple[str, ...]) -> None:
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


def _check_meaning(body: str, expected: dict[str, Any], *, source: str, what: str) -> None:
    """The edited body must mean `expected` (tables emptied by a removal may vanish)."""
    try:
        got = tomllib.loads(body)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: {what} would produce invalid TOML ({err})") from err
    if got != expected and _prune_empty(got) != _prune_empty(expected):
        raise ConfigError(f"{source}: {what} would change other settings; refusing")


def _prune_empty(data: Any) -> Any:
    if isinstance(data, dict):
        pruned = {k: _prune_empty(v) for k, v in data.items()}
        return {k: v for k, v in pruned.items() if v != {} or not isinstance(data[k], dict)}
    return data
