"""Cohorts over HTTP: CRUD and permissions, computation on demand and on stale reads, members, comparison, LTV."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from api.analyses.cohorts import (
    LifetimeValueDefinition,
    cohort_members,
    compare_cohorts,
    latest_computation,
    lifetime_value,
)
from api.analyses.models import AnalysisSettings
from api.analyses.query import TimeRange
from api.analyses.retention import EventSpec, RetentionDefinition
from api.routes import cohorts
from tests.analysis_reference import Event, at, behavioural_reference, insert_events
from tests.integration.query_api_support import Keys, build_app, close, make_keys
from tidemark.settings import Settings

pytestmark = pytest.mark.integration

START, END = at("2026-03-01 00:00:00"), at("2026-05-01 00:00:00")
RANGE = TimeRange(start=START, end=END)
JSON_RANGE = {"start": START.isoformat(), "end": END.isoformat()}
CALENDAR = AnalysisSettings(timezone="America/New_York", week_start=1)

FUNDERS = {
    "name": "Funders",
    "definition": {
        "kind": "behavioural",
        "event_name": "fund_project",
        "min_count": 2,
        "start": START.isoformat(),
        "end": END.isoformat(),
        "ttl_seconds": 3600,
    },
}
SIGNUPS = {
    "name": "March signups",
    "is_public": True,
    "definition": {"kind": "acquisition", "start": START.isoformat(), "end": at("2026-04-01 00:00:00").isoformat()},
}


@pytest.fixture
def api(ch_db: Client, tmp_path: Path) -> Iterator[tuple[TestClient, Keys]]:
    app = build_app(ch_db, tmp_path)
    app.state.settings = Settings(report_timezone=CALENDAR.timezone, week_start=CALENDAR.week_start)
    app.include_router(cohorts.router)
    with TestClient(app) as client:
        yield client, make_keys(app)
    close(app)


def synthetic_events() -> list[Event]:
    """30 people signing up in March and April; person i funds i % 4 times (fee 1.5 each), weekly."""
    events = []
    for i in range(30):
        user = f"m{i:02d}"
        t = START + timedelta(days=2 * i, hours=i % 5)
        events.append(Event("signup", t, user_id=user))
        for k in range(i % 4):
            fee = {"amount": 20, "fee": 1.5}
            events.append(Event("fund_project", t + timedelta(days=7 * k + 1), user_id=user, properties=fee))
    return events


def _create(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/cohorts", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_crud_permissions_and_latest_computation(ch_db: Client, api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    events = synthetic_events()
    insert_events(ch_db, events)
    created = _create(client, keys.ana, FUNDERS)
    cid = created["id"]
    assert created["latest"] is None  # computed on first read or on demand

    read = client.get(f"/v1/cohorts/{cid}", headers=keys.ana)
    assert read.status_code == 200, read.text
    latest = read.json()["latest"]
    want = behavioural_reference(events, "fund_project", (), 2, START, END)
    assert latest["user_count"] == len(want) == 13
    stored = latest_computation(ch_db, str(cid))
    assert stored is not None and latest["computed_at"] == stored.computed_at.isoformat().replace("+00:00", "Z")
    assert client.get(f"/v1/cohorts/{cid}", headers=keys.ana).json()["latest"] == latest  # fresh: not recomputed

    members = client.get(f"/v1/cohorts/{cid}/members", params={"limit": 5, "offset": 2}, headers=keys.ana).json()
    assert members["total"] == 13 and members["items"] == sorted(want)[2:7]
    assert members["items"] == cohort_members(ch_db, str(cid), limit=5, offset=2)

    # Private to ana; viewers cannot create; a public cohort is seen (not changed) by others.
    assert client.get(f"/v1/cohorts/{cid}", headers=keys.bob).status_code == 404
    assert client.post("/v1/cohorts", json=FUNDERS, headers=keys.vic).status_code == 403
    public = _create(client, keys.ana, SIGNUPS)["id"]
    assert [c["id"] for c in client.get("/v1/cohorts", headers=keys.bob).json()["items"]] == [public]
    assert client.patch(f"/v1/cohorts/{public}", json={"name": "x"}, headers=keys.bob).status_code == 403
    assert client.post(f"/v1/cohorts/{public}/compute", headers=keys.vic).json()["latest"]["user_count"] == 16

    # A new definition is computed at once.
    changed = client.patch(
        f"/v1/cohorts/{cid}", json={"definition": {**FUNDERS["definition"], "min_count": 3}}, headers=keys.ana
    )
    three = behavioural_reference(events, "fund_project", (), 3, START, END)
    assert changed.status_code == 200 and changed.json()["latest"]["user_count"] == len(three) == 5
    bad = client.post("/v1/cohorts", json={"name": "x", "definition": {"kind": "acquisition"}}, headers=keys.ana)
    assert bad.status_code == 400 and "start and end" in bad.json()["error"]["message"]

    assert client.delete(f"/v1/cohorts/{cid}", headers=keys.ana).status_code == 204
    assert client.get(f"/v1/cohorts/{cid}", headers=keys.ana).status_code == 404
    assert latest_computation(ch_db, str(cid)) is None


def test_stale_cohorts_are_recomputed_on_read(ch_db: Client, api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    insert_events(ch_db, synthetic_events())
    cid = _create(client, keys.ana, FUNDERS)["id"]
    first = client.post(f"/v1/cohorts/{cid}/compute", headers=keys.ana).json()["latest"]
    assert first["user_count"] == 13
    # New funders arrive; the computation is still fresh, so reads keep the old membership ...
    late = at("2026-04-20 12:00:00")
    insert_events(ch_db, [Event("fund_project", late + timedelta(hours=h), user_id="late") for h in range(2)])
    assert client.get(f"/v1/cohorts/{cid}", headers=keys.ana).json()["latest"] == first
    # ... until it expires: a later computation that has already expired stands in for the passing of time.
    stored = latest_computation(ch_db, str(cid))
    assert stored is not None
    ms = timedelta(milliseconds=1)
    ch_db.insert(
        "cohorts_computed",
        [[str(cid), 13, stored.computed_at + ms, stored.computed_at + 2 * ms]],
        column_names=["cohort_id", "user_count", "computed_at", "expires_at"],
    )
    recomputed = client.get(f"/v1/cohorts/{cid}", headers=keys.ana).json()["latest"]
    assert recomputed["user_count"] == 14 and recomputed["computed_at"] > first["computed_at"]
    assert "late" in client.get(f"/v1/cohorts/{cid}/members", headers=keys.ana).json()["items"]


def test_compare_ltv_and_custom_sql(ch_db: Client, api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    insert_events(ch_db, synthetic_events())
    funders = _create(client, keys.ana, FUNDERS)["id"]
    signups = _create(client, keys.ana, SIGNUPS)["id"]
    retention = RetentionDefinition(
        start_event=EventSpec(event_name="signup"), return_event=EventSpec(event_name="fund_project"), periods=9
    )
    body = {"cohort_ids": [funders, signups], "retention": retention.model_dump(mode="json"), "time_range": JSON_RANGE}
    got = client.post("/v1/cohorts/compare", json=body, headers=keys.ana)
    assert got.status_code == 200, got.text
    want = compare_cohorts(ch_db, [str(funders), str(signups)], retention, RANGE, CALENDAR).model_dump(mode="json")
    assert got.json() == want and [c["size"] for c in want["cohorts"]] == [13, 16]
    assert client.post("/v1/cohorts/compare", json=body, headers=keys.bob).status_code == 404  # funders is private

    ltv_def = LifetimeValueDefinition(period="week", periods=6)
    ltv = client.post(
        f"/v1/cohorts/{signups}/ltv",
        json={"definition": ltv_def.model_dump(mode="json"), "time_range": JSON_RANGE},
        headers=keys.vic,
    )
    assert ltv.status_code == 200, ltv.text
    want_ltv = lifetime_value(ch_db, ltv_def, RANGE, cohort_id=str(signups), settings=CALENDAR).model_dump(mode="json")
    assert ltv.json() == want_ltv and want_ltv["cumulative_revenue_per_member"][-1] > 0

    custom = _create(
        client,
        keys.ana,
        {
            "name": "Custom",
            "definition": {
                "kind": "custom",
                "sql": "SELECT person_id FROM events_resolved WHERE event_name = 'signup' AND user_id LIKE 'm0%'",
            },
        },
    )
    computed = client.post(f"/v1/cohorts/{custom['id']}/compute", headers=keys.ana)
    assert computed.status_code == 200 and computed.json()["latest"]["user_count"] == 10
    writes = _create(client, keys.ana, {"name": "W", "definition": {"kind": "custom", "sql": "DROP TABLE events"}})
    refused = client.post(f"/v1/cohorts/{writes['id']}/compute", headers=keys.ana)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "cohort_failed"
