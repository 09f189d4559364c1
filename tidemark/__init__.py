"""Tidemark: streaming product analytics and BI for a community-funding platform.

Shared settings live in :mod:`tidemark.settings`, Kafka topics in :mod:`tidemark.topics`
and the command-line entry point in :mod:`tidemark.cli`.
"""

__version__ = "0.1.0"
