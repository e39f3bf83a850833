"""Supply chain of the installer image: the release record (images/release.toml), `kwasm-py
manifests` rendering the image by digest, and the image references it builds."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from kwasm_py.cluster import manifests, release
from kwasm_py.errors import UsageError
from tests.harness.cli import invoke

REPO = Path(__file__).resolve().parent.parent
DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def agent_container(yaml_text: str) -> dict:
    ds = next(d for d in yaml.safe_load_all(yaml_text) if d and d["kind"] == "DaemonSet")
    (ctr,) = ds["spec"]["template"]["spec"]["containers"]
    return ctr


def test_shipped_record_is_the_default_image_without_a_digest_yet() -> None:
    """The packaged record is images/release.toml, names the default image and the package
    version, and its digest is empty until a release fills it."""
    rec = release.read_release()
    assert rec == release.parse((REPO / "images/release.toml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert rec.tag == version and f"{rec.image}:{rec.tag}" == manifests.DEFAULT_IMAGE
    assert rec.digest == "" and rec.reference == manifests.DEFAULT_IMAGE


def test_committed_installer_yaml_is_the_cli_default_output() -> None:
    """manifests/installer.yaml is what `kwasm-py manifests` prints with the shipped record."""
    result = invoke("manifests")
    assert result.code == 0, result.err
    assert result.out == (REPO / "manifests/installer.yaml").read_text()


def test_image_digest_option_pins_the_image_and_keeps_if_not_present() -> None:
    """--image-digest renders IMAGE:TAG@DIGEST with pull policy IfNotPresent, for the default
    image and for one given with --image."""
    ctr = agent_container(invoke("manifests", "--image-digest", DIGEST).out)
    assert ctr["image"] == f"{manifests.DEFAULT_IMAGE}@{DIGEST}"
    assert ctr["imagePullPolicy"] == "IfNotPresent"
    out = invoke("manifests", "--image", "registry.internal/kwasm:9", "--image-digest", DIGEST).out
    assert agent_container(out)["image"] == f"registry.internal/kwasm:9@{DIGEST}"


def test_a_recorded_digest_is_used_by_default(tmp_path: Path) -> None:
    """Once the release record carries a digest, the default rendering pulls by it; an image of
    one's own (--image) is not given the release's digest."""
    record = tmp_path / "release.toml"
    record.write_text(
        (REPO / "images/release.toml").read_text().replace('digest = ""', f'digest = "{DIGEST}"')
    )
    env = {"KWASM_RELEASE": str(record)}
    ctr = agent_container(invoke("manifests", env=env).out)
    assert ctr["image"] == f"{manifests.DEFAULT_IMAGE}@{DIGEST}" and ctr["imagePullPolicy"] == "IfNotPresent"
    assert agent_container(invoke("manifests", "--image", "mine:1", env=env).out)["image"] == "mine:1"


@pytest.mark.parametrize(
    "digest", ["abc", "sha256:" + "AB" * 32, "sha256:" + "ab" * 31, "sha512:" + "ab" * 64, DIGEST + " "]
)
def test_a_malformed_digest_is_a_usage_error(digest: str) -> None:
    """A digest that is not sha256: and 64 lower-case hex digits exits 2 with one error line."""
    result = invoke("manifests", "--image-digest", digest)
    assert result.code == 2 and "is not an image digest" in result.err and result.out == ""


def test_two_different_digests_are_refused() -> None:
    """An --image that already names a digest must agree with --image-digest."""
    assert release.pinned_image(f"x:1@{DIGEST}", DIGEST) == f"x:1@{DIGEST}"
    with pytest.raises(UsageError, match="already names digest"):
        release.pinned_image(f"x:1@{DIGEST}", OTHER)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.replace("schema = 1", "schema = 2"), "schema = 2"),
        (lambda t: t.replace('tag = "0.1.0"', "tag = 1"), "tag is missing"),
        (lambda t: t.replace('digest = ""', 'digest = "latest"'), "is not an image digest"),
        (lambda t: t + "[[", "not valid TOML"),
    ],
    ids=["schema", "tag", "digest", "toml"],
)
def test_a_malformed_record_is_refused(tmp_path: Path, edit, match: str) -> None:
    """A broken release record stops `manifests` with one line naming the key (exit 2)."""
    record = tmp_path / "release.toml"
    record.write_text(edit((REPO / "images/release.toml").read_text()))
    result = invoke("manifests", env={"KWASM_RELEASE": str(record)})
    assert result.code == 2 and match in result.err, result.err
