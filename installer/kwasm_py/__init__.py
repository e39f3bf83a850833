"""kwasm-py: make Kubernetes nodes run WebAssembly workloads with containerd."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kwasm-py")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+src"
