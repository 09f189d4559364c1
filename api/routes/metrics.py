"""Metrics over time for any catalogue metric: ``/v1/metrics``."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.auth import ERROR_RESPONSES, ApiError, CurrentPrincipal
from api.metrics_query import (
    Comparison,
    DimensionFilter,
    Granularity,
    MetricInfo,
    MetricQuery,
    MetricResult,
    MetricsEngine,
    QueryError,
    RelativeRange,
    UnknownMetric,
)

router = APIRouter(prefix="/v1/metrics", tags=["metrics"], responses=ERROR_RESPONSES)


def _engine(request: Request) -> MetricsEngine:
    return request.app.state.metrics_engine_factory()


def _answer(request: Request, metric: str, query: MetricQuery) -> MetricResult:
    try:
        return _engine(request).run(metric, query)
    except UnknownMetric as exc:
        raise ApiError(404, "unknown_metric", f"metric {metric!r} is not in the catalogue") from exc
    except QueryError as exc:
        raise ApiError(400, exc.code, exc.message) from exc


@router.get("", response_model=list[MetricInfo], summary="The metric catalogue")
def list_metrics(request: Request, _principal: CurrentPrincipal) -> list[MetricInfo]:
    """Every metric the API can chart, with its unit, aggregation and dimensions."""
    return [
        MetricInfo(
            name=m.name,
            description=m.description,
            unit=m.unit,
            aggregation=m.aggregation.value,
            dimensions=list(m.dimensions),
        )
        for m in _engine(request).catalogue.all()
    ]


@router.post("/{metric}/query", response_model=MetricResult, summary="Query a metric over time")
def query_metric(request: Request, metric: str, body: MetricQuery, _principal: CurrentPrincipal) -> MetricResult:
    """The metric bucketed over a range, with filters, an optional breakdown and comparison."""
    return _answer(request, metric, body)


@router.get("/{metric}/query", response_model=MetricResult, summary="Query a metric over time (query string)")
def query_metric_get(
    request: Request,
    metric: str,
    _principal: CurrentPrincipal,
    range: Annotated[RelativeRange | None, Query()] = None,  # noqa: A002
    start: Annotated[datetime | date | None, Query()] = None,
    end: Annotated[datetime | date | None, Query()] = None,
    granularity: Annotated[Granularity, Query()] = Granularity.day,
    filter: Annotated[list[str] | None, Query(description="dimension:op:value, repeatable")] = None,  # noqa: A002
    breakdown: Annotated[str | None, Query(max_length=80)] = None,
    top_n: Annotated[int, Query(ge=1, le=50)] = 5,
    compare: Annotated[Comparison | None, Query()] = None,
    timezone: Annotated[str | None, Query(max_length=64)] = None,
) -> MetricResult:
    """Same as the POST form, with filters written ``dimension:op:value`` (in-lists separated by ``|``)."""
    filters: list[DimensionFilter] = []
    for text in filter or []:
        dimension, _, rest = text.partition(":")
        op, _, value = rest.partition(":")
        filters.append(
            {
                "dimension": dimension,
                "op": op or "eq",  # type: ignore[arg-type]
                "value": value.split("|") if op in ("in", "not_in") else value,
            }
        )
    try:
        query = MetricQuery.model_validate(
            {
                "range": range,
                "start": start,
                "end": end,
                "granularity": granularity,
                "filters": filters,
                "breakdown": breakdown,
                "top_n": top_n,
                "compare": compare,
                "timezone": timezone,
            }
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)[:1000]) from exc
    return _answer(request, metric, query)
