"""Templates as users write them: k3s/rke2 Go templates and microk8s placeholders (pure).

k3s and rke2 render `config.toml` from `config.toml.tmpl` / `config-v3.toml.tmpl` with Go's
`text/template` (k3s `pkg/agent/templates`): text between actions is emitted verbatim. A user's
template may be a whole copy of the stock template (`{{ .NodeConfig... }}`, `{{- if }}`,
`{{ range }}`), a comment above `{{ template "base" . }}`, or a frozen render with no actions.
kwasm-py keeps every byte up to the end of the line holding the template's last action (the
*prelude*) and edits only the plain TOML after it (the *tail*), so the next render is
predictable: what is rendered today before the tail, then the new tail.

microk8s' `containerd-template.toml` holds `${RUNTIME}`, `${RUNTIME_TYPE}`, `${SNAPSHOTTER}`
and `${SNAP_DATA}`, which the snap's `run-containerd-with-args` substitutes with `sed` into
`args/containerd.toml` at every start (canonical/microk8s `microk8s-resources/wrappers/
run-containerd-with-args`). Their values are read back from that render.
"""

from __future__ import annotations

import re
import tomllib
from enum import Enum
from typing import Any

from kwasm_py.errors import ConflictError

_ACTION = re.compile(r"\{\{.*?\}\}", re.DOTALL)
_PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")

#: Where k3s releases of 2024 looked for Wasm shims before /usr/bin and /usr/sbin (k3s
#: `pkg/agent/containerd/runtimes.go` findWasiRuntimes, "Path when installing via kwasm Operator";
#: later releases look the shims up on PATH).
KWASM_SCANNED_DIR = "/opt/kwasm/bin"
# What the microk8s snap substitutes when a value cannot be read back from its render: the
# defaults of `run-containerd-with-args` (runc, overlayfs) and the snap's data directory.
MICROK8S_DEFAULTS = {
    "RUNTIME": "runc",
    "RUNTIME_TYPE": "io.containerd.runc.v2",
    "SNAPSHOTTER": "overlayfs",
    "SNAP_DATA": "/var/snap/microk8s/current",
}


class TemplateKind(Enum):
    """How a k3s/rke2 template is written."""

    NONE = "none"  # no template actions: a frozen render, edited as plain TOML
    BASE = "base"  # only `{{ template "base" . }}` lines (comments allowed around them)
    GO = "go"  # other Go template actions (a copy of the stock template)


def actions(text: str) -> list[re.Match[str]]:
    """Every `{{ ... }}` action of a Go template, in order."""
    return list(_ACTION.finditer(text))


def kind(text: str) -> TemplateKind:
    """Classify a template by its actions."""
    found = actions(text)
    if not found:
        return TemplateKind.NONE
    if all(re.fullmatch(r'\{\{-?\s*template\s+"base"\s+\.\s*-?\}\}', m.group(0)) for m in found):
        return TemplateKind.BASE
    return TemplateKind.GO


def split(text: str) -> tuple[str, str]:
    """Split `text` into (prelude, tail) at the end of the line of its last template action.

    Returns `("", text)` when `text` has no action, or when it parses as TOML as a whole (a
    plain config whose strings happen to hold `{{`). The tail is emitted verbatim by the render.
    """
    found = actions(text)
    if not found:
        return "", text
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        pass
    else:
        return "", text
    end = found[-1].end()
    newline = text.find("\n", end)
    cut = len(text) if newline < 0 else newline + 1
    return text[:cut], text[cut:]


def rendered_base(rendered: str, tail: str) -> tuple[str, bool]:
    """What today's render holds before the template's tail.

    `rendered` is the current render; `tail` the template's text after its last action. The
    render ends with the tail when the template was rendered as it is now; when the template
    grew since (a write not yet rendered), the render ends with a line-aligned start of the
    tail. Returns (the base part, whether the render is up to date with the whole tail).
    """
    if rendered.endswith(tail):
        return rendered[: len(rendered) - len(tail)], True
    cuts = [i + 1 for i, c in enumerate(tail) if c == "\n"]
    for cut in reversed(cuts):
        if rendered.endswith(tail[:cut]):
            return rendered[: len(rendered) - cut], False
    return rendered, False


def predict_render(template_text: str, rendered: str) -> tuple[str, bool]:
    """The config the next render of `template_text` gives: today's base render + its tail.

    Returns (predicted text, whether today's render already matched the template's tail).
    """
    _prelude, tail = split(template_text)
    base, current = rendered_base(rendered, tail)
    if base and tail and not base.endswith("\n"):
        base += "\n"
    return base + tail, current


# ---------------------------------------------------------------------------------------------
# microk8s placeholders


def placeholders(text: str) -> set[str]:
    """The `${NAME}` placeholders a microk8s template uses."""
    return set(_PLACEHOLDER.findall(text))


def _strings(data: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    out: list[tuple[tuple[str, ...], str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            out.extend(_strings(value, (*path, key)))
    elif isinstance(data, str):
        out.append((path, data))
    return out


def resolve_placeholders(
    template_data: dict[str, Any], rendered_data: dict[str, Any] | None
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Values of the template's placeholders, read back from its render.

    Each string value of the template with placeholders is matched against the value at the
    same key in `rendered_data` (the snap's `args/containerd.toml`); what is not found there
    falls back to `MICROK8S_DEFAULTS`. Returns (values, notes saying where each came from).
    """
    values: dict[str, str] = {}
    for path, value in _strings(template_data):
        names = _PLACEHOLDER.findall(value)
        if not names or rendered_data is None:
            continue
        node: Any = rendered_data
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, str):
            continue
        pattern = "".join(
            f"(?P<{p}>.*?)" if i % 2 else re.escape(p) for i, p in enumerate(_PLACEHOLDER.split(value))
        )
        try:
            match = re.fullmatch(pattern, node)
        except re.error:  # the same placeholder twice in one value
            continue
        if match:
            for name, got in match.groupdict().items():
                values.setdefault(name, got)
    notes = []
    used = {n for _p, v in _strings(template_data) for n in _PLACEHOLDER.findall(v)}
    for name in sorted(used - values.keys()):
        if name in MICROK8S_DEFAULTS:
            values[name] = MICROK8S_DEFAULTS[name]
            notes.append(f"${{{name}}} not found in the render; assuming the snap's default {values[name]!r}")
    return values, tuple(notes)


def substitute(data: Any, values: dict[str, str]) -> Any:
    """`data` with every known `${NAME}` in its strings replaced (unknown ones kept)."""
    if isinstance(data, dict):
        return {k: substitute(v, values) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute(v, values) for v in data]
    if isinstance(data, str):
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), data)
    return data


def substitute_text(text: str, values: dict[str, str]) -> str:
    """The render of a microk8s template: `${NAME}` replaced as the snap's `sed` does."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def check_base(
    template_text: str,
    rendered: str,
    handlers: list[str],
    *,
    runtimes_path: tuple[str, ...],
    ours_prefix: str,
    source: str,
    rendered_source: str,
    wanted: dict[str, str] | None = None,
    digests: dict[str, str | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Runtimes of `handlers` that the base render defines, outside the template's own tail.

    k3s adds a runtime to its base render for every `containerd-shim-NAME-v2` it finds on its
    PATH (k3s `pkg/agent/containerd/runtimes.go`, k3s-io/k3s#9650), so a `spin` table in the
    template too would be defined twice and containerd refuses the render. A table whose
    runtime_type or options.BinaryName lies under `ours_prefix` (our install directory), or
    names a node file whose sha256 (`digests`: node path -> sha256) is the one `wanted` for
    that handler (the very shim asked for), is returned by handler, to be adopted.

    Raises ConflictError for any other such table.
    """
    prelude, tail = split(template_text)
    if not prelude:
        return {}
    base, _current = rendered_base(rendered, tail)
    try:
        data = tomllib.loads(base)
    except tomllib.TOMLDecodeError:
        data = tomllib.loads(rendered)
    adopted: dict[str, dict[str, Any]] = {}
    for handler in handlers:
        table = _lookup(data, (*runtimes_path, handler))
        if not isinstance(table, dict):
            continue
        paths = [table.get("runtime_type"), _lookup(table, ("options", "BinaryName"))]
        if any(isinstance(p, str) and p.startswith(ours_prefix.rstrip("/") + "/") for p in paths):
            adopted[handler] = table
            continue
        digest = (wanted or {}).get(handler)
        if digest is not None and any((digests or {}).get(p) == digest for p in paths if isinstance(p, str)):
            adopted[handler] = table
            continue
        binary = _lookup(table, ("options", "BinaryName"))
        found, where = "", f"k3s/rke2 add a runtime for every containerd-shim-{handler}-v2 on their PATH"
        if isinstance(binary, str):
            found = f" (k3s found {binary} on its PATH)"
            if binary.startswith(KWASM_SCANNED_DIR + "/"):
                found = f" (k3s found {binary}: its 2024 releases look for shims in {KWASM_SCANNED_DIR})"
                where = f"k3s/rke2 of 2024 add a runtime for every shim they find in {KWASM_SCANNED_DIR}"
        raise ConflictError(
            f"{rendered_source} already has runtime `{handler}` (runtime_type = "
            f"{table.get('runtime_type')!r}) from the base template{found}; adding it to "
            f"{source} would define it twice and containerd would refuse the render",
            hint=f"{where}: remove {binary if isinstance(binary, str) else 'that binary'} and restart "
            "k3s/rke2, install that very shim (the same sha256: kwasm-py then adopts the runtime), or "
            "pick another --handler",
        )
    return adopted


def base_binaries(rendered: str, handlers: list[str], runtimes_paths: list[tuple[str, ...]]) -> list[str]:
    """Absolute paths the render's runtimes of `handlers` run (runtime_type, options.BinaryName)."""
    try:
        data = tomllib.loads(rendered)
    except tomllib.TOMLDecodeError:
        return []
    out = []
    for path in runtimes_paths:
        for handler in handlers:
            table = _lookup(data, (*path, handler))
            if isinstance(table, dict):
                for value in (table.get("runtime_type"), _lookup(table, ("options", "BinaryName"))):
                    if isinstance(value, str) and value.startswith("/"):
                        out.append(value)
    return out
