"""Shared fixtures: each real component has its own plugin module in ``tests/fixtures``."""

pytest_plugins = [
    "tests.fixtures.clickhouse",
    "tests.fixtures.kafka",
    "tests.fixtures.server",
]
