"""Benchmark: latency of the executive dashboard's widget data over N demo-like events (embedded engine).

Loads ``--events`` rows (default 10 million) into a fresh embedded ClickHouse with one
``INSERT ... SELECT ... FROM numbers(N)`` (the demo's event mix, people, communities,
countries and amounts, spread over the last 30 days; events, the activity rollups and the
identity links merged as background merges leave them), opens the query API in-process on a
temporary SQLite metadata database, then requests every widget of the pre-built Executive
dashboard ``--rounds`` times over HTTP (FastAPI's test client: no network in the figures)
and prints p50/p95 latency per widget and overall, with the median CPU time of this process
per request (the embedded engine runs in it: the steadier figure on a shared machine), three
ways: computed on every request
(``refresh=true``) from raw events only, computed with metric snapshots present, and served
as a browser gets it (widget results are reused for their refresh interval and the dashboard
warmer recomputes them ahead; the warmer's pass is timed and printed too).

    python bench/api.py                      # 10M events, 5 rounds
    python bench/api.py --events 1000000     # quicker

Goal: p95 < 200 ms per widget request.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

# Run as ``python bench/api.py``, this file's folder comes first on sys.path and its name would
# shadow the ``api`` package: put the project root there instead.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from api.app import install_error_handlers  # noqa: E402
from api.dashboards import close_query_api, open_query_api  # noqa: E402
from api.metrics_query import (  # noqa: E402
    Granularity,
    MetricQuery,
    MetricsEngine,
    bucket_end,
    default_catalogue,
)
from api.routes import dashboards, keys, metrics  # noqa: E402
from sinks.clickhouse import connect  # noqa: E402
from sinks.migrations import apply_migrations  # noqa: E402
from sinks.snapshots import SNAPSHOTS_SINK  # noqa: E402
from tidemark.settings import Settings  # noqa: E402

ADMIN_KEY = "bench-admin-key"

# One row per number: event kind by n % 100 (the demo's rough mix), everything else hashed from n.
LOAD_SQL = """
INSERT INTO events (event_id, event_type, event_name, user_id, anonymous_id, session_id, timestamp, received_at,
                    source, properties, context)
SELECT
    generateUUIDv4(number) AS event_id,
    multiIf(k < 55, 'page_view', k >= 97, 'error', k IN (65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 88, 92, 94, 95, 96),
            'conversion', 'action') AS event_type,
    multiIf(k < 55, 'page_view', k < 65, 'login', k < 75, 'fund_project', k < 83, 'watch_ad',
            k < 86, 'join_community', k < 88, 'project_created', k = 88, 'project_funded', k = 89, 'project_expired',
            k < 92, 'create_loan', k = 92, 'loan_disbursed', k = 93, 'loan_repaid', k < 97, 'signup', 'error')
        AS event_name,
    if(person % 10 < 7, concat('usr_', toString(person)), '') AS user_id,
    concat('anon_', toString(person)) AS anonymous_id,
    concat('s_', toString(intDiv(number, 7))) AS session_id,
    toDateTime64({end:DateTime64(3, 'UTC')}, 3, 'UTC')
        - toIntervalMillisecond(intDiv(number * {span_ms:UInt64}, {n:UInt64})) AS timestamp,
    timestamp AS received_at,
    'bench' AS source,
    concat('{"amount":', toString(amount), ',"fee":', toString(round(amount * 0.029 + 0.3, 2)),
           ',"revenue":', toString(0.01 + (h % 8) / 100), ',"community":"', community, '","category":"', category,
           '","project_id":"p', toString(h % 5000), '","raised_amount":', toString(amount * 20),
           ',"days_to_fund":', toString(1 + h % 30), ',"path":"/projects/p', toString(h % 5000), '"}') AS properties,
    concat('{"location":{"country":"', country, '"},"device":{"type":"', if(h % 3 = 0, 'desktop', 'mobile'),
           '"},"campaign":{"source":"', ['google', 'facebook', 'newsletter', ''][1 + h % 4], '"}}') AS context
FROM (
    SELECT number, number % 100 AS k, cityHash64(number) AS h, cityHash64(number, 1) % 200000 AS person,
           toFloat64(5 + h % 300) AS amount,
           ['brooklyn-makers', 'oakland-gardens', 'manchester-arts', 'nairobi-water', 'lagos-coders',
            'pune-schools', 'recife-music', 'berlin-bikes', 'lyon-food-bank', 'toronto-tenants',
            'cebu-fishers', 'oaxaca-weavers', 'durban-clinics', 'kisumu-solar', 'bristol-repair-cafe',
            'austin-youth-sports'][1 + cityHash64(number, 2) % 16] AS community,
           ['education', 'health', 'water', 'agriculture', 'energy', 'arts', 'sports', 'technology',
            'environment', 'housing'][1 + cityHash64(number, 3) % 10] AS category,
           ['US', 'GB', 'KE', 'NG', 'IN', 'BR', 'DE', 'FR', 'CA', 'PH'][1 + person % 10] AS country
    FROM numbers({n:UInt64})
)
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def main() -> int:
    """Load the events, time the executive dashboard's widgets, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="tidemark-bench-api-"))
    client = connect(f"chdb://{workdir / 'chdb'}", "bench")
    apply_migrations(client)
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    started = time.perf_counter()
    client.command(
        LOAD_SQL,
        parameters={
            "end": end.replace(tzinfo=None),
            "span_ms": int(timedelta(days=30).total_seconds() * 1000),
            "n": args.events,
        },
        settings={"max_insert_threads": 2},
    )
    client.command("OPTIMIZE TABLE events FINAL")
    # The steady state background merges reach: one bulk insert leaves the activity rollups
    # (fed at insert time) with a row per insert block, actor and week (or span) until merged.
    client.command("OPTIMIZE TABLE activity_weeks FINAL")
    client.command("OPTIMIZE TABLE activity_spans FINAL")
    client.command("OPTIMIZE TABLE identities FINAL")  # the same for the identity links (one per device)
    load_s = time.perf_counter() - started
    loaded = client.query("SELECT count() FROM events").result_rows[0][0]
    print(f"loaded {loaded:,} events in {load_s:.1f} s ({loaded / load_s:,.0f} rows/s)")

    settings = Settings(
        metadata_url=f"sqlite:///{workdir / 'metadata.db'}",
        admin_api_key=ADMIN_KEY,
        clickhouse_database="bench",
        dashboard_warm_seconds=0,  # the benchmark runs the warmer's pass itself
    )
    raw = time_executive(client, settings, args.rounds, served=False)
    report(f"computed on every request (refresh=true), raw events only, {args.rounds} rounds", raw)
    started = time.perf_counter()
    written = write_snapshots(client, settings, end)
    print(f"\nwrote {written} metric snapshots (as the batch recompute would) in {time.perf_counter() - started:.1f} s")
    with_snapshots = time_executive(client, settings, args.rounds, served=False)
    report(f"computed on every request (refresh=true), with metric snapshots, {args.rounds} rounds", with_snapshots)
    served = time_executive(client, settings, args.rounds, served=True)
    report(f"served as users get it (after the dashboard warmer's pass), {args.rounds} rounds", served)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


@dataclass(frozen=True)
class Timing:
    """One widget data request: wall-clock and CPU time of this process, in milliseconds."""

    wall_ms: float
    cpu_ms: float


def time_executive(client: Any, settings: Settings, rounds: int, served: bool) -> dict[str, list[Timing]]:
    """Latency and CPU time of every executive widget's data request, per widget, over ``rounds`` rounds.

    ``served=False`` asks for a fresh computation every time (``refresh=true``: the query cost);
    ``served=True`` runs the dashboard warmer's pass first, then requests as a browser does.
    """
    app = FastAPI()
    install_error_handlers(app)
    for router in (keys.router, dashboards.router, metrics.router):
        app.include_router(router)
    open_query_api(app, settings, client)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    latencies: dict[str, list[Timing]] = {}
    with TestClient(app) as http:
        listed = http.get("/v1/dashboards", headers=headers).json()["items"]
        executive = next(d for d in listed if d["prebuilt"] == "executive")
        widgets = http.get(f"/v1/dashboards/{executive['id']}", headers=headers).json()["widgets"]
        if served:
            t0 = time.perf_counter()
            computed = app.state.dashboard_warmer.warm_once()
            print(f"\nwarmer pass: {computed} widgets of the pre-built dashboards in {time.perf_counter() - t0:.1f} s")
        params = {} if served else {"refresh": "true"}
        for round_no in range(rounds + 1):  # round 0 warms the engine's caches and is not counted
            for widget in widgets:
                url = f"/v1/dashboards/{executive['id']}/widgets/{widget['id']}/data"
                t0, cpu0 = time.perf_counter(), time.process_time()
                response = http.get(url, headers=headers, params=params)
                timing = Timing((time.perf_counter() - t0) * 1000, (time.process_time() - cpu0) * 1000)
                if response.status_code != 200:
                    raise SystemExit(f"{widget['title']}: {response.status_code} {response.text[:300]}")
                if round_no:
                    latencies.setdefault(widget["title"], []).append(timing)
    close_query_api(app)
    return latencies


def write_snapshots(client: Any, settings: Settings, end: datetime) -> int:
    """Snapshots of the executive dashboard's metrics at their granularities, computed from raw events.

    This is what the streaming metrics agent and the batch recompute keep in ``metric_snapshots``;
    here the query engine's raw path computes them, so the values are the same definitions.
    """
    engine = MetricsEngine(
        client, default_catalogue(), settings.report_timezone, settings.week_start, use_snapshots=False
    )
    wanted = {"day": ["dau", "ad_revenue", "processing_fees", "new_members"], "week": ["wau"], "month": ["mau"]}
    rows = []
    now = datetime.now(UTC)
    for granularity, names in wanted.items():
        query = MetricQuery(
            start=(end - timedelta(days=70)).date(),
            end=(end + timedelta(days=40)).date(),
            granularity=Granularity(granularity),
        )
        for name in names:
            result = engine.run(name, query)
            zone = ZoneInfo(result.timezone)
            for point in result.series[0].points:
                start = point.t.astimezone(UTC)
                stop = bucket_end(point.t.astimezone(UTC), Granularity(granularity), zone)
                rows.append([name, granularity, start, stop, {}, "", point.value, "bench", now])
    client.insert(
        "metric_snapshots",
        rows,
        column_names=list(SNAPSHOTS_SINK.columns),
    )
    return len(rows)


def report(title: str, latencies: dict[str, list[Timing]]) -> None:
    """Print p50/p95 latency and the median CPU time per widget and over every request."""
    print(f"\nexecutive dashboard (last 30 days), {title}")
    print(f"{'widget':40s} {'p50 ms':>8s} {'p95 ms':>8s} {'cpu ms':>8s}")
    for name, timings in latencies.items():
        walls = [t.wall_ms for t in timings]
        cpu = statistics.median(t.cpu_ms for t in timings)
        print(f"{name:40s} {statistics.median(walls):8.1f} {_percentile(walls, 0.95):8.1f} {cpu:8.1f}")
    every = [t.wall_ms for timings in latencies.values() for t in timings]
    p50, p95 = statistics.median(every), _percentile(every, 0.95)
    cpu = statistics.median(t.cpu_ms for timings in latencies.values() for t in timings)
    verdict = "met" if p95 < 200 else "NOT met"
    print(f"{'ALL widget requests':40s} {p50:8.1f} {p95:8.1f} {cpu:8.1f}   goal p95 < 200 ms: {verdict}")


if __name__ == "__main__":
    raise SystemExit(main())
