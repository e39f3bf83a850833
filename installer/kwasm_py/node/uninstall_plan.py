"""What an uninstall would change on a node: a pure function of the state file and the files.

The engine reads the state file, the config it names and the original's backup, and hands them
here; the UninstallPlan says what the config becomes (the original byte for byte when nothing
else changed it, else the config minus our tables), which files go and what state remains.
The engine applies it step by step and `node plan --uninstall` prints it. No I/O here.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from kwasm_py.containerd.redact import redact
from kwasm_py.errors import UsageError
from kwasm_py.node import ownership
from kwasm_py.node.state import RuntimeRecord, State


@dataclass(frozen=True)
class UninstallPlan:
    """The config's bytes before and after, the runtimes removed and kept, the files that go."""

    state: State
    config_path: PurePosixPath
    chosen: tuple[RuntimeRecord, ...]  # the runtimes removed
    keep: tuple[RuntimeRecord, ...]  # the runtimes kwasm-py keeps managing
    old_data: bytes | None  # the config now (None: it is gone)
    new_data: bytes | None  # the config afterwards (None: removed)
    restores_original: bool  # new_data is the pre-image of our last write, byte for byte
    state_path: PurePosixPath  # where the state file is
    notes: tuple[str, ...] = ()  # tables left in place because they are no longer ours

    @property
    def changed(self) -> bool:
        """Whether the config changes (and so containerd has to be restarted)."""
        return self.old_data != self.new_data

    @property
    def removes(self) -> tuple[PurePosixPath, ...]:
        """Node paths of the files removed after the config: shim binaries, then (when nothing
        is kept) the original's backup and the state file."""
        paths = [PurePosixPath(r.shim) for r in self.chosen]
        if not self.keep:
            if self.state.config.backup:
                paths.append(PurePosixPath(self.state.config.backup))
            paths.append(self.state_path)
        return tuple(paths)

    def diff(self) -> str:
        """The config change as a unified diff ("" when it does not change), credential values
        redacted (`containerd.redact`)."""
        path = str(self.config_path)
        old = redact((self.old_data or b"").decode(errors="replace")).splitlines(keepends=True)
        new = redact((self.new_data or b"").decode(errors="replace")).splitlines(keepends=True)
        return "".join(
            difflib.unified_diff(
                old,
                new,
                fromfile=path if self.old_data is not None else "/dev/null",
                tofile=path if self.new_data is not None else "/dev/null",
            )
        )

    def remaining_state(self, *, updated: str) -> State | None:
        """The state file afterwards: the kept runtimes and the config as written, or None when
        nothing is kept (the state file goes)."""
        if not self.keep:
            return None
        return replace(
            self.state,
            runtimes=self.keep,
            config=replace(
                self.state.config,
                written_sha256=hashlib.sha256(self.new_data or b"").hexdigest(),
            ),
            updated=updated,
        )


def make_plan(
    *,
    state: State,
    state_path: PurePosixPath,
    handlers: list[str],
    old_data: bytes | None,
    backup_data: bytes | None,
    install_dir: PurePosixPath,
) -> UninstallPlan:
    """Decide what removing `handlers` (all when empty) does to the config the state file names.

    Takes the state file and its node path, the handlers, the config's bytes now (None: absent)
    and the bytes of the stored pre-image of our last write (None: absent or none recorded),
    and the install directory (tables whose runtime_type points under it are ours, see
    `ownership.is_ours`). Returns the UninstallPlan. Raises UsageError for a handler kwasm-py
    did not install, ConfigError when the config no longer parses.
    """
    cfg_path = PurePosixPath(state.config.path)
    chosen = [r for r in state.runtimes if not handlers or r.handler in handlers]
    unknown = set(handlers) - {r.handler for r in state.runtimes}
    if unknown:
        raise UsageError(f"kwasm-py did not install handler(s) {', '.join(sorted(unknown))}")
    keep = [r for r in state.runtimes if r not in chosen]
    new_data: bytes | None
    restores = False
    notes: tuple[str, ...] = ()
    if old_data is None:
        new_data = None
    elif (
        not keep
        and hashlib.sha256(old_data).hexdigest() == state.config.written_sha256
        and (state.config.created or backup_data is not None)
    ):
        # Nothing else changed since our last write, and the pre-image of that very write is
        # stored: give it back byte for byte (a file we created goes).
        new_data = None if state.config.created else backup_data
        restores = not state.config.created
    else:
        # Someone changed the file since (or no pre-image): remove exactly our keys from today's.
        new_data, notes = ownership.remove_ours(
            old_data, state, chosen, keep=bool(keep), install_dir=install_dir
        )
    return UninstallPlan(
        state=state,
        config_path=cfg_path,
        chosen=tuple(chosen),
        keep=tuple(keep),
        old_data=old_data,
        new_data=new_data,
        restores_original=restores,
        state_path=state_path,
        notes=notes,
    )
