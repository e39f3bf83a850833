"""Shared test harness: the fakes, real private daemons and fixtures every test module may use.

- cli: `run_kwasm` / `start_kwasm` (this tree's CLI as a subprocess), `invoke` (in process,
  typer's CliRunner), `child_env`.
- noderoot: `tree` (build a node root from a dict), `tree_hash` / `tree_diff` (the whole root).
- containerd: `PrivateContainerd` (a real 1.6 or 2.x daemon in a temp dir), `fake_shim`.
- distro_node: `DistroNode`, a real containerd chrooted into a distribution-shaped node root,
  rendering the config before every start as k3s / microk8s do.
- cri_client: `run_pod`, a CRI RunPodSandbox as the kubelet sends it.
- ocitar: a busybox OCI image tarball, so CRI needs no registry.
- kube_standin: `StandIn`, a stand-in Kubernetes API server (nodes, leases, events, watches):
  its state; `standin_http` serves it (routing, discovery, watch streams), `standin_rules`
  holds its pure rules (merge/strategic/JSON patch, selectors, status documents).
- cluster: `AgentFactory` (agent subprocesses on fake nodes), `wait_until`.
- fake_node: a script speaking the engine's JSON contract, run by agents instead of the engine.
- fake_systemd: `FakeSystemd`, systemd's Manager over real D-Bus on a unix socket.
- shim_http: an HTTP(S) server for shim archives and catalogs.
- image_build: build the installer image with buildah, run it with runc.
- fixtures, cluster_fixtures: the pytest fixtures (registered by tests/conftest.py).
"""
