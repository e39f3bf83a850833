"""Reading what shim directories hold: file digests and the `kwasm-shims.json` manifest.

Shared by the fetcher (artifacts), the shim sources the agent uses, and the node filesystem,
without any of them importing the others (requests stays out of the agent's import graph).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "kwasm-shims.json"  # what a fetch placed in a directory, with the binaries' sha256
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (FileNotFoundError when it is absent)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, dict[str, object]]:
    """The manifest of a shim directory; {} when absent or unreadable."""
    try:
        doc = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    shims = doc.get("shims") if isinstance(doc, dict) else None
    if not isinstance(shims, dict):
        return {}
    return {k: v for k, v in shims.items() if isinstance(k, str) and isinstance(v, dict)}
