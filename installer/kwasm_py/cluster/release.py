"""The release record of the installer image (images/release.toml) and image references by digest.

A tag names whatever the registry holds under it today; a digest names exactly one set of
bytes. The release process pushes the image, records the digest buildx printed in
images/release.toml and re-renders manifests/installer.yaml, so the DaemonSet then pulls
``IMAGE:TAG@sha256:...`` (the kubelet resolves by the digest; the tag stays for people). Until
a release fills it the digest is empty and the image goes by tag.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kwasm_py.errors import UsageError

RELEASE_ENV = "KWASM_RELEASE"  # another release record (tests, forks); default: the packaged copy
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HINT = "the format is described at the top of images/release.toml"


@dataclass(frozen=True)
class Release:
    """The installer image a release published: repository, tag and (once pushed) digest."""

    image: str  # repository, e.g. ghcr.io/kwasm-py/installer
    tag: str
    digest: str  # "" until the release process records it

    @property
    def reference(self) -> str:
        """``IMAGE:TAG``, plus ``@DIGEST`` when the digest is known."""
        ref = f"{self.image}:{self.tag}"
        return pinned_image(ref, self.digest) if self.digest else ref


def parse(text: str, *, source: str = "release.toml") -> Release:
    """Takes the record's TOML text; returns the Release. Raises UsageError naming the key when
    it is not TOML, has another schema, or a field is missing, not a string or (the digest) not
    ``sha256:`` and 64 hex digits."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as ex:
        raise UsageError(f"{source}: not valid TOML: {ex}", hint=_HINT) from ex
    if doc.get("schema") != 1:
        raise UsageError(
            f"{source}: schema = {doc.get('schema')!r}, this kwasm-py reads schema 1", hint=_HINT
        )
    values: dict[str, str] = {}
    for key in ("image", "tag", "digest"):
        value = doc.get(key)
        if not isinstance(value, str) or (key != "digest" and not value.strip()):
            raise UsageError(f"{source}: {key} is missing or not a string", hint=_HINT)
        values[key] = value.strip()
    if values["digest"]:
        check_digest(values["digest"], what=f"{source}: digest")
    return Release(**values)


def read_release(path: str | os.PathLike[str] | None = None) -> Release:
    """The release record at `path`, $KWASM_RELEASE, or the copy shipped in the package.
    Raises UsageError when it cannot be read or is malformed."""
    chosen = path or os.environ.get(RELEASE_ENV)
    if chosen:
        try:
            text = Path(chosen).read_text()
        except OSError as ex:
            raise UsageError(f"cannot read release record {chosen}: {ex.strerror}") from ex
        return parse(text, source=str(chosen))
    ref = resources.files("kwasm_py.cluster").joinpath("data/release.toml")
    return parse(ref.read_text(), source="kwasm_py/cluster/data/release.toml")


def check_digest(digest: str, *, what: str = "--image-digest") -> str:
    """Return `digest` when it is ``sha256:`` and 64 lower-case hex digits; UsageError otherwise."""
    if not DIGEST.fullmatch(digest):
        raise UsageError(
            f"{what} {digest!r} is not an image digest (sha256: and 64 hex digits)",
            hint="take it from `docker buildx imagetools inspect IMAGE` or the push output",
        )
    return digest


def pinned_image(image: str, digest: str) -> str:
    """``IMAGE[:TAG]@DIGEST`` for the image reference and digest given.

    An image that already carries the same digest is returned as is. Raises UsageError when the
    digest is malformed or the image already names another one.
    """
    check_digest(digest)
    name, at, existing = image.partition("@")
    if at:
        if existing != digest:
            raise UsageError(
                f"--image {image} already names digest {existing}, not {digest}",
                hint="give the digest once: in --image or in --image-digest",
            )
        return image
    return f"{name}@{digest}"
