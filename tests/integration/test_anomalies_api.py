"""The anomalies API: list/filter/paginate from ClickHouse ``anomalies FINAL``; status changes published to Kafka."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.app import install_error_handlers
from api.dashboards import close_query_api, open_query_api
from api.publisher import EventPublisher
from api.routes import anomalies as anomaly_routes
from schemas.anomaly import Anomaly, AnomalyStatus, Severity, anomaly_codec
from sinks.anomalies import ANOMALIES_SINK, anomaly_row
from tests.integration.query_api_support import ADMIN_KEY, Keys, make_keys
from tidemark.settings import Settings
from tidemark.topics import ANOMALIES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T0 = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture
def api(ch_db: Client, kafka_settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, Keys, Settings]]:
    settings = kafka_settings.model_copy(
        update={"metadata_url": f"sqlite:///{tmp_path / 'metadata.db'}", "admin_api_key": ADMIN_KEY}
    )
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(anomaly_routes.router)
    open_query_api(app, settings, ch_db)
    app.state.settings = settings
    app.state.clickhouse = ch_db
    publisher = EventPublisher(settings)
    publisher.start()
    app.state.publisher = publisher
    try:
        with TestClient(app) as client:
            yield client, make_keys(app), settings
    finally:
        publisher.stop()
        close_query_api(app)


def anomaly(hours: int, **fields: Any) -> Anomaly:
    detected = T0 + timedelta(hours=hours)
    values: dict[str, Any] = {
        "metric_type": "gmv", "period": "hour", "dimensions": {"country": "DE"}, "detected_at": detected,
        "window_start": detected - timedelta(hours=1), "severity": Severity.high, "expected": 100.0,
        "actual": 10.0, "deviation": -90.0, "score": 8.0, "detector": "seasonal_likelihood",
        "description": "gmv dropped", "updated_at": detected,
    }
    values.update(fields)
    return Anomaly(**values)


def store(ch: Client, *versions: Anomaly) -> None:
    """Rows as the anomalies sink writes them (same row function)."""
    rows = [anomaly_row(anomaly_codec().encode(a.to_avro())) for a in versions]
    ch.insert("anomalies", rows, column_names=list(ANOMALIES_SINK.columns))


def published(settings: Settings, count: int, deadline_s: float = 20.0) -> list[Anomaly]:
    """The first ``count`` anomaly messages on the topic (polling until they are there or the deadline)."""
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap, "group.id": f"check-{uuid4().hex}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })
    consumer.subscribe([settings.topic(ANOMALIES.name)])
    found: list[Anomaly] = []
    deadline = time.monotonic() + deadline_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            found.append(Anomaly.from_avro(anomaly_codec().decode(message.value())))
    finally:
        consumer.close()
    return found


def test_list_filters_paginates_and_reads_latest_version(api: tuple[TestClient, Keys, Settings], ch_db: Client) -> None:
    client, keys, _ = api
    a = anomaly(1)
    b = anomaly(2, metric_type="signups", severity=Severity.low, dimensions={})
    c = anomaly(3, severity=Severity.critical)
    # b was resolved later: the list shows its latest version only.
    b_resolved = b.model_copy(update={"status": AnomalyStatus.resolved, "resolved_by": "detector",
                                      "resolved_at": T0 + timedelta(hours=5), "updated_at": T0 + timedelta(hours=5)})
    store(ch_db, a, b, c, b_resolved)

    def ids(response: Any) -> list[str]:
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    everything = client.get("/v1/anomalies", headers=keys.vic)  # viewers may read
    assert ids(everything) == [str(c.id), str(b.id), str(a.id)] and everything.json()["total"] == 3
    assert ids(client.get("/v1/anomalies?status=open", headers=keys.vic)) == [str(c.id), str(a.id)]
    assert ids(client.get("/v1/anomalies?status=resolved", headers=keys.vic)) == [str(b.id)]
    assert ids(client.get("/v1/anomalies?severity=critical&severity=low", headers=keys.vic)) == [str(c.id), str(b.id)]
    assert ids(client.get("/v1/anomalies?metric=gmv&order=oldest", headers=keys.vic)) == [str(a.id), str(c.id)]
    window = {"since": (T0 + timedelta(hours=2)).isoformat(), "until": (T0 + timedelta(hours=3)).isoformat()}
    assert ids(client.get("/v1/anomalies", params=window, headers=keys.vic)) == [str(b.id)]  # until is exclusive
    page = client.get("/v1/anomalies?limit=2&offset=2", headers=keys.vic)
    assert ids(page) == [str(a.id)] and page.json()["total"] == 3
    one = client.get(f"/v1/anomalies/{b.id}", headers=keys.vic).json()
    assert one["status"] == "resolved" and one["resolved_by"] == "detector" and one["dimensions"] == {}
    assert client.get(f"/v1/anomalies/{uuid4()}", headers=keys.vic).status_code == 404
    assert client.get("/v1/anomalies").status_code == 401
    assert client.get("/v1/anomalies?severity=huge", headers=keys.vic).status_code in (400, 422)
    assert client.get("/v1/anomalies", params={"since": window["until"], "until": window["since"]},
                      headers=keys.vic).status_code == 400


def test_lifecycle_is_published_as_new_versions(api: tuple[TestClient, Keys, Settings], ch_db: Client) -> None:
    client, keys, settings = api
    a = anomaly(1)
    store(ch_db, a)
    assert client.post(f"/v1/anomalies/{a.id}/acknowledge", headers=keys.vic).status_code == 403
    assert client.post(f"/v1/anomalies/{a.id}/resolve", headers=keys.ana).status_code == 409  # not acknowledged

    acked = client.post(f"/v1/anomalies/{a.id}/acknowledge", headers=keys.ana)
    assert acked.status_code == 202, acked.text
    assert acked.json()["status"] == "acknowledged"
    [message] = published(settings, 1)
    assert message.id == a.id and message.status is AnomalyStatus.acknowledged
    assert message.updated_at > a.updated_at and message.actual == a.actual and message.dimensions == a.dimensions
    # The sink writes that version (here: its row, as the sink builds it); then the next step is allowed.
    store(ch_db, message)
    assert client.post(f"/v1/anomalies/{a.id}/acknowledge", headers=keys.ana).status_code == 409

    before = datetime.now(UTC) - timedelta(seconds=1)
    resolved = client.post(f"/v1/anomalies/{a.id}/resolve", json={"resolved_by": "ops@example.org"},
                           headers=keys.admin)
    assert resolved.status_code == 202, resolved.text
    body = resolved.json()
    assert body["status"] == "resolved" and body["resolved_by"] == "ops@example.org"
    messages = published(settings, 2)
    assert [m.status for m in messages] == [AnomalyStatus.acknowledged, AnomalyStatus.resolved]
    final = messages[1]
    assert final.id == a.id and final.resolved_by == "ops@example.org"
    assert final.resolved_at is not None and final.resolved_at >= before
    assert final.updated_at > message.updated_at
    store(ch_db, final)
    assert client.get(f"/v1/anomalies/{a.id}", headers=keys.vic).json()["status"] == "resolved"
    assert client.post(f"/v1/anomalies/{a.id}/resolve", headers=keys.ana).status_code == 409
    assert client.post(f"/v1/anomalies/{uuid4()}/acknowledge", headers=keys.ana).status_code == 404
    assert UUID(body["id"]) == a.id


def test_resolve_defaults_to_the_caller(api: tuple[TestClient, Keys, Settings], ch_db: Client) -> None:
    client, keys, settings = api
    a = anomaly(1, status=AnomalyStatus.acknowledged)
    store(ch_db, a)
    response = client.post(f"/v1/anomalies/{a.id}/resolve", headers=keys.ana)
    assert response.status_code == 202, response.text
    assert response.json()["resolved_by"] == "ana@example.org"
    [message] = published(settings, 1)
    assert message.resolved_by == "ana@example.org" and message.status is AnomalyStatus.resolved
