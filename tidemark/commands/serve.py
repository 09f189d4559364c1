"""``tidemark serve``: the process that owns the ClickHouse engine — the API plus every sink.

chDB allows one engine per process, so the sinks (the only writers) and the API (the
readers, analysts' SQL included) share this process and its one client. The FastAPI
app starts the sinks in its lifespan and stops them on shutdown; uvicorn turns
SIGTERM/SIGINT into that shutdown, so a stop flushes and commits the open batches
and exits 0. Prometheus metrics (the sinks' included) are on the app's ``/metrics``.
"""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

import uvicorn

from sinks.clickhouse import connect
from sinks.runner import build_sink_services
from tidemark.runtime import tune_garbage_collector
from tidemark.settings import get_settings

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``serve`` command."""
    parser = subparsers.add_parser("serve", help="run the API and the sinks (owns the embedded ClickHouse engine)")
    parser.add_argument("--host", default=None, help="address to bind (default: TIDEMARK_API_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: TIDEMARK_API_PORT)")
    parser.add_argument("--no-sinks", action="store_true", help="serve the API only (sinks run elsewhere)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Open ClickHouse, build the sinks and the app, and serve until SIGTERM/SIGINT."""
    from api.app import create_app  # the API is heavy to import; only this command needs it

    tune_garbage_collector()  # after the imports: freezing covers them

    settings = get_settings()
    # The app's lifespan applies the migrations and creates the topics before it starts the sinks.
    client = connect(settings.clickhouse_url, settings.clickhouse_database)
    services = [] if args.no_sinks else build_sink_services(settings, client)
    app = create_app(settings, services=services, clickhouse=client)
    config = uvicorn.Config(
        app,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
    )
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown (the lifespan stops the sinks, which
    # flush and commit), then restores the previous handlers and re-raises the signal. With these
    # handlers in place that re-raise is only logged, so a requested stop exits 0, not -15.
    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGINT, _stopped)
    uvicorn.Server(config).run()
    return 0


def _stopped(signum: int, _frame: FrameType | None) -> None:
    log.info("Stopped on %s", signal.Signals(signum).name)
