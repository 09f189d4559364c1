"""The anomalies sink: every anomaly message on ``anomalies`` becomes a row of ClickHouse ``anomalies``.

The table is ``ReplacingMergeTree(updated_at)`` ordered by ``id``: an episode keeps its id
from firing to resolution, and each new version (escalated, acknowledged, resolved) is a
new row with a later ``updated_at``; ``FINAL`` reads the latest. A replayed message is the
same row again. The detector and the API's status changes both write through this topic,
so this sink is the table's only writer.
"""

from __future__ import annotations

from clickhouse_connect.driver.client import Client
from confluent_kafka import Message

from schemas.anomaly import Anomaly, anomaly_codec
from schemas.codec import SchemaError
from sinks.batch import BatchSink, Row, SinkSpec, UndecodableMessage
from tidemark.settings import Settings
from tidemark.topics import ANOMALIES

ANOMALIES_SINK = SinkSpec(
    name="anomalies",
    topic=ANOMALIES.name,
    table="anomalies",
    columns=(
        "id", "metric_type", "period", "dimensions", "dimensions_key", "detected_at", "window_start", "severity",
        "expected", "actual", "deviation", "score", "detector", "description", "status", "resolved_by",
        "resolved_at", "updated_at",
    ),
)


def anomaly_row(value: bytes | None) -> Row:
    """The ``anomalies`` row of one ``anomalies`` message, or :class:`UndecodableMessage`."""
    if not value:
        raise UndecodableMessage("undecodable", "empty message")
    try:
        a = Anomaly.from_avro(anomaly_codec().decode(value))
    except (SchemaError, ValueError) as exc:
        raise UndecodableMessage("undecodable", str(exc)) from exc
    return (
        a.id, a.metric_type, a.period, dict(a.dimensions), a.dimensions_key, a.detected_at, a.window_start,
        a.severity.value, a.expected, a.actual, a.deviation, a.score, a.detector, a.description, a.status.value,
        a.resolved_by, a.resolved_at, a.updated_at,
    )


class AnomalySink(BatchSink):
    """``anomalies`` → ClickHouse ``anomalies``, committed after the insert."""

    def __init__(self, settings: Settings, client: Client) -> None:
        super().__init__(ANOMALIES_SINK, settings, client)

    def to_row(self, message: Message) -> Row:
        """The row of one anomaly version."""
        return anomaly_row(message.value())
