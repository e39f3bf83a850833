"""Credential values never reach `node plan`'s output: the pure redactor on every place a
registry secret can sit, and `node plan` / `node plan --uninstall` in text and JSON on node
roots whose config carries registry credentials in each schema."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from kwasm_py.containerd.redact import REDACTED, redact
from tests.harness.cli import Kwasm
from tests.harness.containerd import SHARED_CONFIGS
from tests.harness.noderoot import SYSTEMD, UNIT, tree

REAL = SHARED_CONFIGS / "talos-cri-registry-dropin-testdata.toml"

SECRETS = ("hunter2", "YWJjZGVm", "multi-line-secret", "dotted-secret", "inline-secret", "commented-secret")
SECRETS += ("header-secret", "v1-secret", "identity-secret")

SAMPLE = (
    "version = 2\r\n"
    '[plugins."io.containerd.grpc.v1.cri".registry.configs."gcr.io".auth]\r\n'
    '  username = "robot"\r\n'
    '  password = "hunter2"  # rotate monthly\r\n'
    "  \"auth\" = 'YWJjZGVm'\r\n"
    '  identitytoken = """\r\n'
    "multi-line-secret\r\n"
    '"""\r\n'
    '[plugins."io.containerd.cri.v1.images".registry]\r\n'
    '  configs."x.io".auth.password = "dotted-secret"\r\n'
    '  configs."y.io".auth = { username = "u", password = "inline-secret" }\r\n'
    '  # password = "commented-secret"\r\n'
    '[plugins."io.containerd.grpc.v1.cri".registry.headers]\r\n'
    "  Authorization = [\r\n"
    '    "Bearer header-secret",\r\n'
    "  ]\r\n"
    '[plugins.cri.registry.auths."https://gcr.io"]\r\n'
    '  auth = "v1-secret"\r\n'
    '  IdentityToken = "identity-secret"\r\n'
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\r\n'
    '  runtime_type = "io.containerd.runc.v2"\r\n'
)


def test_every_credential_shape_is_redacted_and_lines_are_kept() -> None:
    """Table bodies, quoted and dotted keys, inline tables, multi-line strings and arrays,
    comments and every schema's table: no secret survives; line count, CRLF endings, other
    lines and the username stay; what remains is still TOML."""
    out = redact(SAMPLE)
    for secret in SECRETS:
        assert secret not in out, secret
    assert out.count("\r\n") == SAMPLE.count("\r\n") and len(out.splitlines()) == len(SAMPLE.splitlines())
    assert '  username = "robot"\r\n' in out and '  runtime_type = "io.containerd.runc.v2"\r\n' in out
    assert f"  password = {REDACTED}  # rotate monthly\r\n" in out
    parsed = tomllib.loads(out)
    auth = parsed["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["configs"]["gcr.io"]["auth"]
    assert auth == {
        "username": "robot",
        "password": "<redacted>",
        "auth": "<redacted>",
        "identitytoken": "<redacted>",
    }


@pytest.mark.skipif(not SHARED_CONFIGS.is_dir(), reason="../shared/containerd-configs is absent")
def test_text_without_credentials_is_unchanged() -> None:
    """A config without credentials comes back byte for byte (the redactor only ever hides)."""
    for path in sorted(SHARED_CONFIGS.glob("*.toml")):
        text = path.read_text()
        if "password" in text or "identitytoken" in text or "auth =" in text:
            continue
        assert redact(text) == text, path.name


@pytest.mark.skipif(not REAL.is_file(), reason="shared real configs not present")
def test_a_real_config_with_registry_auth() -> None:
    """Talos's CRI registry drop-in (literal strings, nested tables): password, auth and
    identitytoken are hidden, the username stays."""
    out = redact(REAL.read_text())
    assert "'secret'" not in out and "'token'" not in out and "= 'auth'" not in out
    assert "username = 'root'" in out and out.count(REDACTED) == 3


V1_CONFIG = (
    '[plugins.cri.registry.auths."https://gcr.io"]\n  username = "u"\n  password = "v1-secret"\n'
    "[plugins.cri.containerd.runtimes.runc]\n"
    '  runtime_type = "io.containerd.runc.v2"\n'
)
V2_CONFIG = (
    "version = 2\n"
    '[plugins."io.containerd.grpc.v1.cri".registry.configs."gcr.io".auth]\n'
    '  username = "u"\n  password = "hunter2"\n  auth = "YWJjZGVm"\n  identitytoken = "identity-secret"\n'
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
    '  runtime_type = "io.containerd.runc.v2"\n'
)
V3_CONFIG = (
    "version = 3\n"
    '[plugins."io.containerd.cri.v1.images".registry.configs."gcr.io".auth]\n'
    '  password = "hunter2"\n'
    '[plugins."io.containerd.cri.v1.images".registry.headers]\n'
    '  Authorization = ["Bearer header-secret"]\n'
    '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]\n'
    '  runtime_type = "io.containerd.runc.v2"\n'
)


@pytest.mark.parametrize("text", [V1_CONFIG, V2_CONFIG, V3_CONFIG], ids=["v1", "v2", "v3"])
def test_node_plan_output_redacts_credentials(tmp_path: Path, shim: Path, kwasm: Kwasm, text: str) -> None:
    """`node plan` (text and JSON) and, after an install, `node plan --uninstall` show the diff
    with credentials redacted, while the file on the node keeps them."""
    root = tree(
        tmp_path / "root",
        {
            **SYSTEMD,
            "/etc/containerd/config.toml": text,
            "/usr/bin/containerd": "",
            "/lib/systemd/system/containerd.service": UNIT,
        },
    )
    args = ["--host-root", str(root), "--restart", "none"]
    outputs = []
    for fmt in ("text", "json"):
        r = kwasm("node", "plan", *args, "--shim", str(shim), "-o", fmt)
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout + r.stderr)
    diff = json.loads(outputs[1])["diff"]
    assert diff and REDACTED in diff and "+" in diff
    assert kwasm("node", "install", *args, "--shim", str(shim)).returncode == 0
    for fmt in ("text", "json"):
        r = kwasm("node", "plan", "--uninstall", *args, "-o", fmt)
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout + r.stderr)
    assert REDACTED in json.loads(outputs[-1])["diff"]
    for out in outputs:
        for secret in SECRETS:
            assert secret not in out, (secret, out)
    on_node = (root / "etc/containerd/config.toml").read_text()
    assert [s for s in SECRETS if s in text] == [s for s in SECRETS if s in on_node]
