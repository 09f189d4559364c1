"""Widget results are reused for the widget's refresh interval, recomputed on request, and kept warm."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from tests.integration.query_api_support import Keys, build_app, close, insert_events, make_keys

pytestmark = pytest.mark.integration

START = datetime(2026, 3, 2, tzinfo=UTC)
COUNT_SQL = (
    "SELECT count() AS events FROM events_resolved "
    "WHERE timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}"
)


@pytest.fixture
def api(ch_db: Client, tmp_path: Path) -> Iterator[tuple[TestClient, Keys, Client]]:
    app = build_app(ch_db, tmp_path)
    with TestClient(app) as client:
        yield client, make_keys(app), ch_db
    close(app)


def _events(n: int, offset: int = 0) -> list[dict[str, object]]:
    return [{"name": "login", "ts": START + timedelta(hours=offset + i), "user_id": f"u{i}"} for i in range(n)]


def _dashboard(client: TestClient, keys: Keys, refresh_seconds: int) -> tuple[int, int]:
    body = {
        "name": "Counts",
        "default_filters": {"start": START.isoformat(), "end": (START + timedelta(days=7)).isoformat()},
        "widgets": [
            {
                "title": "Events",
                "widget_type": "table",
                "data_source": {"kind": "sql", "sql": COUNT_SQL},
                "position": {"x": 0, "y": 0, "w": 4, "h": 3},
                "refresh_seconds": refresh_seconds,
            }
        ],
    }
    created = client.post("/v1/dashboards", json=body, headers=keys.ana)
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["widgets"][0]["id"]


def _count(response_json: dict[str, object]) -> int:
    table = response_json["table"]
    assert isinstance(table, dict)
    return int(table["rows"][0][0])


def test_results_are_reused_within_the_refresh_interval(api: tuple[TestClient, Keys, Client]) -> None:
    client, keys, ch = api
    dash, widget = _dashboard(client, keys, refresh_seconds=3600)
    url = f"/v1/dashboards/{dash}/widgets/{widget}/data"
    insert_events(ch, _events(5))

    first = client.get(url, headers=keys.ana).json()
    assert _count(first) == 5 and first["cached"] is False and first["computed_at"]

    insert_events(ch, _events(3, offset=10))
    again = client.get(url, headers=keys.ana).json()
    assert _count(again) == 5 and again["cached"] is True
    assert again["computed_at"] == first["computed_at"]

    fresh = client.get(url, params={"refresh": "true"}, headers=keys.ana).json()
    assert _count(fresh) == 8 and fresh["cached"] is False
    assert client.get(url, headers=keys.ana).json()["cached"] is True

    # Another window is another result.
    other = client.get(
        url, params={"start": START.isoformat(), "end": (START + timedelta(hours=6)).isoformat()}, headers=keys.ana
    ).json()
    assert _count(other) == 5 and other["cached"] is False


def test_an_edited_widget_never_serves_its_old_result(api: tuple[TestClient, Keys, Client]) -> None:
    client, keys, ch = api
    dash, widget = _dashboard(client, keys, refresh_seconds=3600)
    url = f"/v1/dashboards/{dash}/widgets/{widget}/data"
    insert_events(ch, _events(4))
    assert _count(client.get(url, headers=keys.ana).json()) == 4

    edited_sql = COUNT_SQL.replace("count()", "count() * 10")
    patched = client.patch(
        f"/v1/dashboards/{dash}/widgets/{widget}",
        json={"data_source": {"kind": "sql", "sql": edited_sql}},
        headers=keys.ana,
    )
    assert patched.status_code == 200, patched.text
    response = client.get(url, headers=keys.ana).json()
    assert _count(response) == 40 and response["cached"] is False


def test_the_warmer_computes_prebuilt_and_viewed_dashboards_ahead(api: tuple[TestClient, Keys, Client]) -> None:
    client, keys, ch = api
    app = client.app
    dash, widget = _dashboard(client, keys, refresh_seconds=3600)
    insert_events(ch, _events(6))
    warmer = app.state.dashboard_warmer  # type: ignore[attr-defined]
    prebuilt = warmer.dashboards()
    assert len(prebuilt) == 4 and dash not in prebuilt  # not viewed yet

    url = f"/v1/dashboards/{dash}/widgets/{widget}/data"
    assert client.get(url, headers=keys.ana).json()["cached"] is False  # a view of its default filters
    assert dash in warmer.dashboards()
    assert warmer.warm_once() > 0  # the pre-built dashboards' widgets (this one is still fresh)

    insert_events(ch, _events(2, offset=20))
    assert warmer.warm_once(max_age_share=0.0) > 0  # everything is recomputed
    warmed = client.get(url, headers=keys.ana).json()
    assert warmed["cached"] is True and _count(warmed) == 8

    executive = next(
        d
        for d in client.get("/v1/dashboards", headers=keys.admin).json()["items"]
        if d["name"].lower().startswith("executive")
    )
    first_widget = client.get(f"/v1/dashboards/{executive['id']}", headers=keys.admin).json()["widgets"][0]
    response = client.get(f"/v1/dashboards/{executive['id']}/widgets/{first_widget['id']}/data", headers=keys.admin)
    assert response.status_code == 200 and response.json()["cached"] is True
