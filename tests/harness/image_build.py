"""Build the installer image from images/Dockerfile on this machine, without any registry, and
run it with the real runc.

- Base image: ``localhost/kwasm-py-base:bookworm``, a stand-in for ``python:3.11-slim-bookworm``
  (which needs Docker Hub): a debootstrap bookworm root with Debian's python3 (3.11), venv, pip and
  python-is-python3, slimmed like the Debian slim images (no docs, man pages, locales, apt lists).
  Two differences from the official image are made on purpose: no ``EXTERNALLY-MANAGED`` marker
  (the official image's pip installs into its own /usr/local Python, so PEP 668 never triggers
  there) and Python lives in /usr, not /usr/local. The root is cached as
  ``$KWASM_CACHE/roots/bookworm-python.tar``; the base image in a private buildah store under
  ``$KWASM_CACHE/image-build`` (never the machine's own container storage).
- ``buildah bud`` builds the real Dockerfile with ``SHIMS=none`` (the ``shims-catalog`` stage
  downloads release archives from GitHub, unreachable here), ``--pull=never`` and host network
  (``pip`` reaches PyPI). This machine's CA bundle is bind-mounted read-only into RUN steps only
  (egress TLS is intercepted here); nothing of it ends up in an image.
- ``buildah push`` exports the image as an OCI layout; :func:`unpack` applies its layers
  (whiteouts included) into a runc bundle's rootfs; :class:`Runc` runs it with a private
  ``--root`` and the capabilities of a privileged pod, the node root bind-mounted at ``/host``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kwasm_py import sandbox

REPO = Path(__file__).resolve().parent.parent.parent
BASE_IMAGE = "localhost/kwasm-py-base:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3")
# What the Debian slim images leave out (dpkg path-exclude there; removed here after the fact).
SLIM_REMOVE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# Capabilities of a privileged container (the DaemonSet runs `privileged: true`).
ALL_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
]  # fmt: skip  # CAP_SYS_RESOURCE left out: this machine's root lacks it (TEST-INFRA.md)


def unavailable() -> str | None:
    """Why the image cannot be built and run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (buildah storage mounts, runc)"
    missing = [t for t in ("buildah", "runc", "debootstrap") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (.ci/setup installs them)"
    return None


def work_dir() -> Path:
    """This machine's private buildah store and the cached base root live here."""
    return sandbox.cache_dir() / "image-build"


def run(
    argv: Sequence[str],
    *,
    timeout: float = 600,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run argv; unless check is off, raise with the tail of its output when it fails."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False
    )
    if not check:
        return proc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(argv[:2])} failed (exit {proc.returncode}):\n{tail}")
    return proc


def python_root_tar(log: list[str]) -> Path:
    """$KWASM_CACHE/roots/bookworm-python.tar: a slim bookworm root with Python, built once."""
    tar = sandbox.cache_dir() / "roots" / "bookworm-python.tar"
    if tar.is_file():
        return tar
    with sandbox.locked(tar.with_suffix(".lock")):
        if tar.is_file():
            return tar
        build = tar.with_name("bookworm-python.build")
        shutil.rmtree(build, ignore_errors=True)
        t = time.monotonic()
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(build),
                sandbox.debian_mirror(),
            ],
            timeout=900,
        )
        for deb in (build / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        for rel in SLIM_REMOVE:
            for child in (build / rel).iterdir() if (build / rel).is_dir() else ():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        # The official image's Python is not Debian's: pip there installs without PEP 668's marker.
        for marker in build.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        tmp = tar.with_suffix(".tar.tmp")
        run(["tar", "-C", str(build), "-cf", str(tmp), "--numeric-owner", "--xattrs", "."])
        tmp.rename(tar)
        shutil.rmtree(build, ignore_errors=True)
        log.append(f"debootstrap bookworm-python: {time.monotonic() - t:.1f} s")
    return tar


@dataclass
class Buildah:
    """buildah on a private store (overlay driver) under `home`, with a private containers.conf
    whose CNI config dir is under `home` too (buildah sets up CNI even for --network host). One
    machine-wide trace stays: containers/image's blob-info cache, a fixed path for root
    (/var/lib/containers/cache/blob-info-cache-v1.boltdb)."""

    home: Path

    def argv(self) -> list[str]:
        store = ["--root", str(self.home / "storage"), "--runroot", str(self.home / "run")]
        return ["buildah", *store, "--storage-driver", "overlay"]

    def env(self) -> dict[str, str]:
        conf = self.home / "containers.conf"
        text = f'[network]\nnetwork_config_dir = "{self.home / "cni"}"\n'
        if not conf.is_file() or conf.read_text() != text:
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(text)
        return {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        return self.run(*args, timeout=timeout, check=check).stdout

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*self.argv(), *args], timeout=timeout, cwd=REPO, env=self.env(), check=check)

    def exists(self, image: str) -> bool:
        return self.run("inspect", "--type", "image", image, check=False).returncode == 0


def ensure_base(b: Buildah, log: list[str]) -> None:
    """The stand-in base image in the private store, made from the cached root once."""
    if b.exists(BASE_IMAGE):
        return
    tar = python_root_tar(log)
    t = time.monotonic()
    ctr = b("from", "scratch").strip()
    try:
        mnt = b("mount", ctr).strip()
        try:
            run(["tar", "-C", mnt, "-xf", str(tar), "--numeric-owner", "--xattrs"])
        finally:
            b("umount", ctr)
        b(
            "config",
            "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env",
            "LANG=C.UTF-8",
            "--cmd",
            "python3",
            "--label",
            "org.opencontainers.image.description=kwasm-py test stand-in for python:3.11-slim-bookworm",
            ctr,
        )
        b("commit", ctr, BASE_IMAGE)
    finally:
        b("rm", ctr)
    log.append(f"base image from root: {time.monotonic() - t:.1f} s")


def build_image(
    b: Buildah, tag: str, *build_args: str, volumes: Sequence[str] = (), check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`buildah bud` of images/Dockerfile (repository root as context) onto the base image.
    `volumes` (SRC:DEST[:ro]) are bind-mounted into RUN steps only, like this machine's CA bundle."""
    argv = ["bud", "--pull=never", "--network", "host", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}"]
    for volume in ([f"{HOST_CA}:{HOST_CA}:ro"] if HOST_CA.is_file() else []) + list(volumes):
        argv += ["--volume", volume]
    for arg in build_args:
        argv += ["--build-arg", arg]
    return b.run(*argv, "-f", "images/Dockerfile", "-t", tag, ".", timeout=900, check=check)


@dataclass(frozen=True)
class Layer:
    diff_id: str  # sha256 of the uncompressed tar (the image config's rootfs.diff_ids)
    compressed: int  # bytes of the blob as exported
    files: int  # bytes of the regular files in it


@dataclass(frozen=True)
class Image:
    config: dict[str, Any]  # the image config's `config` (Entrypoint, Env, Labels, ...)
    layers: list[Layer]

    def files(self, *, beyond: Sequence[str] = ()) -> int:
        """Bytes of files in the layers, leaving out those whose diff_id is in `beyond`."""
        return sum(la.files for la in self.layers if la.diff_id not in beyond)


def unpack(layout: Path, rootfs: Path) -> Image:
    """Apply the layers of the single image in OCI layout dir `layout` to `rootfs`, in order,
    whiteouts honoured; return its config and layer sizes."""

    def blob(digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        return layout / "blobs" / algo / hexd

    (desc,) = json.loads((layout / "index.json").read_text())["manifests"]
    manifest = json.loads(blob(desc["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    rootfs.mkdir(parents=True, exist_ok=True)
    layers = []
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        gz = layer["mediaType"].endswith("+gzip")
        with tarfile.open(blob(layer["digest"]), "r:gz" if gz else "r:") as tar:
            keep = []
            for m in tar.getmembers():
                parent, _, base = m.name.rstrip("/").rpartition("/")
                target = rootfs / parent
                if base == ".wh..wh..opq":
                    for child in target.iterdir() if target.is_dir() else ():
                        _remove(child)
                elif base.startswith(".wh."):
                    _remove(target / base.removeprefix(".wh."))
                else:
                    keep.append(m)
            tar.extractall(rootfs, members=keep, numeric_owner=True, filter="fully_trusted")
        files = sum(m.size for m in keep if m.isreg())
        layers.append(Layer(diff_id, int(layer["size"]), files))
    return Image(dict(config.get("config") or {}), layers)


@dataclass
class Built:
    """An image built from images/Dockerfile, exported and unpacked into a runc bundle."""

    bundle: Path  # rootfs/ holds the unpacked image
    image: Image
    base_diff_ids: list[str]  # the stand-in base image's layers (the image starts with them)
    timings: dict[str, float]  # seconds: base (0 when cached), build, export, unpack
    log: list[str]  # what had to be made first (root, base image) and how long it took

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    def sizes(self) -> dict[str, int]:
        """Bytes: files in the image and in its base; gzip layers of the image and of its base."""
        base = [la for la in self.image.layers if la.diff_id in self.base_diff_ids]
        return {
            "files": self.image.files(),
            "base_files": sum(la.files for la in base),
            "gzip": sum(la.compressed for la in self.image.layers),
            "base_gzip": sum(la.compressed for la in base),
        }

    def summary(self) -> str:
        mib = {k: round(v / 2**20) for k, v in self.sizes().items()}
        times = {k: round(v, 1) for k, v in self.timings.items()}
        return (
            f"made first: {self.log or 'nothing'}; seconds: {times}; files {mib['files']} MiB"
            f" (base {mib['base_files']}), gzip layers {mib['gzip']} MiB (base {mib['base_gzip']})"
        )


def build_export_unpack(work: Path, *build_args: str) -> Built:
    """Build the image (base made first when absent), export it as an OCI layout, remove it from
    the store and unpack it into `work`/bundle/rootfs. Holds the store's lock while it builds;
    fails if buildah leaves a working container or a mount behind."""
    home = work_dir()
    b = Buildah(home)
    tag = f"localhost/kwasm-py:test-{os.getpid()}"
    log: list[str] = []
    timings: dict[str, float] = {}
    with sandbox.locked(home / "build.lock"):
        t = time.monotonic()
        ensure_base(b, log)
        timings["base"] = time.monotonic() - t
        base = json.loads(b("inspect", "--type", "image", BASE_IMAGE))
        t = time.monotonic()
        try:
            build_image(b, tag, *build_args)
            timings["build"] = time.monotonic() - t
            t = time.monotonic()
            b("push", tag, f"oci:{work / 'oci'}:test")
            timings["export"] = time.monotonic() - t
        finally:
            if b.exists(tag):
                b("rmi", tag)
        leftovers = b("containers", "--quiet").split()
        if leftovers or mounts_under(home):
            raise RuntimeError(f"buildah left containers {leftovers} / mounts {mounts_under(home)}")
    t = time.monotonic()
    image = unpack(work / "oci", work / "bundle" / "rootfs")
    timings["unpack"] = time.monotonic() - t
    shutil.rmtree(work / "oci")
    return Built(work / "bundle", image, base["OCIv1"]["rootfs"]["diff_ids"], timings, log)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass
class Runc:
    """`runc run` of a bundle with a private state root; every container it made is deleted."""

    state: Path
    made: list[str]

    def run(
        self,
        bundle: Path,
        image_config: dict[str, Any],
        args: Sequence[str],
        *,
        host: Path,
        name: str,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the image's entrypoint + ARGS (or ARGS alone when it starts with '/'), with `host`
        bind-mounted read-write at /host; returns exit code, stdout and stderr."""
        spec = bundle / "config.json"
        if not spec.exists():
            run(["runc", "spec", "--bundle", str(bundle)])
        doc = json.loads(spec.read_text())
        entry = [str(a) for a in image_config.get("Entrypoint") or []]
        proc = doc["process"]
        proc["args"] = list(args) if args and args[0].startswith("/") else [*entry, *args]
        proc["env"] = [str(e) for e in image_config.get("Env") or []]
        proc["terminal"] = False
        proc["cwd"] = str(image_config.get("WorkingDir") or "/")
        caps = proc["capabilities"]
        for key in ("bounding", "effective", "permitted"):
            caps[key] = ALL_CAPS
        caps.pop("inheritable", None), caps.pop("ambient", None)
        doc["root"] = {"path": "rootfs", "readonly": False}
        doc["mounts"] = [m for m in doc["mounts"] if m["destination"] != "/host"] + [
            {"destination": "/host", "type": "bind", "source": str(host), "options": ["rbind", "rw"]}
        ]
        spec.write_text(json.dumps(doc, indent=1))
        self.made.append(name)
        argv = ["runc", "--root", str(self.state), "run", "--bundle", str(bundle), name]
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )

    def cleanup(self) -> None:
        """Delete every container this object ran (a finished one is already gone: no error)."""
        for name in self.made:
            subprocess.run(
                ["runc", "--root", str(self.state), "delete", "--force", name],
                capture_output=True,
                check=False,
            )


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            out.append(point)
    return out
