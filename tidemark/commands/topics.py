"""``tidemark topics``: create Tidemark's Kafka topics (idempotent) and list them."""

from __future__ import annotations

import argparse

from tidemark.settings import get_settings
from tidemark.topics import ALL_TOPICS, ensure_topics


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``topics`` command."""
    parser = subparsers.add_parser("topics", help="create the Kafka topics (idempotent) and list them")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Create missing topics, then print each with its partitions and retention."""
    settings = get_settings()
    ensure_topics(settings)
    for spec in ALL_TOPICS:
        days = spec.retention_ms / 86_400_000
        print(f"{settings.topic(spec.name):<24} partitions={spec.partitions:<3} retention={days:g}d")
    return 0
