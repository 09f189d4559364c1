"""Models and codecs of anomalies (topic ``anomalies``) and alert deliveries (``alerts``, ``alerts.dlq``).

Same conventions as :mod:`schemas.models`: snake_case in Python, camelCase on the wire,
aware UTC datetimes in Python and timestamp-millis on the wire.

An :class:`Anomaly` is one *episode* of one series: it keeps its id from the moment it
fires until it resolves, so a later message with the same id replaces the earlier one
(the ClickHouse ``anomalies`` table is a ReplacingMergeTree on ``id``). The episode's
``status`` tells alert delivery what to do: ``open`` (fire or update), ``resolved``
(the series is back to normal: ``resolved_by == "detector"``, or someone resolved it).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from typing import Any
from uuid import UUID, uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.codec import SchemaCodec, load_schema
from schemas.models import now_millis
from schemas.streams import dimensions_key


def _millis(value: datetime) -> int:
    return int(value.timestamp()) * 1000 + value.microsecond // 1000


def _utc(value: int | datetime) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.fromtimestamp(value / 1000, tz=UTC)


class Severity(StrEnum):
    """How urgently on-call should look, in increasing order."""

    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"

    @property
    def rank(self) -> int:
        """0 for low ... 3 for critical, for comparisons."""
        return list(Severity).index(self)


class AnomalyStatus(StrEnum):
    """Lifecycle of an anomaly episode: open -> acknowledged -> resolved."""

    open = "open"
    acknowledged = "acknowledged"
    resolved = "resolved"


class Anomaly(BaseModel):
    """One anomaly episode of one series (the seed's Anomaly)."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    id: UUID = Field(default_factory=uuid4)
    metric_type: str = Field(alias="metricType")
    period: str
    dimensions: dict[str, str] = Field(default_factory=dict)
    detected_at: AwareDatetime = Field(alias="detectedAt")
    window_start: AwareDatetime = Field(alias="windowStart")
    severity: Severity
    expected: float
    actual: float
    deviation: float
    score: float
    detector: str
    description: str = ""
    status: AnomalyStatus = AnomalyStatus.open
    resolved_by: str = Field("", alias="resolvedBy")
    resolved_at: AwareDatetime | None = Field(None, alias="resolvedAt")
    updated_at: AwareDatetime = Field(default_factory=now_millis, alias="updatedAt")

    @property
    def dimensions_key(self) -> str:
        """Canonical text of the dimensions (``""`` for the total)."""
        return dimensions_key(self.dimensions)

    @property
    def series_key(self) -> str:
        """The series this episode belongs to: metric, period and dimensions."""
        return f"{self.metric_type}|{self.period}|{self.dimensions_key}"

    @property
    def dedup_key(self) -> str:
        """Stable key of the alert of this series and detector (the same across episodes).

        Built from metric, dimensions and detector (and period, which is part of the
        series), hashed so it stays short (PagerDuty allows 255 characters).
        """
        text = f"{self.series_key}|{self.detector}"
        return f"tidemark-{hashlib.sha256(text.encode()).hexdigest()[:32]}"

    def to_avro(self) -> dict[str, Any]:
        """The record in ``anomaly.avsc``'s shape."""
        return {
            "id": str(self.id),
            "metricType": self.metric_type,
            "period": self.period,
            "dimensions": dict(self.dimensions),
            "dimensionsKey": self.dimensions_key,
            "detectedAt": _millis(self.detected_at),
            "windowStart": _millis(self.window_start),
            "severity": self.severity.value,
            "expected": self.expected,
            "actual": self.actual,
            "deviation": self.deviation,
            "score": self.score,
            "detector": self.detector,
            "description": self.description,
            "status": self.status.value,
            "resolvedBy": self.resolved_by,
            "resolvedAt": _millis(self.resolved_at) if self.resolved_at else None,
            "updatedAt": _millis(self.updated_at),
        }

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Anomaly:
        """Build the model from a decoded Avro record."""
        resolved = record.get("resolvedAt")
        return cls(
            id=UUID(str(record["id"])),
            metric_type=record["metricType"],
            period=record["period"],
            dimensions=dict(record.get("dimensions") or {}),
            detected_at=_utc(record["detectedAt"]),
            window_start=_utc(record["windowStart"]),
            severity=Severity(record["severity"]),
            expected=record["expected"],
            actual=record["actual"],
            deviation=record["deviation"],
            score=record["score"],
            detector=record["detector"],
            description=record.get("description", ""),
            status=AnomalyStatus(record.get("status", "open")),
            resolved_by=record.get("resolvedBy", ""),
            resolved_at=_utc(resolved) if resolved is not None else None,
            updated_at=_utc(record["updatedAt"]),
        )


class AlertAction(StrEnum):
    """What a notification does to the on-call alert."""

    trigger = "trigger"
    update = "update"
    resolve = "resolve"


class DeliveryOutcome(StrEnum):
    """What became of one notification."""

    delivered = "delivered"
    failed = "failed"
    suppressed = "suppressed"
    deferred = "deferred"


class AlertDelivery(BaseModel):
    """One notification of one anomaly episode to one channel, and what became of it."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    id: UUID = Field(default_factory=uuid4)
    anomaly_id: UUID = Field(alias="anomalyId")
    channel: str
    action: AlertAction
    outcome: DeliveryOutcome
    attempts: int = 0
    http_status: int | None = Field(None, alias="httpStatus")
    reason: str = ""
    dedup_key: str = Field("", alias="dedupKey")
    at: AwareDatetime = Field(default_factory=now_millis)
    payload: str = ""

    def to_avro(self) -> dict[str, Any]:
        """The record in ``alert.avsc``'s shape."""
        return {
            "id": str(self.id),
            "anomalyId": str(self.anomaly_id),
            "channel": self.channel,
            "action": self.action.value,
            "outcome": self.outcome.value,
            "attempts": self.attempts,
            "httpStatus": self.http_status,
            "reason": self.reason,
            "dedupKey": self.dedup_key,
            "at": _millis(self.at),
            "payload": self.payload,
        }

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> AlertDelivery:
        """Build the model from a decoded Avro record."""
        return cls(
            id=UUID(str(record["id"])),
            anomaly_id=UUID(str(record["anomalyId"])),
            channel=record["channel"],
            action=AlertAction(record["action"]),
            outcome=DeliveryOutcome(record["outcome"]),
            attempts=record.get("attempts", 0),
            http_status=record.get("httpStatus"),
            reason=record.get("reason", ""),
            dedup_key=record.get("dedupKey", ""),
            at=_utc(record["at"]),
            payload=record.get("payload", ""),
        )


@cache
def anomaly_codec() -> SchemaCodec:
    """The codec of ``Anomaly`` (topic ``anomalies``), built once per process."""
    return SchemaCodec(load_schema("anomaly.avsc"))


@cache
def alert_delivery_codec() -> SchemaCodec:
    """The codec of ``AlertDelivery`` (topics ``alerts`` and ``alerts.dlq``), built once per process."""
    return SchemaCodec(load_schema("alert.avsc"))
