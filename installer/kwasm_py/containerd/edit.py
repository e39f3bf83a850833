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
from typing import Any

from kwasm_py.containerd import tomlscan
from kwasm_py.containerd.document import (
    MARKER_COMMENT,
    ConfigDoc,
    Edit,
    RuntimeEntry,
    covers,
    find_runtime,
    load,
    lookup,
    parse,
)
from kwasm_py.errors import ConfigError, ConflictError
from kwasm_py.model import CriSchema


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
        got = parse(body)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: {what} would produce invalid TOML ({err})") from err
    if got != expected and _prune_empty(got) != _prune_empty(expected):
        raise ConfigError(f"{source}: {what} would change other settings; refusing")


def _prune_empty(data: Any) -> Any:
    if isinstance(data, dict):
        pruned = {k: _prune_empty(v) for k, v in data.items()}
        return {k: v for k, v in pruned.items() if v != {} or not isinstance(data[k], dict)}
    return data
