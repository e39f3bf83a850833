"""Malformed kubeconfigs: every shape gives one KubeError line, never a traceback, through the
agent's lean reader (`kube.kubeconfig_endpoint` + `LeanKube`), the official client (`official.connect`)
and the CLI as a user runs it (`kwasm-py status --kubeconfig FILE`)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from kwasm_py.cluster import kube, official
from kwasm_py.cluster.lean import LeanKube
from kwasm_py.errors import KubeError
from tests.harness.cli import invoke, run_kwasm

DEAD = "https://127.0.0.1:1"  # nothing listens: a shape that gets this far is refused at once


def config(cluster: str = f"{{server: '{DEAD}'}}", user: str = "{token: abc}") -> str:
    """A one-context kubeconfig with the given cluster and user mappings (YAML flow text)."""
    return (
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {cluster}}}]\n"
        f"users: [{{name: u, user: {user}}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# name -> (file bytes, what the lean reader's one line says)
SHAPES: dict[str, tuple[str | bytes, str]] = {
    "not YAML": ("{: nope", "not YAML"),
    "a YAML list": ("- a\n- b\n", "not a kubeconfig mapping (a YAML list)"),
    "a YAML scalar": ("hello\n", "not a kubeconfig mapping"),
    "empty file": ("", "the file is empty"),
    "not UTF-8": (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    "no contexts": ("apiVersion: v1\ncurrent-context: c\n", "no context named 'c'"),
    "no current-context": ("apiVersion: v1\nclusters: []\n", "no current-context"),
    "current-context a list": ("current-context: [a]\n", "current-context is not a string"),
    "contexts a number": ("current-context: c\ncontexts: 5\n", "contexts is not a list"),
    "contexts a string": ("current-context: c\ncontexts: abc\n", "contexts is not a list"),
    "list items not mappings": ("current-context: c\ncontexts: [1, 2]\n", "contexts[0] is not a mapping"),
    "item without a name": (
        "current-context: c\nclusters: [{cluster: {}}]\n",
        "clusters[0] is not a mapping",
    ),
    "context not a mapping": (
        "current-context: c\ncontexts: [{name: c, context: 7}]\n",
        "context is not a mapping",
    ),
    "cluster missing": (
        "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "users: [{name: u, user: {token: a}}]\n",
        "no cluster named 'k'",
    ),
    "no server": (config(cluster="{insecure-skip-tls-verify: true}"), "cluster 'k' has no server"),
    "server a number": (config(cluster="{server: 5}"), "server is not a string"),
    "user not a mapping": (config(user="[1, 2]"), "user is not a mapping"),
    "token a number": (config(user="{token: 5}"), "token is not a string"),
    "CA data not base64": (
        config(cluster=f"{{server: '{DEAD}', certificate-authority-data: 'not*base64!'}}"),
        "certificate-authority-data is not base64",
    ),
    "CA data bad padding": (
        config(cluster=f"{{server: '{DEAD}', certificate-authority-data: 'QUJDRA='}}"),
        "certificate-authority-data is not base64",
    ),
    "CA data not PEM": (
        config(cluster=f"{{server: '{DEAD}', certificate-authority-data: '{b64(b'not a pem')}'}}"),
        "certificate-authority-data is not a PEM certificate",
    ),
    "CA data binary": (
        config(cluster=f"{{server: '{DEAD}', certificate-authority-data: '{b64(bytes([255, 254, 253]))}'}}"),
        "certificate-authority-data is not a PEM certificate",
    ),
    "CA file missing": (
        config(cluster=f"{{server: '{DEAD}', certificate-authority: /nonexistent/ca.crt}}"),
        "cannot read certificate-authority /nonexistent/ca.crt",
    ),
    "client cert data not base64": (
        config(user="{client-certificate-data: '!!!', client-key-data: '!!!'}"),
        "client-certificate-data is not base64",
    ),
    "client cert not PEM": (
        config(user=f"{{client-certificate-data: {b64(b'x')}, client-key-data: {b64(b'y')}}}"),
        "cannot load the client certificate",
    ),
    "client cert files missing": (
        config(user="{client-certificate: /nonexistent/c.crt, client-key: /nonexistent/c.key}"),
        "cannot load the client certificate",
    ),
    "token file missing": (
        config(user="{tokenFile: /nonexistent/tok}"),
        "cannot read token /nonexistent/tok",
    ),
}


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def bad_config(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """One malformed kubeconfig file and the words the lean reader's error must contain."""
    data, words = SHAPES[request.param]
    path = tmp_path / "kubeconfig"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path, words


def one_line(ex: KubeError) -> str:
    assert ex.message and "\n" not in ex.message, repr(ex.message)
    assert "\n" not in ex.hint
    return ex.message


def test_lean_reader_gives_one_line(bad_config: tuple[Path, str]) -> None:
    """The agent's reader (and the lean client built on it, and its first request) fails with
    one KubeError line naming what is wrong."""
    path, words = bad_config
    with pytest.raises(KubeError) as info:
        LeanKube(kube.kubeconfig_endpoint(str(path))).list_nodes()
    assert words in one_line(info.value)


def test_official_client_gives_one_line(bad_config: tuple[Path, str]) -> None:
    """The official client's path ends in a KubeError line too (its own words for some shapes,
    or connection refused for the shapes it accepts), never a TypeError or YAML error."""
    path, _ = bad_config
    with pytest.raises(KubeError) as info:
        official.connect(str(path)).list_nodes()
    one_line(info.value)


def test_cli_status_gives_one_error_line(bad_config: tuple[Path, str]) -> None:
    """`kwasm-py status --kubeconfig FILE` exits 1 with `error:` and `hint:` lines only."""
    path, _ = bad_config
    result = invoke("status", "--kubeconfig", str(path))
    assert result.code == 1, result
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("error: ") and all(ln.startswith(("error: ", "hint: ")) for ln in lines), (
        result.err
    )


def test_agent_and_cli_processes_print_no_traceback(tmp_path: Path) -> None:
    """As processes: the agent and `status` on a YAML list, a wrong-typed section and a CA that is
    not PEM each exit 1 with one error line (and a hint); no Python traceback reaches the user."""
    for name in ("a YAML list", "contexts a number", "CA data not PEM"):
        path = tmp_path / "kubeconfig"
        data = SHAPES[name][0]
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        for argv in (
            ("status", "--kubeconfig", str(path)),
            ("agent", "--node-name", "n1", "--kubeconfig", str(path), "--shim", "/nonexistent"),
        ):
            proc = run_kwasm(*argv)
            assert proc.returncode == 1, (name, argv, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert lines[0].startswith("error: ") and len(lines) <= 2, proc.stderr
            if argv[0] == "agent":  # the lean reader names the fault itself
                assert lines[0].startswith("error: bad kubeconfig"), proc.stderr


def test_insecure_flag_must_be_a_real_boolean(tmp_path: Path) -> None:
    """`insecure-skip-tls-verify: "false"` (a string) does not turn TLS verification off."""
    path = tmp_path / "kubeconfig"
    path.write_text(config(cluster=f"{{server: '{DEAD}', insecure-skip-tls-verify: 'false'}}"))
    assert kube.kubeconfig_endpoint(str(path)).insecure is False
    path.write_text(config(cluster=f"{{server: '{DEAD}', insecure-skip-tls-verify: true}}"))
    assert kube.kubeconfig_endpoint(str(path)).insecure is True
