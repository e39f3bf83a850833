"""The node's filesystem as seen through its root directory on this machine.

Node paths (``/etc/containerd/config.toml``) are resolved inside the host root the way the node
itself would resolve them: absolute symlinks point into the root, never out to this machine's
own files. Writes are atomic (`write_atomic`: an O_EXCL temp file in the same directory, fsync,
rename) and keep the owner and mode of the file they replace, so a crash leaves either the old
or the new file. Every file the engine writes goes through `HostFS.atomic_write`; every
directory it creates gets `DIR_MODE` (or the mode asked for) whatever the process umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kwasm_py.errors import HostIOError, LockHeld
from kwasm_py.shims import digests

_MAX_LINKS = 40
DIR_MODE = 0o755  # directories kwasm-py creates on the node: root's, readable by containerd


@dataclass(frozen=True)
class FileInfo:
    """A file's bytes with the metadata a rewrite keeps."""

    data: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int


def _io_error(action: str, path: Path | PurePosixPath, err: OSError) -> HostIOError:
    reason = err.strerror or str(err)
    hint = ""
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "the node's filesystem is read-only here; choose a writable --install-dir"
    elif err.errno == errno.ENOSPC:
        hint = "the node's filesystem is full; free space and run again"
    return HostIOError(f"cannot {action} {path}: {reason}", hint=hint)


class HostFS:
    """Files of one node, addressed by node path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------------------------

    def resolve(self, node_path: PurePosixPath) -> Path:
        """Map an absolute node path to a host path under the root, following symlinks as the
        node would (absolute targets stay inside the root). Raises HostIOError for a relative
        path or a symlink loop."""
        if not node_path.is_absolute():
            raise HostIOError(f"node path {node_path} is not absolute")
        parts = list(node_path.parts[1:])
        resolved: list[str] = []
        links = 0
        while parts:
            part = parts.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = self.root.joinpath(*resolved, part)
            if candidate.is_symlink():
                links += 1
                if links > _MAX_LINKS:
                    raise HostIOError(f"too many symlinks resolving {node_path}")
                target = PurePosixPath(os.readlink(candidate))
                if target.is_absolute():
                    resolved = []
                    parts = list(target.parts[1:]) + parts
                else:
                    parts = list(target.parts) + parts
                continue
            resolved.append(part)
        return self.root.joinpath(*resolved)

    # -- reading -------------------------------------------------------------------------------

    def exists(self, node_path: PurePosixPath) -> bool:
        """Whether the node path exists (after resolving symlinks inside the root)."""
        return self.resolve(node_path).exists()

    def read(self, node_path: PurePosixPath) -> FileInfo | None:
        """The file's bytes and metadata, or None when it does not exist.

        Raises HostIOError when it is a directory or cannot be read.
        """
        path = self.resolve(node_path)
        try:
            with path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            return None
        except IsADirectoryError as err:
            raise HostIOError(f"{node_path} is a directory, not a file") from err
        except OSError as err:
            raise _io_error("read", node_path, err) from err
        return FileInfo(data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)

    def read_text(self, node_path: PurePosixPath) -> str | None:
        """The file as UTF-8 text, None when absent; raises HostIOError when unreadable or not UTF-8."""
        info = self.read(node_path)
        if info is None:
            return None
        try:
            return info.data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise HostIOError(f"{node_path} is not UTF-8 text") from err

    def sha256(self, node_path: PurePosixPath) -> str | None:
        """Hex sha256 of the file, None when absent; raises HostIOError when unreadable."""
        return file_sha256(self.resolve(node_path))

    def listdir(self, node_path: PurePosixPath) -> list[str]:
        """Sorted names in the directory; [] when it is absent or not a directory."""
        try:
            return sorted(os.listdir(self.resolve(node_path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -- writing -------------------------------------------------------------------------------

    def atomic_write(
        self,
        node_path: PurePosixPath,
        data: bytes,
        *,
        mode: int = 0o644,
        owner: tuple[int, int] | None = None,
        keep_metadata: bool = True,
    ) -> None:
        """Replace the file at `node_path` with `data` atomically (see `write_atomic`).

        With `keep_metadata` (a node file we edit, such as containerd's config) a symlink at
        `node_path` is followed inside the root, as containerd follows it, and the existing
        file's mode and owner win over `mode` / `owner`. Without it (a file kwasm-py owns: shim
        binaries, state, backups) only the directories are resolved: a symlink planted at the
        name itself is replaced, never written through. Raises HostIOError when the write fails.
        """
        path = self.resolve(node_path.parent) / node_path.name
        if keep_metadata:
            path = self.resolve(node_path)
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                mode = stat.S_IMODE(st.st_mode)
                owner = (st.st_uid, st.st_gid)
        write_atomic(path, data, mode=mode, owner=owner, label=str(node_path))

    def copy_in(self, source: Path, node_path: PurePosixPath, *, mode: int = 0o755) -> str:
        """Copy the host file `source` to `node_path` atomically with `mode`; return its sha256.

        Raises HostIOError when the source cannot be read or the destination written.
        """
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise _io_error("read", source, err) from err
        self.atomic_write(node_path, data, mode=mode, keep_metadata=False)
        return hashlib.sha256(data).hexdigest()

    def makedirs(self, node_path: PurePosixPath, *, mode: int = DIR_MODE) -> list[PurePosixPath]:
        """Create the directory and its missing parents, each with exactly `mode` whatever the
        umask (existing ones are left as they are).

        Returns the node paths of the directories it created, outermost first (so a caller can
        remove exactly those again, innermost first). Raises HostIOError.
        """
        missing: list[PurePosixPath] = []
        current = node_path
        while not self.resolve(current).exists() and current != current.parent:
            missing.append(current)
            current = current.parent
        try:
            make_dirs(self.resolve(node_path), mode=mode)
        except OSError as err:
            raise _io_error("create directory", node_path, err) from err
        return list(reversed(missing))

    def remove(self, node_path: PurePosixPath) -> bool:
        """Unlink the file; True when it was there, False when absent; raises HostIOError."""
        try:
            self.resolve(node_path).unlink()
        except FileNotFoundError:
            return False
        except OSError as err:
            raise _io_error("remove", node_path, err) from err
        _fsync_dir(self.resolve(node_path.parent))
        return True

    def rmdir_if_empty(self, node_path: PurePosixPath) -> None:
        """Remove the directory when it is empty; anything else (absent, not empty) is left."""
        with contextlib.suppress(OSError):
            self.resolve(node_path).rmdir()

    @contextlib.contextmanager
    def lock(self, *, timeout: float) -> Iterator[None]:
        """Hold an exclusive flock on the node's root directory, waiting at most `timeout` s.

        Locking the root directory itself (not a lock file) serialises every kwasm-py run on the
        node, including one in another pod that mounts the same root, and leaves no file behind:
        a run that fails before changing anything really changes nothing. Raises LockHeld after
        the timeout, HostIOError when the root cannot be opened.
        """
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise _io_error("open", self.root, err) from err
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockHeld(
                            f"another kwasm-py run holds the lock on {self.root} (waited {timeout:.0f} s)",
                            hint="wait for it to finish, or raise --lock-timeout",
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)


def file_sha256(path: Path) -> str | None:
    """Hex sha256 of a host file, None when it does not exist; raises HostIOError when unreadable."""
    try:
        return digests.file_sha256(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _io_error("read", path, err) from err


def make_dirs(path: Path, *, mode: int = DIR_MODE) -> None:
    """Create the host directory `path` and its missing parents with exactly `mode`.

    ``mkdir`` applies the process umask (a umask of 077 would leave /opt/kwasm unreadable to
    anything but root, 000 would make it world-writable), so each directory created here is
    opened without following symlinks and ``fchmod``-ed to `mode`. Directories that already
    exist keep their mode. Returns nothing; raises OSError (the caller names the node path).
    """
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode)
        except FileExistsError:
            if not directory.is_dir() or directory.is_symlink():
                raise
            continue  # made meanwhile by a concurrent run: its mode is its maker's
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None, label: str) -> None:
    """Write `data` to the host file `path`: temp file in the same directory, fsync, chmod/chown,
    rename over, fsync the directory. The one atomic-write helper of the node engine.

    The temp file is made by `tempfile.mkstemp` (O_CREAT|O_EXCL|O_NOFOLLOW, a random name, mode
    0600), so a symlink or file planted at a guessable name is never followed or reused. The
    final step is rename(2), which replaces whatever entry is at `path` and never follows a
    symlink there: a link planted at the target name is replaced, its target left alone.
    Missing parent directories are created with `DIR_MODE` (see `make_dirs`). Never rewrites a
    file in place: a running shim binary stays intact (no "text file busy"), and a crash leaves
    the old or the new file, never a partial one. `owner` (uid, gid) is applied when running as
    root. Raises HostIOError naming `label` (the node path) when any step fails.
    """
    tmp: Path | None = None
    try:
        make_dirs(path.parent)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.kwasm-tmp-", dir=path.parent)
        tmp = Path(name)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise _io_error("write", PurePosixPath(label), err) from err


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
