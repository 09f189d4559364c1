"""Retention, churn/reactivation and lifecycle over HTTP (``/v1/retention``).

Periods follow the reporting settings (``report_timezone``, ``week_start``) of the process,
not the request: every chart of the product cuts weeks the same way. Any role may run them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.analyses.query import PropertyFilter, TimeRange
from api.analyses.retention import (
    ActivityDefinition,
    ChurnResult,
    LifecycleResult,
    RetentionDefinition,
    RetentionResult,
    compute_churn,
    compute_lifecycle,
    compute_retention,
)
from api.auth import ERROR_RESPONSES, CurrentPrincipal, DbSession
from api.deps import RowRef
from api.routes.cohorts import (
    AnalysisClickHouse,
    ReportSettings,
    check_range,
    invalid,
    resolve_cohort,
)

router = APIRouter(prefix="/v1/retention", tags=["retention"], responses=ERROR_RESPONSES)


class AnalysisScope(BaseModel):
    """Time range, analysis-wide filters and a cohort of people."""

    time_range: TimeRange
    filters: list[PropertyFilter] = Field(default_factory=list, max_length=50)
    cohort_id: RowRef | None = Field(None, description="Only people in this cohort (recomputed if stale).")


class RetentionQuery(AnalysisScope):
    """A retention matrix request."""

    definition: RetentionDefinition


class ActivityQuery(AnalysisScope):
    """A churn or lifecycle request; activity is any event, by week, unless said otherwise."""

    definition: ActivityDefinition = ActivityDefinition()


class ChurnQuery(ActivityQuery):
    """A churn request, with how many person ids to list per period."""

    people_limit: int = Field(100, ge=0, le=10_000)


def _scope(session: Any, client: Any, principal: Any, body: AnalysisScope) -> tuple[tuple[PropertyFilter, ...], Any]:
    check_range(body.time_range)
    return tuple(body.filters), resolve_cohort(session, client, body.cohort_id, principal)


@router.post("", response_model=RetentionResult, summary="A retention matrix")
def retention(
    body: RetentionQuery,
    principal: CurrentPrincipal,
    session: DbSession,
    client: AnalysisClickHouse,
    settings: ReportSettings,
) -> RetentionResult:
    """Cohorts by start event, people back by period, with weighted and simple averages."""
    filters, cohort = _scope(session, client, principal, body)
    try:
        return compute_retention(client, body.definition, body.time_range, settings, filters, cohort)
    except ValueError as exc:
        raise invalid(exc) from exc


@router.post("/churn", response_model=ChurnResult, summary="Churn and reactivation")
def churn(
    body: ChurnQuery,
    principal: CurrentPrincipal,
    session: DbSession,
    client: AnalysisClickHouse,
    settings: ReportSettings,
) -> ChurnResult:
    """Per period: who was active, who stopped after it, who came back in it."""
    filters, cohort = _scope(session, client, principal, body)
    try:
        return compute_churn(client, body.definition, body.time_range, settings, filters, cohort, body.people_limit)
    except ValueError as exc:
        raise invalid(exc) from exc


@router.post("/lifecycle", response_model=LifecycleResult, summary="Lifecycle")
def lifecycle(
    body: ActivityQuery,
    principal: CurrentPrincipal,
    session: DbSession,
    client: AnalysisClickHouse,
    settings: ReportSettings,
) -> LifecycleResult:
    """Per period: new, returning, resurrecting and dormant people."""
    filters, cohort = _scope(session, client, principal, body)
    try:
        return compute_lifecycle(client, body.definition, body.time_range, settings, filters, cohort)
    except ValueError as exc:
        raise invalid(exc) from exc


__all__ = ["router"]
