"""PURE: parse the shim catalog (images/shims.toml) into frozen value objects.

No I/O here: callers hand in the text. ``kwasm_py.shims.source.read_catalog`` finds and reads the
file; ``kwasm_py.shims.fetch`` fetches what an entry points at.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from kwasm_py.errors import CatalogError

SCHEMA = 1
ARCHES = ("amd64", "arm64")
UNPUBLISHED = "unpublished"  # binary_sha256 value: upstream publishes none; trust the archive hash
# Download cap of a catalog that sets no `max_archive_bytes`: a shim archive is tens of MB.
DEFAULT_MAX_ARCHIVE_BYTES = 256 * 2**20

# `uname -m` / platform.machine() spellings -> the Go/OCI names the catalog and TARGETARCH use.
_MACHINE_ALIASES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "x64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv8": "arm64",
    "armv8l": "arm64",
}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_BINARY = re.compile(r"containerd-shim-[a-z0-9][a-z0-9-]*-v[0-9]+")
_RUNTIME_TYPE = re.compile(r"io\.containerd\.[a-z0-9_-]+\.v[0-9]+")


@dataclass(frozen=True)
class Artifact:
    """One downloadable release archive of a shim for one architecture."""

    arch: str
    url: str
    archive_sha256: str
    binary_sha256: str | None  # None: upstream publishes none (catalog says "unpublished")
    max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES  # a download past this is aborted, nothing placed

    @property
    def filename(self) -> str:
        """The archive's file name: what a --mirror must serve."""
        return unquote(PurePosixPath(urlsplit(self.url).path).name)


@dataclass(frozen=True)
class ShimEntry:
    """A shim the project ships: how containerd knows it and where its archives are."""

    name: str
    handler: str
    runtime_type: str
    binary: str
    version: str
    default: bool
    project: str
    artifacts: Mapping[str, Artifact]

    def artifact(self, arch: str) -> Artifact:
        """The archive for ``arch`` (amd64/arm64), or a CatalogError naming what exists."""
        try:
            return self.artifacts[arch]
        except KeyError as ex:
            have = ", ".join(sorted(self.artifacts)) or "none"
            raise CatalogError(
                f"shim {self.name} {self.version} has no {arch} archive in the catalog (it has: {have})",
                hint="pick another --arch, or add the release asset to images/shims.toml",
            ) from ex


@dataclass(frozen=True)
class Catalog:
    """Every shim in the catalog, in file order."""

    shims: tuple[ShimEntry, ...]
    source: str = "shims.toml"

    def names(self) -> list[str]:
        return [s.name for s in self.shims]

    def get(self, name: str) -> ShimEntry:
        for shim in self.shims:
            if shim.name == name:
                return shim
        raise CatalogError(
            f"unknown shim {name!r} (the catalog {self.source} has: {', '.join(self.names())})",
            hint="`kwasm-py shims list` shows what is available",
        )

    def select(self, names: Iterable[str] = ()) -> list[ShimEntry]:
        """The named shims (deduplicated, in the order given), or the default ones when none."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return [s for s in self.shims if s.default]
        return [self.get(n) for n in wanted]

    def handlers(self) -> dict[str, str]:
        """handler -> runtime_type, for manifests (RuntimeClass) and the node engine."""
        return {s.handler: s.runtime_type for s in self.shims}


def _malformed(message: str) -> CatalogError:
    """A CatalogError for a catalog that breaks the format, pointing at its description."""
    return CatalogError(message, hint="the format is described at the top of images/shims.toml")


def normalize_arch(machine: str) -> str:
    """Map ``uname -m``-style names (x86_64, aarch64) to amd64/arm64; reject anything else."""
    arch = _MACHINE_ALIASES.get(machine.strip().lower())
    if arch is None:
        raise CatalogError(
            f"unsupported architecture {machine!r} (shims exist for: {', '.join(ARCHES)})",
            hint="pass --arch amd64 or --arch arm64",
        )
    return arch


def parse(text: str, *, source: str = "shims.toml") -> Catalog:
    """Parse and validate catalog text; any problem is a CatalogError naming the key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as ex:
        raise _malformed(f"{source}: not valid TOML: {ex}") from ex
    schema = doc.get("schema")
    if schema != SCHEMA:
        raise _malformed(f"{source}: schema = {schema!r}, this kwasm-py reads schema {SCHEMA}")
    shims_doc = doc.get("shims")
    if not isinstance(shims_doc, dict) or not shims_doc:
        raise _malformed(f"{source}: no [shims.NAME] tables")
    cap = _size(doc, "max_archive_bytes", source, DEFAULT_MAX_ARCHIVE_BYTES)
    shims = tuple(_parse_shim(name, body, source, cap) for name, body in shims_doc.items())
    handlers = [s.handler for s in shims]
    dup = sorted({h for h in handlers if handlers.count(h) > 1})
    if dup:
        raise _malformed(f"{source}: handler {dup[0]!r} is used by more than one shim")
    return Catalog(shims=shims, source=source)


def _parse_shim(name: str, body: object, source: str, cap: int) -> ShimEntry:
    where = f"{source}: [shims.{name}]"
    if not isinstance(body, dict):
        raise _malformed(f"{where} is not a table")
    if not _NAME.fullmatch(name):
        raise _malformed(f"{where}: name must be lowercase letters, digits and '-'")
    known = {"handler", "runtime_type", "binary", "version", "default", "project", "arch"}
    extra = sorted(set(body) - known)
    if extra:
        raise _malformed(f"{where}: unknown key {extra[0]!r}")
    handler = _str(body, "handler", where)
    if not _NAME.fullmatch(handler):
        raise _malformed(f"{where}: handler {handler!r} is not a valid runtime name")
    runtime_type = _str(body, "runtime_type", where)
    if not _RUNTIME_TYPE.fullmatch(runtime_type):
        raise _malformed(f"{where}: runtime_type {runtime_type!r} is not io.containerd.NAME.vN")
    binary = _str(body, "binary", where)
    if not _BINARY.fullmatch(binary):
        raise _malformed(f"{where}: binary {binary!r} is not containerd-shim-NAME-vN")
    default = body.get("default", False)
    if not isinstance(default, bool):
        raise _malformed(f"{where}: default must be true or false")
    arch_doc = body.get("arch")
    if not isinstance(arch_doc, dict) or not arch_doc:
        raise _malformed(f"{where}: no [shims.{name}.arch.amd64|arm64] tables")
    artifacts: dict[str, Artifact] = {}
    for arch, art in arch_doc.items():
        if arch not in ARCHES:
            raise _malformed(f"{where}: unknown arch {arch!r} (use {', '.join(ARCHES)})")
        artifacts[arch] = _parse_artifact(arch, art, f"{source}: [shims.{name}.arch.{arch}]", cap)
    return ShimEntry(
        name=name,
        handler=handler,
        runtime_type=runtime_type,
        binary=binary,
        version=_str(body, "version", where),
        default=default,
        project=str(body.get("project", "")),
        artifacts=artifacts,
    )


def _parse_artifact(arch: str, body: object, where: str, cap: int) -> Artifact:
    if not isinstance(body, dict):
        raise _malformed(f"{where} is not a table")
    extra = sorted(set(body) - {"url", "archive_sha256", "binary_sha256", "max_archive_bytes"})
    if extra:
        raise _malformed(f"{where}: unknown key {extra[0]!r}")
    url = _str(body, "url", where)
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc or not parts.path.strip("/"):
        raise _malformed(f"{where}: url {url!r} is not an http(s) URL of a file")
    archive_sha = _str(body, "archive_sha256", where).lower()
    if not _HEX64.fullmatch(archive_sha):
        raise CatalogError(
            f"{where}: archive_sha256 {archive_sha!r} is not a sha256 (64 hex digits)",
            hint="put the release asset's real digest here; placeholders are refused on purpose",
        )
    binary_sha = _str(body, "binary_sha256", where).lower()
    if binary_sha != UNPUBLISHED and not _HEX64.fullmatch(binary_sha):
        raise _malformed(f"{where}: binary_sha256 {binary_sha!r} is neither a sha256 nor {UNPUBLISHED!r}")
    return Artifact(
        arch=arch,
        url=url,
        archive_sha256=archive_sha,
        binary_sha256=None if binary_sha == UNPUBLISHED else binary_sha,
        max_bytes=_size(body, "max_archive_bytes", where, cap),
    )


def _size(body: Mapping[str, object], key: str, where: str, default: int) -> int:
    """A positive byte count (TOML integer) at ``key``, or ``default`` when absent."""
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _malformed(f"{where}: {key} must be a positive number of bytes, not {value!r}")
    return value


def _str(body: Mapping[str, object], key: str, where: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _malformed(f"{where}: {key} is missing or not a non-empty string")
    return value.strip()
