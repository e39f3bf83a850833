"""The pure config editor, on real distribution configs and on our own odd-but-valid fixtures."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kwasm_py.containerd import config as cc
from kwasm_py.containerd import document
from kwasm_py.containerd import edit as ce
from kwasm_py.errors import ConfigError, ConflictError, VersionMismatch
from kwasm_py.model import ContainerdVersion, CriSchema
from tests.harness.containerd import SHARED_CONFIGS

DATA = Path(__file__).parent / "data" / "configs"
SHIM = "/opt/kwasm/bin/containerd-shim-spin-v2"
C16 = ContainerdVersion(1, 6, 20)
C17 = ContainerdVersion(1, 7, 24)
C21 = ContainerdVersion(2, 1, 9)
C23 = ContainerdVersion(2, 3, 0)

SHARED = sorted(SHARED_CONFIGS.glob("*.toml")) if SHARED_CONFIGS.is_dir() else []


def add(text: str, containerd: ContainerdVersion | None = None, **kw: object) -> tuple[cc.Edit, cc.ConfigDoc]:
    doc = cc.load(text, source="test")
    choice = cc.choose_schema(doc.data, containerd=containerd)
    entry = cc.RuntimeEntry("spin", SHIM, cc.runc_systemd_cgroup(doc.data, choice.schema))
    return cc.add_runtime(doc, entry, schema=choice.schema, **kw), doc  # type: ignore[arg-type]


def runtime_at(text: str, schema: CriSchema) -> dict[str, object] | None:
    _, body = cc.split_prelude(text)
    return cc.find_runtime(tomllib.loads(body), schema, "spin")


@pytest.mark.skipif(not SHARED, reason="../shared/containerd-configs is absent")
@pytest.mark.parametrize("path", SHARED, ids=[p.name for p in SHARED])
def test_shared_configs_add_idempotent_and_reversible(path: Path) -> None:
    """Every shipped config: add puts the runtime at the right path, twice = once, remove = original."""
    text = path.read_text()
    doc = cc.load(text, source=path.name)
    choice = cc.choose_schema(doc.data)
    entry = cc.RuntimeEntry("spin", SHIM, cc.runc_systemd_cgroup(doc.data, choice.schema))
    existing = cc.find_runtime(doc.data, choice.schema, "spin")
    if existing is not None:
        with pytest.raises(ConflictError, match="did not add"):
            cc.add_runtime(doc, entry, schema=choice.schema)
        return
    edit = cc.add_runtime(doc, entry, schema=choice.schema)
    assert edit.changed
    assert runtime_at(edit.text, choice.schema) == entry.as_table()
    # everything else means the same
    before, after = tomllib.loads(text), tomllib.loads(edit.text)
    ce._delete(after, (*choice.schema.runtimes_path(), "spin"))
    assert ce._prune_empty(after) == ce._prune_empty(before)
    again = cc.add_runtime(cc.load(edit.text, source=path.name), entry, schema=choice.schema)
    assert not again.changed and again.text == edit.text
    removed = cc.remove_runtime(cc.load(edit.text, source=path.name), "spin", schema=choice.schema)
    assert removed.text == text


@pytest.mark.skipif(not SHARED, reason="../shared/containerd-configs is absent")
def test_shared_configs_choose_expected_tables() -> None:
    """Real configs land in the table their containerd reads."""
    expect = {
        "containerd-1.6.20-default.toml": CriSchema.V2,
        "kind-v0.32.0-base-image.toml": CriSchema.V2,
        "eks-al2023-nodeadm-v20260724-v3-rendered.toml": CriSchema.V3,
        "eks-al2023-nodeadm-v20260724-v2-rendered.toml": CriSchema.V2,
        "talos-cri-registry-dropin-testdata.toml": CriSchema.V2,
    }
    for name, schema in expect.items():
        path = SHARED_CONFIGS / name
        if path.exists():
            assert cc.choose_schema(tomllib.loads(path.read_text())).schema is schema, name


def test_kind_systemd_cgroup_follows_runc() -> None:
    """A node whose runc uses the systemd cgroup driver gets SystemdCgroup = true for spin too."""
    edit, _ = add((DATA / "imports-and-multiline.toml").read_text())
    assert runtime_at(edit.text, CriSchema.V2) == {"runtime_type": SHIM, "options": {"SystemdCgroup": True}}
    edit, _ = add((DATA / "crlf.toml").read_text())
    assert runtime_at(edit.text, CriSchema.V2) == {"runtime_type": SHIM}


@pytest.mark.parametrize(
    "name",
    [
        "dotted-keys.toml",
        "inline-runtimes.toml",
        "unquoted-v1.toml",
        "v2-with-v3-ids.toml",
        "imports-and-multiline.toml",
        "crlf.toml",
        "k3s-base.toml.tmpl",
    ],
)
def test_own_fixtures_roundtrip(name: str) -> None:
    """Odd layouts: add twice = once, and remove gives the original bytes back."""
    text = (DATA / name).read_bytes().decode()
    containerd = C21 if name == "v2-with-v3-ids.toml" else None
    edit, _ = add(text, containerd)
    assert edit.changed
    assert runtime_at(edit.text, edit.schema) is not None
    again, _ = add(edit.text, containerd)
    assert not again.changed
    removed = cc.remove_runtime(cc.load(edit.text, source=name), "spin", schema=edit.schema)
    assert removed.text == text


def test_dotted_and_inline_keep_meaning() -> None:
    """Dotted keys get a sub-table header; inline runtimes get an inline entry."""
    edit, _ = add((DATA / "dotted-keys.toml").read_text())
    data = tomllib.loads(edit.text)
    assert data["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["spin"]["options"] == {
        "SystemdCgroup": True
    }
    assert '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.spin]' in edit.text
    edit, _ = add((DATA / "inline-runtimes.toml").read_text())
    data = tomllib.loads(edit.text)
    assert data["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["spin"] == {
        "runtime_type": SHIM
    }


def test_crlf_stays_crlf() -> None:
    """A CRLF file gets CRLF lines, never a mix."""
    text = (DATA / "crlf.toml").read_bytes().decode()
    edit, _ = add(text)
    assert edit.text.count("\n") == edit.text.count("\r\n")


def test_v1_short_plugin_names() -> None:
    """No version line and plugins.cri: the runtime goes under plugins.cri."""
    edit, _ = add((DATA / "unquoted-v1.toml").read_text(), C16)
    assert edit.schema is CriSchema.V1
    assert tomllib.loads(edit.text)["plugins"]["cri"]["containerd"]["runtimes"]["spin"]


def test_version2_with_v3_ids_follows_the_tables() -> None:
    """`version = 2` paired with containerd 2.x plugin IDs: follow the IDs on containerd 2."""
    data = tomllib.loads((DATA / "v2-with-v3-ids.toml").read_text())
    assert cc.choose_schema(data, containerd=C21).schema is CriSchema.V3
    assert cc.choose_schema(data).schema is CriSchema.V3
    choice = cc.choose_schema(data, containerd=C17)
    assert choice.schema is CriSchema.V2 and choice.notes


def test_single_quoted_style_is_kept() -> None:
    """A go-toml v2 file (single quotes, no indent) gets a block in the same style."""
    text = (DATA / "version4.toml").read_text()
    edit, _ = add(text, C23)
    assert "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.spin]" in edit.text
    assert f"runtime_type = '{SHIM}'" in edit.text


def test_version_guards() -> None:
    """Mismatches containerd would silently ignore (or reject) are refused with a clear error."""
    v3 = {"version": 3, "plugins": {CriSchema.V3.value: {}}}
    with pytest.raises(VersionMismatch, match=r"version = 3.*1\.6\.20.*silently ignores"):
        cc.choose_schema(v3, containerd=C16)
    with pytest.raises(VersionMismatch, match="reads at most version 3"):
        cc.choose_schema({"version": 4}, containerd=C21)
    assert cc.choose_schema({"version": 4}, containerd=C23).schema is CriSchema.V3
    with pytest.raises(VersionMismatch, match="no longer reads"):
        cc.choose_schema({"plugins": {"cri": {}}}, containerd=C21)
    with pytest.raises(ConfigError, match="unknown containerd config `version = 7`"):
        cc.choose_schema({"version": 7})
    with pytest.raises(ConfigError, match="not an integer"):
        cc.choose_schema({"version": "2"})
    v2_tables_no_version = {"plugins": {CriSchema.V2.value: {"containerd": {}}}}
    with pytest.raises(VersionMismatch, match="ignores in a version 1 config") as info:
        cc.choose_schema(v2_tables_no_version, containerd=C16)
    assert "version = 2" in info.value.hint
    assert (
        cc.choose_schema(v2_tables_no_version, reference={"version": 2}, containerd=C16).schema
        is CriSchema.V2
    )
    with pytest.raises(VersionMismatch, match="too old"):
        cc.choose_schema({"version": 2}, containerd=ContainerdVersion(1, 5, 9))


def test_disabled_cri_plugin_is_a_clear_error() -> None:
    """disabled_plugins = ["cri"] (Docker's package default) is reported, not worked around."""
    data = tomllib.loads((DATA / "disabled-cri.toml").read_text())
    with pytest.raises(ConfigError, match="disables containerd's CRI plugin") as info:
        cc.choose_schema(data)
    assert "disabled_plugins" in info.value.hint


def test_foreign_runtime_refused_then_forced_and_restored() -> None:
    """A `spin` table kwasm-py did not add needs --force; removing ours puts theirs back."""
    text = (DATA / "partial-spin-options.toml").read_text()
    with pytest.raises(ConflictError, match="did not add"):
        add(text)
    edit, _ = add(text, force=True)
    assert runtime_at(edit.text, CriSchema.V2) == {"runtime_type": SHIM}
    assert edit.replaced is not None
    removed = cc.remove_runtime(
        cc.load(edit.text, source="t"), "spin", schema=CriSchema.V2, restore=edit.replaced
    )
    assert tomllib.loads(removed.text) == tomllib.loads(text)


def test_owned_runtime_is_updated_in_place() -> None:
    """A table equal to what the state file says we wrote is ours to change (new shim path)."""
    text = (DATA / "crlf.toml").read_bytes().decode()
    first, _ = add(text)
    doc = cc.load(first.text, source="t")
    newer = cc.RuntimeEntry("spin", "/var/kwasm/bin/containerd-shim-spin-v2")
    with pytest.raises(ConflictError):
        cc.add_runtime(doc, newer, schema=CriSchema.V2)
    edit = cc.add_runtime(doc, newer, schema=CriSchema.V2, owned={"runtime_type": SHIM})
    assert runtime_at(edit.text, CriSchema.V2) == {"runtime_type": newer.runtime_type}
    assert cc.remove_runtime(cc.load(edit.text, source="t"), "spin", schema=CriSchema.V2).text == text


def test_templates() -> None:
    """A k3s template keeps every byte up to its last Go action; the runtime goes after it."""
    edit, _ = add((DATA / "k3s-base.toml.tmpl").read_text())
    assert edit.text.startswith('{{ template "base" . }}\n')
    directives = (DATA / "k3s-directives.toml.tmpl").read_text()
    doc = cc.load(directives, source="config.toml.tmpl")
    assert doc.prelude == directives and doc.data == {}
    added = cc.add_runtime(doc, cc.RuntimeEntry("spin", SHIM), schema=CriSchema.V2)
    assert added.text.startswith(directives)
    assert tomllib.loads(added.text[len(directives) :]) == {
        "plugins": {CriSchema.V2.value: {"containerd": {"runtimes": {"spin": {"runtime_type": SHIM}}}}}
    }
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        cc.load(directives + "runtime = [\n", source="config.toml.tmpl")
    assert "after the template's last" in info.value.hint
    bare = cc.load('{{ template "base" . }}\n', source="t")
    assert bare.data == {}
    added = cc.add_runtime(bare, cc.RuntimeEntry("spin", SHIM), schema=CriSchema.V2)
    assert added.text.startswith('{{ template "base" . }}\n[plugins."io.containerd.grpc.v1.cri"')


def test_malformed_toml_names_file_and_position() -> None:
    """Malformed TOML is a ConfigError naming the file and where it breaks."""
    with pytest.raises(ConfigError, match=r"malformed\.toml is not valid TOML: .*line 2"):
        cc.load((DATA / "malformed.toml").read_text(), source="malformed.toml")


def test_empty_config_gets_a_version_line() -> None:
    """A config with no settings gets `version = N` for the node's containerd, removable again."""
    text = (DATA / "empty.toml").read_text()
    doc = cc.load(text, source="t")
    edit = cc.add_runtime(doc, cc.RuntimeEntry("spin", SHIM), schema=CriSchema.V3, version_line=3)
    data = tomllib.loads(edit.text)
    assert data["version"] == 3 and edit.version_added
    removed = cc.remove_runtime(
        cc.load(edit.text, source="t"), "spin", schema=CriSchema.V3, version_added=True
    )
    assert removed.text == text


def test_no_final_newline() -> None:
    """A file without a final newline is edited and restored to the same meaning."""
    text = (DATA / "no-final-newline.toml").read_text()
    edit, _ = add(text)
    removed = cc.remove_runtime(cc.load(edit.text, source="t"), "spin", schema=CriSchema.V2)
    assert tomllib.loads(removed.text) == tomllib.loads(text)
    assert removed.text.rstrip("\n") == text


# ---------------------------------------------------------------------------------------------
# Fuzzing: odd-but-valid layouts built from random style choices.

QUOTES = ['"', "'"]


@st.composite
def configs(draw: st.DrawFn) -> str:
    q = draw(st.sampled_from(QUOTES))
    nl = draw(st.sampled_from(["\n", "\r\n"]))
    indent = draw(st.sampled_from(["", "  ", "    ", "\t"]))
    cri = f"plugins.{q}io.containerd.grpc.v1.cri{q}"
    blocks = []
    if draw(st.booleans()):
        blocks.append([f"[{cri}]", f'{indent}sandbox_image = "pause:3.{draw(st.integers(1, 10))}"'])
    if draw(st.booleans()):
        blocks.append([f"[{cri}.containerd]", f'{indent}default_runtime_name = "runc"'])
    runc_style = draw(st.sampled_from(["table", "dotted", "none"]))
    if runc_style == "table":
        blocks.append(
            [f"[{cri}.containerd.runtimes.runc]", f'{indent}runtime_type = "io.containerd.runc.v2"']
        )
        if draw(st.booleans()):
            sysd = draw(st.sampled_from(["true", "false"]))
            blocks.append(
                [f"{indent}[{cri}.containerd.runtimes.runc.options]", f"{indent * 2}SystemdCgroup = {sysd}"]
            )
    elif runc_style == "dotted":
        blocks.append(
            [f"[{cri}.containerd.runtimes]", f'{indent}runc.runtime_type = "io.containerd.runc.v2"']
        )
    if draw(st.booleans()):
        blocks.append([f"[{cri}.registry]", f'{indent}config_path = "/etc/containerd/certs.d"'])
    if draw(st.booleans()):
        blocks.append(["[grpc]", f'{indent}address = "/run/containerd/containerd.sock"'])
    order = draw(st.permutations(blocks))
    lines = ["version = 2"]
    for block in order:
        if draw(st.booleans()):
            lines.append("")
        if draw(st.booleans()):
            lines.append(f"# comment {draw(st.integers(0, 99))}")
        lines.extend(block)
    text = nl.join(lines)
    if draw(st.booleans()):
        text += nl
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_fuzz_add_remove(text: str) -> None:
    """Random styles, orders and newlines: add is right, idempotent, and reverses exactly."""
    edit, _ = add(text)
    assert runtime_at(edit.text, CriSchema.V2) is not None
    again, _ = add(edit.text)
    assert not again.changed
    removed = cc.remove_runtime(cc.load(edit.text, source="t"), "spin", schema=CriSchema.V2)
    if text.endswith(("\n", "\r\n")) or removed.text == text:
        assert removed.text == text
    else:
        assert tomllib.loads(removed.text) == tomllib.loads(text)


def test_parse_hands_out_a_copy_of_what_it_remembers() -> None:
    """The same text parsed twice gives equal data, and changing one result leaves the next
    alone (parses are remembered, the dicts handed out are not shared)."""
    text = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "overlayfs"\n'
    first = document.parse(text)
    first["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] = "changed"
    first["version"] = 3
    second = document.parse(text)
    assert second == {
        "version": 2,
        "plugins": {"io.containerd.grpc.v1.cri": {"containerd": {"snapshotter": "overlayfs"}}},
    }
    assert document.load(text, source="t").data == second
