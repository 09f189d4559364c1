"""The anomalies sink on the real broker and chDB: every version lands, FINAL reads the latest, bad input is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from schemas.anomaly import Anomaly, AnomalyStatus, Severity, anomaly_codec
from sinks.anomalies import AnomalySink, anomaly_row
from sinks.batch import UndecodableMessage
from tests.integration.sink_support import wait_for
from tidemark.settings import Settings
from tidemark.topics import ANOMALIES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_undecodable_anomaly_is_refused_with_a_reason() -> None:
    for value in (b"", b"\xc3\x01garbage"):
        with pytest.raises(UndecodableMessage):
            anomaly_row(value)


def test_versions_of_an_episode_are_replaced_by_the_latest(ch_db: Client, kafka_settings: Settings) -> None:
    t = datetime(2024, 5, 1, 12, tzinfo=UTC)
    opened = Anomaly(metric_type="gmv", period="hour", dimensions={"country": "FR"}, detected_at=t,
                     window_start=t - timedelta(hours=1), severity=Severity.medium, expected=100.0, actual=40.0,
                     deviation=-60.0, score=6.0, detector="seasonal_likelihood", updated_at=t)
    escalated = opened.model_copy(update={"severity": Severity.critical, "updated_at": t + timedelta(hours=1)})
    resolved = escalated.model_copy(update={"status": AnomalyStatus.resolved, "resolved_by": "detector",
                                            "resolved_at": t + timedelta(hours=3),
                                            "updated_at": t + timedelta(hours=3)})
    other = Anomaly(metric_type="signups", period="day", detected_at=t, window_start=t - timedelta(days=1),
                    severity=Severity.low, expected=10.0, actual=30.0, deviation=20.0, score=4.5, detector="x",
                    updated_at=t)
    producer = Producer({"bootstrap.servers": kafka_settings.kafka_bootstrap})
    codec = anomaly_codec()
    for a in (opened, resolved, escalated, other):  # out of order: updated_at decides, not arrival
        producer.produce(kafka_settings.topic(ANOMALIES.name), key=a.series_key.encode(),
                         value=codec.encode(a.to_avro()))
    assert producer.flush(30) == 0

    sink = AnomalySink(kafka_settings, ch_db)
    sink.start()
    try:
        wait_for(lambda: sink.committed_messages == 4 or None, 40, "the sink to commit all four versions")
    finally:
        sink.stop()
    # (one insert: ClickHouse may already collapse the versions on insert, so only FINAL is asserted)
    rows = ch_db.query(
        "SELECT id, status, severity, resolved_by, resolved_at, dimensions FROM anomalies FINAL ORDER BY metric_type"
    ).result_rows
    assert [(str(r[0]), r[1], r[2], r[3]) for r in rows] == [
        (str(opened.id), "resolved", "critical", "detector"), (str(other.id), "open", "low", ""),
    ]
    assert rows[0][4].replace(tzinfo=UTC) == t + timedelta(hours=3) and rows[0][5] == {"country": "FR"}
    assert rows[1][4] is None
