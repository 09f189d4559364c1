"""``tidemark demo``: stream realistic platform traffic into the pipeline.

Sends the seeded simulation of :mod:`tidemark.demo` either straight to Kafka through the
Python SDK (``--via kafka``, the default) or through the HTTP collector
(``--via http --url ... --write-key ...``). With ``--backfill-days N`` it first sends N
days of history as fast as the receiver takes it, then continues live at ``--rate``
events per second (the weekly average: the hour-of-day and weekday curves still apply;
``--flat`` removes them) with timestamps of now. ``--duration`` ends the live part after
that many seconds; without it the demo runs until Ctrl-C or SIGTERM, which flush what is
pending before exiting. Incidents can be injected for anomaly-detection demos, e.g.
``--inject revenue_drop@+10m/30m`` or ``--inject error_burst@2026-11-25T14:00Z/15m*0.3``.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import FrameType

from tidemark.demo import InjectedAnomaly, generate_records, live_config, paced
from tidemark.demo.senders import CollectorSender, EventSender, KafkaSender
from tidemark.settings import get_settings
from tidemark.topics import ensure_topics

log = logging.getLogger("tidemark.demo")
PROGRESS_EVERY_SECONDS = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``demo`` command."""
    parser = subparsers.add_parser("demo", help="send realistic demo traffic (Kafka via the SDK, or the collector)")
    parser.add_argument("--via", choices=("kafka", "http"), default="kafka", help="where to send (default: kafka)")
    parser.add_argument("--url", default=None, help="collector base URL for --via http (default: the API settings)")
    parser.add_argument("--write-key", default=None, help="collector write key for --via http")
    parser.add_argument("--rate", type=float, default=30.0, help="average events per second (default: 30)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the simulation (default: random, logged)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of live traffic (default: until Ctrl-C)")
    parser.add_argument("--backfill-days", type=float, default=0.0, help="days of history to send first")
    parser.add_argument(
        "--backfill-rate",
        type=float,
        default=None,
        help="average events per second of the history (default: 2, or --rate if lower); 30/s is 2.6M events a day",
    )
    parser.add_argument("--timezone", default="UTC", help="local timezone of the daily curve (default: UTC)")
    parser.add_argument("--flat", action="store_true", help="no daily/weekly seasonality")
    parser.add_argument("--batch-size", type=int, default=100, help="events per /v1/batch request (--via http)")
    parser.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="KIND@START/DURATION[*MAGNITUDE]",
        help="inject an incident: revenue_drop, signup_spike or error_burst (repeatable)",
    )
    parser.set_defaults(func=run)


class _Stop(Exception):
    """SIGTERM arrived: stop like Ctrl-C, flushing what is pending."""


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def run(args: argparse.Namespace) -> int:
    """Generate and send demo traffic until the duration ends or the process is told to stop."""
    if args.rate <= 0:
        raise SystemExit("--rate must be positive")
    settings = get_settings()
    now = datetime.now(UTC)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    try:
        anomalies = tuple(InjectedAnomaly.parse(spec, now=now) for spec in args.inject)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    config = live_config(
        args.rate,
        seed,
        backfill=timedelta(days=args.backfill_days),
        now=now,
        backfill_rate=args.backfill_rate if args.backfill_rate is not None else min(args.rate, 2.0),
        timezone=args.timezone,
        seasonality=0.0 if args.flat else 1.0,
        anomalies=anomalies,
    )
    if args.duration is not None:
        config = replace(config, end=now + timedelta(seconds=args.duration))

    sender: EventSender
    if args.via == "kafka":
        ensure_topics(settings)
        sender = KafkaSender(settings)
        target = f"Kafka {settings.kafka_bootstrap} topic {settings.topic('events.raw')}"
    else:
        url = args.url or f"http://{settings.api_host}:{settings.api_port}"
        key = args.write_key or (settings.write_keys[0] if settings.write_keys else "")
        sender = CollectorSender(url, key, batch_size=args.batch_size)
        target = f"collector {url}/v1/batch"
    log.info(
        "Demo traffic seed=%d rate=%.1f/s backfill=%.1f days from %s, %s, to %s%s",
        seed,
        args.rate,
        args.backfill_days,
        config.start.isoformat(timespec="seconds"),
        f"for {args.duration:.0f}s live" if args.duration is not None else "until stopped",
        target,
        "".join(f"; injecting {a.kind} at {a.start.isoformat(timespec='seconds')} for {a.duration}" for a in anomalies),
    )
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    started = time.monotonic()
    progress = _Progress(sender, now)
    try:
        for record in paced(generate_records(config), lambda r: r["timestamp"] / 1000):
            if record is None:
                sender.tick()
            else:
                sender.send(record)
                progress.latest = record["timestamp"]
            progress.maybe_log()
    except (KeyboardInterrupt, _Stop):
        log.info("Stopping: flushing what is pending")
    finally:
        signal.signal(signal.SIGTERM, previous)
        sender.close()
        progress.maybe_log(force=True)
    counts = sender.counts()
    log.info(
        "Demo done in %.1fs: sent %d, accepted %d, rejected %d, failed %d",
        time.monotonic() - started,
        counts.sent,
        counts.accepted,
        counts.rejected,
        counts.failed,
    )
    return 0 if counts.failed == 0 and counts.rejected == 0 else 1


class _Progress:
    """A log line every few seconds: how much was sent and confirmed, and how fast."""

    def __init__(self, sender: EventSender, live_from: datetime) -> None:
        self.sender = sender
        self.live_from_ms = int(live_from.timestamp() * 1000)
        self.latest: int | None = None  # Unix ms of the latest event sent
        self.last_log = time.monotonic()
        self.last_sent = 0

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_log < PROGRESS_EVERY_SECONDS:
            return
        counts = self.sender.counts()
        rate = (counts.sent - self.last_sent) / max(now - self.last_log, 1e-9)
        phase = "backfill" if self.latest is not None and self.latest < self.live_from_ms else "live"
        log.info(
            "%s: sent %d (%.0f/s), accepted %d, rejected %d, failed %d; latest event %s",
            phase,
            counts.sent,
            rate,
            counts.accepted,
            counts.rejected,
            counts.failed,
            datetime.fromtimestamp(self.latest / 1000, UTC).isoformat(timespec="seconds") if self.latest else "-",
        )
        self.last_log, self.last_sent = now, counts.sent
