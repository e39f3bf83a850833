"""A containerd config as a document: its template prelude and TOML body (`load`), the runtime
table kwasm-py writes (RuntimeEntry), an edit's result (Edit) and lookups in the parsed data. Pure.
"""

from __future__ import annotations

import copy
import functools
import tomllib
from dataclasses import dataclass, field
from typing import Any

from kwasm_py.containerd import template
from kwasm_py.errors import ConfigError
from kwasm_py.model import CriSchema

MARKER_COMMENT = "# added by kwasm-py; `kwasm-py node uninstall` removes this runtime"


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
class Edit:
    """The result of adding or removing a runtime."""

    text: str
    changed: bool
    schema: CriSchema
    notes: tuple[str, ...] = ()
    replaced: str | None = None  # the foreign table text that --force took over
    version_added: bool = False  # we wrote the `version` line of a config that had none
    extra: dict[str, Any] = field(default_factory=dict)


def split_prelude(text: str) -> tuple[str, str]:
    """Separate a template's text up to its last Go action from the TOML after it."""
    return template.split(text)


def parse(body: str) -> dict[str, Any]:
    """tomllib's parse of the TOML `body`, as a fresh copy each call: one plan parses the same
    config up to seven times (mode choice, effective config, plan, the edit's meaning checks),
    about 1 ms each for an 8 KB file, and a copy costs a tenth of that. Raises
    tomllib.TOMLDecodeError."""
    return copy.deepcopy(_parsed(body))


@functools.lru_cache(maxsize=8)
def _parsed(body: str) -> dict[str, Any]:
    return tomllib.loads(body)


def load(text: str, *, source: str) -> ConfigDoc:
    """Parse a config or template; raise ConfigError naming `source` when it is not TOML."""
    if text.startswith("\ufeff"):
        raise ConfigError(f"{source} starts with a byte-order mark; containerd cannot read it")
    prelude, body = split_prelude(text)
    try:
        data = parse(body)
    except tomllib.TOMLDecodeError as err:
        hint = "fix the file (containerd would refuse it too), or point --config at another file"
        if prelude:
            hint = "the text after the template's last {{ ... }} action is not TOML; fix it there"
        raise ConfigError(f"{source} is not valid TOML: {err}", hint=hint) from err
    return ConfigDoc(text=text, prelude=prelude, body=body, data=data)


def lookup(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


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
