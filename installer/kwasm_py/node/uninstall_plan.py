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

from kwasm_py.containerd import config as cc
from kwasm_py.containerd.redact import redact
from kwasm_py.errors import HostIOError, UsageError
from kwasm_py.model import CriSchema
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
    restores_original: bool  # new_data is the backup of the original, byte for byte
    state_path: PurePosixPath  # where the state file is

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
) -> UninstallPlan:
    """Decide what removing `handlers` (all when empty) does to the config the state file names.

    Takes the state file and its node path, the handlers, the config's bytes now (None: absent)
    and the bytes of the original's backup (None: absent or none recorded). Returns the
    UninstallPlan. Raises
    UsageError for a handler kwasm-py did not install, HostIOError when the original has to be
    restored but its backup is missing, ConfigError when the config no longer parses.
    """
    cfg_path = PurePosixPath(state.config.path)
    chosen = [r for r in state.runtimes if not handlers or r.handler in handlers]
    unknown = set(handlers) - {r.handler for r in state.runtimes}
    if unknown:
        raise UsageError(f"kwasm-py did not install handler(s) {', '.join(sorted(unknown))}")
    keep = [r for r in state.runtimes if r not in chosen]
    new_data: bytes | None
    restores = False
    if old_data is None:
        new_data = None
    elif not keep and hashlib.sha256(old_data).hexdigest() == state.config.written_sha256:
        # Nothing else changed since we wrote it: give back the original, byte for byte.
        if state.config.created:
            new_data = None
        else:
            if backup_data is None:
                raise HostIOError(
                    f"the backup of {cfg_path} is missing ({state.config.backup})",
                    hint="the runtime table can still be removed by hand",
                )
            new_data = backup_data
            restores = True
    else:
        schema = CriSchema(state.config.schema)
        doc = cc.load(old_data.decode(), source=str(cfg_path))
        for record in chosen:
            edit = cc.remove_runtime(
                doc,
                record.handler,
                schema=schema,
                restore=record.replaced,
                version_added=state.config.version_added and not keep and record is chosen[-1],
                source=str(cfg_path),
            )
            doc = cc.load(edit.text, source=str(cfg_path))
        extra = state.companion
        if not keep and extra and cc.find_runtime(doc.data, schema, extra["handler"]) == extra["table"]:
            doc = cc.load(
                cc.remove_runtime(doc, extra["handler"], schema=schema, source=str(cfg_path)).text,
                source=str(cfg_path),
            )
        new_data = doc.text.encode()
        if state.config.created and not keep and not doc.data and not doc.body.strip():
            new_data = None
    return UninstallPlan(
        state=state,
        config_path=cfg_path,
        chosen=tuple(chosen),
        keep=tuple(keep),
        old_data=old_data,
        new_data=new_data,
        restores_original=restores,
        state_path=state_path,
    )
