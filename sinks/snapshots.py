"""The snapshots sink: every ``MetricSnapshot`` on ``metrics`` becomes a row of ``metric_snapshots``.

The table is ``ReplacingMergeTree(computed_at)`` ordered by (metric_type, period,
period_start, dimensions_key): a newer snapshot of the same window replaces the older
one (``FINAL``), never adds to it. Stream and batch recompute write the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client
from confluent_kafka import Message

from schemas.codec import SchemaError
from schemas.streams import metric_snapshot_codec
from sinks.batch import BatchSink, Row, SinkSpec, UndecodableMessage
from tidemark.settings import Settings
from tidemark.topics import METRICS

SNAPSHOTS_SINK = SinkSpec(
    name="snapshots",
    topic=METRICS.name,
    table="metric_snapshots",
    columns=(
        "metric_type", "period", "period_start", "period_end", "dimensions", "dimensions_key", "value", "source",
        "computed_at",
    ),
)


def _utc(value: datetime | int) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def snapshot_row(value: bytes | None) -> Row:
    """The ``metric_snapshots`` row of one ``metrics`` message, or :class:`UndecodableMessage`."""
    if not value:
        raise UndecodableMessage("undecodable", "empty message")
    try:
        r = metric_snapshot_codec().decode(value)
    except SchemaError as exc:
        raise UndecodableMessage("undecodable", str(exc)) from exc
    return (
        r["metricType"], r["period"], _utc(r["periodStart"]), _utc(r["periodEnd"]), dict(r["dimensions"]),
        r["dimensionsKey"], float(r["value"]), r["source"], _utc(r["computedAt"]),
    )


class SnapshotSink(BatchSink):
    """``metrics`` → ClickHouse ``metric_snapshots``, committed after the insert."""

    def __init__(self, settings: Settings, client: Client) -> None:
        super().__init__(SNAPSHOTS_SINK, settings, client)

    def to_row(self, message: Message) -> Row:
        """The row of one snapshot."""
        return snapshot_row(message.value())
