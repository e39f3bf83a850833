"""A node root shaped like one distribution, served by a real containerd running in it.

The node root holds the distribution's config at the path its layout uses (so kwasm-py's
auto-detection finds it), the real containerd binary and the two libraries it links (so
pre-flight runs the node's own containerd, chrooted), busybox for a shell, and the layout's
marker files. A supervisor loop runs chrooted into the root, in a private mount namespace with
/proc, /sys and /dev mounted (visible to it only: the test's view of the root has no mounts),
and before every containerd start it renders the config the way the distribution does:

- k3s: `config.toml.tmpl` rendered with the sandbox's k3s stand-in renderer (`{{ template
  "base" . }}` is the file k3s rendered on this node when the case starts);
- microk8s: the snap wrapper's `sed` of `${...}` in `containerd-template.toml` into
  `args/containerd.toml`.

containerd reads the node's own file (root, state, sockets and imports resolve on the node), so
`--pid` (the supervisor) is a process of the node and the CRI socket is reached through
`/proc/PID/root`. What containerd itself writes (its root and state dirs) and the harness's own
directory `HARNESS` are the only paths that may change under the root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import tomllib
from pathlib import Path

from kwasm_py.node import cri
from tests.harness import k0s_render
from tests.harness.cli import REPO
from tests.harness.containerd import BINARIES, Incarnation, PrivateContainerd

RENDER_AWK = REPO / "installer" / "kwasm_py" / "sandbox" / "data" / "sandbox-k3s-render.awk"
K3S_DIR = "/var/lib/rancher/k3s/agent/etc/containerd"
MICROK8S_ARGS = "/var/snap/microk8s/current/args"
HARNESS = "kwasm-harness"  # the harness's own directory under the root (log, pid, base render)
#: What the microk8s snap's wrapper substitutes by default (snap `args/containerd-env` defaults).
MICROK8S_VALUES = {
    "RUNTIME": "runc",
    "RUNTIME_TYPE": "io.containerd.runc.v2",
    "SNAPSHOTTER": "overlayfs",
    "SNAP_DATA": "/var/snap/microk8s/current",
    "SNAP_COMMON": "/var/snap/microk8s/common",
}
K3S_RENDER = f"""
d={K3S_DIR}; h=/{HARNESS}
[ -e $h/base ] || cp $d/config.toml $h/base
t=
for n in config-v3.toml.tmpl config.toml.tmpl; do [ -e $d/$n ] && {{ t=$d/$n; break; }}; done
if [ -n "$t" ]; then
  : > $h/empty
  awk -v base=$h/base -v vars=$h/empty -v extra=$h/empty -v tmpl=$t -f $h/render.awk $t > $h/out
else
  cp $h/base $h/out
fi
cmp -s $h/out $d/config.toml || cat $h/out > $d/config.toml
"""
MICROK8S_RENDER = (
    "sed "
    + " ".join(f"-e 's#${{{k}}}#{v}#g'" for k, v in MICROK8S_VALUES.items())
    + f" {MICROK8S_ARGS}/containerd-template.toml > {MICROK8S_ARGS}/containerd.toml\n"
)
#: k0s: the chroot has no Python, so the render step asks the host (`DistroNode._k0s_loop`) to
#: run `k0s_render.render` and blocks on the answer: the FIFOs order it, no polling.
K0S_RENDER = f"echo go > /{HARNESS}/k0s-req && cat /{HARNESS}/k0s-done\n"
#: k0s's own containerd arguments (component.go at the commit cited in k0s_render).
K0S_ARGS = "--root=/var/lib/k0s/containerd --state=/run/k0s/containerd --address=/run/k0s/containerd.sock"
SUPERVISOR = """
trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' TERM INT
while :; do
  sh /$HARNESS/render.sh
  "$CONTAINERD" $ARGS --config "$CONFIG" &
  child=$!
  echo "$child" > /$HARNESS/containerd.pid
  wait "$child"
  [ -e /$HARNESS/stop ] && exit 0
done
"""
# The root bound onto itself first, so that it is a mount point: containerd 2.x looks up the
# mount of its own root dir in /proc/self/mountinfo, where a plain chroot directory is not one.
MOUNT = (
    'mount --bind "$ROOT" "$ROOT" && for d in proc sys dev; do mount --rbind /$d "$ROOT/$d"; done'
    ' && exec chroot "$ROOT" /bin/sh -c "$SUPERVISOR"'
)


def copy_containerd(root: Path, binary: Path, node_path: str) -> None:
    """Put `binary` at `node_path` under `root` with the libc and loader it links, so that
    `chroot root node_path` runs."""
    dest = root / node_path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest)
    for lib in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
        (root / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, root / lib.lstrip("/"))
    (root / "tmp").mkdir(exist_ok=True)


def default_cri() -> dict[str, object]:
    """containerd's default CRI plugin table, as k0s <= 1.35 starts from it
    (`criconfig.DefaultConfig()` of containerd 1.x): the 1.x binary's `config default`."""
    out = subprocess.run(
        [str(BINARIES["1.6"] / "containerd"), "config", "default"], capture_output=True, text=True, check=True
    ).stdout
    cri_table: dict[str, object] = tomllib.loads(out)["plugins"][k0s_render.CRI]
    return cri_table


def daemon_paths(text: str) -> tuple[str, str, str]:
    """(root, state, gRPC socket) node paths a config makes containerd use (its defaults
    where unset)."""
    data = tomllib.loads(text)
    return (
        data.get("root", "/var/lib/containerd"),
        data.get("state", "/run/containerd"),
        data.get("grpc", {}).get("address", "/run/containerd/containerd.sock"),
    )


class DistroNode(PrivateContainerd):
    """A containerd of `generation` chrooted into the node root `self.root`, reading the node
    path `reads` (the rendered file on k3s/microk8s; `render` is "k3s", "microk8s" or "")."""

    def __init__(self, generation: str, *, binary: str, reads: str, render: str = "") -> None:
        super().__init__(generation)
        self.root = self.dir / "node"
        self.node_binary, self.reads, self.render = binary, reads, render
        self.harness = self.root / HARNESS
        self.harness.mkdir(parents=True)
        self.log = self.dir / "containerd.log"

    def start(self, *, wait: bool = True) -> DistroNode:
        """Set up the root's shell and render step, then start the supervisor (after the
        config is in place)."""
        for d in ("proc", "sys", "dev", "bin"):
            (self.root / d).mkdir(exist_ok=True)
        shutil.copy2("/bin/busybox", self.root / "bin/busybox")
        for tool in ("sh", "awk", "sed", "cp", "cmp", "cat"):
            link = self.root / "bin" / tool
            if not link.exists():
                link.symlink_to("busybox")
        shutil.copy2(RENDER_AWK, self.harness / "render.awk")
        script = {"k3s": K3S_RENDER, "microk8s": MICROK8S_RENDER, "k0s": K0S_RENDER}.get(self.render, ":\n")
        if self.render == "k0s":
            for fifo in ("k0s-req", "k0s-done"):
                os.mkfifo(self.harness / fifo)
            threading.Thread(target=self._k0s_loop, daemon=True).start()
        (self.harness / "render.sh").write_text(script)
        env = {
            "PATH": "/bin:/usr/bin:/usr/sbin:/sbin",
            "ROOT": str(self.root),
            "HARNESS": HARNESS,
            "SUPERVISOR": SUPERVISOR,
            "CONTAINERD": self.node_binary,
            "CONFIG": self.reads,
            "ARGS": K0S_ARGS if self.render == "k0s" else "",
        }
        with self.log.open("ab") as log:
            self.supervisor = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", MOUNT],
                env=env, start_new_session=True, stdout=log, stderr=log,
            )  # fmt: skip
        if wait:
            self.wait_ready()
        return self

    def _k0s_loop(self) -> None:
        """Serve the chroot's render requests with k0s's step until the supervisor ends (a
        render error is answered too, so the supervisor goes on and containerd reports it)."""
        while self.supervisor is None or self.supervisor.poll() is None:
            with (self.harness / "k0s-req").open() as req:
                if not req.read():
                    continue
            try:
                k0s_render.render(self.root, default_cri())
            except (OSError, ValueError) as e:
                (self.harness / "k0s-render-error").write_text(f"{e}\n")
            with (self.harness / "k0s-done").open("w") as done:
                done.write("")

    def _paths(self) -> tuple[str, str, str]:
        if self.render == "k0s":
            return "/var/lib/k0s/containerd", "/run/k0s/containerd", "/run/k0s/containerd.sock"
        return daemon_paths((self.root / self.reads.lstrip("/")).read_text())

    @property
    def socket_node_path(self) -> str:
        """The CRI socket as a node path (the config's gRPC address, once rendered; k0s's
        `--address`)."""
        return self._paths()[2]

    @property
    def socket(self) -> Path:  # type: ignore[override]
        return self.root / self.socket_node_path.lstrip("/")

    @socket.setter
    def socket(self, value: Path) -> None:  # PrivateContainerd.__init__ sets its own
        pass

    def daemon_writes(self) -> tuple[str, ...]:
        """Root-relative directories containerd itself writes (root, state, socket dir), and
        the harness's own directory."""
        root, state, sock = self._paths()
        return (*(p.strip("/") + "/" for p in (root, state, str(Path(sock).parent))), HARNESS + "/")

    def daemon(self) -> Incarnation:
        """The current containerd process and its start time (to tell restarts apart)."""
        pid = int((self.harness / "containerd.pid").read_text())
        raw = Path(f"/proc/{pid}/stat").read_text()
        return Incarnation(pid, int(raw[raw.rindex(")") + 2 :].split()[19]))

    def stop(self) -> None:
        (self.harness / "stop").touch()
        super().stop()
        if self.render == "k0s":  # wake the render loop, which then sees the supervisor gone
            with contextlib.suppress(OSError):
                os.close(os.open(self.harness / "k0s-req", os.O_WRONLY | os.O_NONBLOCK))

    def cri_status(self) -> cri.CriStatus:
        return cri.status(str(self.socket))

    def node_args(self) -> list[str]:
        """Options for `kwasm-py node ...`: this node root, auto-detected layout and config,
        the restart by signal to this daemon, its CRI socket."""
        return [
            "--host-root",
            str(self.root),
            "--socket",
            self.socket_node_path,
            "--pid",
            str(self.pid),
            "--restart",
            "signal:containerd",
        ]
