"""uninstall_plan.make_plan: pure decisions of an uninstall, from the state file and the files."""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

import pytest

from kwasm_py.errors import UsageError
from kwasm_py.model import ContainerdVersion
from kwasm_py.node import plan, uninstall_plan
from kwasm_py.node.state import ConfigRecord, RuntimeRecord, State
from tests.test_plan import DEBIAN, LAYOUT, SHIM

INSTALL_DIR = PurePosixPath("/opt/kwasm")
STATE_PATH = INSTALL_DIR / "kwasm-state.json"
BACKUP = "/opt/kwasm/backup/config.toml.orig"
C16, C21 = ContainerdVersion(1, 6, 20), ContainerdVersion(2, 1, 9)


def installed(own_text: str | None, containerd: ContainerdVersion) -> tuple[State, bytes]:
    """The state file and config an install of spin leaves, as the engine records them."""
    p = plan.make_plan(
        layout=LAYOUT,
        own_text=own_text,
        reference_text=None,
        containerd=containerd,
        shims=[SHIM],
        installed={},
        install_dir=PurePosixPath("/opt/kwasm"),
        state=None,
    )
    written = p.new_text.encode()
    records = tuple(
        RuntimeRecord(
            handler=e.handler,
            name=b.shim.name,
            runtime_type=e.runtime_type,
            shim=str(b.dest),
            sha256=b.sha256,
            table=e.as_table(),
        )
        for e, b in zip(p.entries, p.binaries, strict=True)
    )
    state = State(
        status="installed",
        layout="containerd",
        config=ConfigRecord(
            path=str(LAYOUT.config_path),
            kind="config",
            created=own_text is None,
            original_sha256=hashlib.sha256(own_text.encode()).hexdigest() if own_text else None,
            written_sha256=hashlib.sha256(written).hexdigest(),
            backup=BACKUP if own_text is not None else None,
            schema=p.schema.value,
            version_added=p.version_added,
        ),
        runtimes=records,
        companion=p.companion,
    )
    return state, written


def test_untouched_config_is_restored_from_the_backup() -> None:
    """Nothing else changed the file: the plan gives back the backup byte for byte and removes
    the binary, the backup and the state file."""
    state, written = installed(DEBIAN, C16)
    p = uninstall_plan.make_plan(
        state=state,
        state_path=STATE_PATH,
        handlers=[],
        old_data=written,
        backup_data=DEBIAN.encode(),
        install_dir=INSTALL_DIR,
    )
    assert p.changed and p.restores_original and p.new_data == DEBIAN.encode()
    assert p.removes == (
        PurePosixPath("/opt/kwasm/bin/containerd-shim-spin-v2"),
        PurePosixPath(BACKUP),
        STATE_PATH,
    )
    assert p.remaining_state(updated="now") is None
    lines = p.diff().splitlines()[2:]
    assert [x[1:].strip() for x in lines if x.startswith("-")][
        -1
    ] == 'runtime_type = "/opt/kwasm/bin/containerd-shim-spin-v2"'
    assert not [x for x in lines if x.startswith("+")], "restoring only removes lines"


def test_a_config_others_edited_loses_only_our_tables() -> None:
    """After someone else edited the file, only our runtime (and the runc companion we added on
    1.x) goes; their edit stays and the backup is not used."""
    state, written = installed(DEBIAN, C16)
    edited = written.decode().replace('bin_dir = "/usr/lib/cni"', 'bin_dir = "/opt/cni/bin"').encode()
    p = uninstall_plan.make_plan(
        state=state,
        state_path=STATE_PATH,
        handlers=[],
        old_data=edited,
        backup_data=None,
        install_dir=INSTALL_DIR,
    )
    assert p.changed and not p.restores_original and p.new_data is not None
    after = p.new_data.decode()
    assert 'bin_dir = "/opt/cni/bin"' in after and "spin" not in after and "runtimes.runc" not in after
    assert after == DEBIAN.replace('bin_dir = "/usr/lib/cni"', 'bin_dir = "/opt/cni/bin"')


def test_a_config_we_created_is_removed() -> None:
    """A file kwasm-py created (containerd 2.x, no config before) goes entirely."""
    state, written = installed(None, C21)
    p = uninstall_plan.make_plan(
        state=state,
        state_path=STATE_PATH,
        handlers=[],
        old_data=written,
        backup_data=None,
        install_dir=INSTALL_DIR,
    )
    assert p.changed and p.new_data is None
    assert p.diff().splitlines()[:2] == ["--- /etc/containerd/config.toml", "+++ /dev/null"]
    assert p.removes == (PurePosixPath("/opt/kwasm/bin/containerd-shim-spin-v2"), STATE_PATH)


def test_a_config_that_is_gone_needs_no_restart() -> None:
    """The config is already gone: no config change (so no restart), the files still go."""
    state, _ = installed(DEBIAN, C16)
    p = uninstall_plan.make_plan(
        state=state,
        state_path=STATE_PATH,
        handlers=["spin"],
        old_data=None,
        backup_data=None,
        install_dir=INSTALL_DIR,
    )
    assert not p.changed and p.diff() == "" and STATE_PATH in p.removes


def test_refusals() -> None:
    """A handler kwasm-py did not install is refused; a missing pre-image only means our keys
    are removed from today's file instead of restoring bytes (issue 11: ownership by keys)."""
    state, written = installed(DEBIAN, C16)
    with pytest.raises(UsageError, match="did not install handler"):
        uninstall_plan.make_plan(
            state=state,
            state_path=STATE_PATH,
            handlers=["nope"],
            old_data=written,
            backup_data=None,
            install_dir=INSTALL_DIR,
        )
    p = uninstall_plan.make_plan(
        state=state,
        state_path=STATE_PATH,
        handlers=[],
        old_data=written,
        backup_data=None,
        install_dir=INSTALL_DIR,
    )
    assert not p.restores_original and p.new_data is not None
    assert b"spin" not in p.new_data and p.new_data.decode() == DEBIAN
