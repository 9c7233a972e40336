"""Shared pytest configuration: the test cluster's fixtures (see tests/cluster/fixtures.py)."""

pytest_plugins = ["tests.cluster.fixtures"]
