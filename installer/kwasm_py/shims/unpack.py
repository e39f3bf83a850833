"""EFFECT: take the one shim binary out of a release archive, after vetting every member.

Every member is passed through ``tarfile.data_filter`` (the policy of ``extractall(filter=
"data")``, Python 3.11.4+; https://docs.python.org/3/library/tarfile.html#tarfile.data_filter)
before anything is written: absolute names, ``..`` escapes, links leaving the tree, devices and
FIFOs refuse the whole archive. Stricter than extraction, a name the filter would rewrite (a
leading ``/``) is refused too. Nothing is extracted onto the filesystem by name: the binary is
streamed into a file the caller chose, so link tricks at extraction time have nothing to act on.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from kwasm_py.errors import FetchError

CHUNK = 256 * 1024
MAX_BINARY_BYTES = 1 << 30  # a shim is tens of MB; refuse archive members claiming more
ARCHIVE_HINT = "this is not a plain release archive: check the url and archive_sha256 in the shim catalog"

# What each of tarfile's filter refusals means, in the words of our one-line errors.
_REFUSALS: tuple[tuple[type[tarfile.FilterError], str], ...] = (
    (tarfile.AbsolutePathError, "has an absolute path"),
    (tarfile.OutsideDestinationError, "climbs out of the archive's tree with '..'"),
    (tarfile.SpecialFileError, "is a device, FIFO or other special file"),
    (tarfile.AbsoluteLinkError, "is a link to an absolute path"),
    (tarfile.LinkOutsideDestinationError, "is a link to a place outside the archive"),
)


def check_members(members: Sequence[tarfile.TarInfo], *, what: str, root: str) -> None:
    """Refuse the whole archive if any member would be refused by ``filter="data"``.

    Takes the archive's members, a label for messages and ``root``: an empty directory standing
    for the extraction target (the filter resolves paths under it; nothing is written there).
    Raises FetchError naming the first unsafe member, chained from tarfile's FilterError.
    """
    for m in members:
        try:
            vetted = tarfile.data_filter(m, root)
        except tarfile.FilterError as ex:
            reason = next((r for kind, r in _REFUSALS if isinstance(ex, kind)), "is unsafe to extract")
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
