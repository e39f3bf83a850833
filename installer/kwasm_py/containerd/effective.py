"""The configuration containerd really loads: a main file plus the files its `imports` name.

Pure: files come in through two injected callables (``expand`` a pattern to node paths,
``load`` a node path to its parsed table), so every rule is a unit test. The merge rules were
measured with ``containerd --config F config dump`` on the real binaries (tests in
``tests/test_effective.py`` check them against containerd 1.6.20 and 2.1.9):

* Imports of imported files are loaded too, each file once. A relative path is resolved from
  the directory of the file that names it, except a relative *glob* on 1.x, which containerd
  1.6 expands from its working directory (``/`` under systemd). Globs expand in sorted order
  (containerd 1.6 ``services/server/config`` ``resolveImports``; 2.x
  ``cmd/containerd/server/config``).
* containerd 1.x: an imported file's table for a plugin **replaces** the table of that plugin
  loaded so far, in import order; other top-level sections merge. So the last file that has a
  ``plugins."io.containerd.grpc.v1.cri"`` table decides the whole CRI plugin.
* containerd 2.x: tables merge deeply; a later scalar or array replaces the earlier one.
"""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kwasm_py.errors import ConflictError
from kwasm_py.model import CriSchema

Expand = Callable[[str], list[str]]  # absolute node-path pattern -> matching node paths, sorted
Load = Callable[[str], dict[str, Any] | None]  # node path -> parsed table (None: unreadable)


@dataclass(frozen=True)
class Source:
    """One file containerd loads, in load order."""

    path: str
    data: dict[str, Any]
    imported_by: str | None = None  # None for the main file


@dataclass(frozen=True)
class Effective:
    """The files containerd loads for one main config and what they add up to."""

    major: int  # containerd major version whose merge rules were applied
    sources: tuple[Source, ...]  # main file first, then imports in load order
    data: dict[str, Any]  # the merged table

    @property
    def main(self) -> str:
        return self.sources[0].path

    @property
    def imports(self) -> tuple[Source, ...]:
        return self.sources[1:]

    def contributors(self, plugin: str) -> tuple[str, ...]:
        """The files (load order) that have a table for `plugin` (a plugin ID)."""
        return tuple(s.path for s in self.sources if isinstance(_plugins(s.data).get(plugin), dict))

    def winner(self, plugin: str) -> Source | None:
        """On containerd 1.x the one file whose table of `plugin` containerd uses (the last);
        on 2.x None, since every contributor is merged."""
        if self.major >= 2:
            return None
        found = [s for s in self.sources if isinstance(_plugins(s.data).get(plugin), dict)]
        return found[-1] if found else None

    def overriding_import(self, plugin: str) -> Source | None:
        """An imported file that, on containerd 1.x, hides the main file's `plugin` table."""
        won = self.winner(plugin)
        return won if won is not None and won.imported_by is not None else None

    def describe(self, plugin: str) -> str:
        """One line for `plan`: which files set `plugin` and which one counts."""
        files = self.contributors(plugin)
        if not files:
            return f"no file sets plugin {plugin}; containerd uses its defaults"
        if self.major >= 2:
            return f"plugin {plugin} from {', '.join(files)} (containerd {self.major}.x merges them)"
        won = self.winner(plugin)
        assert won is not None
        rest = [f for f in files if f != won.path]
        hidden = f"; it replaces the table in {', '.join(rest)}" if rest else ""
        return f"plugin {plugin} from {won.path} (containerd 1.x uses the last file's table{hidden})"

    def handler_sources(self, handler: str) -> tuple[tuple[str, CriSchema], ...]:
        """Every (file, schema) that defines a runtime named `handler`, in load order."""
        out = []
        for src in self.sources:
            for schema in CriSchema:
                node = _lookup(src.data, (*schema.runtimes_path(), handler))
                if isinstance(node, dict):
                    out.append((src.path, schema))
        return tuple(out)


def resolve(
    main_path: str,
    main_data: dict[str, Any],
    *,
    major: int,
    expand: Expand,
    load: Load,
) -> Effective:
    """The effective configuration of `main_path` (whose parsed table is `main_data`).

    `expand` turns an absolute pattern into sorted node paths; `load` parses one node path
    (None when it is missing or not TOML, then containerd would fail: the caller's own checks
    report that). Returns the sources in containerd's load order and their merge under the rules
    of containerd `major` (see the module docstring). Raises nothing itself.
    """
    sources = [Source(main_path, main_data)]
    seen = {posixpath.normpath(main_path)}

    def walk(path: str, data: dict[str, Any]) -> None:
        for named in data.get("imports") or []:
            if not isinstance(named, str):
                continue
            pattern = named
            if not posixpath.isabs(named):
                # 1.x globs a relative pattern from its working directory (/ under systemd);
                # 2.x, and 1.x for a plain path, from the importing file's directory.
                glob_from_cwd = major < 2 and "*" in named
                pattern = posixpath.join("/" if glob_from_cwd else posixpath.dirname(path), named)
            for found in expand(posixpath.normpath(pattern)):
                norm = posixpath.normpath(found)
                if norm in seen:
                    continue
                seen.add(norm)
                loaded = load(norm)
                if loaded is None:
                    continue
                sources.append(Source(norm, loaded, imported_by=path))
                walk(norm, loaded)

    walk(main_path, main_data)
    return Effective(major=major, sources=tuple(sources), data=merge([s.data for s in sources], major=major))


def merge(tables: list[dict[str, Any]], *, major: int) -> dict[str, Any]:
    """Merge parsed config tables (main first) as containerd `major` does.

    1.x: each later file's plugin tables replace the earlier ones whole, other tables merge
    deeply; 2.x: everything merges deeply. Scalars and arrays of later files win. `version` and
    `imports` stay the main file's.
    """
    out: dict[str, Any] = copy.deepcopy(tables[0]) if tables else {}
    for table in tables[1:]:
        for key, value in table.items():
            if key in ("version", "imports"):
                continue
            if key == "plugins" and major < 2 and isinstance(value, dict):
                plugins = out.setdefault("plugins", {})
                for plugin, body in value.items():
                    plugins[plugin] = copy.deepcopy(body)
            else:
                out[key] = _deep_merge(out.get(key), value)
    return out


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _deep_merge(base.get(key), value)
        return merged
    return copy.deepcopy(over)


def _plugins(data: dict[str, Any]) -> dict[str, Any]:
    plugins = data.get("plugins")
    return plugins if isinstance(plugins, dict) else {}


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def check_handlers(
    eff: Effective, handlers: list[str], *, edited: str, merged_ours: dict[str, str] | None = None
) -> None:
    """Refuse handlers that a file other than `edited` (the one we write) already defines.

    `merged_ours` maps handlers to our runtime_type where the distribution copies what we write
    into a file it generates (k3s/rke2 render the template into config.toml; k0s merges CRI
    drop-ins into /run/k0s/containerd-cri.toml): a table there with our runtime_type is ours,
    not a conflict. Raises ConflictError naming the file and the
    file that imports it.
    """
    for handler in handlers:
        for path, schema in eff.handler_sources(handler):
            if path == edited:
                continue
            src_data = next(s.data for s in eff.sources if s.path == path)
            table = _lookup(src_data, (*schema.runtimes_path(), handler))
            if (
                merged_ours
                and isinstance(table, dict)
                and table.get("runtime_type") == merged_ours.get(handler)
            ):
                continue
            src = next(s for s in eff.sources if s.path == path)
            by = f" (imported by {src.imported_by})" if src.imported_by else ""
            raise ConflictError(
                f"{path}{by} already defines runtime `{handler}`",
                hint="remove it there, or pick another --handler",
            )


def check_takes_effect(eff: Effective, schema: CriSchema, *, edited: str) -> None:
    """Refuse a runtime written to `edited` that containerd 1.x would never see.

    On 1.x the last file with a table for the CRI plugin replaces the others' (module docstring):
    an imported file with a `plugins."<schema>"` table hides every runtime of the main file.
    Raises ConflictError naming the overriding file; the caller has changed nothing yet.
    """
    if eff.major >= 2:
        return
    won = eff.winner(schema.plugin_id)
    if won is None or won.path == edited or won.imported_by is None:
        return
    raise ConflictError(
        f'{won.path} (imported by {won.imported_by}) has its own [plugins."{schema.plugin_id}"] '
        f"tables, which containerd 1.x uses instead of those in {edited}: a runtime added there "
        "would never be loaded",
        hint=f"move the CRI settings of {won.path} into {edited} (containerd 1.x does not merge "
        "them), then run kwasm-py again",
    )
