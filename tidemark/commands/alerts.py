"""``tidemark alerts``: deliver anomaly alerts to on-call (webhook, Alertmanager, PagerDuty, Slack).

Reads ``anomalies`` and delivers each notification to the channels routed for its
severity (``TIDEMARK_ALERT_ROUTES``); channels are configured by
``TIDEMARK_ALERT_WEBHOOK_URL``, ``TIDEMARK_ALERT_ALERTMANAGER_URL``,
``TIDEMARK_ALERT_PAGERDUTY_ROUTING_KEY`` (+ ``TIDEMARK_ALERT_PAGERDUTY_URL``) and
``TIDEMARK_ALERT_SLACK_WEBHOOK_URL``. Quiet hours: ``TIDEMARK_ALERT_QUIET_HOURS=22:00-07:00``
with ``TIDEMARK_ALERT_QUIET_TIMEZONE`` and ``TIDEMARK_ALERT_QUIET_MODE`` (defer | suppress).
Prometheus metrics (``tidemark_alert_*``) on ``--metrics-port``. SIGTERM or SIGINT finishes the
message in hand, commits and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from prometheus_client import start_http_server

from consumers.alerts.consumer import AlertConsumer, channels_from_settings
from tidemark.settings import get_settings
from tidemark.topics import ensure_topics

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``alerts`` command."""
    parser = subparsers.add_parser("alerts", help="deliver anomaly alerts to on-call")
    parser.add_argument("--stop-timeout", type=float, default=30.0, help="seconds to finish and commit on stop")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the alert consumer until SIGTERM/SIGINT."""
    settings = get_settings()
    stopping = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("Received %s: stopping alert delivery", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    ensure_topics(settings)
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, addr=args.metrics_host)
        log.info("Metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
    channels = channels_from_settings(settings)
    if not channels:
        log.warning("No alert channel configured: anomalies will be read and recorded, not delivered")
    log.info("Alert channels: %s", ", ".join(sorted(channels)) or "none")
    service = AlertConsumer(settings)
    service.start()
    while not stopping.wait(1.0):
        if not service.is_alive():
            log.error("Alert delivery stopped unexpectedly")
            return 1
    service.stop(args.stop_timeout)
    return 0
