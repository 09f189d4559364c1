"""The Segment-compatible collector: ``POST /v1/track | identify | page | screen | group | alias | batch``.

Handlers are thin: read the body (bounded), let ``api.collector.segment`` validate and map it,
publish, answer like Segment (``{"success": true}``). Every refusal is a 4xx with
``{"error": {"code", "message"}}``; inside a batch, refused items become dead letters instead.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.auth import ErrorBody
from api.collector.enrich import RequestFacts
from api.collector.segment import (
    MESSAGE_TYPES,
    CollectorError,
    Intake,
    SegmentMessage,
    TimeLimits,
    read_batch,
    read_message,
)
from api.deps import PublisherDep, SettingsDep
from api.metrics import EVENTS_ACCEPTED, EVENTS_RECEIVED, EVENTS_REJECTED
from api.publisher import EventPublisher, PublishError
from schemas.models import now_millis
from tidemark.settings import Settings

router = APIRouter(prefix="/v1", tags=["collector"])


class Accepted(BaseModel):
    """Segment's answer to an accepted message."""

    success: bool = True


class BatchAccepted(BaseModel):
    """The answer to a batch: Segment's ``success`` plus what happened to the items."""

    success: bool
    accepted: int
    rejected: int
    errors: list[dict[str, Any]] = []


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Invalid message: bad JSON or UTF-8, wrong types, missing fields, timestamp out of range"),
        (401, "Unknown or missing write key"),
        (413, "Event or batch larger than the limit"),
        (415, "Content-Encoding other than gzip"),
        (503, "Kafka did not acknowledge the events; retry"),
    )
}


def _request_body(schema: dict[str, Any]) -> dict[str, Any]:
    # The body is read raw (bounded, gzip-aware) and validated by api.collector.segment; this only
    # documents it in the OpenAPI schema.
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


MESSAGE_SCHEMA = SegmentMessage.model_json_schema()
BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["batch"],
    "properties": {
        "batch": {"type": "array", "items": MESSAGE_SCHEMA, "minItems": 1},
        "context": {"type": "object"},
        "sentAt": {"type": "string", "format": "date-time"},
        "writeKey": {"type": "string"},
    },
}


def collector_error_response(exc: CollectorError) -> JSONResponse:
    """The JSON answer to a refused request (also counts the refusal)."""
    EVENTS_REJECTED.labels(exc.code).inc()
    headers = {"WWW-Authenticate": 'Basic realm="tidemark"'} if exc.status == 401 else None
    return JSONResponse(exc.as_json(), status_code=exc.status, headers=headers)


def _publish_failed(exc: PublishError) -> JSONResponse:
    return JSONResponse({"error": {"code": "kafka_unavailable", "message": str(exc)}}, status_code=503)


def basic_auth_user(request: Request) -> str | None:
    """The user name of an ``Authorization: Basic`` header (Segment's write key), if any."""
    header = request.headers.get("authorization")
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise CollectorError("unknown_write_key", "malformed Basic authorization header", 401) from None
    return decoded.split(":", 1)[0] or None


async def read_body(request: Request, limit: int, code: str) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` bytes (never buffered whole).

    A gzip body (``Content-Encoding: gzip``, as several tracking libraries send) is inflated
    incrementally and the limit applies to the inflated size, so a small bomb cannot grow large.
    """
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", ""):
        raise CollectorError("unsupported_encoding", f"Content-Encoding {encoding!r} is not supported (use gzip)", 415)
    gzip = encoding == "gzip"
    declared = request.headers.get("content-length")
    if not gzip and declared and declared.isdigit() and int(declared) > limit:
        raise CollectorError(code, f"body is {declared} bytes; the limit is {limit}", 413)
    inflater = zlib.decompressobj(wbits=31) if gzip else None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        if inflater is not None:
            try:
                chunk = inflater.decompress(chunk, limit + 1 - size)
            except zlib.error as exc:
                raise CollectorError("invalid_gzip", f"body is not valid gzip: {exc}") from exc
            if inflater.unconsumed_tail:  # more output is waiting than the limit allows
                raise CollectorError(code, f"inflated body is over the limit of {limit} bytes", 413)
        size += len(chunk)
        if size > limit:
            raise CollectorError(code, f"body is over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    if inflater is not None and not inflater.eof:
        raise CollectorError("invalid_gzip", "gzip body is truncated")
    return b"".join(chunks)


def _facts(request: Request) -> RequestFacts:
    return RequestFacts.from_headers(request.headers, request.client.host if request.client else None)


def _limits(settings: Settings) -> TimeLimits:
    return TimeLimits(timedelta(seconds=settings.max_future_skew_seconds), timedelta(days=settings.max_past_age_days))


def _message_handler(
    message_type: str,
) -> Callable[[Request, SettingsDep, PublisherDep], Awaitable[Accepted | JSONResponse]]:
    async def handle(request: Request, settings: SettingsDep, publisher: PublisherDep) -> Accepted | JSONResponse:
        EVENTS_RECEIVED.labels(message_type).inc()
        received_at = now_millis()
        try:
            header_key = basic_auth_user(request)
            body = await read_body(request, settings.max_event_bytes, "event_too_large")
            event = read_message(
                body,
                message_type,
                header_key=header_key,
                accepted_keys=settings.write_keys,
                received_at=received_at,
                facts=_facts(request),
                limits=_limits(settings),
                max_event_bytes=settings.max_event_bytes,
            )
        except CollectorError as exc:
            return collector_error_response(exc)
        try:
            await publisher.publish([event], [])
        except PublishError as exc:
            return _publish_failed(exc)
        EVENTS_ACCEPTED.labels(message_type).inc()
        return Accepted()

    handle.__name__ = f"collect_{message_type}"
    handle.__doc__ = f"Segment `{message_type}` call: validate, enrich and publish one message; 200 once Kafka has it."
    return handle


for _type in MESSAGE_TYPES:
    router.add_api_route(
        f"/{_type}",
        _message_handler(_type),
        methods=["POST"],
        response_model=Accepted,
        responses=ERROR_RESPONSES,
        summary=f"Collect one {_type} message",
        openapi_extra=_request_body(MESSAGE_SCHEMA),
    )


async def _publish_batch(intake: Intake, publisher: EventPublisher) -> BatchAccepted | JSONResponse:
    try:
        await publisher.publish(intake.events, intake.dead)
    except PublishError as exc:
        return _publish_failed(exc)
    for letter in intake.dead:
        EVENTS_REJECTED.labels(letter.reason).inc()
    EVENTS_ACCEPTED.labels("batch").inc(len(intake.events))
    return BatchAccepted(
        success=bool(intake.events) or not intake.dead,
        accepted=len(intake.events),
        rejected=len(intake.dead),
        errors=intake.errors,
    )


@router.post(
    "/batch",
    response_model=BatchAccepted,
    responses=ERROR_RESPONSES,
    summary="Collect a batch",
    openapi_extra=_request_body(BATCH_SCHEMA),
)
@router.post("/import", response_model=BatchAccepted, responses=ERROR_RESPONSES, include_in_schema=False)
async def collect_batch(
    request: Request, settings: SettingsDep, publisher: PublisherDep
) -> BatchAccepted | JSONResponse:
    """Segment `batch` (and `import`): many messages of any type in one request.

    Refused as a whole (4xx) when the request itself is bad; otherwise each bad item goes to
    ``events.dlq`` with its reason and the valid ones are published. 200 once Kafka has both.
    """
    received_at = now_millis()
    try:
        header_key = basic_auth_user(request)
        body = await read_body(request, settings.max_batch_bytes, "batch_too_large")
        intake = read_batch(
            body,
            header_key=header_key,
            accepted_keys=settings.write_keys,
            received_at=received_at,
            facts=_facts(request),
            limits=_limits(settings),
            max_event_bytes=settings.max_event_bytes,
            max_batch_bytes=settings.max_batch_bytes,
        )
    except CollectorError as exc:
        EVENTS_RECEIVED.labels("batch").inc()
        return collector_error_response(exc)
    EVENTS_RECEIVED.labels("batch").inc(len(intake.events) + len(intake.dead))
    return await _publish_batch(intake, publisher)
