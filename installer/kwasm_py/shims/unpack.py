"""EFFECT: take the one shim binary out of a release archive, after vetting every member.

Every member is passed through ``tarfile.data_filter`` (the policy of ``extractall(filter=
"data")``, Python 3.11.4+; https://docs.python.org/3/library/tarfile.html#tarfile.data_filter;
on older 3.11, such as Debian bookworm's 3.11.2, a small check with the same refusals) before
anything is written: absolute names, ``..`` escapes, links leaving the tree, devices and
FIFOs refuse the whole archive. Stricter than extraction, a name the filter would rewrite (a
leading ``/``) is refused too. Nothing is extracted onto the filesystem by name: the binary is
streamed into a file the caller chose, so link tricks at extraction time have nothing to act on.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from kwasm_py.errors import FetchError

CHUNK = 256 * 1024
MAX_BINARY_BYTES = 1 << 30  # a shim is tens of MB; refuse archive members claiming more
ARCHIVE_HINT = "this is not a plain release archive: check the url and archive_sha256 in the shim catalog"

# What each of tarfile's filter refusals means, in the words of our one-line errors (by class
# name: Python before 3.11.4, Debian bookworm's 3.11.2 among them, has no filters at all).
_REFUSALS: tuple[tuple[str, str], ...] = (
    ("AbsolutePathError", "has an absolute path"),
    ("OutsideDestinationError", "climbs out of the archive's tree with '..'"),
    ("SpecialFileError", "is a device, FIFO or other special file"),
    ("AbsoluteLinkError", "is a link to an absolute path"),
    ("LinkOutsideDestinationError", "is a link to a place outside the archive"),
)
_HAS_FILTERS = hasattr(tarfile, "data_filter")


class _Refused(Exception):
    """A member the legacy check refuses; `kind` is the name tarfile's filter error would have."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _legacy_filter(member: tarfile.TarInfo, root: str) -> tarfile.TarInfo:
    """The refusals of ``filter="data"`` for Pythons without it (3.11.0-3.11.3): absolute names,
    names or links that leave `root`, devices and FIFOs. Member names are POSIX paths and nothing
    is extracted, so plain path arithmetic decides. Raises _Refused; returns the member."""
    base = posixpath.normpath(root)

    def inside(path: str) -> bool:
        return posixpath.commonpath([base, posixpath.normpath(path)]) == base

    if member.name.startswith("/"):
        raise _Refused("AbsolutePathError")
    if not inside(posixpath.join(base, member.name)):
        raise _Refused("OutsideDestinationError")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise _Refused("SpecialFileError")
    if member.issym() or member.islnk():
        if member.linkname.startswith("/"):
            raise _Refused("AbsoluteLinkError")
        start = posixpath.dirname(posixpath.join(base, member.name)) if member.issym() else base
        if not inside(posixpath.join(start, member.linkname)):
            raise _Refused("LinkOutsideDestinationError")
    return member


def check_members(members: Sequence[tarfile.TarInfo], *, what: str, root: str) -> None:
    """Refuse the whole archive if any member would be refused by ``filter="data"``.

    Takes the archive's members, a label for messages and ``root``: an empty directory standing
    for the extraction target (the filter resolves paths under it; nothing is written there).
    Raises FetchError naming the first unsafe member, chained from tarfile's FilterError.
    """
    vet = tarfile.data_filter if _HAS_FILTERS else _legacy_filter
    refused: tuple[type[Exception], ...] = (_Refused, getattr(tarfile, "FilterError", _Refused))
    for m in members:
        try:
            vetted = vet(m, root)
        except refused as ex:
            kind = ex.kind if isinstance(ex, _Refused) else type(ex).__name__
            reason = next((r for name, r in _REFUSALS if name == kind), "is unsafe to extract")
            if m.issym() or m.islnk():
                reason += f" ({m.linkname!r})"
            raise FetchError(
                f"{what}: archive member {m.name!r} {reason}; refused", hint=ARCHIVE_HINT
            ) from ex
        if vetted.name != m.name:  # the filter strips a leading '/': refuse, do not rewrite
            raise FetchError(
                f"{what}: archive member {m.name!r} has an absolute path; refused", hint=ARCHIVE_HINT
            )


def extract_binary(archive: Path, binary: str, out_path: Path, *, what: str) -> str:
    """Vet every member of ``archive``, then stream the regular file named ``binary`` into
    ``out_path`` (fsynced, mode 0755).

    Returns the binary's sha256 hex. Raises FetchError when the archive is unreadable or
    corrupt, holds an unsafe member, holds no or several ``binary``, or that member is not a
    regular file or is implausibly large; always chained from the cause when there is one.
    """
    try:
        tf = tarfile.open(archive, mode="r:*")  # noqa: SIM115 - closed below, after the checks
    except (tarfile.TarError, OSError) as ex:
        raise FetchError(f"{what}: not a readable tar archive: {ex}", hint=ARCHIVE_HINT) from ex
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as ex:
            raise FetchError(f"{what}: the archive is corrupt: {ex}", hint=ARCHIVE_HINT) from ex
        with tempfile.TemporaryDirectory(prefix=".vet-", dir=out_path.parent) as root:
            check_members(members, what=what, root=root)
        found = [m for m in members if PurePosixPath(m.name).name == binary and not m.isdir()]
        if len(found) != 1:
            names = ", ".join(m.name for m in members[:8]) or "nothing"
            many = "more than one" if found else "no"
            raise FetchError(
                f"{what}: the archive holds {many} {binary} (it has: {names})",
                hint="check the binary name in the shim catalog against the release archive",
            )
        member = found[0]
        if not member.isreg():
            raise FetchError(f"{what}: {member.name} in the archive is not a regular file", hint=ARCHIVE_HINT)
        if member.size > MAX_BINARY_BYTES:
            raise FetchError(f"{what}: {member.name} claims {member.size} bytes; refused", hint=ARCHIVE_HINT)
        h = hashlib.sha256()
        try:
            src = tf.extractfile(member)
            if src is None:  # pragma: no cover - isreg() members always have a file object
                raise FetchError(f"{what}: cannot read {member.name} from the archive", hint=ARCHIVE_HINT)
            with src, out_path.open("wb") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                out.flush()
                os.fsync(out.fileno())
        except (tarfile.TarError, EOFError, zlib.error) as ex:
            raise FetchError(f"{what}: the archive is corrupt: {ex}", hint=ARCHIVE_HINT) from ex
    out_path.chmod(0o755)
    return h.hexdigest()
