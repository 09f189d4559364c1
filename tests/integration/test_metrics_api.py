"""Metrics over time: period arithmetic, timezone day boundaries, filters, breakdowns, snapshot-vs-raw equality.

Every figure is checked against a plain-Python computation over the same events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from api.metrics_query import (
    MAX_BUCKETS,
    Comparison,
    DimensionFilter,
    Granularity,
    MetricQuery,
    MetricsEngine,
    QueryError,
    RelativeRange,
    TimeWindow,
    bucket_starts,
    comparison_window,
    default_catalogue,
    resolve_window,
)
from sinks.snapshots import SNAPSHOTS_SINK
from tests.integration.query_api_support import (
    build_app,
    close,
    demo_events,
    insert_events,
    make_keys,
    person,
    person_of,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
UTC_ZONE = ZoneInfo("UTC")


def _window(start: date, end: date, zone: ZoneInfo = UTC_ZONE) -> TimeWindow:
    query = MetricQuery(start=start, end=end)
    return resolve_window(query, zone, datetime(2030, 1, 1, tzinfo=UTC))


def _local(w: TimeWindow) -> tuple[datetime, datetime]:
    return w.start.astimezone(w.zone), w.end.astimezone(w.zone)


# --- period arithmetic (pure) -------------------------------------------------------------------


def test_last_7_days_against_previous_7() -> None:
    now = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
    window = resolve_window(MetricQuery(range=RelativeRange.last_7_days), ZoneInfo("UTC"), now)
    assert (window.start, window.end) == (datetime(2026, 3, 4, tzinfo=UTC), datetime(2026, 3, 11, tzinfo=UTC))
    previous = comparison_window(window, Comparison.previous_period)
    assert (previous.start, previous.end) == (datetime(2026, 2, 25, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC))


def test_calendar_months_compare_with_whole_months_of_their_own_length() -> None:
    march = _window(date(2024, 3, 1), date(2024, 4, 1))
    prev = comparison_window(march, Comparison.previous_period)
    assert _local(prev) == (datetime(2024, 2, 1, tzinfo=march.zone), datetime(2024, 3, 1, tzinfo=march.zone))
    assert (prev.end - prev.start).days == 29  # February of a leap year
    year_ago = comparison_window(march, Comparison.previous_year)
    assert _local(year_ago)[0].date() == date(2023, 3, 1) and _local(year_ago)[1].date() == date(2023, 4, 1)
    q1 = _window(date(2025, 1, 1), date(2025, 4, 1))
    assert [d.date() for d in _local(comparison_window(q1, Comparison.previous_period))] == [
        date(2024, 10, 1),
        date(2025, 1, 1),
    ]


def test_leap_day_last_year_is_feb_28() -> None:
    leap_day = _window(date(2024, 2, 29), date(2024, 3, 1))
    year_ago = comparison_window(leap_day, Comparison.previous_year)
    assert [d.date() for d in _local(year_ago)] == [date(2023, 2, 28), date(2023, 3, 1)]
    leap_year = _window(date(2024, 1, 1), date(2025, 1, 1))
    prev = comparison_window(leap_year, Comparison.previous_period)
    assert [d.date() for d in _local(prev)] == [date(2023, 1, 1), date(2024, 1, 1)]


def test_days_across_dst_compare_by_local_days_not_hours() -> None:
    week = _window(date(2026, 3, 25), date(2026, 4, 1), BERLIN)
    assert week.end - week.start == timedelta(days=7, hours=-1)  # the spring-forward week is 167 hours
    prev = comparison_window(week, Comparison.previous_period)
    assert [d.date() for d in _local(prev)] == [date(2026, 3, 18), date(2026, 3, 25)]
    assert _local(prev)[0].hour == 0 and prev.end - prev.start == timedelta(days=7)


def test_partial_day_ranges_shift_by_their_duration() -> None:
    start = datetime(2026, 5, 5, 10, tzinfo=UTC)
    window = resolve_window(MetricQuery(start=start, end=start + timedelta(hours=6)), ZoneInfo("UTC"), start)
    prev = comparison_window(window, Comparison.previous_period)
    assert (prev.start, prev.end) == (start - timedelta(hours=6), start)


def test_buckets_follow_local_calendar() -> None:
    day = _window(date(2026, 3, 29), date(2026, 3, 30), BERLIN)
    assert len(bucket_starts(day, Granularity.hour, 1)) == 23
    fall = _window(date(2026, 10, 25), date(2026, 10, 26), BERLIN)
    assert len(bucket_starts(fall, Granularity.hour, 1)) == 25
    month = _window(date(2026, 3, 1), date(2026, 4, 1), BERLIN)
    days = bucket_starts(month, Granularity.day, 1)
    assert len(days) == 31 and all(d.astimezone(BERLIN).hour == 0 for d in days)
    weeks_sun = bucket_starts(month, Granularity.week, 7)
    assert all(d.astimezone(BERLIN).isoweekday() == 7 for d in weeks_sun)
    assert weeks_sun[0].astimezone(BERLIN).date() == date(2026, 3, 1)  # a Sunday
    weeks_mon = bucket_starts(month, Granularity.week, 1)
    assert weeks_mon[0].astimezone(BERLIN).date() == date(2026, 2, 23)


@pytest.mark.parametrize(
    ("granularity", "unit"), [(Granularity.hour, timedelta(hours=1)), (Granularity.day, timedelta(days=1))]
)
def test_no_more_than_max_buckets(granularity: Granularity, unit: timedelta) -> None:
    # Hours were not counted: 0001-01-01..9999-12-31 by the hour made datetimes until memory ran out.
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert len(bucket_starts(TimeWindow(start, start + MAX_BUCKETS * unit, UTC_ZONE), granularity, 1)) == MAX_BUCKETS
    for end in (start + (MAX_BUCKETS + 1) * unit, datetime(9999, 12, 31, tzinfo=UTC)):
        with pytest.raises(QueryError) as refused:
            bucket_starts(TimeWindow(start, end, UTC_ZONE), granularity, 1)
        assert refused.value.code == "too_many_buckets"


@pytest.mark.parametrize(
    ("start", "end", "zone"),
    [
        (date(1, 1, 1), date(2026, 1, 1), ZoneInfo("Pacific/Kiritimati")),  # year 0 in UTC: overflowed (a 500)
        (date(2026, 1, 1), date(9999, 12, 31), ZoneInfo("Etc/GMT+12")),  # year 10000 in UTC: overflowed
        (date(1899, 12, 31), date(1900, 1, 2), UTC_ZONE),  # exists, but ClickHouse cannot hold it
        (date(2026, 1, 1), date(2262, 1, 2), UTC_ZONE),
    ],
)
def test_ranges_beyond_clickhouse_timestamps_are_refused(start: date, end: date, zone: ZoneInfo) -> None:
    with pytest.raises(QueryError) as refused:
        resolve_window(MetricQuery(start=start, end=end), zone, datetime(2030, 1, 1, tzinfo=UTC))
    assert refused.value.code == "out_of_range"


@pytest.mark.parametrize("kind", list(Comparison))
def test_comparisons_beyond_clickhouse_timestamps_are_refused(kind: Comparison) -> None:
    # Before January of year 1 is year 0 (ValueError, a 500 before); January 1900 compares with 1899.
    for first in (date(1, 1, 1), date(1900, 1, 1)):
        window = TimeWindow(
            datetime(first.year, first.month, first.day, tzinfo=UTC),
            datetime(first.year, first.month + 1, first.day, tzinfo=UTC),
            UTC_ZONE,
        )
        with pytest.raises(QueryError) as refused:
            comparison_window(window, kind)
        assert refused.value.code == "out_of_range"
    inside = _window(date(1901, 3, 1), date(1901, 4, 1))
    assert comparison_window(inside, kind).start.year in (1900, 1901)


# --- against ClickHouse ------------------------------------------------------------------------


def _engine(ch: Client, tz: str = "UTC", week_start: int = 1, snapshots: bool = True) -> MetricsEngine:
    return MetricsEngine(ch, default_catalogue(), tz, week_start, use_snapshots=snapshots)


def _signup(ts: datetime, user: str) -> dict[str, Any]:
    return {"name": "signup", "ts": ts, "user_id": user, "properties": {"method": "email"}}


@pytest.mark.integration
def test_day_boundaries_follow_the_reporting_timezone(ch_db: Client) -> None:
    utc = UTC
    instants = [
        datetime(2026, 3, 8, 4, 59, 59, 999000, tzinfo=utc),  # 2026-03-07 23:59:59.999 EST
        datetime(2026, 3, 8, 5, 0, tzinfo=utc),  # 2026-03-08 00:00 EST
        datetime(2026, 3, 9, 3, 59, 59, 999000, tzinfo=utc),  # 2026-03-08 23:59:59.999 EDT (23-hour day)
        datetime(2026, 3, 9, 4, 0, tzinfo=utc),  # 2026-03-09 00:00 EDT
    ]
    insert_events(ch_db, [_signup(ts, f"u{i}") for i, ts in enumerate(instants)])
    query = MetricQuery(start=date(2026, 3, 7), end=date(2026, 3, 10), granularity=Granularity.day)
    ny = _engine(ch_db, "America/New_York").run("signups", query)
    assert [(p.t.date(), p.value) for p in ny.series[0].points] == [
        (date(2026, 3, 7), 1.0),
        (date(2026, 3, 8), 2.0),
        (date(2026, 3, 9), 1.0),
    ]
    assert ny.series[0].points[1].t.utcoffset() == timedelta(hours=-5)
    assert ny.series[0].points[2].t.utcoffset() == timedelta(hours=-4)
    in_utc = _engine(ch_db, "UTC").run("signups", query)
    assert [p.value for p in in_utc.series[0].points] == [0.0, 2.0, 2.0]
    hourly = _engine(ch_db, "America/New_York").run(
        "signups", MetricQuery(start=date(2026, 3, 8), end=date(2026, 3, 9), granularity=Granularity.hour)
    )
    assert len(hourly.series[0].points) == 23 and sum(p.value for p in hourly.series[0].points) == 2
    weekly = _engine(ch_db, "America/New_York", week_start=7).run(
        "signups", MetricQuery(start=date(2026, 3, 1), end=date(2026, 3, 15), granularity=Granularity.week)
    )
    # Weeks start on Sunday: Mar 1-7 holds one signup, Mar 8-14 the other three.
    assert [(p.t.date(), p.value) for p in weekly.series[0].points] == [
        (date(2026, 3, 1), 1.0),
        (date(2026, 3, 8), 3.0),
    ]


DEMO_START = datetime(2026, 3, 2, tzinfo=UTC)
DEMO_DAYS = 10


@pytest.fixture
def demo(ch_db: Client) -> Iterator[tuple[Client, list[dict[str, Any]]]]:
    events = demo_events(DEMO_START, DEMO_DAYS, sessions_per_day=200, seed=5)
    insert_events(ch_db, events)
    yield ch_db, events


def _reference(events: list[dict[str, Any]], zone: ZoneInfo, select: Any, fold: Any) -> dict[date, float]:
    links = person_of(events)
    groups: dict[date, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if select(e):
            groups[e["ts"].astimezone(zone).date()].append({**e, "person": person(e, links)})
    return {d: fold(rows) for d, rows in groups.items()}


def _approx(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


@pytest.mark.integration
def test_demo_metrics_match_plain_python(demo: tuple[Client, list[dict[str, Any]]]) -> None:
    ch, events = demo
    zone = ZoneInfo("Asia/Kolkata")  # +05:30: local days are not UTC days
    engine = _engine(ch, zone.key)
    query = MetricQuery(start=date(2026, 3, 3), end=date(2026, 3, 11), granularity=Granularity.day)
    days = [date(2026, 3, 3) + timedelta(days=i) for i in range(8)]
    checks = {
        "dau": (lambda e: True, lambda rows: len({r["person"] for r in rows})),
        "gmv": (lambda e: e["name"] == "fund_project", lambda rows: sum(r["properties"]["amount"] for r in rows)),
        "average_transaction_size": (
            lambda e: e["name"] == "fund_project",
            lambda rows: sum(r["properties"]["amount"] for r in rows) / len(rows),
        ),
        "processing_fees": (
            lambda e: e["name"] == "fund_project",
            lambda rows: sum(r["properties"]["fee"] for r in rows),
        ),
    }
    for metric, (select, fold) in checks.items():
        expected = _reference(events, zone, select, fold)
        got = engine.run(metric, query).series[0].points
        assert [p.t.date() for p in got] == days
        for p in got:
            assert _approx(p.value, expected.get(p.t.date(), 0.0)), (metric, p.t, p.value, expected.get(p.t.date()))
        assert any(p.value > 0 for p in got), metric

    # A filter and a ratio: backer conversion among US people, per day.
    us = [DimensionFilter(dimension="country", op="eq", value="US")]
    links = person_of(events)
    got_ratio = engine.run("backer_conversion", query.model_copy(update={"filters": us})).series[0]
    for p in got_ratio.points:
        day_events = [
            e
            for e in events
            if e["ts"].astimezone(zone).date() == p.t.date() and e["context"].get("location", {}).get("country") == "US"
        ]
        backers = {person(e, links) for e in day_events if e["name"] == "fund_project"}
        viewers = {
            person(e, links)
            for e in day_events
            if e["name"] == "page_view" and "/projects/" in e["properties"].get("path", "").lower()
        }
        assert _approx(p.value, len(backers) / len(viewers) if viewers else 0.0)
    assert any(p.value > 0 for p in got_ratio.points)
    # The range total of a distinct-user metric is not the sum of its days.
    total = engine.run("dau", query).series[0].total
    in_range = [e for e in events if date(2026, 3, 3) <= e["ts"].astimezone(zone).date() < date(2026, 3, 11)]
    assert total == len({person(e, links) for e in in_range})


@pytest.mark.integration
def test_breakdown_top_n_and_other(demo: tuple[Client, list[dict[str, Any]]]) -> None:
    ch, events = demo
    links = person_of(events)
    engine = _engine(ch)
    query = MetricQuery(
        start=date(2026, 3, 2),
        end=date(2026, 3, 12),
        breakdown="country",
        top_n=3,
        filters=[DimensionFilter(dimension="country", op="not_in", value=["FR"])],
    )
    result = engine.run("active_users", query)
    by_country: dict[str, set[str]] = defaultdict(set)
    for e in events:
        country = e["context"].get("location", {}).get("country", "")
        if country != "FR":
            by_country[country].add(person(e, links))
    ranked = sorted(by_country, key=lambda c: (-len(by_country[c]), c))
    assert [s.name or "" for s in result.series[:3]] == [c or "(none)" for c in ranked[:3]]
    assert [s.total for s in result.series[:3]] == [len(by_country[c]) for c in ranked[:3]]
    other_people = set().union(*(by_country[c] for c in ranked[3:]))
    assert result.series[3].name == "Other" and result.series[3].total == len(other_people)
    assert "FR" not in {s.name for s in result.series}


def _snapshot_rows(ch: Client, metric: str, values: dict[date, float], zone: ZoneInfo) -> None:
    rows = []
    for day, value in values.items():
        start = datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)
        end = (datetime(day.year, day.month, day.day, tzinfo=zone) + timedelta(days=1)).astimezone(UTC)
        rows.append([metric, "day", start, end, {}, "", value, "test", datetime.now(UTC)])
    ch.insert(
        "metric_snapshots",
        rows,
        column_names=list(SNAPSHOTS_SINK.columns),
    )


@pytest.mark.integration
def test_snapshots_and_raw_events_give_the_same_answer(demo: tuple[Client, list[dict[str, Any]]]) -> None:
    ch, events = demo
    zone = ZoneInfo("UTC")
    query = MetricQuery(start=date(2026, 3, 2), end=date(2026, 3, 12), granularity=Granularity.day, compare=None)
    raw_only = _engine(ch, snapshots=False)
    for metric, select, fold in (
        ("gmv", lambda e: e["name"] == "fund_project", lambda rows: sum(r["properties"]["amount"] for r in rows)),
        ("dau", lambda e: True, lambda rows: len({r["person"] for r in rows})),
    ):
        reference = _reference(events, zone, select, fold)
        raw = raw_only.run(metric, query)
        assert raw.source == "raw"
        # Snapshots (independently computed) for the first six days only: the rest comes from raw events.
        _snapshot_rows(ch, metric, {d: v for d, v in reference.items() if d < date(2026, 3, 8)}, zone)
        mixed = _engine(ch).run(metric, query)
        assert mixed.source == "mixed"
        assert [(p.t, p.value) for p in mixed.series[0].points] == [(p.t, p.value) for p in raw.series[0].points]
        assert _approx(mixed.series[0].total, raw.series[0].total)
        _snapshot_rows(ch, metric, {d: v for d, v in reference.items() if d >= date(2026, 3, 8)}, zone)
        full = _engine(ch).run(metric, query)
        assert full.source == "snapshots"
        assert all(_approx(a.value, b.value) for a, b in zip(full.series[0].points, raw.series[0].points, strict=True))
    # The snapshot road is really taken: a replaced snapshot value shows through.
    _snapshot_rows(ch, "gmv", {date(2026, 3, 5): 12345.0}, zone)
    values = {p.t.date(): p.value for p in _engine(ch).run("gmv", query).series[0].points}
    assert values[date(2026, 3, 5)] == 12345.0


@pytest.mark.integration
def test_metrics_endpoint(demo: tuple[Client, list[dict[str, Any]]], tmp_path: Path) -> None:
    ch, events = demo
    app = build_app(ch, tmp_path)
    try:
        with TestClient(app) as client:
            keys = make_keys(app)
            catalogue = client.get("/v1/metrics", headers=keys.vic).json()
            assert {"dau", "gmv", "success_rate"} <= {m["name"] for m in catalogue}
            params = {
                "start": "2026-03-09",
                "end": "2026-03-12",
                "granularity": "day",
                "compare": "previous_period",
                "filter": ["country:in:US|GB"],
            }
            got = client.get("/v1/metrics/transactions/query", params=params, headers=keys.vic)
            assert got.status_code == 200, got.text
            body = got.json()

            def count(first: date, last: date) -> int:
                return sum(
                    1
                    for e in events
                    if e["name"] == "fund_project"
                    and first <= e["ts"].date() < last
                    and e["context"].get("location", {}).get("country") in ("US", "GB")
                )

            assert body["series"][0]["total"] == count(date(2026, 3, 9), date(2026, 3, 12))
            comparison = body["comparison"]
            assert comparison["start"].startswith("2026-03-06") and comparison["end"].startswith("2026-03-09")
            previous = count(date(2026, 3, 6), date(2026, 3, 9))
            assert comparison["series"][0]["total"] == previous
            assert _approx(comparison["change"]["transactions"], (body["series"][0]["total"] - previous) / previous)
            posted = client.post(
                "/v1/metrics/transactions/query",
                headers=keys.vic,
                json={
                    "start": "2026-03-09",
                    "end": "2026-03-12",
                    "filters": [{"dimension": "country", "op": "in", "value": ["US", "GB"]}],
                },
            )
            assert posted.json()["series"] == [{**body["series"][0]}]
            unknown = client.get("/v1/metrics/nope/query", headers=keys.vic)
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_metric"
            bad = client.get("/v1/metrics/gmv/query", params={"filter": "planet:eq:mars"}, headers=keys.vic)
            assert bad.status_code == 400 and "unknown dimension" in bad.json()["error"]["message"]
            empty = client.post(
                "/v1/metrics/gmv/query", headers=keys.vic, json={"start": "2026-03-09", "end": "2026-03-09"}
            )
            assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_range"
            assert client.get("/v1/metrics/gmv/query").status_code == 401
    finally:
        close(app)
