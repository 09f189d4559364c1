"""Anomaly episodes and their status lifecycle: ``/v1/anomalies``.

Reads come from ClickHouse ``anomalies FINAL`` (the latest version of each episode).
The sinks are the table's only writers, so a status change is *published*: the route
checks the transition against the latest stored version, then produces a new version of
the episode (``updated_at`` = now) to the ``anomalies`` topic, waits until Kafka has it,
and answers ``202 Accepted`` with that version. The anomalies sink then writes it; alert
delivery reads the same message (``acknowledged``: nobody is paged again; ``resolved``:
the on-call alert is resolved).

Status moves forward only: ``open`` → ``acknowledged`` → ``resolved`` (anything else is
409). Anyone with a key may read; analysts and admins may change the status.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

from confluent_kafka import KafkaError
from fastapi import APIRouter, Query, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from api.auth import ERROR_RESPONSES, Analyst, ApiError, CurrentPrincipal, not_found
from api.deps import ClickHouseDep, PublisherDep, SettingsDep
from api.publisher import EventPublisher, PublishError
from schemas.anomaly import Anomaly, AnomalyStatus, Severity, anomaly_codec
from tidemark.topics import ANOMALIES

router = APIRouter(prefix="/v1/anomalies", tags=["anomalies"], responses=ERROR_RESPONSES)

COLUMNS = (
    "id", "metric_type", "period", "dimensions", "detected_at", "window_start", "severity", "expected", "actual",
    "deviation", "score", "detector", "description", "status", "resolved_by", "resolved_at", "updated_at",
)
# Each status may be reached from exactly one other (no skipping, no going back).
TRANSITIONS: dict[AnomalyStatus, AnomalyStatus] = {
    AnomalyStatus.acknowledged: AnomalyStatus.open,
    AnomalyStatus.resolved: AnomalyStatus.acknowledged,
}


class AnomalyOut(BaseModel):
    """One anomaly episode as the API shows it (its latest version)."""

    id: UUID
    metric_type: str
    period: str
    dimensions: dict[str, str]
    detected_at: datetime
    window_start: datetime
    severity: Severity
    expected: float
    actual: float
    deviation: float
    score: float
    detector: str
    description: str
    status: AnomalyStatus
    resolved_by: str
    resolved_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, anomaly: Anomaly) -> AnomalyOut:
        """The API view of an anomaly version."""
        return cls.model_validate(anomaly.model_dump(by_alias=False))


class AnomalyPage(BaseModel):
    """One page of anomalies, newest detection first: ``items`` from ``offset``, at most ``limit`` of ``total``."""

    items: list[AnomalyOut]
    total: int
    limit: int
    offset: int


class ResolveIn(BaseModel):
    """Who resolved the anomaly (defaults to the caller's e-mail)."""

    resolved_by: str | None = Field(None, min_length=1, max_length=200)


class SortOrder(StrEnum):
    """Order of the list by detection time."""

    newest = "newest"
    oldest = "oldest"


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _anomaly(row: dict[str, Any]) -> Anomaly:
    return Anomaly(
        id=row["id"] if isinstance(row["id"], UUID) else UUID(str(row["id"])),
        metric_type=row["metric_type"],
        period=row["period"],
        dimensions=dict(row["dimensions"]),
        detected_at=_utc(row["detected_at"]),
        window_start=_utc(row["window_start"]),
        severity=Severity(row["severity"]),
        expected=row["expected"],
        actual=row["actual"],
        deviation=row["deviation"],
        score=row["score"],
        detector=row["detector"],
        description=row["description"],
        status=AnomalyStatus(row["status"]),
        resolved_by=row["resolved_by"],
        resolved_at=_utc(row["resolved_at"]),
        updated_at=_utc(row["updated_at"]),
    )


def _load(client: Any, anomaly_id: UUID) -> Anomaly:
    result = client.query(
        f"SELECT {', '.join(COLUMNS)} FROM anomalies FINAL WHERE id = {{id:UUID}}",
        parameters={"id": str(anomaly_id)},
    )
    rows = list(result.named_results())
    if not rows:
        raise not_found(f"anomaly {anomaly_id}")
    return _anomaly(rows[0])


@router.get("", response_model=AnomalyPage, summary="List anomalies (latest version of each episode)")
def list_anomalies(
    _principal: CurrentPrincipal,
    client: ClickHouseDep,
    status_: Annotated[list[AnomalyStatus] | None, Query(alias="status")] = None,
    severity: Annotated[list[Severity] | None, Query()] = None,
    metric: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    since: Annotated[datetime | None, Query(description="detected at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="detected before (ISO 8601)")] = None,
    order: SortOrder = SortOrder.newest,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> AnomalyPage:
    """Anomalies filtered by status, severity (both repeatable), metric and detection time, paginated."""
    if since is not None and until is not None and _utc(since) >= _utc(until):  # type: ignore[operator]
        raise ApiError(400, "bad_request", "'since' must be before 'until'")
    conditions: list[str] = []
    parameters: dict[str, Any] = {"limit": limit, "offset": offset}
    if status_:
        conditions.append("status IN {statuses:Array(String)}")
        parameters["statuses"] = [s.value for s in status_]
    if severity:
        conditions.append("severity IN {severities:Array(String)}")
        parameters["severities"] = [s.value for s in severity]
    if metric:
        conditions.append("metric_type = {metric:String}")
        parameters["metric"] = metric
    if since is not None:
        conditions.append("detected_at >= {since:DateTime64(3, 'UTC')}")
        parameters["since"] = _utc(since)
    if until is not None:
        conditions.append("detected_at < {until:DateTime64(3, 'UTC')}")
        parameters["until"] = _utc(until)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    direction = "DESC" if order is SortOrder.newest else "ASC"
    # FINAL first (latest version per id), filters on that version: a resolved episode is not "open".
    latest = f"SELECT {', '.join(COLUMNS)} FROM anomalies FINAL"
    total = client.query(f"SELECT count() FROM ({latest}) {where}", parameters=parameters).result_rows[0][0]
    rows = client.query(
        f"SELECT * FROM ({latest}) {where} ORDER BY detected_at {direction}, id "
        "LIMIT {limit:UInt32} OFFSET {offset:UInt32}",
        parameters=parameters,
    ).named_results()
    items = [AnomalyOut.of(_anomaly(row)) for row in rows]
    return AnomalyPage(items=items, total=int(total), limit=limit, offset=offset)


@router.get("/{anomaly_id}", response_model=AnomalyOut, summary="One anomaly (its latest version)")
def get_anomaly(anomaly_id: UUID, _principal: CurrentPrincipal, client: ClickHouseDep) -> AnomalyOut:
    """The latest stored version of one anomaly episode (404 if unknown)."""
    return AnomalyOut.of(_load(client, anomaly_id))


async def publish_anomaly(publisher: EventPublisher, topic: str, anomaly: Anomaly, timeout: float) -> None:
    """Produce one anomaly version (keyed by its series, like the detector's) and wait for Kafka's ack."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def report(err: KafkaError | None, _msg: Any) -> None:
        def settle() -> None:
            if done.done():
                return
            if err is None:
                done.set_result(None)
            else:
                done.set_exception(PublishError(str(err)))

        loop.call_soon_threadsafe(settle)

    try:
        publisher.producer.produce(
            topic, key=anomaly.series_key.encode(), value=anomaly_codec().encode(anomaly.to_avro()),
            on_delivery=report,
        )
        await asyncio.wait_for(done, timeout)
    except (PublishError, TimeoutError, BufferError) as exc:
        raise ApiError(503, "unavailable", f"the status change could not be published: {exc}") from exc
    except Exception as exc:  # KafkaException (unknown topic, fatal producer state)
        raise ApiError(503, "unavailable", f"the status change could not be published: {exc}") from exc


async def _change_status(
    anomaly_id: UUID, target: AnomalyStatus, client: Any, publisher: EventPublisher, settings: Any,
    update: dict[str, Any],
) -> AnomalyOut:
    current = await run_in_threadpool(_load, client, anomaly_id)
    if current.status is not TRANSITIONS[target]:
        raise ApiError(
            409, "conflict",
            f"anomaly {anomaly_id} is {current.status.value}; only a {TRANSITIONS[target].value} one can become "
            f"{target.value}",
        )
    now = datetime.now(UTC)
    # Millisecond precision (as on the wire) and strictly later than the stored version, so
    # ReplacingMergeTree(updated_at) keeps this one.
    updated_at = max(now.replace(microsecond=now.microsecond // 1000 * 1000),
                     current.updated_at + timedelta(milliseconds=1))
    version = current.model_copy(update={"status": target, "updated_at": updated_at, **update})
    await publish_anomaly(
        publisher, settings.topic(ANOMALIES.name), version, settings.publish_timeout_seconds + 5
    )
    return AnomalyOut.of(version)


@router.post(
    "/{anomaly_id}/acknowledge", response_model=AnomalyOut, status_code=status.HTTP_202_ACCEPTED,
    summary="Acknowledge an open anomaly",
)
async def acknowledge_anomaly(
    anomaly_id: UUID, _principal: Analyst, client: ClickHouseDep, publisher: PublisherDep, settings: SettingsDep
) -> AnomalyOut:
    """open → acknowledged (409 otherwise); answers the new version, published to ``anomalies``."""
    return await _change_status(anomaly_id, AnomalyStatus.acknowledged, client, publisher, settings, {})


@router.post(
    "/{anomaly_id}/resolve", response_model=AnomalyOut, status_code=status.HTTP_202_ACCEPTED,
    summary="Resolve an acknowledged anomaly",
)
async def resolve_anomaly(
    anomaly_id: UUID, principal: Analyst, client: ClickHouseDep, publisher: PublisherDep, settings: SettingsDep,
    body: ResolveIn | None = None,
) -> AnomalyOut:
    """acknowledged → resolved (409 otherwise), with ``resolved_by`` (default: the caller) and ``resolved_at`` = now."""
    resolved_by = (body.resolved_by if body else None) or principal.email
    update = {"resolved_by": resolved_by, "resolved_at": datetime.now(UTC)}
    return await _change_status(anomaly_id, AnomalyStatus.resolved, client, publisher, settings, update)
