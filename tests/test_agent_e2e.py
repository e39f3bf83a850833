"""End to end: stand-in API + a real private containerd + `kwasm-py agent` running the real engine.

The agent runs `python -m kwasm_py node install/uninstall/status` (the default node command) aimed
at a private containerd under a supervisor (restart = SIGTERM its containerd child).
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kwasm_py.errors import RestartError
from kwasm_py.model import OPT_IN_KEY, PROVISIONED_LABEL, STATUS_ANNOTATION
from kwasm_py.node import cri
from tests.harness.cli import invoke
from tests.harness.cluster import wait_until
from tests.harness.containerd import PrivateContainerd, fake_shim
from tests.harness.kube_standin import StandIn

pytestmark = [pytest.mark.root, pytest.mark.containerd]


def engine_env(ctd: PrivateContainerd, shim: Path) -> dict[str, str]:
    """Point the real engine at a private containerd: the agent passes host root, PID, restart,
    install dir and shim on as arguments; KWASM_CONFIG and KWASM_SOCKET reach it by inheritance."""
    return {
        "KWASM_NODE_COMMAND": f"{sys.executable} -m kwasm_py node",
        # The host root is this machine's /: keep the agent's attempt count with this containerd.
        "KWASM_ATTEMPTS_FILE": str(ctd.dir / "agent-attempts.json"),
        **ctd.engine_env(shim),
    }


def labelled(api: StandIn, node: str) -> bool:
    return api.node(node)["metadata"]["labels"].get(PROVISIONED_LABEL) == "true"


def test_annotate_provision_label_remove(standin: StandIn, kubeconfig: Path, agents, ctd16, tmp_path):
    """CLI opt-in -> label only once containerd lists spin -> opt-out -> runtime gone, label gone."""
    shim = fake_shim(tmp_path / "shims")
    standin.add_node("n1")
    seen_at_label: list[dict[str, str]] = []

    def on_write(res, kind, obj):
        labels = obj.get("metadata", {}).get("labels") or {}
        if res.plural == "nodes" and labels.get(PROVISIONED_LABEL) == "true":
            seen_at_label.append(ctd16.cri_status().runtimes)

    standin.on_write = on_write
    # API faults mid-flight: a failed label patch, a lost lease race, a stale watch.
    standin.inject(409, 1, method="POST", plural="leases")
    standin.inject(410, 1, method="GET", watch=True)
    agent = agents("n1", **engine_env(ctd16, shim))
    assert "spin" not in ctd16.cri_status().runtimes
    res = invoke("annotate-node", "n1", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    # The agent's phase patch (best effort) and then its label patch fail once each.
    standin.inject(500, 2, method="PATCH", plural="nodes", name="n1")
    standin.wait_for(lambda: labelled(standin, "n1"), 60, "n1 labelled")
    assert seen_at_label and seen_at_label[0].get("spin") == str(
        ctd16.dir / "kwasm/bin/containerd-shim-spin-v2"
    )
    standin.wait_for(lambda: standin.events("Provisioned", "n1"), 10, "Provisioned")
    res = invoke("wait", "n1", "--timeout", "5", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err

    res = invoke("annotate-node", "n1", "--remove", "--kubeconfig", str(kubeconfig))
    assert res.code == 0, res.err
    standin.wait_for(
        lambda: (
            not labelled(standin, "n1")
            and STATUS_ANNOTATION not in standin.node("n1")["metadata"]["annotations"]
        ),
        60,
        "n1 unlabelled",
    )
    assert "spin" not in ctd16.cri_status().runtimes
    assert "spin" not in ctd16.config.read_text()
    standin.wait_for(lambda: standin.events("Unprovisioned", "n1"), 10, "Unprovisioned")
    assert agent.stop() == 0


def test_killed_between_install_and_label_no_second_restart(standin: StandIn, agents, ctd16, tmp_path):
    """An agent killed after installing but before labelling: the next one labels, no restart."""
    shim = fake_shim(tmp_path / "shims")
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    standin.inject(500, 100_000, method="PATCH", plural="nodes")
    standin.inject(500, 100_000, method="PATCH", plural="nodes/status")  # the label goes there
    first = agents("n1", **engine_env(ctd16, shim))
    wait_until(lambda: first.events("api_error"), 60, "install done, label refused")
    assert ctd16.cri_status().runtimes.get("spin")
    first.kill()
    before = ctd16.daemon()
    standin.clear_faults()
    second = agents("n1", **engine_env(ctd16, shim))
    standin.wait_for(lambda: labelled(standin, "n1"), 60, "n1 labelled")
    assert ctd16.daemon() == before  # same containerd process: no second restart
    (line,) = wait_until(lambda: second.events("provisioned"), 10, "provisioned logged")
    assert "changed=False" in line and "restarted=False" in line


def test_two_nodes_one_restart_lease(standin: StandIn, agents, ctd16, ctd16b, tmp_path):
    """Two real nodes and one restart Lease: their lease holds (and restarts) never overlap."""
    shim = fake_shim(tmp_path / "shims")
    standin.add_node("a", annotations={OPT_IN_KEY: "true"})
    standin.add_node("b", annotations={OPT_IN_KEY: "true"})
    agents("a", **engine_env(ctd16, shim))
    agents("b", **engine_env(ctd16b, shim))
    standin.wait_for(lambda: labelled(standin, "a") and labelled(standin, "b"), 90, "both labelled")

    def hold(node: str) -> tuple[float, float]:
        """From the API's side (one clock): the node's phase `installing` (written inside its
        slot) to the write that gave the slot away or cleared it. The agents' own log lines
        cannot order this: a waiter may log its hand-off before the releasing agent has read
        the answer to the write that made it."""
        reqs = standin.recorded()
        start = next(
            r.at
            for r in reqs
            if r.method == "PATCH" and f"/nodes/{node}" in r.path and "installing" in str(r.body)
        )
        end = next(
            r.at
            for r in reqs
            if r.method == "PUT"
            and "/leases/kwasm-restart-" in r.path
            and r.at > start
            and (r.body or {}).get("spec", {}).get("holderIdentity") != node
        )
        return start, end

    sa, sb = hold("a"), hold("b")
    assert sa[1] <= sb[0] or sb[1] <= sa[0], (sa, sb)


def cri_runtime_handlers(ctd: PrivateContainerd) -> list[str] | None:
    """The handlers containerd lists in CRI ``StatusResponse.runtime_handlers`` (field 3, each a
    ``RuntimeHandler`` whose field 1 is the name), as the kubelet reads them; None when it
    lists none (containerd 1.x)."""
    raw = cri._call(str(ctd.socket), "Status", b"", 3.0)
    names = [
        next((v.decode() for n, _, v in cri._fields(value) if n == 1), "")
        for num, _, value in cri._fields(raw)
        if num == 3
    ]
    return names or None


@pytest.fixture
def kubelet(standin: StandIn) -> Iterator[object]:
    """Play the kubelet for a node and a real containerd: every 0.2 s (the kubelet does it every
    5 s) read the runtime's handlers over CRI and post them to the Node's status when they
    changed. Yields a function start(node, ctd)."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(node: str, ctd: PrivateContainerd) -> None:
        def loop() -> None:
            last: list[str] | None = None
            while not stop.is_set():
                try:
                    now = cri_runtime_handlers(ctd)
                except RestartError:  # containerd is restarting
                    now = last
                if now != last:
                    standin.set_runtime_handlers(node, now)
                    last = now
                stop.wait(0.2)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(5)


def test_containerd2_handlers_reach_the_label_through_the_kubelet(
    standin: StandIn, agents, ctd2, kubelet, tmp_path
):
    """containerd 2.x lists its handlers over CRI and the kubelet copies them into
    status.runtimeHandlers: the agent labels only once that list has spin (check kubelet), and
    at that moment containerd itself lists spin too."""
    shim = fake_shim(tmp_path / "shims")
    before = cri_runtime_handlers(ctd2)
    assert before is not None and "spin" not in before, before
    standin.add_node("n1")
    seen_at_label: list[list[str]] = []

    def on_write(res, kind, obj):
        labels = obj.get("metadata", {}).get("labels") or {}
        if res.plural == "nodes" and labels.get(PROVISIONED_LABEL) == "true" and not seen_at_label:
            seen_at_label.append([h["name"] for h in obj.get("status", {}).get("runtimeHandlers") or []])

    standin.on_write = on_write
    kubelet("n1", ctd2)
    standin.wait_for(
        lambda: standin.node("n1").get("status", {}).get("runtimeHandlers"), 10, "kubelet report"
    )
    agents("n1", **engine_env(ctd2, shim), KWASM_KUBELET_TIMEOUT="60")
    standin.patch_node("n1", {"metadata": {"annotations": {OPT_IN_KEY: "true"}}})
    standin.wait_for(lambda: labelled(standin, "n1"), 90, "n1 labelled")
    assert seen_at_label and "spin" in seen_at_label[0]
    assert "spin" in (cri_runtime_handlers(ctd2) or [])
    status = json.loads(standin.node("n1")["metadata"]["annotations"][STATUS_ANNOTATION])
    assert status["check"] == "kubelet" and status["phase"] == "provisioned"


def test_real_engine_failures_are_bounded_until_an_input_changes(standin: StandIn, agents, ctd16, tmp_path):
    """The real engine fails every attempt (its shim is not there yet): exactly
    KWASM_MAX_ATTEMPTS attempts, then held; once the shim appears (a changed input) the agent
    provisions by itself, with no retry request."""
    late = tmp_path / "late"
    shim = late / "containerd-shim-spin-v2"
    standin.add_node("n1", annotations={OPT_IN_KEY: "true"})
    env = {**engine_env(ctd16, shim), "KWASM_MAX_ATTEMPTS": "2", "KWASM_DRIFT_INTERVAL": "0.2"}
    agent = agents("n1", **env)
    standin.wait_for(lambda: standin.events("ProvisionHeld", "n1"), 60, "ProvisionHeld")
    assert len(agent.events("install_start")) == 2 and len(agent.events("provision_failed")) == 2
    assert not labelled(standin, "n1")
    seen = len([r for r in standin.recorded("GET", "nodes") if not r.query.get("watch")])
    standin.wait_for(
        lambda: len([r for r in standin.recorded("GET", "nodes") if not r.query.get("watch")]) >= seen + 3,
        10,
        "re-checks while held",
    )
    assert len(agent.events("install_start")) == 2
    fake_shim(late)
    standin.wait_for(lambda: labelled(standin, "n1"), 60, "n1 labelled")
    assert len(agent.events("install_start")) == 3
    assert ctd16.cri_status().runtimes.get("spin") == str(ctd16.dir / "kwasm/bin/containerd-shim-spin-v2")
