"""Funnels over HTTP: saved definitions (``/v1/funnels``), computing them, their people, ad-hoc funnels.

Handlers only translate: request → :class:`FunnelDefinition` (+ time range, filters, cohort) →
:func:`compute_funnel` / :func:`funnel_people`. Who sees what: the owner sees their own
funnels, everyone sees public ones, admins see all; viewers read and compute but do not
create or change funnels.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.analyses.funnels import (
    Breakdown,
    FunnelDefinition,
    FunnelExclusion,
    FunnelOrder,
    FunnelPeople,
    FunnelResult,
    FunnelStep,
    compute_funnel,
    funnel_people,
)
from api.analyses.query import PropertyFilter, TimeRange
from api.auth import ERROR_RESPONSES, Analyst, CurrentPrincipal, DbSession
from api.dashboards.models import Page
from api.deps import MAX_ID, RowId, RowRef
from api.metadata.models import Funnel
from api.routes.cohorts import (
    AnalysisClickHouse,
    check_range,
    invalid,
    load_editable_row,
    load_visible_row,
    page_of,
    resolve_cohort,
    visible_rows,
)

router = APIRouter(prefix="/v1/funnels", tags=["funnels"], responses=ERROR_RESPONSES)


class FunnelIn(FunnelDefinition):
    """A new saved funnel (AnalyticsFunnel): the definition plus its visibility."""

    is_public: bool = False


class FunnelPatch(BaseModel):
    """Changes to a funnel (omitted fields stay); the result is validated as a whole."""

    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = None
    steps: list[FunnelStep] | None = None
    window_seconds: float | None = Field(None, gt=0)
    order: FunnelOrder | None = None
    exclusions: list[FunnelExclusion] | None = None
    breakdown: Breakdown | None = None
    is_public: bool | None = None


class FunnelOut(FunnelDefinition):
    """A saved funnel."""

    id: int
    owner_id: int | None
    is_public: bool
    created_at: datetime
    updated_at: datetime


class FunnelQuery(BaseModel):
    """What to compute a funnel over: a time range, analysis-wide filters, a cohort of people."""

    time_range: TimeRange
    filters: list[PropertyFilter] = Field(default_factory=list, max_length=50)
    cohort_id: RowRef | None = Field(None, description="Only people in this cohort (recomputed if stale).")


class AdHocFunnelQuery(FunnelQuery):
    """An unsaved funnel and what to compute it over."""

    definition: FunnelDefinition


# --- conversions ---------------------------------------------------------------------------------

_SETTINGS_FIELDS = ("window_seconds", "order", "exclusions", "breakdown")


def definition_of(funnel: Funnel) -> FunnelDefinition:
    """The analysis definition of a stored funnel (steps and settings columns)."""
    return FunnelDefinition.model_validate(
        {"name": funnel.name, "description": funnel.description, "steps": funnel.steps, **funnel.settings}
    )


def _store(funnel: Funnel, definition: FunnelDefinition) -> None:
    doc = definition.model_dump(mode="json")
    funnel.name, funnel.description, funnel.steps = doc["name"], doc["description"], doc["steps"]
    funnel.settings = {k: doc[k] for k in _SETTINGS_FIELDS}


def funnel_out(funnel: Funnel) -> FunnelOut:
    """The API view of a stored funnel."""
    return FunnelOut(
        **definition_of(funnel).model_dump(),
        id=funnel.id,
        owner_id=funnel.owner_id,
        is_public=funnel.is_public,
        created_at=funnel.created_at,
        updated_at=funnel.updated_at,
    )


def _compute(
    session: Any, client: Any, principal: Any, definition: FunnelDefinition, query: FunnelQuery
) -> FunnelResult:
    check_range(query.time_range)
    cohort = resolve_cohort(session, client, query.cohort_id, principal)
    try:
        return compute_funnel(client, definition, query.time_range, tuple(query.filters), cohort)
    except ValueError as exc:
        raise invalid(exc) from exc


# --- routes --------------------------------------------------------------------------------------


@router.get("", response_model=Page[FunnelOut], summary="List funnels the caller can see")
def list_funnels(
    principal: CurrentPrincipal,
    session: DbSession,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Page[FunnelOut]:
    """Own and public funnels (admins: all), by id."""
    rows, total = page_of(session, visible_rows(Funnel, principal), Funnel.id, limit, offset)
    return Page[FunnelOut](items=[funnel_out(f) for f in rows], total=total, limit=limit, offset=offset)


@router.post("", response_model=FunnelOut, status_code=201, summary="Create a funnel")
def create_funnel(body: FunnelIn, principal: Analyst, session: DbSession) -> FunnelOut:
    """A new funnel owned by the caller (analyst role or above)."""
    funnel = Funnel(owner_id=principal.user_id, is_public=body.is_public)
    _store(funnel, FunnelDefinition.model_validate(body.model_dump(exclude={"is_public"})))
    session.add(funnel)
    session.commit()
    return funnel_out(funnel)


# Declared before "/{funnel_id}" routes so "compute" is never read as an id.
@router.post("/compute", response_model=FunnelResult, summary="Compute an unsaved funnel")
def compute_adhoc(
    body: AdHocFunnelQuery, principal: CurrentPrincipal, session: DbSession, client: AnalysisClickHouse
) -> FunnelResult:
    """Compute an inline definition without saving it (any role)."""
    return _compute(session, client, principal, body.definition, body)


@router.get("/{funnel_id}", response_model=FunnelOut, summary="Read a funnel")
def get_funnel(funnel_id: RowId, principal: CurrentPrincipal, session: DbSession) -> FunnelOut:
    """A funnel the caller can see."""
    return funnel_out(load_visible_row(session, Funnel, funnel_id, principal, "funnel"))


@router.patch("/{funnel_id}", response_model=FunnelOut, summary="Change a funnel")
def update_funnel(funnel_id: RowId, body: FunnelPatch, principal: CurrentPrincipal, session: DbSession) -> FunnelOut:
    """Change any part of the definition or the visibility (owner or admin)."""
    funnel = load_editable_row(session, Funnel, funnel_id, principal, "funnel")
    changes = body.model_dump(exclude_unset=True, mode="json")
    is_public = changes.pop("is_public", None)
    merged = {**definition_of(funnel).model_dump(mode="json"), **{k: v for k, v in changes.items()}}
    try:
        definition = FunnelDefinition.model_validate(merged)
    except ValueError as exc:
        raise invalid(exc) from exc
    _store(funnel, definition)
    if is_public is not None:
        funnel.is_public = is_public
    session.commit()
    return funnel_out(funnel)


@router.delete("/{funnel_id}", status_code=204, summary="Delete a funnel")
def delete_funnel(funnel_id: RowId, principal: CurrentPrincipal, session: DbSession) -> None:
    """Delete a funnel (owner or admin)."""
    session.delete(load_editable_row(session, Funnel, funnel_id, principal, "funnel"))
    session.commit()


@router.post("/{funnel_id}/compute", response_model=FunnelResult, summary="Compute a saved funnel")
def compute_saved(
    funnel_id: RowId, body: FunnelQuery, principal: CurrentPrincipal, session: DbSession, client: AnalysisClickHouse
) -> FunnelResult:
    """Counts, conversion, drop-off, times to convert and breakdown over the range (any role that sees it)."""
    definition = definition_of(load_visible_row(session, Funnel, funnel_id, principal, "funnel"))
    return _compute(session, client, principal, definition, body)


@router.get("/{funnel_id}/people", response_model=FunnelPeople, summary="People at a funnel step")
def people_at_step(
    funnel_id: RowId,
    principal: CurrentPrincipal,
    session: DbSession,
    client: AnalysisClickHouse,
    step: Annotated[int, Query(ge=1, description="1-based step.")],
    start: Annotated[datetime, Query(description="Range start (timezone-aware).")],
    end: Annotated[datetime, Query(description="Range end, exclusive.")],
    status: Annotated[Literal["reached", "dropped"], Query(description="Reached the step, or stopped after it.")] = (
        "reached"
    ),
    cohort_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    limit: int = Query(100, ge=1, le=10_000),
    offset: int = Query(0, ge=0, le=100_000_000),
) -> FunnelPeople:
    """One page of person ids (after identity stitching) at ``step``, sorted."""
    definition = definition_of(load_visible_row(session, Funnel, funnel_id, principal, "funnel"))
    try:
        time_range = TimeRange(start=start, end=end)
    except ValueError as exc:
        raise invalid(exc) from exc
    check_range(time_range)
    cohort = resolve_cohort(session, client, cohort_id, principal)
    try:
        return funnel_people(
            client, definition, time_range, step, status, cohort_id=cohort, limit=limit, offset=offset
        )
    except ValueError as exc:
        raise invalid(exc) from exc


__all__ = ["router"]
