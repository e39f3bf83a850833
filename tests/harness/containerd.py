"""A real, private containerd for tests: own config, root, state and socket in a temp dir.

The daemon runs under a tiny supervisor shell loop (as k3s runs containerd in a k3d node), so
``kwasm-py node install --restart signal:containerd --pid <supervisor>`` restarts it for real:
SIGTERM the containerd child, the loop starts it again with the edited config.
Never touches the machine's own containerd socket, state or services.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kwasm_py.node import cri
from tests.harness.cli import REPO

CACHE = Path(os.environ.get("KWASM_CACHE", "/var/cache/kwasm-py"))


def _shared_configs() -> Path:
    """The project's shared folder of real distribution configs: beside the checkout, or beside
    the folder of worktrees (/work/main and /work/wt/NAME both find /work/shared)."""
    candidates = [p / "shared" / "containerd-configs" for p in (REPO.parent, REPO.parent.parent)]
    return next((c for c in candidates if c.is_dir()), candidates[0])


#: Real containerd configs of distributions (read-only, shared by the project).
SHARED_CONFIGS = _shared_configs()
BINARIES = {
    "1.6": Path("/usr/bin"),
    "2.x": CACHE / "containerd2" / "usr" / "bin",
}


def available(generation: str) -> str | None:
    """Why a containerd generation cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root"
    if not (BINARIES[generation] / "containerd").exists():
        return f"containerd {generation} not installed at {BINARIES[generation]} (run .ci/run)"
    if shutil.which("runc") is None:
        return "runc not installed"
    return None


def debian_packaged_text(directory: Path) -> str:
    """Debian's packaged /etc/containerd/config.toml (no runtimes), with private paths added."""
    d = directory
    return f"""version = 2
root = "{d}/lib"
state = "{d}/run"

[grpc]
  address = "{d}/c.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"
"""


def config_text(directory: Path, version: int, *, systemd_cgroup: bool = False) -> str:
    """A minimal private config of the given schema version (2: containerd 1.x, 3: 2.x)."""
    d = directory
    if version == 3:
        cri_rt, cri_img = "'io.containerd.cri.v1.runtime'", "'io.containerd.cri.v1.images'"
        return f"""version = 3
root = '{d}/lib'
state = '{d}/run'

[grpc]
  address = '{d}/c.sock'

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = '{d}/opt'
  [plugins.{cri_img}.pinned_images]
    sandbox = 'docker.io/library/bb:test'
  [plugins.{cri_rt}]
    restrict_oom_score_adj = true
  [plugins.{cri_rt}.containerd]
    [plugins.{cri_rt}.containerd.runtimes]
      [plugins.{cri_rt}.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.{cri_rt}.containerd.runtimes.runc.options]
          SystemdCgroup = {str(systemd_cgroup).lower()}
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_port = '0'
"""
    cri_v2 = '"io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{d}/lib"
state = "{d}/run"

[grpc]
  address = "{d}/c.sock"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"
  [plugins.{cri_v2}]
    stream_server_port = "0"
    restrict_oom_score_adj = true
    sandbox_image = "docker.io/library/bb:test"
    [plugins.{cri_v2}.containerd]
      [plugins.{cri_v2}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.{cri_v2}.containerd.runtimes.runc.options]
          SystemdCgroup = {str(systemd_cgroup).lower()}
"""


SUPERVISOR = """
trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' TERM INT
while :; do
  "$CONTAINERD" --config "$CONFIG" >> "$LOG" 2>&1 &
  child=$!
  echo "$child" > "$PIDFILE"
  wait "$child"
  [ -e "$STOPFILE" ] && exit 0
done
"""


@dataclass
class Incarnation:
    pid: int
    start_ticks: int


class PrivateContainerd:
    """One containerd daemon under a supervisor loop, with everything in `self.dir`."""

    def __init__(
        self,
        generation: str,
        *,
        version: int | None = None,
        systemd_cgroup: bool = False,
        debian_packaged: bool = False,
    ):
        self.generation = generation
        self.bin = BINARIES[generation]
        self.dir = Path(tempfile.mkdtemp(prefix="kw-", dir="/tmp"))
        self.config = self.dir / "config.toml"
        self.socket = self.dir / "c.sock"
        self.log = self.dir / "containerd.log"
        self.version = version or (3 if generation == "2.x" else 2)
        text = config_text(self.dir, self.version, systemd_cgroup=systemd_cgroup)
        self.config.write_text(debian_packaged_text(self.dir) if debian_packaged else text)
        self.supervisor: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, *, wait: bool = True) -> PrivateContainerd:
        env = {
            "PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            "CONTAINERD": str(self.bin / "containerd"),
            "CONFIG": str(self.config),
            "LOG": str(self.log),
            "PIDFILE": str(self.dir / "containerd.pid"),
            "STOPFILE": str(self.dir / "stop"),
        }
        self.supervisor = subprocess.Popen(["/bin/sh", "-c", SUPERVISOR], env=env, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.supervisor is not None
        return self.supervisor.pid

    def wait_ready(self, timeout: float = 20.0) -> cri.CriStatus:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                status = cri.status(str(self.socket), timeout=1.0)
                if status.runtime_ready:
                    return status
            except Exception as err:
                last = err
            if self.supervisor is not None and self.supervisor.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"containerd did not become ready: {last}\n{self.log_tail()}")

    def daemon(self) -> Incarnation:
        """The current containerd process and its start time (to tell restarts apart)."""
        pid = int((self.dir / "containerd.pid").read_text())
        raw = Path(f"/proc/{pid}/stat").read_text()
        return Incarnation(pid, int(raw[raw.rindex(")") + 2 :].split()[19]))

    def stop(self) -> None:
        if self.supervisor is None:
            return
        (self.dir / "stop").touch()
        with_suppressed(lambda: os.killpg(self.supervisor.pid, signal.SIGTERM))  # type: ignore[union-attr]
        try:
            self.supervisor.wait(10)
        except subprocess.TimeoutExpired:
            with_suppressed(lambda: os.killpg(self.supervisor.pid, signal.SIGKILL))  # type: ignore[union-attr]
            self.supervisor.wait(5)
        self._reap_shims()
        self.supervisor = None

    def cleanup(self) -> None:
        self.stop()
        self._unmount()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _reap_shims(self) -> None:
        """Shims outlive containerd: end the ones started for our socket, by PID."""
        mine = str(self.socket).encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and mine in cmdline:
                pids.append(int(entry))
        for pid in pids:
            with_suppressed(lambda p=pid: os.kill(p, signal.SIGKILL))

    def _unmount(self) -> None:
        prefix = str(self.dir) + "/"
        mounts = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(prefix)
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)

    # -- asking containerd ---------------------------------------------------------------------

    def cri_status(self) -> cri.CriStatus:
        return cri.status(str(self.socket))

    def config_dump(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "containerd"), "--config", str(self.config), "config", "dump"],
            capture_output=True,
            text=True,
            check=False,
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    # -- the CLI, aimed at this containerd --------------------------------------------------------

    def node_args(self) -> list[str]:
        """Options that point `kwasm-py node ...` at this private containerd (host root /)."""
        return [
            "--host-root",
            "/",
            "--config",
            str(self.config),
            "--install-dir",
            str(self.dir / "kwasm"),
            "--socket",
            str(self.socket),
            "--pid",
            str(self.pid),
            "--restart",
            "signal:containerd",
        ]

    def engine_env(self, shim: Path) -> dict[str, str]:
        """The same options as node_args (plus the shim), as the KWASM_* variables the agent
        hands to the engine it runs."""
        args = self.node_args()
        env = {
            "KWASM_" + flag[2:].upper().replace("-", "_"): value
            for flag, value in zip(args[::2], args[1::2], strict=True)
        }
        return {**env, "KWASM_SHIM": str(shim)}


def with_suppressed(fn: object) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        fn()  # type: ignore[operator]


def fake_shim(directory: Path, name: str = "spin", *, log: Path | None = None) -> Path:
    """A shell script shim that logs how containerd called it, then refuses to start (exit 3)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"containerd-shim-{name}-v2"
    log = log or directory / "shim-calls.log"
    path.write_text(
        "#!/bin/sh\n"
        f'{{ echo "argv0=$0"; for a in "$@"; do echo "arg=$a"; done; }} >> {log}\n'
        'echo "fake shim refusing to start" >&2\n'
        "exit 3\n"
    )
    path.chmod(0o755)
    return path
