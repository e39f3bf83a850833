"""The installer image, built from the real images/Dockerfile with buildah (no registry: a local
stand-in base image, SHIMS=none) and run with the real runc. See tests/image_build.py."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kwasm_py import sandbox
from kwasm_py.shims import catalog as shim_catalog
from kwasm_py.shims import source as shim_source
from tests.harness import image_build as ib
from tests.harness.containerd import fake_shim
from tests.harness.image_build import Built
from tests.harness.noderoot import SYSTEMD, UNIT, V2, tree

pytestmark = [pytest.mark.root, pytest.mark.image]


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    """Build (SHIMS=none), export and unpack the image once for this module; removed afterwards."""
    reason = ib.unavailable()
    if reason:
        if os.environ.get("KWASM_REQUIRE_NODES"):
            pytest.fail(f"image build required here: {reason}")
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="kwasm-img-"))
    try:
        built = ib.build_export_unpack(work, "SHIMS=none")
        print(f"\nimage build: {built.summary()}")
        yield built
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def runc(tmp_path: Path) -> Iterator[ib.Runc]:
    """runc with a private state root; every container started is deleted after the test."""
    r = ib.Runc(Path(tempfile.mkdtemp(prefix="kwasm-runc-")), [])
    try:
        yield r
    finally:
        r.cleanup()
        shutil.rmtree(r.state, ignore_errors=True)


def test_agent_help_runs_in_the_image(built: Built, runc: ib.Runc, tmp_path: Path) -> None:
    """The image's entrypoint is `kwasm-py agent`: `--help` exits 0 inside runc and lists its options."""
    r = runc.run(
        built.bundle, built.image.config, ["--help"], host=tmp_path, name=f"kwasm-help-{os.getpid()}"
    )
    assert r.returncode == 0, r.stderr
    assert "Usage: kwasm-py agent" in r.stdout and "--shim-source" in r.stdout


def test_node_install_from_the_image_edits_the_host_root(built: Built, runc: ib.Runc, tmp_path: Path) -> None:
    """`kwasm-py node install --host-root /host --restart none` inside the container adds the spin
    runtime to the node's containerd config, installs the shim and writes the state file."""
    node = tree(
        tmp_path / "node",
        {
            **SYSTEMD,
            "/etc/containerd/config.toml": V2,
            "/usr/bin/containerd": "",
            "/lib/systemd/system/containerd.service": UNIT,
        },
    )
    shim = fake_shim(node / "src")
    argv = ["/opt/kwasm-py/venv/bin/kwasm-py", "node", "install", "--host-root", "/host"]
    argv += ["--restart", "none", "--shim", "/host/src/containerd-shim-spin-v2", "--output", "json"]
    r = runc.run(built.bundle, built.image.config, argv, host=node, name=f"kwasm-install-{os.getpid()}")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["changed"] and out["layout"] == "containerd", out
    config = tomllib.loads((node / "etc/containerd/config.toml").read_text())
    runtimes = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert runtimes["spin"]["runtime_type"] == "/opt/kwasm/bin/containerd-shim-spin-v2"
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert (node / "opt/kwasm/bin/containerd-shim-spin-v2").read_bytes() == shim.read_bytes()
    state = json.loads((node / "opt/kwasm/kwasm-state.json").read_text())
    assert state["runtimes"][0]["handler"] == "spin"


def test_final_stage_is_slim(built: Built) -> None:
    """No compilers, pip caches, wheels or sources in the final image; the venv (with its
    bytecode) and an empty shim dir (SHIMS=none) are; labels carry the package version."""
    root = built.rootfs
    assert (root / "opt/kwasm-py/venv/bin/kwasm-py").is_file()
    assert (root / "opt/kwasm-py/shims").is_dir() and not any((root / "opt/kwasm-py/shims").iterdir())
    for absent in ("root/.cache/pip", "wheels", "src", "usr/bin/gcc", "usr/bin/cc", "usr/bin/make"):
        assert not (root / absent).exists(), absent
    assert not list(root.glob("usr/bin/*-gcc*")) and not list(root.glob("usr/lib/gcc/*/*/cc1"))
    # bytecode is built in (every engine call is a new process that cannot write it)
    package = next((root / "opt/kwasm-py/venv/lib").glob("python3*/site-packages/kwasm_py"))
    assert list(package.glob("__pycache__/*.pyc")) and list(package.glob("node/__pycache__/*.pyc"))
    version = tomllib.loads((ib.REPO / "pyproject.toml").read_text())["project"]["version"]
    assert built.image.config["Labels"]["org.opencontainers.image.version"] == version
    assert built.image.config["Entrypoint"] == ["kwasm-py", "agent"]
    # The image is its base plus the venv's layer(s), not a second Python.
    n = len(built.base_diff_ids)
    assert [la.diff_id for la in built.image.layers[:n]] == built.base_diff_ids
    assert 0 < built.image.files(beyond=built.base_diff_ids) < 80 * 2**20


def test_default_build_refuses_unverified_catalog_shims(built: Built, tmp_path: Path) -> None:
    """Without SHIMS the build still installs kwasm-py and runs `shims fetch` on images/shims.toml:
    fed archives that do not match the catalog's sha256 (a local SHIM_MIRROR), it stops there."""
    arch = shim_catalog.normalize_arch(platform.machine())
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for shim in shim_source.read_catalog(ib.REPO / "images" / "shims.toml").shims:
        if arch in shim.artifacts:
            (mirror / shim.artifact(arch).filename).write_bytes(b"not the release archive")
    home = ib.work_dir()
    b = ib.Buildah(home)
    tag = f"localhost/kwasm-py:catalog-{os.getpid()}"
    with sandbox.locked(home / "build.lock"):
        try:
            r = ib.build_image(b, tag, "SHIM_MIRROR=/mirror", volumes=[f"{mirror}:/mirror:ro"], check=False)
        finally:
            if b.exists(tag):
                b("rmi", tag)
        assert not b("containers", "--quiet").split()
        assert not ib.mounts_under(home)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert "Successfully tagged" not in out
    assert "the catalog expects" in out and "nothing was installed" in out, out[-2000:]
