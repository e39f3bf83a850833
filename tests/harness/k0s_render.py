"""A stand-in for k0s's own containerd config step (k0s <= 1.35), in pure Python.

Source: k0sproject/k0s at v1.35.7+k0s.0 (commit 175316edce42c2d7323d1c0835a40e90559689a3),
`pkg/component/worker/containerd/component.go` (`setupConfig`, run before every containerd start
and again when a drop-in changes, `watchDropinConfigs`) and `configurer.go` (`handleImports`):

- when `/etc/k0s/containerd.toml` does not carry `# k0s_managed=true` (`isK0sManagedConfig`),
  k0s writes nothing;
- otherwise it starts from containerd's default CRI plugin config (`criconfig.DefaultConfig()`
  with the pause image, encoded as `{version = 2, plugins."io.containerd.grpc.v1.cri" = ...}`);
- for each `/etc/k0s/containerd.d/*.toml` (Go `filepath.Glob`: sorted): a file with a
  `plugins."io.containerd.grpc.v1.cri"` table is merged into that config as a patch
  (mesosphere/toml-merge `patch.TOMLString`; modelled here as a recursive table merge where the
  patch's non-table values replace, which is not verified against toml-merge's code), any other
  file is added to the import list;
- it writes the result to `/run/k0s/containerd-cri.toml` and rewrites `/etc/k0s/containerd.toml`
  as `containerdTomlHeader` + `{version = 2, imports = [<plain drop-ins>..., <cri file>]}`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomlkit

CONFIG = "etc/k0s/containerd.toml"
DROPINS = "etc/k0s/containerd.d"
CRI_FILE = "/run/k0s/containerd-cri.toml"
CRI = "io.containerd.grpc.v1.cri"
#: `containerdTomlHeader` in component.go at the commit above.
HEADER = (
    "# k0s_managed=true\n"
    "# This is a placeholder configuration for k0s managed containerd.\n"
    "# If you wish to override the config, remove the first line and replace this file with "
    "your custom configuration.\n"
    "# For reference see https://github.com/containerd/containerd/blob/main/docs/man/"
    "containerd-config.toml.5.md\n"
)


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Takes two parsed TOML tables; returns `base` with `patch` merged in recursively (tables
    merge, every other value of the patch replaces). Pure: neither input is changed."""
    out = dict(base)
    for key, value in patch.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def managed(text: str) -> bool:
    """Takes the text of /etc/k0s/containerd.toml; returns whether k0s manages it (a line
    `# k0s_managed=true`, as `isK0sManagedConfig` looks for it)."""
    return any(line.strip() == "# k0s_managed=true" for line in text.splitlines())


def render(root: Path, default_cri: dict[str, Any]) -> bool:
    """Takes the node root and containerd's default CRI plugin table (what
    `criconfig.DefaultConfig()` encodes to); does k0s's `setupConfig` under `root`. Returns
    whether it wrote (False: the config is user-managed). Raises tomllib.TOMLDecodeError on a
    drop-in that is not TOML, as k0s fails to start then."""
    config = root / CONFIG
    if not managed(config.read_text()):
        return False
    cri: dict[str, Any] = {"version": 2, "plugins": {CRI: default_cri}}
    imports: list[str] = []
    for dropin in sorted((root / DROPINS).glob("*.toml")):
        data = tomllib.loads(dropin.read_text())
        if CRI in data.get("plugins", {}):
            cri = merge(cri, data)
        else:
            imports.append(f"/{dropin.relative_to(root)}")
    run = root / CRI_FILE.lstrip("/")
    run.parent.mkdir(parents=True, exist_ok=True)
    run.write_text(tomlkit.dumps(cri))
    config.write_text(HEADER + tomlkit.dumps({"imports": [*imports, CRI_FILE], "version": 2}))
    return True
