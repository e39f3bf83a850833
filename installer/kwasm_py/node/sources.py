"""EFFECT: read the files containerd loads for a layout (its main file and every import).

The merge rules are pure (``containerd/effective.py``); this module only expands the imports'
globs on the node root and reads and parses what they name.
"""

from __future__ import annotations

import glob
import os
from pathlib import PurePosixPath
from typing import Any

from kwasm_py.containerd import config as cc
from kwasm_py.containerd import effective
from kwasm_py.errors import KwasmError
from kwasm_py.model import ConfigKind, ContainerdVersion, CriSchema, Layout
from kwasm_py.node.hostfs import HostFS


def effective_config(
    fs: HostFS,
    lay: Layout,
    own: str | None,
    reference: str | None,
    *,
    containerd: ContainerdVersion | None,
) -> effective.Effective | None:
    """What containerd loads for `lay`: the file it reads (for a template or drop-in layout the
    rendered / main file `reference`, else the edited file `own`) with its imports resolved on
    the node root, merged by the rules of `containerd`'s major (when unknown: 2.x for a version 3
    or 4 file, else 1.x, the stricter guess). None when there is no readable main file (the plan
    then reports that itself). Raises nothing.
    """
    main_path, text = lay.config_path, own
    if lay.kind is not ConfigKind.CONFIG and lay.rendered_path is not None and reference is not None:
        main_path, text = lay.rendered_path, reference  # a template's next render: today's + our block
    if text is None:
        return None
    try:
        main = cc.load(text, source=str(main_path)).data
    except KwasmError:
        return None
    major = containerd.major if containerd else (2 if main.get("version", 1) in (3, 4) else 1)
    root = str(fs.root)

    def expand(pattern: str) -> list[str]:
        return ["/" + os.path.relpath(p, root) for p in sorted(glob.glob(root + pattern))]

    def load(path: str) -> dict[str, Any] | None:
        found = fs.read_text(PurePosixPath(path))
        try:
            return None if found is None else cc.load(found, source=path).data
        except KwasmError:
            return None

    return effective.resolve(str(main_path), main, major=major, expand=expand, load=load)


def decision_data(eff: effective.Effective | None, lay: Layout) -> dict[str, Any] | None:
    """The merged config the plan decides from, or None to decide from the files themselves.

    Without imports they are the same; k0s merges its drop-ins itself (our own drop-ins in a
    directory containerd imports are part of the merge); on 1.x an import that
    replaces a CRI table is refused after planning (``effective.check_takes_effect``).
    """
    if eff is None or not eff.imports or (lay.kind is ConfigKind.DROP_IN and lay.name == "k0s"):
        return None
    if eff.major < 2 and any(eff.overriding_import(s.plugin_id) for s in CriSchema):
        return None
    return eff.data
