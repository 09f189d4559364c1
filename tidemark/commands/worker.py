"""``tidemark worker``: the stream worker (sessions, windowed metrics), a Faust worker.

Start as many as ``events.raw`` has partitions; they share the work as one consumer
group (the app id, ``TIDEMARK_STREAM_APP_ID`` after ``TIDEMARK_TOPIC_PREFIX``).
SIGTERM or SIGINT stops it; whatever was not checkpointed is replayed by the next owner.
"""

from __future__ import annotations

import argparse
import logging

from tidemark.runtime import tune_garbage_collector
from tidemark.settings import get_settings
from tidemark.topics import ensure_topics

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``worker`` command."""
    parser = subparsers.add_parser("worker", help="run the stream worker (sessions and windowed metrics)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the Faust worker until stopped."""
    import faust

    from streams.app import create_app, ensure_stream_topics

    tune_garbage_collector()  # after the imports: freezing covers them

    settings = get_settings()
    ensure_topics(settings)
    ensure_stream_topics(settings)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0
