"""Real nodes for tests: systemd-nspawn nodes from `kwasm_py.sandbox`, with helpers.

Every test under tests/nodes is marked `root` and `nspawn`. The node roots are built once
(debootstrap, about a minute each) into $KWASM_CACHE and reused; each test gets freshly booted
nodes (an overlay copy, about a second to boot) that are stopped by PID and removed after it.

Without root or the tools the tests skip, unless KWASM_REQUIRE_NODES=1 (CI) makes that a
failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nodekit import KINDS, TEST_SHIM, NodeHandle

from kwasm_py import sandbox
from kwasm_py.errors import SandboxError


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this folder root + nspawn, so a quick run can deselect them."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.nspawn)


def _unavailable() -> str | None:
    try:
        sandbox.check_prerequisites()
    except SandboxError as err:
        return err.message
    return None


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def node_state() -> Iterator[Path]:
    """A registry folder for this session's nodes; every node left in it is stopped at the end."""
    reason = _unavailable()
    if reason:
        if os.environ.get("KWASM_REQUIRE_NODES") == "1":
            pytest.fail(f"real-node tests required but unavailable: {reason}")
        pytest.skip(reason)
    state = sandbox.scratch_state()
    yield state
    sandbox.down_all(state=state)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def node_roots(node_state: Path) -> Callable[[str], Path]:
    """Build (once, cached in $KWASM_CACHE) and return the unpacked root of a suite."""
    built: dict[str, Path] = {}

    def get(suite: str) -> Path:
        if suite not in built:
            built[suite] = sandbox.ensure_root(suite)
        return built[suite]

    return get


@pytest.fixture
def make_node(node_state: Path, node_roots: Callable[[str], Path]) -> Iterator[Callable[..., NodeHandle]]:
    """Factory: boot a fresh node (suite, flavour[, prepare(root)]); all stopped after the test."""
    started: list[sandbox.Node] = []
    counter = iter(range(1000))

    def make(
        suite: str = "bookworm",
        flavor: str = "containerd",
        prepare: Callable[[Path], None] | None = None,
    ) -> NodeHandle:
        node_roots(suite)
        name = f"t{os.getpid() % 10000}-{next(counter)}-{flavor}"
        node = sandbox.up(suite=suite, flavor_name=flavor, name=name, state=node_state, prepare=prepare)
        started.append(node)
        return NodeHandle(node)

    yield make
    errors = []
    for node in started:
        try:
            sandbox.down(node.name, state=node_state)
        except SandboxError as err:
            errors.append(err.message)
        for pid, start in ((node.nspawn_pid, node.nspawn_start), (node.pid, node.pid_start)):
            if sandbox.proc_start_time(pid) == start:
                errors.append(f"process {pid} of node {node.name} still runs after down")
    assert not errors, errors


@pytest.fixture(params=list(KINDS), ids=list(KINDS))
def any_node(request: pytest.FixtureRequest, make_node: Callable[..., NodeHandle]) -> NodeHandle:
    """One fresh node of each kind: bookworm, sid, k3s, k3s-agent, k3d."""
    suite, flavor = KINDS[request.param]
    return make_node(suite, flavor)


@pytest.fixture
def bookworm_node(make_node: Callable[..., NodeHandle]) -> NodeHandle:
    """A fresh bookworm node: containerd 1.6 under systemd."""
    return make_node(*KINDS["bookworm"])


@pytest.fixture
def sid_node(make_node: Callable[..., NodeHandle]) -> NodeHandle:
    """A fresh sid node: containerd 2.x under systemd."""
    return make_node(*KINDS["sid"])


@pytest.fixture
def test_shim(tmp_path: Path) -> Callable[[str], Path]:
    """Factory: write a test shim `containerd-shim-spin-v2` tagged TAG; return its host path."""

    def make(tag: str = "v1") -> Path:
        d = tmp_path / f"shim-{tag}"
        d.mkdir(exist_ok=True)
        shim = d / "containerd-shim-spin-v2"
        shim.write_text(TEST_SHIM % {"tag": tag})
        shim.chmod(0o755)
        return shim

    return make
