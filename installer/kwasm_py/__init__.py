"""kwasm-py: make Kubernetes nodes run WebAssembly workloads with containerd."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Lazy: importlib.metadata costs ~25 ms at start-up, and only `--version` needs it.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("kwasm-py")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0.0.0+src"
    raise AttributeError(name)
