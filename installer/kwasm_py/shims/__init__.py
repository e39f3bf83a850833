"""Shim binaries: the catalog, fetching and verifying, the sources the agent installs from."""
