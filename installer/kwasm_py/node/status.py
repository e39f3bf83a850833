"""`node status`: what kwasm-py installed on the node and how far the node drifted from it."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from kwasm_py.containerd import config as cc
from kwasm_py.errors import (
    KwasmError,
)
from kwasm_py.model import (
    CriSchema,
)
from kwasm_py.node import cri, ownership
from kwasm_py.node import state as st
from kwasm_py.node.context import NodeOptions, Report, _runtime_dicts, open_node
from kwasm_py.node.procfs import ProcFS


def status(
    opts: NodeOptions,
    *,
    ask_containerd: bool = False,
    cri_client: cri.CriClient | None = None,
    proc: ProcFS | None = None,
) -> Report:
    """What kwasm-py installed on the node and how far the node drifted from it.

    Takes the options, whether to ask containerd over CRI (its failure to answer is reported,
    not raised) and the ports (None: the real ones). Returns the Report; raises what
    `open_node` raises. Changes nothing.
    """
    node = open_node(opts, cri_client=cri_client, proc=proc)
    state = node.state
    report = Report(
        installed=state is not None and state.status == st.INSTALLED,
        status=state.status if state else "absent",
        layout=state.layout if state else node.layout.name,
        config=state.config.path if state else str(node.layout.config_path),
    )
    if ask_containerd:
        try:
            cs = node.cri_status()
            report.containerd = {
                "ready": cs.runtime_ready,
                "version": str(node.containerd_version() or ""),
                "runtimes": cs.runtimes,
            }
        except KwasmError as err:
            report.containerd = {"ready": False, "error": err.message}
    if state is None:
        return report
    report.runtimes = _runtime_dicts(state.runtimes)
    text = node.fs.read_text(PurePosixPath(state.config.path))
    data: dict[str, Any] = {}
    if text is None:
        report.drift.append(f"config {state.config.path} is gone")
    else:
        try:
            data = cc.load(text, source=state.config.path).data
        except KwasmError as err:
            report.drift.append(err.message)
    schema = CriSchema(state.config.schema)
    for record in state.runtimes:
        table = cc.find_runtime(data, schema, record.handler)
        if text is not None and not ownership.is_ours(table, record, install_dir=node.install_dir):
            report.drift.append(
                f"config {state.config.path} no longer has runtime {record.handler} as installed"
            )
        digest = node.fs.sha256(PurePosixPath(record.shim))
        if digest is None:
            report.drift.append(f"shim {record.shim} is missing")
        elif digest != record.sha256:
            report.drift.append(
                f"shim {record.shim} changed (sha256 {digest[:12]}…, installed {record.sha256[:12]}…)"
            )
        seen = (report.containerd or {}).get("runtimes")
        if seen is not None and seen.get(record.handler) != record.runtime_type:
            report.drift.append(f"containerd does not report runtime {record.handler}")
    return report
