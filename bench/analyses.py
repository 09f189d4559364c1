"""Benchmark: a 5-step funnel and a 12-week retention matrix over 10 million demo-like events.

Runs on the embedded engine in a temporary directory (or ``--path``). The events are made
inside ClickHouse with ``INSERT ... SELECT FROM numbers()`` so that generating them takes
seconds, then each analysis runs a few times and the median is printed. Not a test:
figures depend on the machine.

    python -m bench.analyses --events 10000000 --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from api.analyses.funnels import FunnelDefinition, FunnelStep, compute_funnel
from api.analyses.models import AnalysisSettings
from api.analyses.query import TimeRange
from api.analyses.retention import EventSpec, RetentionDefinition, compute_retention
from sinks.clickhouse import connect
from sinks.migrations import apply_migrations

START = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
DAYS = 90

# Event mix (cumulative percent thresholds) loosely following the demo platform's traffic.
MIX = [
    ("page_view", 45),
    ("login", 55),
    ("join_community", 62),
    ("watch_ad", 75),
    ("fund_project", 84),
    ("referral_sent", 88),
    ("project_created", 91),
    ("create_loan", 94),
    ("signup", 96),
    ("error", 100),
]


def generate(client: object, events: int, people: int) -> float:
    """Insert ``events`` rows into ``events`` from ``numbers()``; return the seconds it took."""
    names = "[" + ", ".join(f"'{n}'" for n, _ in MIX) + "]"
    thresholds = "[" + ", ".join(str(t) for _, t in MIX) + "]"
    span_ms = DAYS * 86400 * 1000
    start_ms = int(START.timestamp() * 1000)
    sql = f"""
        INSERT INTO events (event_id, event_type, event_name, user_id, anonymous_id, session_id, timestamp,
                            received_at, source, properties, context)
        SELECT
            generateUUIDv4(number) AS event_id,
            'action',
            {names}[arrayFirstIndex(t -> (intHash64(number * 7) % 100) < t, {thresholds})] AS name,
            -- one event in ten is anonymous (a device not yet stitched), except signups which link both ids
            if(intHash64(number * 11) % 10 = 0 AND name != 'signup', '', concat('u', toString(person))) AS user_id,
            concat('d', toString(person)) AS anonymous_id,
            '',
            fromUnixTimestamp64Milli(toInt64({start_ms} + (intHash64(number * 3) % {span_ms})), 'UTC') AS ts,
            ts,
            'bench',
            concat('{{"community":"c', toString(intHash64(number * 13) % 50), '","amount":',
                   toString(intHash64(number * 17) % 200), ',"fee":', toString((intHash64(number * 17) % 200) * 0.03),
                   '}}'),
            concat('{{"location":{{"country":"', ['NG', 'KE', 'GH', 'ZA'][1 + intHash64(number * 19) % 4], '"}}}}')
        FROM (SELECT number, intHash64(number) % {people} AS person FROM numbers({events}))
    """
    began = time.perf_counter()
    client.command(sql)  # type: ignore[attr-defined]
    return time.perf_counter() - began


def timed(label: str, runs: int, action: Callable[[], object]) -> float:
    """Median wall seconds of ``runs`` runs of ``action`` (after one warm-up run), printed with CPU seconds.

    The engine runs in this process, so CPU seconds are the engine's work; on a busy shared
    machine wall time also measures waiting for a core.
    """
    action()
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    median = statistics.median(walls)
    print(
        f"{label:<52} wall median {median:6.3f} s  cpu median {statistics.median(cpus):6.3f} s  "
        f"(wall runs: {', '.join(f'{t:.2f}' for t in walls)})"
    )
    return median


def main() -> None:
    """Generate the events, then time the funnel and the retention matrix."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--people", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--path", default=None, help="engine data path (default: a temporary directory)")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")

    path = args.path or tempfile.mkdtemp(prefix="tidemark-bench-")
    client = connect(f"chdb://{path}", "bench")
    apply_migrations(client)
    if client.query("SELECT count() FROM events").result_rows[0][0] == 0:
        seconds = generate(client, args.events, args.people)
        print(f"generated {args.events:,} events for {args.people:,} people in {seconds:.1f} s")
    client.command("OPTIMIZE TABLE events FINAL")
    # As background merges leave it: one bulk insert gives the weekly activity rollup (fed at insert
    # time) a row per insert block, actor and week until merged.
    client.command("OPTIMIZE TABLE activity_weeks FINAL")
    client.command("OPTIMIZE TABLE identities FINAL")  # the same for the identity links (one per device)
    total, people = client.query("SELECT count(), uniqExact(person_id) FROM events_resolved").result_rows[0]
    print(f"events_resolved: {total:,} events, {people:,} people (after stitching)")

    funnel = FunnelDefinition(
        name="bench",
        steps=tuple(
            FunnelStep(name=n, event_name=n)
            for n in ("page_view", "join_community", "watch_ad", "fund_project", "referral_sent")
        ),
        window_seconds=7 * 86400,
    )
    month = TimeRange(start=START + timedelta(days=30), end=START + timedelta(days=60))
    result = compute_funnel(client, funnel, month)
    print("funnel counts:", [s.count for s in result.steps], f"median time to convert {result.time_to_convert.median}")
    timed("5-step ordered funnel, 30-day range, 7-day window", args.runs, lambda: compute_funnel(client, funnel, month))
    strict = funnel.model_copy(update={"order": "strict"})
    timed("5-step strict funnel, 30-day range", args.runs, lambda: compute_funnel(client, strict, month))

    retention = RetentionDefinition(
        start_event=EventSpec(event_name="signup"), return_event=EventSpec(event_name="$any"), period="week", periods=12
    )
    quarter = TimeRange(start=START, end=START + timedelta(weeks=12))
    settings = AnalysisSettings(timezone="Africa/Lagos")
    matrix = compute_retention(client, retention, quarter, settings)
    print("retention cohort sizes:", [c.size for c in matrix.cohorts][:12])
    timed(
        "12-week retention matrix (first-time, any return)",
        args.runs,
        lambda: compute_retention(client, retention, quarter, settings),
    )
    recurring = retention.model_copy(update={"cohort_type": "recurring"})
    timed(
        "12-week retention matrix (recurring)",
        args.runs,
        lambda: compute_retention(client, recurring, quarter, settings),
    )


if __name__ == "__main__":
    main()
