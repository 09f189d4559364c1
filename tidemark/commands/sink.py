"""``tidemark sink``: the Kafka → ClickHouse sinks on their own, without the API.

For a deployment on a ClickHouse server (run as many replicas as there are
partitions to share), or for a process that owns an embedded engine by itself.
Prometheus metrics are served on ``--metrics-port``. SIGTERM or SIGINT flushes and
commits the open batches, then exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from prometheus_client import start_http_server

from sinks.clickhouse import connect
from sinks.migrations import apply_migrations
from sinks.runner import SINKS, build_sink_services
from tidemark.runtime import tune_garbage_collector
from tidemark.settings import get_settings
from tidemark.topics import ensure_topics

log = logging.getLogger(__name__)

# How often the main thread checks that every sink is still alive.
HEALTH_CHECK_SECONDS = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``sink`` command."""
    parser = subparsers.add_parser("sink", help="run the Kafka → ClickHouse sinks (no API)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated sinks to run (default: all of {', '.join(SINKS)})"
    )
    parser.add_argument("--stop-timeout", type=float, default=30.0, help="seconds to flush and commit on stop")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the sinks until SIGTERM/SIGINT; exit 0 after a clean stop, 1 if a sink died."""
    tune_garbage_collector()
    settings = get_settings()
    stopping = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("Received %s: flushing and stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    ensure_topics(settings)
    client = connect(settings.clickhouse_url, settings.clickhouse_database)
    apply_migrations(client)
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    services = build_sink_services(settings, client, only)
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, addr=args.metrics_host)
        log.info("Metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
    for service in services:
        service.start()
    log.info("Sinks running: %s", ", ".join(service.name for service in services))

    failed = False
    while not stopping.wait(HEALTH_CHECK_SECONDS):
        dead = [s.name for s in services if getattr(s, "running", True) is False]
        if dead:
            log.error("Sink(s) %s stopped unexpectedly; stopping the rest", ", ".join(dead))
            failed = True
            break
    for service in reversed(services):
        service.stop(args.stop_timeout)
    log.info("Sinks stopped")
    return 1 if failed else 0
