"""The Segment HTTP tracking API's messages, validated once and mapped to ``AnalyticsEvent``.

Spec: https://segment.com/docs/connections/sources/catalog/libraries/server/http-api/
(track, identify, page, screen, group, alias and batch). Any Segment-compatible library can
post here unchanged.

Every way a message can be wrong is a :class:`CollectorError` with a stable machine-readable
``code`` (the same code becomes a dead letter's ``reason`` inside a batch) and an HTTP status.

Event time follows Segment's clock-skew correction: when the sender says when it sent the
request (``sentAt``), the device's clock offset is removed,
``timestamp = receivedAt − (sentAt − originalTimestamp)``; without ``sentAt`` the sender's
timestamp is taken as is; without any timestamp the event happened when it was received.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, ValidationError

from api.collector.enrich import RequestFacts, enrich_context
from schemas.models import MAX_ID_LENGTH, MAX_NAME_LENGTH, AnalyticsEvent, DeadLetter
from schemas.taxonomy import event_type_for

MessageType = Literal["track", "identify", "page", "screen", "group", "alias"]
MESSAGE_TYPES: tuple[str, ...] = ("track", "identify", "page", "screen", "group", "alias")
SOURCE = "collector"
# Non-UUID messageIds are mapped into this namespace (uuid5), so a replayed messageId collapses
# into the event already stored.
MESSAGE_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "message-id.tidemark")
PAGE_FIELDS = ("path", "url", "title", "referrer", "search")


class CollectorError(Exception):
    """Input the collector refuses, with a stable ``code``, a human ``message`` and the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def as_json(self) -> dict[str, Any]:
        """The error body every 4xx answer carries: ``{"error": {"code", "message"}}``."""
        return {"error": {"code": self.code, "message": self.message}}


def _id_text(value: Any) -> Any:
    # Libraries send numeric user ids too; booleans are not ids.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _naive_is_utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


Identifier = Annotated[StrictStr, BeforeValidator(_id_text), Field(max_length=MAX_ID_LENGTH)]
Timestamp = datetime


class SegmentMessage(BaseModel):
    """One Segment message (the fields Tidemark reads; unknown fields are ignored, as Segment does)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: MessageType | None = None
    messageId: Identifier | None = None  # noqa: N815 - Segment's wire names
    userId: Identifier | None = None  # noqa: N815
    anonymousId: Identifier | None = None  # noqa: N815
    sessionId: Identifier | None = None  # noqa: N815
    event: StrictStr | None = Field(None, max_length=MAX_NAME_LENGTH)
    name: StrictStr | None = None
    category: StrictStr | None = None
    groupId: Identifier | None = None  # noqa: N815
    previousId: Identifier | None = None  # noqa: N815
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    timestamp: Timestamp | None = None
    originalTimestamp: Timestamp | None = None  # noqa: N815
    sentAt: Timestamp | None = None  # noqa: N815
    writeKey: StrictStr | None = None  # noqa: N815


@dataclass(frozen=True)
class TimeLimits:
    """How far from the receive time an event's (corrected) time may be."""

    max_future: timedelta
    max_past: timedelta


def parse_json_body(body: bytes, check_surrogates: bool = True) -> Any:
    """Decode a request body: strict UTF-8, then JSON without NaN/Infinity (ClickHouse cannot read those).

    ``check_surrogates=False`` leaves the lone-surrogate check to the caller (a batch checks per item).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CollectorError("invalid_utf8", f"body is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise CollectorError("invalid_json", f"body is not valid JSON: {exc}") from exc
    # JSON may spell a lone UTF-16 surrogate as an escape; such a string cannot be stored as UTF-8.
    if check_surrogates and has_surrogate_escapes(body):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CollectorError("invalid_utf8", "body contains a lone UTF-16 surrogate escape") from exc
    return value


def has_surrogate_escapes(body: bytes) -> bool:
    """Whether a JSON text spells a UTF-16 surrogate as an escape (rare; then strings need a closer look)."""
    return b"\\ud" in body or b"\\uD" in body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def validate_message(raw: Any, message_type: str | None = None) -> SegmentMessage:
    """Validate one message (a parsed JSON object); ``message_type`` is the endpoint's type if any.

    Raises :class:`CollectorError` with code ``invalid_type`` (not an object, or a field of the wrong
    type) or ``invalid_message_type`` (a batch item with no or an unknown ``type``).
    """
    if not isinstance(raw, dict):
        raise CollectorError("invalid_type", f"a message must be a JSON object, not {type(raw).__name__}")
    if message_type is None and raw.get("type") not in MESSAGE_TYPES:
        raise CollectorError(
            "invalid_message_type", f"type must be one of {', '.join(MESSAGE_TYPES)}, got {raw.get('type')!r}"
        )
    try:
        message = SegmentMessage.model_validate(raw)
    except ValidationError as exc:
        raise CollectorError("invalid_type", _describe(exc)) from exc
    if message_type is not None and message.type not in (None, message_type):
        raise CollectorError("invalid_message_type", f"a {message.type} message was posted to /v1/{message_type}")
    return message


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def event_id(message_id: str | None) -> uuid.UUID:
    """The event id of a ``messageId``: itself when it is a UUID, else a deterministic uuid5 of it.

    >>> event_id("ajs-next-1700000000000-abc") == event_id("ajs-next-1700000000000-abc")
    True
    """
    if not message_id:
        return uuid.uuid4()
    try:
        return uuid.UUID(message_id)
    except ValueError:
        return uuid.uuid5(MESSAGE_ID_NAMESPACE, message_id)


def event_time(message: SegmentMessage, received_at: datetime, batch_sent_at: datetime | None = None) -> datetime:
    """The event's time, corrected for the device's clock skew when ``sentAt`` is known."""
    device_time = _utc(message.originalTimestamp or message.timestamp)
    sent_at = _utc(message.sentAt or batch_sent_at)
    if device_time is None:
        return received_at
    if sent_at is None:
        return device_time
    try:
        return received_at - (sent_at - device_time)
    except OverflowError:  # a skew of millennia: the corrected time is before year 1 or after 9999
        raise CollectorError(
            "timestamp_out_of_range",
            f"sentAt {sent_at.isoformat()} and timestamp {device_time.isoformat()} put the event outside the calendar",
        ) from None


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00: in UTC it falls before year 1
        raise CollectorError(
            "timestamp_out_of_range", f"{value.isoformat()} is outside the calendar in UTC"
        ) from None


def _check_time(timestamp: datetime, received_at: datetime, limits: TimeLimits) -> None:
    if timestamp - received_at > limits.max_future:
        raise CollectorError(
            "timestamp_out_of_range",
            f"timestamp {timestamp.isoformat()} is more than {limits.max_future} in the future",
        )
    if received_at - timestamp > limits.max_past:
        raise CollectorError(
            "timestamp_out_of_range",
            f"timestamp {timestamp.isoformat()} is more than {limits.max_past.days} days in the past",
        )


def to_event(
    message: SegmentMessage,
    message_type: str,
    *,
    received_at: datetime,
    facts: RequestFacts,
    limits: TimeLimits,
    batch_context: dict[str, Any] | None = None,
    batch_sent_at: datetime | None = None,
) -> AnalyticsEvent:
    """Map a validated Segment message to the ``AnalyticsEvent`` Tidemark stores.

    track → ``event``; page → ``page_view`` (name and the page's path, url, title, referrer, search
    added to properties); screen → ``screen``; identify → ``identify`` (traits as properties);
    group → ``group`` ({groupId, traits}); alias → ``alias`` ({previousId}).
    Raises :class:`CollectorError` for a missing event name, user, group or previous id, or a
    timestamp outside the accepted range.
    """
    user_id = message.userId or None
    anonymous_id = message.anonymousId or None
    if not user_id and not anonymous_id:
        raise CollectorError("missing_identity", "either userId or anonymousId is required")
    context = {**batch_context, **(message.context or {})} if batch_context else dict(message.context or {})
    properties: dict[str, Any]
    declared_type: Any = None
    if message_type == "track":
        if not message.event or not message.event.strip():
            raise CollectorError("missing_event_name", "a track message needs a non-empty event name")
        name = message.event
        properties = dict(message.properties or {})
        declared_type = properties.get("$event_type")
    elif message_type == "page":
        name = "page_view"
        properties = _page_properties(message, context)
    elif message_type == "screen":
        name = "screen"
        properties = dict(message.properties or {})
        if message.name is not None:
            properties.setdefault("name", message.name)
    elif message_type == "identify":
        name = "identify"
        properties = dict(message.traits or context.get("traits") or {})
    elif message_type == "group":
        if not message.groupId:
            raise CollectorError("missing_group_id", "a group message needs a groupId")
        name = "group"
        properties = {"groupId": message.groupId, "traits": dict(message.traits or {})}
    elif message_type == "alias":
        if not message.previousId:
            raise CollectorError("missing_previous_id", "an alias message needs a previousId")
        if not user_id:
            raise CollectorError("missing_identity", "an alias message needs the new userId")
        name = "alias"
        properties = {"previousId": message.previousId}
    else:  # validate_message lets no other type through
        raise CollectorError("invalid_message_type", f"unknown message type {message_type!r}")

    timestamp = event_time(message, received_at, batch_sent_at)
    _check_time(timestamp, received_at, limits)
    session_id = message.sessionId or _text(context.get("sessionId"))
    event_type = event_type_for(name, declared_type if isinstance(declared_type, str) else None)
    if message_type == "page" and not isinstance(context.get("page"), dict):
        # Server-side libraries describe the page in properties only; enrichment reads context.page.
        context["page"] = {f: properties[f] for f in PAGE_FIELDS if isinstance(properties.get(f), str)}
    # Validating here costs less than ``model_construct`` (measured: pydantic-core's validator beats
    # the Python-level constructor) and keeps AnalyticsEvent's own invariants checked.
    return AnalyticsEvent(
        id=event_id(message.messageId),
        event_type=event_type,
        event_name=name,
        user_id=user_id,
        anonymous_id=anonymous_id,
        session_id=session_id,
        properties=properties,
        context=enrich_context(context, facts),
        timestamp=timestamp,
        received_at=received_at,
        source=SOURCE,
    )


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value[:MAX_ID_LENGTH]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _page_properties(message: SegmentMessage, context: dict[str, Any]) -> dict[str, Any]:
    properties = dict(message.properties or {})
    page = context.get("page") if isinstance(context.get("page"), dict) else {}
    if message.name is not None:
        properties.setdefault("name", message.name)
    if message.category is not None:
        properties.setdefault("category", message.category)
    for field in PAGE_FIELDS:
        if field not in properties and page.get(field) is not None:
            properties[field] = page[field]
    return properties


@dataclass
class Intake:
    """What one collector request produced: events to publish and dead letters (batch items refused)."""

    events: list[AnalyticsEvent]
    dead: list[DeadLetter]
    errors: list[dict[str, Any]]


MAX_REPORTED_ERRORS = 100


def check_write_key(header_key: str | None, body_key: str | None, accepted: list[str]) -> str | None:
    """The write key of a request (Basic-auth user name, else ``writeKey`` in the body), if accepted.

    An empty ``accepted`` list disables the check. Raises ``unknown_write_key`` (401) otherwise.
    """
    key = header_key or body_key
    if not accepted:
        return key
    if not key:
        raise CollectorError("unknown_write_key", "a write key is required (Basic auth user name or writeKey)", 401)
    if key not in accepted:
        raise CollectorError("unknown_write_key", "unknown write key", 401)
    return key


def read_message(
    body: bytes,
    message_type: str,
    *,
    header_key: str | None,
    accepted_keys: list[str],
    received_at: datetime,
    facts: RequestFacts,
    limits: TimeLimits,
    max_event_bytes: int,
) -> AnalyticsEvent:
    """One ``/v1/<type>`` request body → the event to publish, or a :class:`CollectorError`."""
    if len(body) > max_event_bytes:
        raise CollectorError("event_too_large", f"event is {len(body)} bytes; the limit is {max_event_bytes}", 413)
    if header_key:
        check_write_key(header_key, None, accepted_keys)
    raw = parse_json_body(body)
    if isinstance(raw, dict) and not header_key:
        body_key = raw.get("writeKey")
        check_write_key(None, body_key if isinstance(body_key, str) else None, accepted_keys)
    message = validate_message(raw, message_type)
    return to_event(message, message_type, received_at=received_at, facts=facts, limits=limits)


def read_batch(
    body: bytes,
    *,
    header_key: str | None,
    accepted_keys: list[str],
    received_at: datetime,
    facts: RequestFacts,
    limits: TimeLimits,
    max_event_bytes: int,
    max_batch_bytes: int,
) -> Intake:
    """One ``/v1/batch`` request body → events and dead letters.

    The request as a whole is refused (a :class:`CollectorError`) when it is too large, not UTF-8 or
    JSON, has no ``batch`` list, an empty one, or an unknown write key. Inside an accepted batch each bad
    item becomes a dead letter (reason = its error code, payload = the item's JSON) and the rest go on.
    Batch-level ``context`` and ``sentAt`` apply to every item (an item's own values win).
    """
    if len(body) > max_batch_bytes:
        raise CollectorError("batch_too_large", f"batch is {len(body)} bytes; the limit is {max_batch_bytes}", 413)
    if header_key:
        check_write_key(header_key, None, accepted_keys)
    raw = parse_json_body(body, check_surrogates=False)
    if not isinstance(raw, dict):
        raise CollectorError("invalid_type", "a batch must be a JSON object with a 'batch' list")
    if not header_key:
        body_key = raw.get("writeKey")
        check_write_key(None, body_key if isinstance(body_key, str) else None, accepted_keys)
    items = raw.get("batch")
    if not isinstance(items, list):
        raise CollectorError("invalid_type", "'batch' must be a list of messages")
    if not items:
        raise CollectorError("empty_batch", "'batch' is empty")
    batch_context = raw.get("context") if isinstance(raw.get("context"), dict) else None
    try:
        batch_sent_at = _utc(_BatchEnvelope.model_validate({"sentAt": raw.get("sentAt")}).sentAt)
    except ValidationError as exc:
        raise CollectorError("invalid_type", _describe(exc)) from exc
    # No item can be over the per-event limit when the whole body is not, and no item can hold a lone
    # surrogate when the body has no such escape, so most batches skip re-encoding their items.
    inspect_items = len(body) > max_event_bytes or has_surrogate_escapes(body)
    intake = Intake(events=[], dead=[], errors=[])
    for index, item in enumerate(items):
        try:
            if inspect_items:
                size = _encoded_size(item)
                if size > max_event_bytes:
                    raise CollectorError("event_too_large", f"item is {size} bytes; the limit is {max_event_bytes}")
            message = validate_message(item, None)
            assert message.type is not None  # validate_message guarantees a known type in a batch
            event = to_event(
                message,
                message.type,
                received_at=received_at,
                facts=facts,
                limits=limits,
                batch_context=batch_context,
                batch_sent_at=batch_sent_at,
            )
        except CollectorError as exc:
            intake.dead.append(
                DeadLetter(
                    source=SOURCE,
                    reason=exc.code,
                    detail=f"batch item {index}: {exc.message}",
                    payload=json.dumps(item, separators=(",", ":")).encode("utf-8"),
                )
            )
            if len(intake.errors) < MAX_REPORTED_ERRORS:
                intake.errors.append({"index": index, "code": exc.code, "message": exc.message})
            continue
        intake.events.append(event)
    return intake


def _encoded_size(item: Any) -> int:
    try:
        return len(json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise CollectorError("invalid_utf8", "item contains a lone UTF-16 surrogate escape") from exc


class _BatchEnvelope(BaseModel):
    sentAt: Timestamp | None = None  # noqa: N815
