"""A line-level map of a TOML document: where each table header sits and which lines hold values.

tomlkit gives structure but not positions. To insert or cut a table without disturbing a single
byte around it we need to know, per line, whether it is a table header, a value (including the
continuation lines of multi-line strings and arrays), a comment or blank. This scanner tracks
strings, multi-line strings and array nesting, so a ``[`` inside a string or an array is never
taken for a header. Its result is cross-checked against tomlkit's parse by the callers.

Pure: text in, data out.
"""

from __future__ import annotations

import enum
import re
import tomllib
from dataclasses import dataclass


class LineKind(enum.Enum):
    BLANK = "blank"
    COMMENT = "comment"
    HEADER = "header"
    VALUE = "value"  # a key/value line or a continuation of a multi-line value


@dataclass(frozen=True)
class Line:
    start: int  # offset of the first character
    end: int  # offset just past the line terminator (or end of text)
    kind: LineKind
    indent: str = ""


@dataclass(frozen=True)
class Header:
    line: int  # index into Scan.lines
    path: tuple[str, ...]
    array: bool  # [[array of tables]]
    indent: str
    quote: str  # the quote character the header uses for quoted keys ('"', "'" or "")


@dataclass(frozen=True)
class Scan:
    text: str
    lines: tuple[Line, ...]
    headers: tuple[Header, ...]
    newline: str

    def header_end_line(self, index: int) -> int:
        """Index of the last VALUE/HEADER line that belongs to headers[index]'s table."""
        first = self.headers[index].line
        stop = self.headers[index + 1].line if index + 1 < len(self.headers) else len(self.lines)
        last = first
        for i in range(first, stop):
            if self.lines[i].kind in (LineKind.VALUE, LineKind.HEADER):
                last = i
        return last

    def last_content_line(self) -> int:
        """Index of the last VALUE/HEADER line of the document, or -1."""
        for i in range(len(self.lines) - 1, -1, -1):
            if self.lines[i].kind in (LineKind.VALUE, LineKind.HEADER):
                return i
        return -1


class ScanError(ValueError):
    """The text is not something this scanner can map (the caller falls back or refuses)."""


_BARE = re.compile(r"[A-Za-z0-9_-]+")


def parse_key(raw: str) -> tuple[tuple[str, ...], str]:
    """Split a dotted key (as written in a header) into its parts; return the quote used."""
    parts: list[str] = []
    quote = ""
    i, n = 0, len(raw)
    while i < n:
        while i < n and raw[i] in " \t":
            i += 1
        if i >= n:
            break
        ch = raw[i]
        if ch in "\"'":
            j = i + 1
            while j < n and raw[j] != ch:
                j += 2 if (ch == '"' and raw[j] == "\\") else 1
            if j >= n:
                raise ScanError(f"unterminated quoted key in [{raw}]")
            token = raw[i : j + 1]
            parts.append(tomllib.loads(f"k = {token}")["k"])
            quote = quote or ch
            i = j + 1
        else:
            m = _BARE.match(raw, i)
            if not m:
                raise ScanError(f"unexpected character {ch!r} in table key [{raw}]")
            parts.append(m.group(0))
            i = m.end()
        while i < n and raw[i] in " \t":
            i += 1
        if i < n:
            if raw[i] != ".":
                raise ScanError(f"unexpected character {raw[i]!r} in table key [{raw}]")
            i += 1
    if not parts:
        raise ScanError("empty table key")
    return tuple(parts), quote


def format_key(parts: tuple[str, ...], quote: str) -> str:
    """Render a dotted key, quoting the parts that are not bare keys, in the file's style."""
    out = []
    for part in parts:
        if _BARE.fullmatch(part):
            out.append(part)
        elif quote == "'" and "'" not in part and "\n" not in part:
            out.append(f"'{part}'")
        else:
            escaped = part.replace("\\", "\\\\").replace('"', '\\"')
            out.append(f'"{escaped}"')
    return ".".join(out)


class _Lexer:
    """Walks the text once, remembering multi-line strings and open arrays across lines."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.ml: str | None = None  # '"""' or "'''" while inside a multi-line string
        self.depth = 0  # open [ / { in a value

    def _skip_string(self, line: str, i: int) -> int:
        """Return the index after the string starting at line[i] (or len when a ML string opens)."""
        for delim in ('"""', "'''"):
            if line.startswith(delim, i):
                return self._in_ml(line, i + 3, delim)
        ch = line[i]
        j = i + 1
        while j < len(line):
            if ch == '"' and line[j] == "\\":
                j += 2
                continue
            if line[j] == ch:
                return j + 1
            j += 1
        raise ScanError(f"unterminated string: {line.strip()!r}")

    def _in_ml(self, line: str, j: int, delim: str) -> int:
        while j < len(line):
            if delim == '"""' and line[j] == "\\":
                j += 2
                continue
            if line.startswith(delim, j):
                # up to two extra quotes may belong to the content ("""a"""" is valid)
                k = j + 3
                while k < len(line) and line[k] == delim[0] and k < j + 5:
                    k += 1
                self.ml = None
                return k
            j += 1
        self.ml = delim
        return len(line)

    def value_chars(self, line: str, i: int) -> None:
        """Consume a value (or the rest of one) from line[i:], tracking brackets and strings."""
        while i < len(line):
            if self.ml is not None:
                i = self._in_ml(line, i, self.ml)
                continue
            ch = line[i]
            if ch == "#":
                return
            if ch in "\"'":
                i = self._skip_string(line, i)
                continue
            if ch in "[{":
                self.depth += 1
            elif ch in "]}":
                self.depth -= 1
                if self.depth < 0:
                    raise ScanError(f"unbalanced bracket: {line.strip()!r}")
            i += 1

    def key_then_value(self, line: str) -> None:
        """A `key = value` line: skip the (possibly quoted, dotted) key, then the value."""
        i = 0
        while i < len(line) and line[i] != "=":
            if line[i] in "\"'":
                i = self._skip_string(line, i)
                if self.ml is not None:
                    raise ScanError(f"multi-line string used as a key: {line.strip()!r}")
                continue
            i += 1
        if i >= len(line):
            raise ScanError(f"line is neither a table, a key/value, nor a comment: {line.strip()!r}")
        self.value_chars(line, i + 1)


def scan(text: str) -> Scan:
    """Map every line of a TOML document. Raises ScanError on what it cannot map."""
    newline = "\r\n" if "\r\n" in text else "\n"
    lex = _Lexer(text)
    lines: list[Line] = []
    headers: list[Header] = []
    pos = 0
    for raw in text.splitlines(keepends=True):
        start, end = pos, pos + len(raw)
        pos = end
        body = raw.rstrip("\r\n")
        stripped = body.lstrip(" \t")
        indent = body[: len(body) - len(stripped)]
        if lex.ml is not None or lex.depth > 0:
            lex.value_chars(body, 0)
            lines.append(Line(start, end, LineKind.VALUE, indent))
            continue
        if not stripped:
            lines.append(Line(start, end, LineKind.BLANK, indent))
        elif stripped.startswith("#"):
            lines.append(Line(start, end, LineKind.COMMENT, indent))
        elif stripped.startswith("["):
            array = stripped.startswith("[[")
            inner_start = 2 if array else 1
            close = _header_close(stripped, inner_start, array)
            path, quote = parse_key(stripped[inner_start:close])
            headers.append(Header(len(lines), path, array, indent, quote))
            lines.append(Line(start, end, LineKind.HEADER, indent))
        else:
            lex.key_then_value(body)
            lines.append(Line(start, end, LineKind.VALUE, indent))
    if lex.ml is not None or lex.depth:
        raise ScanError("document ends inside a string or an array")
    return Scan(text, tuple(lines), tuple(headers), newline)


def _header_close(stripped: str, i: int, array: bool) -> int:
    """Find the closing bracket of a table header, skipping quoted keys."""
    while i < len(stripped):
        ch = stripped[i]
        if ch in "\"'":
            j = i + 1
            while j < len(stripped) and stripped[j] != ch:
                j += 2 if (ch == '"' and stripped[j] == "\\") else 1
            i = j + 1
            continue
        if ch == "]":
            if array and not stripped.startswith("]]", i):
                raise ScanError(f"malformed array-of-tables header: {stripped!r}")
            rest = stripped[i + (2 if array else 1) :].strip()
            if rest and not rest.startswith("#"):
                raise ScanError(f"text after table header: {stripped!r}")
            return i
        i += 1
    raise ScanError(f"unterminated table header: {stripped!r}")
