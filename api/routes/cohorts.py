"""Cohorts over HTTP: definitions, on-demand computation, members, comparison and lifetime value.

Also home of what every analysis route shares: the ClickHouse handle, the reporting
settings, who may see a saved definition, and :func:`resolve_cohort`, which turns a
``cohort_id`` filter of any analysis into a fresh computation.

Freshness: a cohort's membership lives in ClickHouse (:mod:`api.analyses.cohorts`). Whenever a
request reads it (``GET /v1/cohorts/{id}``, its members, its LTV, a comparison, or any analysis
filtered by it) and the latest computation has expired (:func:`cohort_is_stale`; never
computed counts as expired), the cohort is recomputed first, in the request. ``POST
/v1/cohorts/{id}/compute`` recomputes regardless. Changing a definition recomputes it at
once. The latest computation's count and times are mirrored into the metadata row so lists
show them without querying ClickHouse.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVar

from clickhouse_connect.driver.exceptions import ClickHouseError
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, model_validator
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from api.analyses.cohorts import (
    CohortComparison,
    CohortComputation,
    CohortDefinition,
    LifetimeValue,
    LifetimeValueDefinition,
    cohort_is_stale,
    cohort_members,
    compare_cohorts,
    compute_cohort,
    latest_computation,
    lifetime_value,
)
from api.analyses.models import AnalysisSettings
from api.analyses.query import TimeRange
from api.analyses.retention import RetentionDefinition
from api.auth import (
    ERROR_RESPONSES,
    Analyst,
    ApiError,
    CurrentPrincipal,
    DbSession,
    Principal,
    Role,
    forbidden,
    not_found,
)
from api.dashboards.models import Page
from api.deps import RowId, RowRef
from api.metadata.models import Cohort
from api.metrics_query import EARLIEST, LATEST, storable

router = APIRouter(prefix="/v1/cohorts", tags=["cohorts"], responses=ERROR_RESPONSES)


# --- what every analysis route shares -------------------------------------------------------------


def analysis_clickhouse(request: Request) -> Any:
    """The ClickHouse client the query API reads (503 while it is not connected)."""
    state = request.app.state
    client = getattr(state, "query_clickhouse", None) or getattr(state, "clickhouse", None)
    if client is None:
        raise ApiError(503, "not_ready", "ClickHouse is not connected yet")
    return client


def analysis_settings(request: Request) -> AnalysisSettings:
    """Reporting timezone and week start from the app's settings (the process settings otherwise)."""
    settings = getattr(request.app.state, "settings", None)
    if settings is None:
        from tidemark.settings import get_settings

        settings = get_settings()
    return AnalysisSettings.from_settings(settings)


AnalysisClickHouse = Annotated[Any, Depends(analysis_clickhouse)]
ReportSettings = Annotated[AnalysisSettings, Depends(analysis_settings)]

Row = TypeVar("Row", bound=Any)


def visible_rows(model: Any, principal: Principal) -> Any:
    """SELECT of the saved definitions the caller sees: own and public ones (admins: all)."""
    query = select(model)
    if principal.role is not Role.admin:
        query = query.where(or_(model.owner_id == principal.user_id, model.is_public.is_(True)))
    return query


def load_visible_row(session: Session, model: type[Row], row_id: int, principal: Principal, what: str) -> Row:
    """A saved definition the caller may see (404 otherwise: others' private ones are not disclosed)."""
    row = session.get(model, row_id)
    if row is None:
        raise not_found(f"{what} {row_id}")
    if principal.role is not Role.admin and row.owner_id != principal.user_id and not row.is_public:
        raise not_found(f"{what} {row_id}")
    return row


def load_editable_row(session: Session, model: type[Row], row_id: int, principal: Principal, what: str) -> Row:
    """A saved definition the caller may change: their own (analyst role), or any for admins."""
    row = load_visible_row(session, model, row_id, principal, what)
    if not principal.at_least(Role.analyst):
        raise forbidden("this needs the analyst role")
    if principal.role is not Role.admin and row.owner_id != principal.user_id:
        raise forbidden(f"only the owner changes this {what}")
    return row


def page_of(session: Session, query: Any, order: Any, limit: int, offset: int) -> tuple[list[Any], int]:
    """One page of ``query`` and the total count."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    return list(session.scalars(query.order_by(order).limit(limit).offset(offset)).all()), total


def invalid(exc: Exception) -> ApiError:
    """400 for a definition or request the analysis refuses (its message says why)."""
    return ApiError(400, "invalid_request", str(exc))


def check_range(time_range: TimeRange) -> TimeRange:
    """A time range must not be empty and must lie within what ClickHouse timestamps hold (else 400)."""
    if time_range.end <= time_range.start:
        raise ApiError(400, "invalid_request", "time_range.end must be after time_range.start")
    if not storable(time_range.start, time_range.end):
        raise ApiError(400, "invalid_request", f"time ranges must lie within {EARLIEST.year}..{LATEST.year}")
    return time_range


# --- cohorts as a filter -------------------------------------------------------------------------


def _cohort_key(cohort: Cohort) -> str:
    """The cohort's id in ClickHouse (``cohort_members.cohort_id``)."""
    return str(cohort.id)


def _compute(session: Session, client: Any, cohort: Cohort) -> CohortComputation:
    definition = CohortDefinition.model_validate(cohort.definition)
    try:
        done = compute_cohort(client, _cohort_key(cohort), definition)
    except (ValueError, ClickHouseError) as exc:
        raise ApiError(400, "cohort_failed", f"cohort {cohort.id} could not be computed: {exc}") from exc
    cohort.user_count, cohort.computed_at, cohort.expires_at = done.user_count, done.computed_at, done.expires_at
    session.commit()
    return done


def fresh_computation(session: Session, client: Any, cohort: Cohort) -> CohortComputation:
    """The cohort's latest computation, recomputed first when it expired (or never ran)."""
    if cohort_is_stale(client, _cohort_key(cohort)):
        return _compute(session, client, cohort)
    latest = latest_computation(client, _cohort_key(cohort))
    assert latest is not None
    return latest


def resolve_cohort(session: Session, client: Any, cohort_id: int | None, principal: Principal) -> str | None:
    """The ClickHouse id of a visible cohort used as an analysis filter, fresh (None without a cohort)."""
    if cohort_id is None:
        return None
    cohort = load_visible_row(session, Cohort, cohort_id, principal, "cohort")
    fresh_computation(session, client, cohort)
    return _cohort_key(cohort)


# --- contracts -----------------------------------------------------------------------------------


class CohortIn(BaseModel):
    """A new cohort."""

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=10_000)
    is_public: bool = False
    definition: CohortDefinition


class CohortPatch(BaseModel):
    """Changes to a cohort (omitted fields stay)."""

    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, max_length=10_000)
    is_public: bool | None = None
    definition: CohortDefinition | None = None


class CohortOut(BaseModel):
    """A cohort with its latest computation (``null`` until it is first computed)."""

    id: int
    name: str
    description: str
    owner_id: int | None
    is_public: bool
    definition: CohortDefinition
    latest: CohortComputation | None
    created_at: datetime
    updated_at: datetime


class CompareIn(BaseModel):
    """Cohorts to put side by side under the same retention analysis."""

    cohort_ids: list[RowRef] = Field(min_length=1, max_length=10)
    retention: RetentionDefinition
    time_range: TimeRange


class LifetimeValueIn(BaseModel):
    """How to measure a cohort's lifetime value, and until when."""

    definition: LifetimeValueDefinition = LifetimeValueDefinition()
    time_range: TimeRange

    @model_validator(mode="after")
    def _ordered(self) -> LifetimeValueIn:
        if self.time_range.end <= self.time_range.start:
            raise ValueError("time_range.end must be after time_range.start")
        return self


def cohort_out(cohort: Cohort, latest: CohortComputation | None) -> CohortOut:
    """The API view of a stored cohort."""
    return CohortOut(
        id=cohort.id,
        name=cohort.name,
        description=cohort.description,
        owner_id=cohort.owner_id,
        is_public=cohort.is_public,
        definition=CohortDefinition.model_validate(cohort.definition),
        latest=latest,
        created_at=cohort.created_at,
        updated_at=cohort.updated_at,
    )


def _mirrored(cohort: Cohort) -> CohortComputation | None:
    if cohort.computed_at is None or cohort.expires_at is None or cohort.user_count is None:
        return None
    return CohortComputation(
        cohort_id=_cohort_key(cohort),
        user_count=cohort.user_count,
        computed_at=cohort.computed_at,
        expires_at=cohort.expires_at,
    )


# --- routes --------------------------------------------------------------------------------------


@router.get("", response_model=Page[CohortOut], summary="List cohorts the caller can see")
def list_cohorts(
    principal: CurrentPrincipal,
    session: DbSession,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Page[CohortOut]:
    """Own and public cohorts, with their last known computation (not recomputed here)."""
    rows, total = page_of(session, visible_rows(Cohort, principal), Cohort.id, limit, offset)
    return Page[CohortOut](items=[cohort_out(c, _mirrored(c)) for c in rows], total=total, limit=limit, offset=offset)


@router.post("", response_model=CohortOut, status_code=201, summary="Create a cohort")
def create_cohort(body: CohortIn, principal: Analyst, session: DbSession) -> CohortOut:
    """Store a definition owned by the caller (computed on first read or on demand)."""
    cohort = Cohort(
        name=body.name,
        description=body.description,
        is_public=body.is_public,
        owner_id=principal.user_id,
        kind=body.definition.kind,
        definition=body.definition.model_dump(mode="json"),
        refresh_seconds=float(body.definition.ttl_seconds),
    )
    session.add(cohort)
    session.commit()
    return cohort_out(cohort, None)


@router.get("/{cohort_id}", response_model=CohortOut, summary="Read a cohort with its latest computation")
def get_cohort(
    cohort_id: RowId, principal: CurrentPrincipal, session: DbSession, client: AnalysisClickHouse
) -> CohortOut:
    """The cohort; recomputed first when its computation has expired."""
    cohort = load_visible_row(session, Cohort, cohort_id, principal, "cohort")
    return cohort_out(cohort, fresh_computation(session, client, cohort))


@router.patch("/{cohort_id}", response_model=CohortOut, summary="Change a cohort")
def update_cohort(
    cohort_id: RowId, body: CohortPatch, principal: CurrentPrincipal, session: DbSession, client: AnalysisClickHouse
) -> CohortOut:
    """Change name, description, visibility or definition (a new definition is computed at once)."""
    cohort = load_editable_row(session, Cohort, cohort_id, principal, "cohort")
    if body.name is not None:
        cohort.name = body.name
    if body.description is not None:
        cohort.description = body.description
    if body.is_public is not None:
        cohort.is_public = body.is_public
    latest: CohortComputation | None
    if body.definition is not None:
        cohort.kind = body.definition.kind
        cohort.definition = body.definition.model_dump(mode="json")
        cohort.refresh_seconds = float(body.definition.ttl_seconds)
        session.commit()
        latest = _compute(session, client, cohort)
    else:
        session.commit()
        latest = _mirrored(cohort)
    return cohort_out(cohort, latest)


@router.delete("/{cohort_id}", status_code=204, summary="Delete a cohort")
def delete_cohort(
    cohort_id: RowId, principal: CurrentPrincipal, session: DbSession, client: AnalysisClickHouse
) -> None:
    """Delete the definition and its computed membership (so a reused id starts empty)."""
    cohort = load_editable_row(session, Cohort, cohort_id, principal, "cohort")
    key = _cohort_key(cohort)
    for table in ("cohorts_computed", "cohort_members"):
        # Fixed table names; the id is a server-side parameter.
        client.command(f"DELETE FROM {table} WHERE cohort_id = {{cid:String}}", parameters={"cid": key})
    session.delete(cohort)
    session.commit()


@router.post("/{cohort_id}/compute", response_model=CohortOut, summary="Compute a cohort now")
def compute_now(
    cohort_id: RowId, principal: CurrentPrincipal, session: DbSession, client: AnalysisClickHouse
) -> CohortOut:
    """Recompute membership regardless of freshness (any caller who can see the cohort)."""
    cohort = load_visible_row(session, Cohort, cohort_id, principal, "cohort")
    return cohort_out(cohort, _compute(session, client, cohort))


@router.get("/{cohort_id}/members", response_model=Page[str], summary="A cohort's members")
def list_members(
    cohort_id: RowId,
    principal: CurrentPrincipal,
    session: DbSession,
    client: AnalysisClickHouse,
    limit: int = Query(100, ge=1, le=10_000),
    offset: int = Query(0, ge=0, le=100_000_000),
) -> Page[str]:
    """One page of the latest computation's person ids, sorted."""
    cohort = load_visible_row(session, Cohort, cohort_id, principal, "cohort")
    latest = fresh_computation(session, client, cohort)
    people = cohort_members(client, _cohort_key(cohort), limit=limit, offset=offset)
    return Page[str](items=people, total=latest.user_count, limit=limit, offset=offset)


@router.post("/compare", response_model=CohortComparison, summary="Compare cohorts")
def compare(
    body: CompareIn,
    principal: CurrentPrincipal,
    session: DbSession,
    client: AnalysisClickHouse,
    settings: ReportSettings,
) -> CohortComparison:
    """Sizes and the same retention matrix for each cohort (in the reporting timezone and week start)."""
    check_range(body.time_range)
    keys = [resolve_cohort(session, client, cid, principal) for cid in body.cohort_ids]
    try:
        return compare_cohorts(client, [k for k in keys if k is not None], body.retention, body.time_range, settings)
    except ValueError as exc:
        raise invalid(exc) from exc


@router.post("/{cohort_id}/ltv", response_model=LifetimeValue, summary="A cohort's lifetime value")
def cohort_ltv(
    cohort_id: RowId,
    body: LifetimeValueIn,
    principal: CurrentPrincipal,
    session: DbSession,
    client: AnalysisClickHouse,
    settings: ReportSettings,
) -> LifetimeValue:
    """Cumulative revenue per member by period since each member's acquisition."""
    check_range(body.time_range)
    key = resolve_cohort(session, client, cohort_id, principal)
    try:
        return lifetime_value(client, body.definition, body.time_range, cohort_id=key, settings=settings)
    except ValueError as exc:
        raise invalid(exc) from exc


__all__ = [
    "AnalysisClickHouse",
    "ReportSettings",
    "check_range",
    "invalid",
    "load_editable_row",
    "load_visible_row",
    "page_of",
    "resolve_cohort",
    "router",
    "visible_rows",
]
