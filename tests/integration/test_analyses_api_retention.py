"""Retention, churn and lifecycle over HTTP: the numbers of the analyses called directly, in the settings' calendar."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from api.analyses.models import AnalysisSettings
from api.analyses.query import PropertyFilter, TimeRange
from api.analyses.retention import (
    ActivityDefinition,
    EventSpec,
    RetentionDefinition,
    compute_churn,
    compute_lifecycle,
    compute_retention,
)
from api.routes import cohorts, retention
from tests.analysis_reference import Event, at, insert_events
from tests.integration.query_api_support import Keys, build_app, close, make_keys
from tidemark.settings import Settings

pytestmark = pytest.mark.integration

# A range crossing the end of summer time in Berlin (2026-10-25), weeks starting on Sunday.
START, END = at("2026-10-05 00:00:00"), at("2026-11-09 00:00:00")
RANGE = TimeRange(start=START, end=END)
JSON_RANGE = {"start": START.isoformat(), "end": END.isoformat()}
CALENDAR = AnalysisSettings(timezone="Europe/Berlin", week_start=7)


@pytest.fixture
def api(ch_db: Client, tmp_path: Path) -> Iterator[tuple[TestClient, Keys]]:
    app = build_app(ch_db, tmp_path)
    app.state.settings = Settings(report_timezone=CALENDAR.timezone, week_start=CALENDAR.week_start)
    for router in (retention.router, cohorts.router):
        app.include_router(router)
    with TestClient(app) as client:
        yield client, make_keys(app)
    close(app)


def synthetic_events(seed: int = 5) -> list[Event]:
    """40 people signing up over five weeks and coming back now and then (some from mobile)."""
    rng = random.Random(seed)
    events = []
    for i in range(40):
        user = f"p{i:02d}"
        device = {"device": {"type": "mobile" if i % 4 == 0 else "desktop"}}
        t = START + timedelta(hours=rng.randint(-30, 24 * 33))
        events.append(Event("signup", t, user_id=user, context=device))
        for _ in range(rng.randint(0, 6)):
            t += timedelta(hours=rng.randint(5, 24 * 9))
            events.append(Event(rng.choice(["page_view", "fund_project"]), t, user_id=user, context=device))
    return events


def _post(client: TestClient, path: str, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_retention_matrix_in_the_settings_calendar(ch_db: Client, api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    insert_events(ch_db, synthetic_events())
    definition = RetentionDefinition(
        start_event=EventSpec(event_name="signup"),
        return_event=EventSpec(event_name="page_view"),
        period="week",
        periods=6,
        return_type="on_or_after",
    )
    filters = (PropertyFilter(key="device.type", source="context", value="desktop"),)
    body = {
        "definition": definition.model_dump(mode="json"),
        "time_range": JSON_RANGE,
        "filters": [f.model_dump(mode="json") for f in filters],
    }
    got = _post(client, "/v1/retention", keys.vic, body)
    want = compute_retention(ch_db, definition, RANGE, CALENDAR, filters).model_dump(mode="json")
    assert got == want
    assert sum(c["size"] for c in got["cohorts"]) > 10 and any(sum(c["counts"][1:]) for c in got["cohorts"])
    # The settings' calendar is the one used: Sunday weeks in Berlin differ from the default calendar.
    assert got != compute_retention(ch_db, definition, RANGE, AnalysisSettings(), filters).model_dump(mode="json")
    assert got["cohorts"][0]["period_start"] == "2026-10-04T00:00:00+02:00"

    fortnight = {**body, "definition": {**body["definition"], "period": "fortnight"}}
    bad = client.post("/v1/retention", json=fortnight, headers=keys.vic)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    assert client.post("/v1/retention", json=body).status_code == 401


def test_churn_and_lifecycle(ch_db: Client, api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    insert_events(ch_db, synthetic_events())
    activity = ActivityDefinition(period="day", periods=35)
    body = {"definition": activity.model_dump(mode="json"), "time_range": JSON_RANGE}

    churn = _post(client, "/v1/retention/churn", keys.ana, {**body, "people_limit": 3})
    assert churn == compute_churn(ch_db, activity, RANGE, CALENDAR, people_limit=3).model_dump(mode="json")
    assert sum(p["churned"] for p in churn["periods"]) > 0 and sum(p["reactivated"] for p in churn["periods"]) > 0

    lifecycle = _post(client, "/v1/retention/lifecycle", keys.ana, body)
    assert lifecycle == compute_lifecycle(ch_db, activity, RANGE, CALENDAR).model_dump(mode="json")
    assert len(lifecycle["periods"]) == 35

    # Defaults: any event, by week.
    default = _post(client, "/v1/retention/lifecycle", keys.ana, {"time_range": JSON_RANGE})
    assert default == compute_lifecycle(ch_db, ActivityDefinition(), RANGE, CALENDAR).model_dump(mode="json")


def test_cohort_filter(ch_db: Client, api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    insert_events(ch_db, synthetic_events())
    mobile = {"key": "device.type", "source": "context", "value": "mobile"}
    cohort = {
        "name": "Mobile",
        "definition": {"kind": "behavioural", "event_name": "signup", "within_days": 3650, "filters": [mobile]},
    }
    created = client.post("/v1/cohorts", json=cohort, headers=keys.ana)
    assert created.status_code == 201, created.text
    cid = created.json()["id"]
    definition = RetentionDefinition(start_event=EventSpec(event_name="signup"), period="week", periods=6)
    got = _post(
        client,
        "/v1/retention",
        keys.ana,
        {"definition": definition.model_dump(mode="json"), "time_range": JSON_RANGE, "cohort_id": cid},
    )
    want = compute_retention(ch_db, definition, RANGE, CALENDAR, cohort_id=str(cid)).model_dump(mode="json")
    assert got == want and 0 < sum(c["size"] for c in got["cohorts"]) <= 10  # mobile: every fourth of 40 people
    missing = client.post(
        "/v1/retention",
        json={"definition": definition.model_dump(mode="json"), "time_range": JSON_RANGE, "cohort_id": cid + 1},
        headers=keys.ana,
    )
    assert missing.status_code == 404
