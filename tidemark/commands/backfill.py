"""``tidemark backfill``: recompute metric snapshots of a past range from raw events, and reconcile.

Examples::

    tidemark backfill --from 2026-03-01 --to 2026-03-08                 # every metric, every period
    tidemark backfill --from 2026-03-29 --to 2026-03-30 --metrics dau,gmv --periods day --report --dry-run
    tidemark backfill --lookback-hours 48 --every 3600                  # the scheduled job

Dates without a time are midnights in ``TIDEMARK_REPORT_TIMEZONE``. Results go to the
``metrics`` topic (the sinks write them). ClickHouse is read directly
(``TIDEMARK_CLICKHOUSE_URL``), or through a running API with ``--api`` when the API
process owns the embedded engine.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from datetime import datetime
from types import FrameType
from zoneinfo import ZoneInfo

from tidemark.settings import Settings, get_settings

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``backfill`` command."""
    parser = subparsers.add_parser("backfill", help="recompute metric snapshots from raw events; reconcile")
    parser.add_argument("--from", dest="start", help="start (ISO date or datetime; local to the reporting timezone)")
    parser.add_argument("--to", dest="end", help="end, exclusive (ISO date or datetime)")
    parser.add_argument("--lookback-hours", type=float, help="instead of --from/--to: the last N hours up to now")
    parser.add_argument("--metrics", help="comma-separated metric names (default: every catalogue metric)")
    parser.add_argument("--periods", help="comma-separated periods (minute,hour,day,week,month; default: all)")
    parser.add_argument("--report", action="store_true", help="print the stream-vs-recompute reconciliation")
    parser.add_argument("--dry-run", action="store_true", help="compute (and report) but publish nothing")
    parser.add_argument("--every", type=float, help="repeat every N seconds (with --lookback-hours): scheduled job")
    parser.add_argument("--api", help="read ClickHouse through this Tidemark API base URL (POST /v1/sql)")
    parser.add_argument("--api-key", help="API key for --api")
    parser.set_defaults(func=run)


def parse_instant(text: str, tz: str) -> int:
    """Epoch ms of an ISO date/datetime; naive values are local to ``tz``."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=ZoneInfo(tz))
    return int(value.timestamp() * 1000)


def run_once(args: argparse.Namespace, settings: Settings, queries: object) -> int:
    """One recompute (+ report, + publish); returns the number of snapshots published."""
    from streams.backfill import current_values, format_report, publish, recompute, reconcile, retractions
    from streams.catalogue import get_catalogue
    from streams.periods import Period, PeriodCalendar

    tz = settings.report_timezone
    if args.lookback_hours is not None:
        to_ms = int(time.time() * 1000)
        from_ms = to_ms - int(args.lookback_hours * 3_600_000)
    else:
        if not (args.start and args.end):
            raise SystemExit("give --from and --to, or --lookback-hours")
        from_ms, to_ms = parse_instant(args.start, tz), parse_instant(args.end, tz)
    if to_ms <= from_ms:
        raise SystemExit("--to must be after --from")
    catalogue = get_catalogue(settings.metrics_file)
    names = [n.strip() for n in args.metrics.split(",")] if args.metrics else None
    try:
        definitions = catalogue.select(names)
    except KeyError as exc:
        raise SystemExit(str(exc)) from exc
    periods = [Period(p.strip()) for p in args.periods.split(",")] if args.periods else None
    calendar = PeriodCalendar(tz, settings.week_start)
    values = recompute(queries, catalogue, definitions, calendar, from_ms, to_ms, settings, periods)  # type: ignore[arg-type]
    # The whole periods the recompute covered, per period: what ClickHouse holds there now.
    lo = min((v.period_start for v in values), default=from_ms)
    hi = max((v.period_end for v in values), default=to_ms)
    held = current_values(queries, [d.name for d in definitions], lo, hi)  # type: ignore[arg-type]
    covered = {(v.metric, v.period.value) for v in values}
    current = {k: v for k, (v, _source) in held.items() if (k[0], k[1]) in covered}
    if args.report:
        print(format_report(reconcile(current, values), tz))
    stale = retractions(current, values, catalogue, calendar)
    if args.dry_run:
        print(f"recomputed {len(values)} snapshots, {len(stale)} to retract (dry run: nothing published)")
        return 0
    published = publish(settings, [*values, *stale])
    print(f"published {published} recomputed snapshots to {settings.topic('metrics')}")
    return published


def run(args: argparse.Namespace) -> int:
    """Recompute once, or every ``--every`` seconds until SIGTERM/SIGINT."""
    settings = get_settings()
    if args.api:
        from streams.backfill import ApiQueries

        queries: object = ApiQueries(args.api, args.api_key)
    else:
        from sinks.clickhouse import connect

        queries = connect(settings.clickhouse_url, settings.clickhouse_database)
    if args.every is None:
        run_once(args, settings, queries)
        return 0
    if args.lookback_hours is None:
        raise SystemExit("--every needs --lookback-hours")
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping.is_set():
        try:
            run_once(args, settings, queries)
        except Exception:  # a failed round is logged; the schedule goes on
            log.exception("Backfill round failed")
        stopping.wait(args.every)
    return 0
