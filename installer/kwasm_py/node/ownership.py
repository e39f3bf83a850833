"""What on a node is kwasm-py's: decided from keys and values, not from a snapshot of a file.

Other tools rewrite containerd's config after we leave (EKS bootstrap regenerates it at boot,
some tools write `containerd config dump` back, which adds every default key to our table). So:

* a runtime table is ours when its handler and ``runtime_type`` are what the state file
  recorded and that ``runtime_type`` is a path under our install directory, whatever else the
  table has gained;
* a byte-for-byte restore of the pre-image is allowed only when the file is exactly our last
  write and the pre-image was taken for that write; when we write over a file that changed since
  our last write, the current file becomes the new pre-image (and a pre-image that still holds
  our tables is no pre-image at all).

Pure: plain values in, plain values out (bytes and parsed tables, no files).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from kwasm_py.containerd import config as cc
from kwasm_py.errors import KwasmError
from kwasm_py.model import CriSchema
from kwasm_py.node.state import RuntimeRecord, State


def is_ours(table: dict[str, Any] | None, record: RuntimeRecord, *, install_dir: PurePosixPath) -> bool:
    """Whether `table` (the current runtimes.<handler> table, or None) is the one `record` describes.

    True when its runtime_type equals the recorded one and lies under `install_dir`.
    """
    if table is None:
        return False
    runtime_type = table.get("runtime_type")
    if not isinstance(runtime_type, str) or runtime_type != record.runtime_type:
        return False
    return PurePosixPath(runtime_type).is_relative_to(install_dir)


def changed_since_our_write(state: State | None, path: str, current_sha256: str | None) -> bool:
    """Whether the file at `path` (sha256 `current_sha256`, None if absent) is no longer our last write."""
    if state is None or state.config.path != path:
        return False
    return current_sha256 != state.config.written_sha256


def rebase(state: State | None, path: str, current_sha256: str | None) -> State | None:
    """The state a new plan should start from.

    When the file changed since our last write, what we recorded about *that* file's bytes (the
    `version` line we added, the default-runtime companion we added) belongs to a file that is
    gone; only our runtimes (identified by key) remain ours. Returns `state` otherwise.
    """
    if state is None or not changed_since_our_write(state, path, current_sha256):
        return state
    return replace(state, config=replace(state.config, version_added=False), companion=None)


def holds_ours_bytes(data: bytes, state: State | None, *, install_dir: PurePosixPath) -> bool:
    """Whether the config `data` has any runtime `state` recorded (so it cannot be a pre-image).

    False when there is no state or `data` is not a readable config.
    """
    if state is None:
        return False
    try:
        parsed = cc.load(data.decode(), source=state.config.path).data
    except (KwasmError, UnicodeDecodeError):
        return False
    schema = CriSchema(state.config.schema)
    return any(
        is_ours(cc.find_runtime(parsed, schema, r.handler), r, install_dir=install_dir)
        for r in state.runtimes
    )


def remove_ours(
    data: bytes,
    state: State,
    chosen: list[RuntimeRecord],
    *,
    keep: bool,
    install_dir: PurePosixPath,
) -> tuple[bytes | None, tuple[str, ...]]:
    """Today's config `data` without the `chosen` runtimes of `state`, keeping every other change.

    A table goes only while it is ours (`is_ours`); a table --force took over is given back. When
    nothing is kept (`keep` False) the default-runtime companion goes if it is still as we wrote
    it, the `version` line we added goes if the file is still our last write, and a file we
    created that is left empty is deleted (None). Returns the new bytes and notes; raises
    ConfigError when `data` is not a config.
    """
    path = state.config.path
    schema = CriSchema(state.config.schema)
    doc = cc.load(data.decode(), source=path)
    # A `version` line we added is ours only in the file we wrote, not in a regenerated one.
    unchanged = hashlib.sha256(data).hexdigest() == state.config.written_sha256
    notes = []
    for record in chosen:
        table = cc.find_runtime(doc.data, schema, record.handler)
        if not is_ours(table, record, install_dir=install_dir):
            if table is not None:
                notes.append(
                    f"runtime {record.handler} in {path} is no longer the one kwasm-py added "
                    f"(runtime_type {table.get('runtime_type')!r}): left in place"
                )
            continue
        edit = cc.remove_runtime(
            doc,
            record.handler,
            schema=schema,
            restore=record.replaced,
            version_added=state.config.version_added and unchanged and not keep and record is chosen[-1],
            source=path,
        )
        doc = cc.load(edit.text, source=path)
    extra = state.companion
    if not keep and extra and cc.find_runtime(doc.data, schema, extra["handler"]) == extra["table"]:
        doc = cc.load(cc.remove_runtime(doc, extra["handler"], schema=schema, source=path).text, source=path)
    if state.config.created and not keep and not doc.data and not doc.body.strip():
        return None, tuple(notes)
    return doc.text.encode(), tuple(notes)


def drop_unrequested(
    text: str,
    state: State | None,
    *,
    path: str,
    handlers: set[str],
    install_dir: PurePosixPath,
) -> tuple[str, tuple[RuntimeRecord, ...], tuple[str, ...]]:
    """Remove from `text` (the planned config at `path`) our runtimes that are no longer asked for.

    `handlers` are the handlers of this request; every runtime the state recorded for `path`
    outside them goes: its table when it still is ours (a table --force took over is given back),
    and the caller removes its binary. Returns the new text, the dropped records and notes.
    Raises ConfigError when the text cannot be parsed.
    """
    if state is None or state.config.path != path:
        return text, (), ()
    dropped = tuple(r for r in state.runtimes if r.handler not in handlers)
    if not dropped:
        return text, (), ()
    schema = CriSchema(state.config.schema)
    notes = []
    for record in dropped:
        doc = cc.load(text, source=path)
        table = cc.find_runtime(doc.data, schema, record.handler)
        if is_ours(table, record, install_dir=install_dir):
            text = cc.remove_runtime(
                doc, record.handler, schema=schema, restore=record.replaced, source=path
            ).text
            notes.append(f"removing runtime {record.handler} and {record.shim}: no longer asked for")
        else:
            notes.append(f"removing {record.shim}: runtime {record.handler} is no longer asked for")
    return text, dropped, tuple(notes)
