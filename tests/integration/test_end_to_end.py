"""End to end: events sent through the HTTP collector and through the SDK land in ClickHouse exactly once."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.fixtures.server import TidemarkServer, wait_until
from tidemark.settings import Settings
from tidemark.tracker import Tracker

pytestmark = pytest.mark.integration

N = 300


def _count(server: TidemarkServer) -> tuple[int, int]:
    count, distinct = server.sql("SELECT count(), uniqExact(event_id) FROM events FINAL")[0]
    return int(count), int(distinct)


def test_collector_and_sdk_events_land_exactly_once_with_properties_and_context(
    tidemark_server: TidemarkServer, kafka_settings: Settings
) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    http_ids = [str(uuid.uuid4()) for _ in range(N)]
    batch = [
        {
            "type": "track",
            "messageId": message_id,
            "userId": f"http-user-{i % 17}",
            "event": "fund_project",
            "properties": {"amount": i + 0.5, "currency": "USD", "project_id": f"p{i % 5}", "community": "Lagos",
                           "tags": ["a", "b"]},
            "context": {"locale": "fr-FR", "campaign": {"source": "newsletter"}},
            "timestamp": (start + timedelta(seconds=i)).isoformat(),
        }
        for i, message_id in enumerate(http_ids)
    ]
    for chunk in range(0, N, 100):
        response = httpx.post(
            f"{tidemark_server.url}/v1/batch",
            json={"batch": batch[chunk : chunk + 100]},
            auth=(kafka_settings.write_keys[0], ""),
            timeout=30,
        )
        assert response.status_code == 200, response.text

    sdk_ids = []
    with Tracker(kafka_settings.kafka_bootstrap, settings=kafka_settings) as tracker:
        for i in range(N):
            sdk_ids.append(
                str(
                    tracker.track(
                        "watch_ad",
                        anonymous_id=f"device-{i % 23}",
                        properties={"ad_id": f"ad{i}", "project_id": "p1", "revenue": 0.01 * i},
                        context={"locale": "en-GB"},
                        timestamp=start + timedelta(seconds=i),
                    )
                )
            )
        assert tracker.flush(30) == 0

    wait_until(lambda: _count(tidemark_server) == (2 * N, 2 * N), 120, f"{2 * N} events in ClickHouse")
    assert _count(tidemark_server) == (2 * N, 2 * N)

    ids = {row[0] for row in tidemark_server.sql("SELECT toString(event_id) FROM events FINAL")}
    assert ids == set(http_ids) | set(sdk_ids)

    properties, context, amount, community, utm = tidemark_server.sql(
        f"SELECT properties, context, amount, community, utm_source FROM events FINAL "
        f"WHERE event_id = toUUID('{http_ids[7]}')"
    )[0]
    assert json.loads(properties) == batch[7]["properties"]
    assert json.loads(context)["locale"] == "fr-FR"
    assert (amount, community, utm) == (7.5, "Lagos", "newsletter")

    revenue, locale = tidemark_server.sql(
        f"SELECT JSONExtractFloat(properties, 'revenue'), JSONExtractString(context, 'locale') FROM events FINAL "
        f"WHERE event_id = toUUID('{sdk_ids[10]}')"
    )[0]
    assert (revenue, locale) == (pytest.approx(0.1), "en-GB")
