"""Experiments over HTTP: CRUD, status transitions, sticky assignment, and results equal to the analysis."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.analyses.experiments import ExperimentDefinition, assign_variant, compute_experiment
from api.analyses.query import TimeRange
from api.metadata.models import ExperimentAssignment
from api.routes import experiments
from tests.analysis_reference import Event, at, insert_events
from tests.integration.query_api_support import Keys, build_app, close, make_keys

pytestmark = pytest.mark.integration

START, END = at("2026-03-01 00:00:00"), at("2026-03-15 00:00:00")
EXPERIMENT: dict[str, Any] = {
    "key": "checkout_button",
    "name": "Checkout button colour",
    "variants": [{"name": "control", "weight": 0.5}, {"name": "green", "weight": 0.5}],
    "conversion": {"event_name": "fund_project"},
    "continuous": {"event_name": "fund_project", "property": "amount"},
    "minimum_detectable_effect": 0.05,
}


@pytest.fixture
def api(ch_db: Client, tmp_path: Path) -> Iterator[tuple[TestClient, Keys, FastAPI]]:
    app = build_app(ch_db, tmp_path)
    app.include_router(experiments.router)
    with TestClient(app) as client:
        yield client, make_keys(app), app
    close(app)


def _create(client: TestClient, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/experiments", json={**EXPERIMENT, **fields}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def _status(client: TestClient, eid: int, status: str, headers: dict[str, str]) -> Any:
    return client.patch(f"/v1/experiments/{eid}", json={"status": status}, headers=headers)


def test_crud_and_status_transitions(api: tuple[TestClient, Keys, FastAPI]) -> None:
    client, keys, _ = api
    created = _create(client, keys.ana)
    eid = created["id"]
    assert created["status"] == "draft" and created["control"] == "control" and created["started_at"] is None
    assert client.post("/v1/experiments", json=EXPERIMENT, headers=keys.bob).status_code == 409  # key taken
    assert client.post("/v1/experiments", json={**EXPERIMENT, "key": "v"}, headers=keys.vic).status_code == 403
    bad = client.post("/v1/experiments", json={**EXPERIMENT, "key": "x", "control": "blue"}, headers=keys.ana)
    assert bad.status_code == 400 and "control" in bad.json()["error"]["message"]
    # Team-wide reading; only the owner changes it.
    assert client.get(f"/v1/experiments/{eid}", headers=keys.vic).json()["name"] == EXPERIMENT["name"]
    assert client.patch(f"/v1/experiments/{eid}", json={"name": "x"}, headers=keys.bob).status_code == 403

    edited = client.patch(f"/v1/experiments/{eid}", json={"alpha": 0.01}, headers=keys.ana)
    assert edited.status_code == 200 and edited.json()["alpha"] == 0.01
    assert edited.json()["variants"][1]["name"] == "green"

    skipped = _status(client, eid, "completed", keys.ana)
    assert skipped.status_code == 409 and skipped.json()["error"]["code"] == "conflict"
    running = _status(client, eid, "running", keys.ana)
    assert running.status_code == 200 and running.json()["started_at"] is not None
    assert client.patch(f"/v1/experiments/{eid}", json={"alpha": 0.1}, headers=keys.ana).status_code == 409
    assert _status(client, eid, "draft", keys.ana).status_code == 409
    assert client.delete(f"/v1/experiments/{eid}", headers=keys.ana).status_code == 409
    listed = client.get("/v1/experiments", params={"status": "running"}, headers=keys.vic).json()
    assert [e["id"] for e in listed["items"]] == [eid]
    done = _status(client, eid, "completed", keys.ana)
    assert done.status_code == 200 and done.json()["ended_at"] is not None
    assert _status(client, eid, "running", keys.ana).status_code == 409
    assert _status(client, eid, "stopped", keys.ana).status_code == 409

    other = _create(client, keys.bob, key="abandoned")["id"]
    assert _status(client, other, "stopped", keys.bob).status_code == 200
    assert client.delete(f"/v1/experiments/{eid}", headers=keys.ana).status_code == 204
    assert client.get(f"/v1/experiments/{eid}", headers=keys.ana).status_code == 404


def test_assignment_is_deterministic_sticky_and_only_while_running(api: tuple[TestClient, Keys, FastAPI]) -> None:
    client, keys, app = api
    eid = _create(client, keys.ana)["id"]
    path = "/v1/experiments/checkout_button/assign"
    assert client.post(path, json={"user_id": "u1"}, headers=keys.vic).status_code == 409  # draft
    assert _status(client, eid, "running", keys.ana).status_code == 200

    weights = [("control", 0.5), ("green", 0.5)]
    seen = {}
    for i in range(20):
        response = client.post(path, json={"user_id": f"u{i}"}, headers=keys.vic)
        assert response.status_code == 200, response.text
        seen[f"u{i}"] = response.json()["variant"]
        assert seen[f"u{i}"] == assign_variant("checkout_button", f"u{i}", weights)
    assert set(seen.values()) == {"control", "green"}
    again = client.post(path, json={"user_id": "u3"}, headers=keys.bob).json()
    assert again["variant"] == seen["u3"]

    with app.state.metadata_sessions() as session:
        rows = session.scalars(select(ExperimentAssignment).where(ExperimentAssignment.experiment_id == eid)).all()
        assert {r.person_id: r.variant for r in rows} == seen  # one row per person, repeats not recorded twice
        # Sticky beyond the hash: the recorded variant is the answer.
        row = next(r for r in rows if r.person_id == "u3")
        row.variant = "green" if seen["u3"] == "control" else "control"
        session.commit()
        flipped = row.variant
    assert client.post(path, json={"user_id": "u3"}, headers=keys.vic).json()["variant"] == flipped

    assert client.post("/v1/experiments/nope/assign", json={"user_id": "u1"}, headers=keys.vic).status_code == 404
    assert client.post(path, json={"user_id": ""}, headers=keys.vic).status_code == 400
    assert client.post(path, json={"user_id": "u1"}).status_code == 401
    assert _status(client, eid, "stopped", keys.ana).status_code == 200
    assert client.post(path, json={"user_id": "u1"}, headers=keys.vic).status_code == 409


def exposures(key: str, users: int, start: datetime, seed: int = 3) -> list[Event]:
    """Exposed users converting more often on green; one person sees both variants."""
    rng = random.Random(seed)
    weights = [("control", 0.5), ("green", 0.5)]
    events = []
    for i in range(users):
        user = f"{key}-{i:04d}"
        variant = assign_variant(key, user, weights)
        t = start + timedelta(minutes=rng.randint(0, 600))
        events.append(Event("experiment_exposure", t, user_id=user, properties={"experiment": key, "variant": variant}))
        if rng.random() < (0.35 if variant == "green" else 0.2):
            amount = rng.randint(5, 60)
            events.append(Event("fund_project", t + timedelta(minutes=5), user_id=user, properties={"amount": amount}))
    both = start + timedelta(minutes=1)
    events += [
        Event("experiment_exposure", both, user_id="both", properties={"experiment": key, "variant": "control"}),
        Event("experiment_exposure", both, user_id="both", properties={"experiment": key, "variant": "green"}),
    ]
    return events


def test_results_match_the_analysis(ch_db: Client, api: tuple[TestClient, Keys, FastAPI]) -> None:
    client, keys, _ = api
    created = _create(client, keys.ana)
    eid = created["id"]
    assert client.get(f"/v1/experiments/{eid}/results", headers=keys.vic).status_code == 409  # never started
    insert_events(ch_db, exposures("checkout_button", 400, START + timedelta(days=1)))

    definition = ExperimentDefinition.model_validate({k: v for k, v in EXPERIMENT.items() if k != "name"})
    params = {"start": START.isoformat(), "end": END.isoformat()}
    got = client.get(f"/v1/experiments/{eid}/results", params=params, headers=keys.vic)
    assert got.status_code == 200, got.text
    want = compute_experiment(ch_db, definition, TimeRange(start=START, end=END)).model_dump(mode="json")
    assert got.json() == want
    assert want["multiple_variant_people"] == 1 and want["required_sample_size"] is not None
    assert sum(v["exposed"] for v in want["variants"]) == 400
    assert want["variants"][1]["conversion_vs_control"] is not None and want["sample_ratio"]["p_value"] > 0

    # Without a range: from the start of the experiment to its end.
    assert _status(client, eid, "running", keys.ana).status_code == 200
    key = "checkout_button"
    live_events = []
    for i in range(6):
        user, now = f"live-{i}", datetime.now(UTC)
        variant = assign_variant(key, user, [("control", 0.5), ("green", 0.5)])
        exposure = {"experiment": key, "variant": variant}
        live_events.append(Event("experiment_exposure", now, user_id=user, properties=exposure))
    insert_events(ch_db, live_events)
    ended = _status(client, eid, "completed", keys.ana).json()
    own = client.get(f"/v1/experiments/{eid}/results", headers=keys.ana)
    assert own.status_code == 200, own.text
    live = TimeRange(start=datetime.fromisoformat(ended["started_at"]), end=datetime.fromisoformat(ended["ended_at"]))
    # Nobody converted: Welch's t of two all-zero samples is undefined, reported as null.
    direct = compute_experiment(ch_db, definition, live)
    assert direct.variants[1].metric_vs_control is not None and direct.variants[1].metric_vs_control.t is None
    assert own.json() == json.loads(direct.model_dump_json())
    assert own.json()["variants"][1]["metric_vs_control"]["t"] is None
    assert sum(v["exposed"] for v in own.json()["variants"]) == 6
