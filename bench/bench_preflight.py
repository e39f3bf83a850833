"""Pre-flight cost, against containerd's own `config dump` of the same file.

For each containerd generation (1.6 and 2.x): a node root holding that containerd binary (and
the libraries it links) and the largest real config of ../shared/containerd-configs at
/etc/containerd/config.toml. The value is `preflight.check` as the engine runs it (two chrooted
`config dump`s at once, today's file and the edited one, then the comparison); the floor is one
chrooted `containerd --config /etc/containerd/config.toml config dump` of the same file.

    python -m bench --only preflight [--quick]
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

from bench._common import Goal, row, skipped, timed
from bench.bench_engine import largest_config
from kwasm_py.containerd import config as cc
from kwasm_py.model import ContainerdVersion
from kwasm_py.node import preflight
from kwasm_py.node.hostfs import HostFS
from tests.harness.containerd import BINARIES, available

NODE_CONFIG = PurePosixPath("/etc/containerd/config.toml")
BINARY = PurePosixPath("/usr/bin/containerd")
RUNTIME_TYPE = "/opt/kwasm/bin/containerd-shim-spin-v2"
VERSIONS = {"1.6": ContainerdVersion(1, 6), "2.x": ContainerdVersion(2, 1)}


def node_root(directory: Path, generation: str, text: str) -> Path:
    """A node root with `generation`'s containerd binary (and libc, loader) and `text` as its
    /etc/containerd/config.toml."""
    root = directory / "root"
    for rel in ("usr/bin", "lib/x86_64-linux-gnu", "lib64", "etc/containerd", "tmp"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BINARIES[generation] / "containerd", root / str(BINARY).lstrip("/"))
    for lib in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
        shutil.copy2(lib, root / lib.lstrip("/"))
    (root / str(NODE_CONFIG).lstrip("/")).write_text(text)
    return root


def edited(text: str, name: str, generation: str) -> str:
    """`text` with our spin runtime added where `generation` reads it (the engine's edit)."""
    doc = cc.load(text, source=name)
    choice = cc.choose_schema(doc.data, containerd=VERSIONS[generation])
    entry = cc.RuntimeEntry("spin", RUNTIME_TYPE, cc.runc_systemd_cgroup(doc.data, choice.schema))
    return cc.add_runtime(doc, entry, schema=choice.schema).text


def bench_preflight(generation: str, quick: bool) -> dict[str, object]:
    name, text = largest_config()
    figure = f"pre-flight, largest real config ({name}, {len(text)} B; containerd {generation})"
    if reason := available(generation):
        return skipped(figure, reason)
    rounds = 3 if quick else 15
    with tempfile.TemporaryDirectory(prefix="kw-bench-pf-") as tmp:
        root = node_root(Path(tmp), generation, text)
        fs, after = HostFS(root), edited(text, name, generation)

        def check() -> None:
            verdict = preflight.check(
                fs,
                effective=NODE_CONFIG,
                before_text=text,
                after_text=after,
                wanted={"spin": RUNTIME_TYPE},
                source=str(NODE_CONFIG),
                binary=BINARY,
            )
            assert verdict.ran and verdict.ok, verdict.message

        def dump() -> None:
            proc = subprocess.run(
                ["chroot", str(root), str(BINARY), "--config", str(NODE_CONFIG), "config", "dump"],
                capture_output=True,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr[-500:]

        check()  # warm: page cache for the binary, first-call imports
        dump()
        values, floors = [], []
        for _ in range(rounds):  # interleaved, so drift hits both alike
            values += timed(check, 1)
            floors += timed(dump, 1)
    return row(
        figure,
        values,
        floors,
        unit="ms",
        scale=1e3,
        floor_name="one chrooted `containerd config dump` of the same file",
        compare="ratio",
        goal=Goal("ratio", "<=", 2.0, "<= 2x one config dump (it runs two)"),
    )


def run(quick: bool) -> list[dict[str, object]]:
    return [bench_preflight(generation, quick) for generation in ("1.6", "2.x")]
