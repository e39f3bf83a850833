"""images/Dockerfile and the other consumers agree with images/shims.toml (parsed here; the
image itself is built with buildah and run with runc in tests/test_image_build.py)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from kwasm_py.shims import catalog as shim_catalog
from kwasm_py.shims import source as shim_source

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "images" / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    platform: str
    lines: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def all(self, instr: str) -> list[str]:
        return [rest for i, rest in self.lines if i == instr]


def parse_dockerfile(text: str) -> tuple[list[str], list[Stage]]:
    """(global ARG lines, stages) from Dockerfile text: joins continuations, drops comments."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "dangling line continuation"
    global_args: list[str] = []
    stages: list[Stage] = []
    for line in logical:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            words = rest.split()
            platform = ""
            if words[0].startswith("--platform="):
                platform = words.pop(0).split("=", 1)[1]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(name=name, base=words[0], platform=platform))
        elif stages:
            stages[-1].lines.append((instr, rest.strip()))
        else:
            assert instr == "ARG", f"{instr} before the first FROM"
            global_args.append(rest.strip())
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_multi_stage_multi_arch_layout(dockerfile):
    """wheel and shims stages run on $BUILDPLATFORM; venv and final run on the target."""
    _, stages = dockerfile
    by = {s.name: s for s in stages}
    assert [s.name for s in stages] == ["wheel", "shims", "venv", ""]
    assert by["wheel"].platform == by["shims"].platform == "$BUILDPLATFORM"
    assert by["venv"].platform == stages[-1].platform == ""
    assert {s.base for s in stages} == {"${PYTHON_IMAGE}"}


def test_slim_python_base(dockerfile):
    """The base is a slim Python image (no compilers in the final stage), pinned by digest."""
    global_args, _ = dockerfile
    base = next(a for a in global_args if a.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9]-slim-\w+@sha256:[0-9a-f]{64}", base)
    assert "REFRESH IT" in DOCKERFILE.read_text()  # the comment says the pin must be renewed


def test_shims_fetched_from_the_catalog_for_targetarch(dockerfile):
    """The shims stage copies images/shims.toml and runs `kwasm-py shims fetch` on it for
    $TARGETARCH into the directory the final stage copies to the image shim dir."""
    _, stages = dockerfile
    shims = next(s for s in stages if s.name == "shims")
    assert "TARGETARCH" in shims.all("ARG")
    assert "images/shims.toml /catalog/shims.toml" in shims.all("COPY")
    run = " ".join(r for r in shims.all("RUN") if "shims fetch" in r)
    fetch = run[run.index("kwasm-py shims fetch") :]
    argv = shlex.split(fetch.split("${SHIM_MIRROR")[0])
    assert argv[:3] == ["kwasm-py", "shims", "fetch"]
    opts = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert opts == {
        "--catalog": "/catalog/shims.toml",
        "--arch": "${TARGETARCH}",
        "--dest": "/out/shims/${TARGETARCH}",
    }
    final = stages[-1]
    assert f"--from=shims /out/shims {shim_source.IMAGE_SHIM_DIR}" in final.all("COPY")
    env = " ".join(final.all("ENV"))
    assert f"KWASM_SHIM_DIR={shim_source.IMAGE_SHIM_DIR}" in env


def test_shims_build_arg_defaults_to_the_catalog(dockerfile):
    """SHIMS defaults to catalog (fetch and bake); none only makes the empty shim dir and skips
    the install and the fetch; any other value stops the build."""
    _, stages = dockerfile
    shims = next(s for s in stages if s.name == "shims")
    assert "SHIMS=catalog" in shims.all("ARG")
    (run,) = [r for r in shims.all("RUN") if "shims fetch" in r]
    head, _, rest = run.partition("esac")
    assert " ".join(head.split()) == (
        'case "$SHIMS" in catalog) ;; none) mkdir -p /out/shims; exit 0 ;; '
        "*) echo \"SHIMS must be catalog or none, not '$SHIMS'\" >&2; exit 1 ;;"
    )
    # Everything after the case runs only for catalog: install the hashed lock, then kwasm-py
    # alone, then fetch.
    steps = [s.strip() for s in rest.split("&&") if s.strip()]
    assert steps[0] == "pip install --no-cache-dir --require-hashes -r /locks/requirements.lock"
    assert steps[1].startswith("pip install --no-cache-dir --no-deps /wheels/")
    assert steps[2].startswith("kwasm-py shims fetch")
    assert len(steps) == 3


def test_no_shim_url_or_hash_duplicated_in_dockerfile():
    """The Dockerfile names no release URL or digest: images/shims.toml is the only source."""
    text = DOCKERFILE.read_text()
    cat = shim_catalog.parse((ROOT / "images" / "shims.toml").read_text())
    for s in cat.shims:
        for a in s.artifacts.values():
            assert a.url not in text and a.archive_sha256 not in text and a.filename not in text
    # The one digest allowed is the base image's pin on the PYTHON_IMAGE line.
    rest = re.sub(r"(?m)^ARG PYTHON_IMAGE=\S+@sha256:[0-9a-f]{64}$", "", text)
    assert rest != text and not re.search(r"\b[0-9a-f]{64}\b", rest)


def test_final_stage_labels_entrypoint_and_no_build_tools(dockerfile):
    """OCI labels (source, version, licenses), entrypoint `kwasm-py agent`, no compilers/caches."""
    _, stages = dockerfile
    final = stages[-1]
    labels = " ".join(final.all("LABEL"))
    for key in ("source", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    assert json.loads(final.all("ENTRYPOINT")[0]) == ["kwasm-py", "agent"]
    assert final.all("RUN") == []  # nothing installed or built in the final stage
    copies = final.all("COPY")
    assert all(c.startswith("--from=") for c in copies)
    body = " ".join(r for s in stages for r in s.all("RUN"))
    assert "apt-get" not in body and "gcc" not in body and "build-essential" not in body
    for s in stages:
        for r in s.all("RUN"):
            if "pip " in r and (" install " in r or " wheel " in r):
                assert "--no-cache-dir" in r, r


def test_version_label_matches_pyproject(dockerfile):
    """The image's default VERSION label is the package version."""
    _, stages = dockerfile
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"VERSION={version}" in stages[-1].all("ARG")


def test_wheel_stage_has_what_the_package_needs(dockerfile):
    """The wheel stage copies the catalog so the packaged symlink resolves inside the build."""
    _, stages = dockerfile
    wheel = stages[0]
    copies = wheel.all("COPY")
    assert "installer ./installer" in copies
    assert "images/shims.toml ./images/shims.toml" in copies
    link = ROOT / "installer" / "kwasm_py" / "shims" / "data" / "shims.toml"
    assert link.is_symlink()
    assert (link.parent / link.readlink()).resolve() == (ROOT / "images" / "shims.toml").resolve()
    assert "images/release.toml ./images/release.toml" in copies
    link = ROOT / "installer" / "kwasm_py" / "cluster" / "data" / "release.toml"
    assert link.is_symlink()
    assert (link.parent / link.readlink()).resolve() == (ROOT / "images" / "release.toml").resolve()


def test_dockerignore_keeps_what_the_build_needs():
    """.dockerignore does not exclude the catalog, the package or the project metadata."""
    ignored = (ROOT / ".dockerignore").read_text().split()
    needed_files = ("images", "installer", "pyproject.toml", "README.md", "images/shims.toml")
    locks = ("images/requirements.lock", "images/requirements-build.lock")
    for needed in (*needed_files, "images/release.toml", *locks):
        assert needed not in ignored


def test_images_readme_documents_builders_and_loaders():
    """images/README.md covers buildx, podman/buildah and loading into kind, k3d and minikube."""
    text = (ROOT / "images" / "README.md").read_text()
    needles = ["docker buildx build", "podman build", "buildah build"]
    needles += ["kind load docker-image", "k3d image import", "minikube image load"]
    for needle in needles:
        assert needle in text, needle


def test_manifests_runtimeclasses_match_catalog():
    """Every RuntimeClass handler in the shipped manifests is a catalog shim's handler."""
    path = ROOT / "manifests" / "installer.yaml"
    if not path.exists():
        pytest.skip("manifests/installer.yaml is not on this branch yet (kwasm-py manifests)")
    handlers = shim_source.read_catalog().handlers()
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    classes = [d for d in docs if d.get("kind") == "RuntimeClass"]
    assert classes, "no RuntimeClass in the manifests"
    for rc in classes:
        assert rc["handler"] in handlers, rc["handler"]


LOCKS = {"requirements.lock": "runtime", "requirements-build.lock": "build"}


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from a `--generate-hashes` requirements file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", re.sub(r"(?m)^\s*#.*\n?", "", text).strip()):
        head, *hashes = [w for w in block.replace("\\", " ").split() if w]
        name, _, version = head.partition("==")
        assert version, f"not pinned with ==: {head}"
        assert all(h.startswith("--hash=sha256:") and len(h) == 14 + 64 for h in hashes), head
        entries[name.lower().replace("_", "-")] = (version, hashes)
    return entries


def test_every_pip_install_in_the_dockerfile_uses_a_hashed_lock(dockerfile):
    """Each `pip install` either installs a lock with --require-hashes or only kwasm-py's own
    wheel with --no-deps, and each lock it names is copied in from images/; the wheel is built
    without build isolation (no unpinned setuptools download)."""
    _, stages = dockerfile
    for stage in stages:
        copies = " ".join(stage.all("COPY"))
        for run in stage.all("RUN"):
            for step in run.split("&&"):
                words = step.split()
                if "pip" not in words or not {"install", "wheel"} & set(words):
                    continue
                if "wheel" in words:
                    assert "--no-build-isolation" in words and "--no-deps" in words, step
                elif "--require-hashes" in words:
                    lock = words[words.index("-r") + 1]
                    assert lock.startswith("/locks/") and f"images/{Path(lock).name} {lock}" in copies, step
                else:
                    assert "--no-deps" in words and words[-1] == "/wheels/*.whl", step


def test_locks_are_hashed_and_cover_pyproject():
    """images/requirements.lock pins every runtime dependency of pyproject.toml to a version
    its range allows, each with sha256 hashes (for every platform's wheels); the build lock pins
    setuptools as the build-system asks."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locks = {kind: parse_lock((ROOT / "images" / name).read_text()) for name, kind in LOCKS.items()}
    for kind, wanted in (
        ("runtime", project["project"]["dependencies"]),
        ("build", project["build-system"]["requires"]),
    ):
        for spec in wanted:
            req = Requirement(spec)
            name = req.name.lower().replace("_", "-")
            assert name in locks[kind], f"{name} is not in the {kind} lock"
            version, hashes = locks[kind][name]
            assert req.specifier.contains(version, prereleases=True), (name, version, str(req.specifier))
            assert hashes
    grpcio = locks["runtime"]["grpcio"][1]
    assert len(grpcio) > 10  # wheels for amd64 and arm64 (and more), not just this machine's


def test_runtime_lock_is_what_the_tests_run():
    """The image installs the versions this test run uses for the direct dependencies, so the
    image runs tested code."""
    from importlib import metadata

    lock = parse_lock((ROOT / "images" / "requirements.lock").read_text())
    for name in ("kubernetes", "tomlkit", "typer", "requests", "rich", "pyyaml", "grpcio"):
        assert metadata.version(name) == lock[name][0], name
