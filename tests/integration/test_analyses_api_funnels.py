"""Funnels over HTTP: CRUD and who may do what, and computed numbers equal to the analysis called directly."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from api.analyses.cohorts import CohortDefinition, compute_cohort
from api.analyses.funnels import FunnelDefinition, compute_funnel, funnel_people
from api.analyses.query import PropertyFilter, TimeRange
from api.routes import cohorts, funnels
from tests.analysis_reference import Event, at, insert_events
from tests.integration.query_api_support import Keys, build_app, close, make_keys

pytestmark = pytest.mark.integration

START, END = at("2026-03-01 00:00:00"), at("2026-03-08 00:00:00")
RANGE = TimeRange(start=START, end=END)
JSON_RANGE = {"start": START.isoformat(), "end": END.isoformat()}

FUNNEL: dict[str, Any] = {
    "name": "Signup to funding",
    "description": "from the landing page",
    "steps": [
        {"name": "Visit", "event_name": "page_view"},
        {"name": "Signup", "event_name": "signup"},
        {"name": "Fund", "event_name": "fund_project", "filters": [{"key": "amount", "operator": "gt", "value": 10}]},
    ],
    "window_seconds": 3600,
    "order": "ordered",
    "breakdown": {"key": "location.country", "source": "context", "limit": 1},
}


@pytest.fixture
def api(ch_db: Client, tmp_path: Path) -> Iterator[tuple[TestClient, Keys]]:
    app = build_app(ch_db, tmp_path)
    for router in (funnels.router, cohorts.router):
        app.include_router(router)
    with TestClient(app) as client:
        yield client, make_keys(app)
    close(app)


def synthetic_events() -> list[Event]:
    """Eight people through the funnel at different depths, one of them stitched from a device."""
    t0 = at("2026-03-02 09:00:00")
    m = timedelta(minutes=1)
    events: list[Event] = []
    for i in range(8):
        user = f"u{i}"
        country = {"location": {"country": "DE" if i % 3 else "FR"}}
        base = t0 + timedelta(hours=i)
        events.append(Event("page_view", base, user_id=user, context=country))
        if i < 6:
            events.append(Event("signup", base + 5 * m, user_id=user, context=country))
        if i < 4:
            events.append(
                Event("fund_project", base + (10 + i) * m, user_id=user, properties={"amount": 5 + 5 * i})
            )
    # A device browsing anonymously, then signing up and funding as u9: one person after stitching.
    base = t0 + timedelta(days=1)
    events += [
        Event("page_view", base, anonymous_id="dev9", context={"location": {"country": "DE"}}),
        Event("signup", base + m, anonymous_id="dev9", user_id="u9"),
        Event("fund_project", base + 2 * m, user_id="u9", properties={"amount": 50}),
        # Outside the window: reached step 2 only.
        Event("page_view", base, user_id="u10"),
        Event("signup", base + 2 * timedelta(hours=1), user_id="u10"),
    ]
    return events


def _create(client: TestClient, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/funnels", json={**FUNNEL, **fields}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_crud_and_permissions(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    created = _create(client, keys.ana)
    fid = created["id"]
    assert created["steps"][2]["filters"][0] == {"key": "amount", "operator": "gt", "value": 10.0, "source": "event"}
    assert created["window_seconds"] == 3600 and created["is_public"] is False

    assert client.get(f"/v1/funnels/{fid}", headers=keys.ana).status_code == 200
    # Private: others neither read nor list it; a viewer cannot create at all; no key is a 401.
    assert client.get(f"/v1/funnels/{fid}", headers=keys.bob).status_code == 404
    assert client.get("/v1/funnels", headers=keys.bob).json()["total"] == 0
    refused = client.post("/v1/funnels", json=FUNNEL, headers=keys.vic)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert client.get("/v1/funnels").status_code == 401

    public = client.patch(f"/v1/funnels/{fid}", json={"is_public": True, "order": "strict"}, headers=keys.ana)
    assert public.status_code == 200 and public.json()["order"] == "strict" and public.json()["is_public"]
    assert public.json()["steps"] == created["steps"]  # untouched parts stay
    listed = client.get("/v1/funnels", headers=keys.vic).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == fid
    assert client.patch(f"/v1/funnels/{fid}", json={"name": "mine"}, headers=keys.bob).status_code == 403
    assert client.delete(f"/v1/funnels/{fid}", headers=keys.vic).status_code == 403

    # Definitions are validated as a whole: 400 with the reason.
    bad = client.patch(f"/v1/funnels/{fid}", json={"steps": FUNNEL["steps"][:1]}, headers=keys.ana)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    bad = client.post("/v1/funnels", json={**FUNNEL, "order": "sideways"}, headers=keys.ana)
    assert bad.status_code == 400 and "order" in bad.json()["error"]["message"]

    assert client.delete(f"/v1/funnels/{fid}", headers=keys.ana).status_code == 204
    assert client.get(f"/v1/funnels/{fid}", headers=keys.ana).status_code == 404


def test_compute_people_and_adhoc_match_the_analysis(ch_db: Client, api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    insert_events(ch_db, synthetic_events())
    fid = _create(client, keys.ana, is_public=True)["id"]
    definition = FunnelDefinition.model_validate({k: v for k, v in FUNNEL.items()})
    filters = [{"key": "location.country", "source": "context", "operator": "neq", "value": "XX"}]
    direct_filters = (PropertyFilter(key="location.country", source="context", operator="neq", value="XX"),)

    want = compute_funnel(ch_db, definition, RANGE).model_dump(mode="json")
    assert [s["count"] for s in want["steps"]] == [10, 7, 3]  # the data exercise every step
    got = client.post(f"/v1/funnels/{fid}/compute", json={"time_range": JSON_RANGE}, headers=keys.vic)
    assert got.status_code == 200, got.text
    assert got.json() == want
    assert [b["value"] for b in got.json()["breakdown"]] == ["DE", "Other"]

    filtered = client.post(
        f"/v1/funnels/{fid}/compute", json={"time_range": JSON_RANGE, "filters": filters}, headers=keys.ana
    )
    assert filtered.json() == compute_funnel(ch_db, definition, RANGE, direct_filters).model_dump(mode="json")

    adhoc = client.post(
        "/v1/funnels/compute",
        json={"time_range": JSON_RANGE, "definition": {**FUNNEL, "order": "unordered", "breakdown": None}},
        headers=keys.bob,
    )
    unordered = definition.model_copy(update={"order": "unordered", "breakdown": None})
    assert adhoc.status_code == 200 and adhoc.json() == compute_funnel(ch_db, unordered, RANGE).model_dump(mode="json")

    params = {"start": START.isoformat(), "end": END.isoformat(), "step": 2, "status": "dropped", "limit": 2}
    people = client.get(f"/v1/funnels/{fid}/people", params=params, headers=keys.vic)
    assert people.status_code == 200, people.text
    assert people.json() == funnel_people(ch_db, definition, RANGE, 2, "dropped", limit=2).model_dump()
    assert people.json()["total"] == 4 and len(people.json()["people"]) == 2
    reached = client.get(
        f"/v1/funnels/{fid}/people", params={**params, "status": "reached", "step": 3, "limit": 10}, headers=keys.vic
    )
    direct = funnel_people(ch_db, definition, RANGE, 3, "reached").people
    assert reached.json()["people"] == direct == ["u2", "u3", "u9"]
    last = client.get(f"/v1/funnels/{fid}/people", params={**params, "step": 3}, headers=keys.vic)
    assert last.status_code == 400 and "last step" in last.json()["error"]["message"]

    empty = client.post(
        f"/v1/funnels/{fid}/compute",
        json={"time_range": {"start": END.isoformat(), "end": START.isoformat()}},
        headers=keys.ana,
    )
    assert empty.status_code == 400


def test_cohort_filter_is_the_latest_computation(ch_db: Client, api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    insert_events(ch_db, synthetic_events())
    fid = _create(client, keys.ana)["id"]
    cohort = {
        "name": "Signed up",
        "definition": {
            "kind": "behavioural", "event_name": "signup", "start": START.isoformat(), "end": END.isoformat()
        },
    }
    cid = client.post("/v1/cohorts", json=cohort, headers=keys.ana).json()["id"]
    # The cohort is computed when the analysis first needs it.
    got = client.post(f"/v1/funnels/{fid}/compute", json={"time_range": JSON_RANGE, "cohort_id": cid}, headers=keys.ana)
    assert got.status_code == 200, got.text
    definition = FunnelDefinition.model_validate(FUNNEL)
    want = compute_funnel(ch_db, definition, RANGE, cohort_id=str(cid)).model_dump(mode="json")
    assert got.json() == want and want["steps"][0]["count"] == 8  # only people who signed up
    # Bob cannot filter by ana's private cohort.
    hidden = client.post(
        "/v1/funnels/compute", json={"time_range": JSON_RANGE, "cohort_id": cid, "definition": FUNNEL}, headers=keys.bob
    )
    assert hidden.status_code == 404
    # Sanity of the direct call: the same membership as computing the cohort by hand.
    compute_cohort(ch_db, "by-hand", CohortDefinition.model_validate(cohort["definition"]))
    assert compute_funnel(ch_db, definition, RANGE, cohort_id="by-hand").model_dump(mode="json") == want
