"""Models and codecs of what the stream processors publish: sessions and metric snapshots.

Same conventions as :mod:`schemas.models`: snake_case in Python, camelCase on the wire,
times are aware UTC datetimes in Python and timestamp-millis on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import quote

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from schemas.codec import SchemaCodec, load_schema

PERIODS = ("minute", "hour", "day", "week", "month")


def _millis(value: datetime) -> int:
    return int(value.timestamp()) * 1000 + value.microsecond // 1000


def _utc(value: int | datetime) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def dimensions_key(dimensions: dict[str, str]) -> str:
    """Canonical text of a dimension map: ``""`` for the total, ``country=DE`` for one value.

    Values are percent-encoded so ``&`` and ``=`` inside them cannot collide.
    """
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in sorted(dimensions.items()))


def series_key(metric_type: str, period: str, dimensions: Mapping[str, str]) -> str:
    """The identity of a metric series: ``metric|period|dimensions key`` (every period start of it).

    >>> series_key("gmv", "day", {"country": "FR"})
    'gmv|day|country=FR'
    """
    return series_key_of(metric_type, period, dimensions_key(dict(dimensions)))


def series_key_of(metric_type: str, period: str, dims_key: str) -> str:
    """:func:`series_key` from an already canonical dimensions key (a snapshot record's ``dimensionsKey``)."""
    return f"{metric_type}|{period}|{dims_key}"


class UserSession(BaseModel):
    """One version of a device's session (the seed's UserSession; topic ``sessions``)."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    id: str = Field(alias="sessionId")
    user_id: str | None = Field(None, alias="userId")
    device_id: str = Field(alias="deviceId")
    started_at: AwareDatetime = Field(alias="startedAt")
    last_seen_at: AwareDatetime = Field(alias="lastSeenAt")
    duration_ms: int = Field(alias="durationMs")
    page_views: int = Field(alias="pageViews")
    events: int
    device: str = ""
    browser: str = ""
    os: str = ""
    country: str = ""
    referrer: str = ""
    utm_source: str = Field("", alias="utmSource")
    utm_medium: str = Field("", alias="utmMedium")
    utm_campaign: str = Field("", alias="utmCampaign")
    closed: bool = False
    version: int

    def to_avro(self) -> dict[str, Any]:
        """The record in ``session.avsc``'s shape."""
        record = self.model_dump(by_alias=True)
        record["startedAt"] = _millis(self.started_at)
        record["lastSeenAt"] = _millis(self.last_seen_at)
        return record

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> UserSession:
        """Build the model from a decoded Avro record."""
        data = dict(record)
        data["startedAt"] = _utc(record["startedAt"])
        data["lastSeenAt"] = _utc(record["lastSeenAt"])
        return cls.model_validate(data)


class MetricSnapshot(BaseModel):
    """The value of one metric for one period and dimension value (the seed's MetricSnapshot; topic ``metrics``)."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    metric_type: str = Field(alias="metricType")
    period: str
    period_start: AwareDatetime = Field(alias="periodStart")
    period_end: AwareDatetime = Field(alias="periodEnd")
    value: float
    dimensions: dict[str, str] = Field(default_factory=dict)
    source: str = "stream"
    computed_at: AwareDatetime = Field(alias="computedAt")
    final: bool = False  # the window's complete value: see metric_snapshot.avsc

    @field_validator("period_start", "period_end", "computed_at", mode="before")
    @classmethod
    def _millis_to_datetime(cls, value: Any) -> Any:
        return _utc(value) if isinstance(value, int) else value

    @field_validator("period")
    @classmethod
    def _known_period(cls, value: str) -> str:
        if value not in PERIODS:
            raise ValueError(f"period must be one of {PERIODS}")
        return value

    @property
    def dimensions_key(self) -> str:
        """The canonical text of the dimensions (part of the snapshot's identity)."""
        return dimensions_key(self.dimensions)

    @property
    def key(self) -> tuple[str, str, int, str]:
        """The identity a later snapshot replaces: (metric, period, period start ms, dimensions key)."""
        return (self.metric_type, self.period, _millis(self.period_start), self.dimensions_key)

    def to_avro(self) -> dict[str, Any]:
        """The record in ``metric_snapshot.avsc``'s shape."""
        return {
            "metricType": self.metric_type,
            "period": self.period,
            "periodStart": _millis(self.period_start),
            "periodEnd": _millis(self.period_end),
            "value": self.value,
            "dimensions": dict(self.dimensions),
            "dimensionsKey": self.dimensions_key,
            "source": self.source,
            "computedAt": _millis(self.computed_at),
            "final": self.final,
        }

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> MetricSnapshot:
        """Build the model from a decoded Avro record."""
        return cls(
            metric_type=record["metricType"],
            period=record["period"],
            period_start=_utc(record["periodStart"]),
            period_end=_utc(record["periodEnd"]),
            value=record["value"],
            dimensions=dict(record.get("dimensions") or {}),
            source=record.get("source") or "stream",
            computed_at=_utc(record["computedAt"]),
            final=bool(record.get("final", False)),
        )


@cache
def session_codec() -> SchemaCodec:
    """The codec of ``UserSession`` (topic ``sessions``), built once per process."""
    return SchemaCodec(load_schema("session.avsc"))


@cache
def metric_snapshot_codec() -> SchemaCodec:
    """The codec of ``MetricSnapshot`` (topic ``metrics``), built once per process."""
    return SchemaCodec(load_schema("metric_snapshot.avsc"), (load_schema("metric_snapshot.v1.avsc"),))


@cache
def metric_partial_batch_codec() -> SchemaCodec:
    """The codec of the internal ``metrics.partials`` topic, built once per process."""
    return SchemaCodec(load_schema("metric_partial_batch.avsc"))


@cache
def metric_partial_codec() -> SchemaCodec:
    """The codec of ``metrics.partials`` before partials were batched (read during an upgrade)."""
    return SchemaCodec(load_schema("metric_partial.avsc"))
