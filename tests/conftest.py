"""Every test gets the shared fixtures of tests/harness (see tests/README.md)."""

pytest_plugins = ["tests.harness.fixtures", "tests.harness.cluster_fixtures"]
