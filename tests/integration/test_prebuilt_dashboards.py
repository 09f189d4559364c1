"""Every widget of the four pre-built dashboards, on the demo dataset, against plain Python.

The demo generator's events are loaded into ClickHouse; each widget's data comes over HTTP;
each figure is recomputed here from the same events with no SQL (identity stitching,
buckets, ratios, retention, float and margin included) and must agree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from api.dashboards.prebuilt import CARD_COST_FIXED, CARD_COST_RATE
from tests.integration.query_api_support import (
    Keys,
    build_app,
    close,
    demo_events,
    insert_events,
    make_keys,
    person,
    person_of,
)

pytestmark = pytest.mark.integration

DATA_START = datetime(2026, 2, 2, tzinfo=UTC)  # a Monday
DATA_DAYS = 35
WINDOW = (datetime(2026, 2, 9, tzinfo=UTC), datetime(2026, 3, 9, tzinfo=UTC))  # four whole weeks
PREVIOUS = (WINDOW[0] - (WINDOW[1] - WINDOW[0]), WINDOW[0])

Row = dict[str, Any]


def _prop(e: Row, key: str) -> Any:
    return e["properties"].get(key)


def _country(e: Row) -> str:
    return e["context"].get("location", {}).get("country", "") or ""


def _community(e: Row) -> str:
    value = _prop(e, "community")
    return value if isinstance(value, str) else ""


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _persons(rows: list[Row], name: str | None = None) -> set[str]:
    return {r["person"] for r in rows if name is None or r["name"] == name}


def _sum(rows: list[Row], name: str, key: str) -> float:
    return float(sum(_prop(r, key) or 0 for r in rows if r["name"] == name))


def _count(rows: list[Row], *names: str) -> float:
    return float(sum(1 for r in rows if r["name"] in names))


def _mean(rows: list[Row], name: str, key: str) -> float:
    values = [_prop(r, key) for r in rows if r["name"] == name and _prop(r, key) is not None]
    return sum(values) / len(values) if values else 0.0


#: The catalogue metrics the pre-built dashboards use, written again in plain Python.
REFERENCE: dict[str, Callable[[list[Row]], float]] = {
    "dau": lambda rows: float(len(_persons(rows))),
    "wau": lambda rows: float(len(_persons(rows))),
    "mau": lambda rows: float(len(_persons(rows))),
    "active_users": lambda rows: float(len(_persons(rows))),
    "projects_funded": lambda rows: _count(rows, "project_funded"),
    "projects_created": lambda rows: _count(rows, "project_created"),
    "loans_disbursed": lambda rows: _sum(rows, "loan_disbursed", "amount"),
    "new_members": lambda rows: _count(rows, "join_community"),
    "ad_revenue": lambda rows: _sum(rows, "watch_ad", "revenue"),
    "processing_fees": lambda rows: _sum(rows, "fund_project", "fee"),
    "gmv": lambda rows: _sum(rows, "fund_project", "amount"),
    "average_transaction_size": lambda rows: _mean(rows, "fund_project", "amount"),
    "community_activity": lambda rows: float(sum(1 for r in rows if _community(r))),
    "events_per_user": lambda rows: _ratio(len(rows), len(_persons(rows))),
    "success_rate": lambda rows: _ratio(
        _count(rows, "project_funded"), _count(rows, "project_funded", "project_expired")
    ),
    "average_funding_time": lambda rows: _mean(rows, "project_funded", "days_to_fund"),
    "backer_conversion": lambda rows: _ratio(
        len(_persons(rows, "fund_project")),
        len(
            {r["person"] for r in rows if r["name"] == "page_view" and "/projects/" in (_prop(r, "path") or "").lower()}
        ),
    ),
}


def _bucket(ts: datetime, granularity: str) -> date:
    day = ts.astimezone(UTC).date()
    if granularity == "week":
        return day - timedelta(days=day.isoweekday() - 1)
    if granularity == "month":
        return day.replace(day=1)
    return day


def _within(events: list[Row], window: tuple[datetime, datetime]) -> list[Row]:
    return [e for e in events if window[0] <= e["ts"] < window[1]]


def _by_bucket(rows: list[Row], granularity: str) -> dict[date, list[Row]]:
    out: dict[date, list[Row]] = defaultdict(list)
    for r in rows:
        out[_bucket(r["ts"], granularity)].append(r)
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def _check_points(series: dict[str, Any], rows: list[Row], metric: str, granularity: str) -> None:
    buckets = _by_bucket(rows, granularity)
    for point in series["points"]:
        t = datetime.fromisoformat(point["t"]).date()
        expected = REFERENCE[metric](buckets.get(t, []))
        assert _close(point["value"], expected), (metric, series["name"], t, point["value"], expected)


# --- the SQL widgets, independently ---------------------------------------------------------------


def _retention(events: list[Row]) -> dict[date, float]:
    weeks: dict[str, set[date]] = defaultdict(set)
    for e in events:
        if WINDOW[0] - timedelta(days=14) <= e["ts"] < WINDOW[1]:
            weeks[e["person"]].add(_bucket(e["ts"], "week"))
    out = {}
    week = WINDOW[0].date()
    while week < WINDOW[1].date():
        before = {p for p, ws in weeks.items() if week - timedelta(days=7) in ws}
        again = {p for p in before if week in weeks[p]}
        if before:
            out[week] = len(again) / len(before)
        week += timedelta(days=7)
    return out


def _float_balance(rows: list[Row]) -> dict[date, float]:
    net: dict[date, float] = defaultdict(float)
    for r in rows:
        name, day = r["name"], r["ts"].date()
        if name == "fund_project":
            net[day] += (_prop(r, "amount") or 0) - (_prop(r, "fee") or 0)
        elif name == "loan_repaid":
            net[day] += _prop(r, "amount") or 0
        elif name == "loan_disbursed":
            net[day] -= _prop(r, "amount") or 0
        elif name in ("project_funded", "project_expired"):
            net[day] -= _prop(r, "raised_amount") or 0
    running, out = 0.0, {}
    for day in sorted(net):
        running += net[day]
        out[day] = running
    return out


def _gross_margin(rows: list[Row]) -> dict[date, float]:
    revenue: dict[date, float] = defaultdict(float)
    cost: dict[date, float] = defaultdict(float)
    for r in rows:
        day = r["ts"].date()
        if r["name"] == "fund_project":
            revenue[day] += _prop(r, "fee") or 0
            cost[day] += (_prop(r, "amount") or 0) * CARD_COST_RATE + CARD_COST_FIXED
        elif r["name"] == "watch_ad":
            revenue[day] += _prop(r, "revenue") or 0
    return {d: (revenue[d] - cost[d]) / revenue[d] for d in revenue if revenue[d] > 0}


def _leaderboard(rows: list[Row]) -> list[list[Any]]:
    stats: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"members": set(), "backers": set(), "raised": 0.0, "funded": 0}
    )
    for r in rows:
        community = _community(r)
        if not community:
            continue
        s = stats[community]
        if r["name"] == "join_community":
            s["members"].add(r["person"])
        elif r["name"] == "fund_project":
            s["backers"].add(r["person"])
            s["raised"] += _prop(r, "amount") or 0
        elif r["name"] == "project_funded":
            s["funded"] += 1
    ranked = sorted(stats.items(), key=lambda kv: (-kv[1]["raised"], kv[0]))[:20]
    return [[c, len(s["members"]), len(s["backers"]), s["raised"], s["funded"]] for c, s in ranked]


# --- the test ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dataset() -> list[Row]:
    events = demo_events(DATA_START, DATA_DAYS, sessions_per_day=160, seed=3)
    links = person_of(events)
    for e in events:
        e["person"] = person(e, links)
    return events


@pytest.fixture
def api(ch_db: Client, tmp_path: Path, demo_dataset: list[Row]) -> Iterator[tuple[TestClient, Keys]]:
    insert_events(ch_db, demo_dataset)
    app = build_app(ch_db, tmp_path)
    with TestClient(app) as client:
        yield client, make_keys(app)
    close(app)


def _whole_buckets(granularity: str) -> tuple[datetime, datetime]:
    """WINDOW widened to whole buckets, as charts over time show it (only months differ: WINDOW is whole weeks)."""
    if granularity != "month":
        return WINDOW
    first = WINDOW[0].replace(day=1)
    last = (WINDOW[1] - timedelta(microseconds=1)).replace(day=1)
    following = datetime(last.year + last.month // 12, last.month % 12 + 1, 1, tzinfo=UTC)
    return first, following


def _check_widget(widget: dict[str, Any], data: dict[str, Any], events: list[Row]) -> None:
    source = widget["data_source"]
    title = widget["title"]
    rows = _within(events, WINDOW)
    if data["kind"] == "series" and source["kind"] in ("metric", "metrics"):
        window = _whole_buckets(data["granularity"])
        assert (datetime.fromisoformat(data["start"]), datetime.fromisoformat(data["end"])) == window, title
        rows = _within(events, window)
    if source["kind"] == "metrics":
        assert [s["name"] for s in data["series"]] == source["labels"]
        for series, metric in zip(data["series"], source["metrics"], strict=True):
            _check_points(series, rows, metric, data["granularity"])
            assert any(p["value"] > 0 for p in series["points"]), title
        return
    if source["kind"] == "metric":
        metric = source["metric"]
        if data["kind"] == "value":
            assert _close(data["value"], REFERENCE[metric](rows)), (title, data["value"])
            assert _close(data["previous_value"], REFERENCE[metric](_within(events, PREVIOUS)))
            assert data["value"] > 0, title
            return
        breakdown = source.get("breakdown")
        if breakdown is None:
            (series,) = data["series"]
            _check_points(series, rows, metric, data["granularity"])
            assert any(p["value"] > 0 for p in series["points"]), title
            return
        value_of = {"community": _community, "country": _country, "category": lambda e: _prop(e, "category") or ""}[
            breakdown
        ]
        groups: dict[str, list[Row]] = defaultdict(list)
        for r in rows:
            groups[value_of(r)].append(r)
        totals = {g: REFERENCE[metric](rs) for g, rs in groups.items()}
        ranked = sorted((g for g in totals if totals[g] != 0), key=lambda g: (-totals[g], g))
        top = ranked[: source["top_n"]]
        if data["kind"] == "table":
            got = [(r[0], r[1]) for r in data["table"]["rows"]]
            assert [g for g, _ in got][: len(top)] == [g or "(none)" for g in top], title
            for name, value in got:
                key = "" if name == "(none)" else name
                if name == "Other":
                    other = [r for g in ranked[len(top) :] for r in groups[g]]
                    assert _close(value, REFERENCE[metric](other))
                else:
                    assert _close(value, totals[key]), (title, name)
            assert got, title
            return
        for series in data["series"]:
            if series["name"] == "Other":
                subset = [r for g in groups if g not in top for r in groups[g]]
            else:
                subset = groups["" if series["name"] == "(none)" else series["name"]]
            _check_points(series, subset, metric, data["granularity"])
        assert [s["name"] for s in data["series"]][: len(top)] == top
        return
    # Read-only SQL widgets.
    if "retention_rate" in source["sql"]:
        expected = _retention(events)
        (series,) = data["series"]
        got = {datetime.fromisoformat(p["t"]).date(): p["value"] for p in series["points"]}
        assert got.keys() == expected.keys() and all(_close(got[d], expected[d]) for d in got), title
        assert len(got) == 4
    elif "float_balance" in source["sql"]:
        (series,) = data["series"]
        expected = _float_balance(rows)
        got = {datetime.fromisoformat(p["t"]).date(): p["value"] for p in series["points"]}
        assert got.keys() == expected.keys() and all(_close(got[d], expected[d]) for d in got), title
    elif "gross_margin" in source["sql"]:
        (series,) = data["series"]
        expected = _gross_margin(rows)
        got = {datetime.fromisoformat(p["t"]).date(): p["value"] for p in series["points"]}
        assert got.keys() == expected.keys() and all(_close(got[d], expected[d]) for d in got), title
    elif "LIMIT 20" in source["sql"]:
        expected_rows = _leaderboard(rows)
        got_rows = data["table"]["rows"]
        assert [r[0] for r in got_rows] == [r[0] for r in expected_rows]
        for g, e in zip(got_rows, expected_rows, strict=True):
            assert g[1:3] == e[1:3] and _close(g[3], e[3]) and g[4] == e[4]
    else:
        raise AssertionError(f"no reference for widget {title}")
    assert (data["series"] and data["series"][0]["points"]) or data["table"]["rows"], title


def test_every_prebuilt_widget_matches_plain_python(api: tuple[TestClient, Keys], demo_dataset: list[Row]) -> None:
    client, keys = api
    dashboards = [d for d in client.get("/v1/dashboards", headers=keys.vic).json()["items"] if d["prebuilt"]]
    assert sorted(d["prebuilt"] for d in dashboards) == ["community", "executive", "financial", "projects"]
    checked = 0
    for summary in dashboards:
        dashboard = client.get(f"/v1/dashboards/{summary['id']}", headers=keys.vic).json()
        assert dashboard["widgets"]
        for widget in dashboard["widgets"]:
            response = client.get(
                f"/v1/dashboards/{dashboard['id']}/widgets/{widget['id']}/data",
                params={"start": WINDOW[0].isoformat(), "end": WINDOW[1].isoformat()},
                headers=keys.vic,
            )
            assert response.status_code == 200, (widget["title"], response.text)
            _check_widget(widget, response.json(), demo_dataset)
            checked += 1
    assert checked == 24
