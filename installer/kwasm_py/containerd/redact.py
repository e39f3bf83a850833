"""PURE: hide credential values in containerd config text before it is shown to anyone.

``node plan`` prints the config diff (text and JSON); a node's config may carry registry
credentials. containerd's CRI registry auth takes ``username``, ``password``, ``auth`` and
``identitytoken`` (``AuthConfig`` in containerd's ``pkg/cri/config/config.go`` for 1.x and
``internal/cri/config`` for 2.x, under ``plugins."io.containerd.grpc.v1.cri".registry.configs.
HOST.auth``, ``plugins."io.containerd.cri.v1.images".registry...`` and the version-1
``plugins.cri.registry.auths``), and ``registry.headers`` may hold an ``Authorization`` header.
Every value of such a key is replaced by ``"<redacted>"``, wherever it sits (a table body, a
dotted key, an inline table, a commented-out line), so no schema is missed. Line count and line
endings are kept, so a diff of redacted texts has the real line numbers, and TOML stays TOML.
"""

from __future__ import annotations

import re

REDACTED = '"<redacted>"'
# Lower-cased key names whose values are credentials.
SECRET_KEYS = frozenset(
    {
        "password",
        "auth",
        "identitytoken",
        "identity_token",
        "registrytoken",
        "token",
        "secret",
        "authorization",
    }
)

_BARE = r"[A-Za-z0-9_-]+"
_BASIC = r'"(?:[^"\\]|\\.)*"'
_LITERAL = r"'[^']*'"
_PART = rf"(?:{_BARE}|{_BASIC}|{_LITERAL})"
_KEYVAL = re.compile(
    rf"^(?P<lead>\s*)(?P<key>{_PART}(?:\s*\.\s*{_PART})*)(?P<eq>\s*=\s*)(?P<value>.*?)(?P<eol>\r?\n?)$"
)
_PARTS = re.compile(_PART)
# A secret key inside an inline table or a comment: `password = "x"`, `"auth" = {...}`.
_NAMES = "|".join(sorted(SECRET_KEYS))
_INLINE = re.compile(
    rf"""(?P<key>(?<![A-Za-z0-9_-])["']?(?i:{_NAMES})["']?\s*=\s*)"""
    rf"""(?P<value>{_BASIC}|{_LITERAL}|\{{[^{{}}]*\}}|\[[^\[\]]*\]|[^\s,}}#]+)"""
)


def _last_key(dotted: str) -> str:
    parts = _PARTS.findall(dotted)
    return parts[-1].strip("\"'").lower() if parts else ""


def _opens_multiline(value: str) -> str | None:
    """The closing delimiter when `value` starts a string or array that goes on past this line."""
    for quote in ('"""', "'''"):
        if value.startswith(quote) and value.count(quote) % 2 == 1:
            return quote
    if value.startswith("["):
        depth = 0
        for ch in re.sub(rf"{_BASIC}|{_LITERAL}", '""', value.split("#", 1)[0]):
            depth += ch == "["
            depth -= ch == "]"
        if depth > 0:
            return "]"
    return None


def redact(text: str) -> str:
    """Takes config text; returns it with every credential value replaced by ``"<redacted>"``.

    Same number of lines, same line endings; lines without credentials are unchanged. The
    continuation lines of a multi-line secret (a ``\"\"\"`` string or an array) become
    ``# <redacted>`` comments, so redacted TOML stays TOML. Raises nothing: text that is not
    TOML is redacted as far as it looks like key = value lines.
    """
    out: list[str] = []
    closing: str | None = None
    for line in text.splitlines(keepends=True):
        if closing is not None:
            body = line.rstrip("\r\n")
            eol = line[len(body) :]
            out.append(f"{body[: len(body) - len(body.lstrip())]}# <redacted>{eol}")
            if closing in body:
                closing = None
            continue
        m = _KEYVAL.match(line)
        if m and _last_key(m["key"]) in SECRET_KEYS:
            comment = ""
            value = m["value"]
            closing = _opens_multiline(value)
            if closing is None and "#" in value:
                stripped = re.sub(rf"{_BASIC}|{_LITERAL}", lambda s: "x" * len(s.group()), value)
                if "#" in stripped:
                    comment = "  " + value[stripped.index("#") :].strip()
            out.append(f"{m['lead']}{m['key']}{m['eq']}{REDACTED}{comment}{m['eol']}")
            continue
        out.append(_INLINE.sub(lambda s: s["key"] + REDACTED, line))
    return "".join(out)
