"""containerd configs, pure: which CRI schema and config version a file uses (`choose_schema`), what
its runtimes say (default runtime, runc's cgroup driver), and what containerd 1.x needs beside ours.

The one entry point callers import (`cc.load`, `cc.add_runtime`, ...): the document and its
lookups live in `document`, adding and removing a runtime in `edit`; both are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kwasm_py.containerd.document import (
    MARKER_COMMENT,
    ConfigDoc,
    Edit,
    RuntimeEntry,
    covers,
    find_runtime,
    load,
    lookup,
    split_prelude,
)
from kwasm_py.containerd.edit import add_runtime, remove_runtime
from kwasm_py.errors import ConfigError, VersionMismatch
from kwasm_py.model import ContainerdVersion, CriSchema

CRI_PLUGIN_NAMES = frozenset({"cri", CriSchema.V2.value, CriSchema.V3.value})


@dataclass(frozen=True)
class SchemaChoice:
    schema: CriSchema
    version: int
    notes: tuple[str, ...] = ()


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


__all__ = [
    "CRI_PLUGIN_NAMES",
    "MARKER_COMMENT",
    "ConfigDoc",
    "Edit",
    "RuntimeEntry",
    "SchemaChoice",
    "add_runtime",
    "check_cri_enabled",
    "choose_schema",
    "config_version",
    "covers",
    "default_runtime_companion",
    "default_runtime_name",
    "find_runtime",
    "has_runtimes",
    "load",
    "lookup",
    "max_config_version",
    "plugins_present",
    "remove_runtime",
    "runc_systemd_cgroup",
    "split_prelude",
]
