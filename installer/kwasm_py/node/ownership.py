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

Pure: plain values in, plain values out.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from kwasm_py.containerd import config as cc
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


def holds_ours(
    data: dict[str, Any], schema: CriSchema, records: tuple[RuntimeRecord, ...], *, install_dir: PurePosixPath
) -> bool:
    """Whether the parsed config `data` has any of `records`' runtimes (so it cannot be a pre-image)."""
    return any(is_ours(cc.find_runtime(data, schema, r.handler), r, install_dir=install_dir) for r in records)


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
