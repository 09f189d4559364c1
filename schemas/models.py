"""Pydantic models of the messages on Tidemark's topics (the code's view of the Avro schemas)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_NAME_LENGTH = 200
MAX_ID_LENGTH = 256


class EventType(StrEnum):
    """The four kinds of tracked event."""

    page_view = "page_view"
    action = "action"
    conversion = "conversion"
    error = "error"


def _to_millis(value: datetime) -> int:
    return (int(value.timestamp()) * 1000) + value.microsecond // 1000


def now_millis() -> datetime:
    """The current UTC time, truncated to the millisecond the wire carries."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _from_millis(value: int | datetime) -> datetime:
    if isinstance(value, datetime):  # fastavro already applied the timestamp-millis logical type
        return value.astimezone(UTC)
    return datetime.fromtimestamp(value / 1000, tz=UTC)


class AnalyticsEvent(BaseModel):
    """One tracked event, as validated at the edge (collector or SDK).

    Field names are snake_case in Python and camelCase on the wire (aliases).
    Either ``user_id`` or ``anonymous_id`` is required.
    """

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    id: UUID = Field(default_factory=uuid4, description="Idempotency key (Segment messageId).")
    event_type: EventType = Field(EventType.action, alias="eventType")
    event_name: str = Field(alias="eventName", min_length=1, max_length=MAX_NAME_LENGTH)
    user_id: str | None = Field(None, alias="userId", max_length=MAX_ID_LENGTH)
    anonymous_id: str | None = Field(None, alias="anonymousId", max_length=MAX_ID_LENGTH)
    session_id: str | None = Field(None, alias="sessionId", max_length=MAX_ID_LENGTH)
    properties: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    timestamp: AwareDatetime = Field(description="Event time.")
    received_at: AwareDatetime | None = Field(None, alias="receivedAt")
    source: str = "unknown"

    @field_validator("event_name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("event name must not be blank")
        return value

    @field_validator("user_id", "anonymous_id", "session_id")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value if value else None

    @model_validator(mode="after")
    def _someone_did_it(self) -> AnalyticsEvent:
        if not self.user_id and not self.anonymous_id:
            raise ValueError("either userId or anonymousId is required")
        return self

    @property
    def distinct_id(self) -> str:
        """The identity an event is keyed by before stitching: the device's anonymous id, else the user id."""
        return self.anonymous_id or self.user_id or ""

    def to_avro(self) -> dict[str, Any]:
        """The record in ``analytics_event.avsc``'s shape."""
        return {
            "id": str(self.id),
            "eventType": self.event_type.value,
            "eventName": self.event_name,
            "userId": self.user_id,
            "anonymousId": self.anonymous_id,
            "sessionId": self.session_id,
            "properties": json.dumps(self.properties, separators=(",", ":"), ensure_ascii=False),
            "context": json.dumps(self.context, separators=(",", ":"), ensure_ascii=False),
            "timestamp": _to_millis(self.timestamp),
            "receivedAt": _to_millis(self.received_at) if self.received_at else None,
            "source": self.source,
        }

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> AnalyticsEvent:
        """Build the model from a decoded Avro record."""
        received = record.get("receivedAt")
        return cls(
            id=UUID(str(record["id"])),
            event_type=EventType(record["eventType"]),
            event_name=record["eventName"],
            user_id=record.get("userId"),
            anonymous_id=record.get("anonymousId"),
            session_id=record.get("sessionId"),
            properties=json.loads(record.get("properties") or "{}"),
            context=json.loads(record.get("context") or "{}"),
            timestamp=_from_millis(record["timestamp"]),
            received_at=_from_millis(received) if received is not None else None,
            source=record.get("source") or "unknown",
        )


class DeadLetter(BaseModel):
    """Input that was not accepted, with a machine-readable reason and the raw payload."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    id: UUID = Field(default_factory=uuid4)
    rejected_at: AwareDatetime = Field(default_factory=now_millis, alias="rejectedAt")
    source: str
    reason: str
    detail: str = ""
    payload: bytes

    def to_avro(self) -> dict[str, Any]:
        """The record in ``dead_letter.avsc``'s shape."""
        return {
            "id": str(self.id),
            "rejectedAt": _to_millis(self.rejected_at),
            "source": self.source,
            "reason": self.reason,
            "detail": self.detail,
            "payload": self.payload,
        }

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> DeadLetter:
        """Build the model from a decoded Avro record."""
        return cls(
            id=UUID(str(record["id"])),
            rejected_at=_from_millis(record["rejectedAt"]),
            source=record["source"],
            reason=record["reason"],
            detail=record.get("detail", ""),
            payload=record["payload"],
        )
