"""Resolve a widget into chart-ready data, with the dashboard's filters and per-request overrides.

A widget's data source is a catalogue metric (one or several), a read-only SQL query, or a
saved analysis. Metric cards get one number for the range (and the previous period's, for
the change); charts get ``series -> points -> {t, value}``; tables and categorical charts
(pie, bar by category, geo map, leaderboard) get rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import TypeAdapter

from api.dashboards.cache import WidgetCache, widget_key
from api.dashboards.models import (
    AnalysisSource,
    DashboardFilters,
    DataSource,
    MetricSource,
    MetricsSource,
    SqlSource,
    TableData,
    WidgetData,
    WidgetType,
)
from api.metadata.models import DashboardWidget, SavedQuery
from api.metrics_query import (
    Comparison,
    DimensionFilter,
    MetricQuery,
    MetricsEngine,
    Point,
    QueryError,
    Series,
    TimeWindow,
    comparison_window,
    resolve_window,
)
from api.readonly import QueryFailed, QueryRefused, ReadOnlyGuard, run_readonly

DATA_SOURCE = TypeAdapter(DataSource)

#: Analysis runners by saved-query kind (funnel, retention, ...): the analyses package registers
#: ``runner(definition, window, filters, client) -> WidgetData-shaped dict`` here.
AnalysisRunner = Callable[[dict[str, Any], TimeWindow, list[DimensionFilter], Any], dict[str, Any]]
ANALYSIS_RUNNERS: dict[str, AnalysisRunner] = {}


class WidgetDataError(QueryError):
    """A widget that cannot be resolved (broken SQL, missing saved analysis, ...)."""


@dataclass
class WidgetContext:
    """Everything resolution needs besides the widget itself."""

    engine: MetricsEngine
    client: Any
    filters: DashboardFilters
    week_start: int
    sql_max_seconds: int = 30
    sql_max_rows: int = 100_000
    saved_query: Callable[[int], SavedQuery | None] = lambda _id: None
    now: datetime | None = None

    @classmethod
    def of_app(cls, state: Any, filters: DashboardFilters, session: Any) -> WidgetContext:
        """The context the query API's ``app.state`` gives, reading saved analyses through ``session``."""
        return cls(
            engine=state.metrics_engine_factory(),
            client=state.query_clickhouse,
            filters=filters,
            week_start=state.week_start,
            sql_max_seconds=state.sql_max_seconds,
            sql_max_rows=state.sql_max_rows,
            saved_query=lambda sid: session.get(SavedQuery, sid),
        )


def merge_filters(defaults: DashboardFilters, overrides: dict[str, Any]) -> DashboardFilters:
    """The dashboard's filters with the request's overrides on top (explicit start/end beat a range)."""
    data = defaults.model_dump()
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "filters":
            data["filters"] = [f.model_dump() if isinstance(f, DimensionFilter) else f for f in value] + [
                f.model_dump()
                for f in defaults.filters
                if f.dimension
                not in {(g.dimension if isinstance(g, DimensionFilter) else g["dimension"]) for g in value}
            ]
        else:
            data[key] = value
    if overrides.get("start") is not None and overrides.get("range") is None:
        data["range"] = None
    if overrides.get("range") is not None and overrides.get("start") is None:
        data["start"] = data["end"] = None
    return DashboardFilters.model_validate(data)


def _base_query(ctx: WidgetContext) -> tuple[MetricQuery, ZoneInfo]:
    filters = ctx.filters
    zone = ZoneInfo(filters.timezone or ctx.engine.timezone)
    query = MetricQuery(
        range=filters.range,
        start=filters.start,
        end=filters.end,
        granularity=filters.granularity,
        filters=list(filters.filters),
        timezone=zone.key,
    )
    return query, zone


def widget_window(ctx: WidgetContext) -> TimeWindow:
    """The instants the widgets cover under ``ctx.filters`` (relative ranges: whole local days)."""
    query, zone = _base_query(ctx)
    return resolve_window(query, zone, ctx.now or datetime.now(UTC))


def resolve_cached(
    widget: DashboardWidget, ctx: WidgetContext, cache: WidgetCache, max_age_share: float = 1.0
) -> WidgetData:
    """``resolve`` through the cache: a result younger than ``max_age_share`` x the widget's refresh interval is reused.

    ``max_age_share=0`` recomputes (and re-caches) regardless of age; the warmer asks for less
    than 1 to recompute ahead of expiry. A reused result has ``cached=True``.
    """
    window = widget_window(ctx)
    key = widget_key(widget, ctx.filters, ctx.week_start, window.start, window.end)
    hit = cache.get(key, max_age_share * widget.refresh_seconds)
    if hit is not None:
        return hit
    data = resolve(widget, ctx)
    cache.put(key, data)
    return data


def resolve(widget: DashboardWidget, ctx: WidgetContext) -> WidgetData:
    """The chart-ready data of ``widget`` under ``ctx.filters``."""
    source = DATA_SOURCE.validate_python(widget.data_source)
    filters = ctx.filters
    base_query, zone = _base_query(ctx)
    now = ctx.now or datetime.now(UTC)
    window = resolve_window(base_query, zone, now)
    widget_type = WidgetType(widget.widget_type)
    common: dict[str, Any] = {
        "computed_at": datetime.now(UTC),
        "widget_id": widget.id,
        "widget_type": widget_type,
        "start": window.start.astimezone(zone),
        "end": window.end.astimezone(zone),
        "timezone": zone.key,
        "granularity": filters.granularity,
    }
    if isinstance(source, MetricSource):
        return _metric(source, widget_type, base_query, window, ctx, now, common)
    if isinstance(source, MetricsSource):
        return _metrics(source, base_query, ctx, now, common)
    if isinstance(source, SqlSource):
        return _sql(source.sql, window, ctx, common)
    return _analysis(source, window, filters, ctx, common)


def _metric(
    source: MetricSource,
    widget_type: WidgetType,
    base: MetricQuery,
    window: TimeWindow,
    ctx: WidgetContext,
    now: datetime,
    common: dict[str, Any],
) -> WidgetData:
    metric = ctx.engine.catalogue.get(source.metric)
    filters = list(base.filters) + list(source.filters)
    granularity = source.granularity or base.granularity
    common["granularity"] = granularity
    if widget_type is WidgetType.metric_card:
        value = ctx.engine.total(metric.name, window, filters)
        previous_window = comparison_window(window, source.compare or Comparison.previous_period)
        previous = ctx.engine.total(metric.name, previous_window, filters)
        change = None if previous == 0 else (value - previous) / previous
        return WidgetData(kind="value", unit=metric.unit, value=value, previous_value=previous, change=change, **common)
    categorical = widget_type in (WidgetType.pie, WidgetType.geo_map, WidgetType.table) and bool(source.breakdown)
    query = base.model_copy(
        update={
            "granularity": granularity,
            "filters": filters,
            "breakdown": source.breakdown,
            "top_n": source.top_n,
            "compare": source.compare,
            # Charts over time show whole buckets and need no extra range-total query.
            "whole_buckets": not categorical,
            "include_total": categorical,
        }
    )
    result = ctx.engine.run(metric.name, query, now=now)
    common["start"], common["end"] = result.start, result.end
    if categorical:
        # Categorical charts: one row per breakdown value with its range total.
        rows: list[list[Any]] = [[s.name, s.total] for s in result.series]
        return WidgetData(
            kind="table",
            unit=metric.unit,
            table=TableData(columns=[source.breakdown or "", metric.name], rows=rows),
            **common,
        )
    series = list(result.series)
    if result.comparison is not None:
        series += [s.model_copy(update={"name": f"{s.name} (previous)"}) for s in result.comparison.series]
    return WidgetData(kind="series", unit=metric.unit, series=series, **common)


def _metrics(
    source: MetricsSource, base: MetricQuery, ctx: WidgetContext, now: datetime, common: dict[str, Any]
) -> WidgetData:
    granularity = source.granularity or base.granularity
    common["granularity"] = granularity
    query = base.model_copy(
        update={
            "granularity": granularity,
            "filters": list(base.filters) + list(source.filters),
            "whole_buckets": True,
            "include_total": False,
        }
    )
    labels = source.labels or source.metrics
    series: list[Series] = []
    unit = None
    for name, label in zip(source.metrics, labels, strict=False):
        result = ctx.engine.run(name, query, now=now)
        common["start"], common["end"] = result.start, result.end
        unit = unit or result.unit
        series.extend(s.model_copy(update={"name": label}) for s in result.series)
    return WidgetData(kind="series", unit=unit, series=series, **common)


_GUARD = ReadOnlyGuard()


def run_read_only(
    client: Any, sql: str, parameters: dict[str, Any], max_seconds: int, max_rows: int
) -> tuple[list[str], list[list[Any]]]:
    """Run ``sql`` through the analysts' read-only guard (readonly mode, time and row limits)."""
    try:
        result = run_readonly(
            client, sql, max_rows=max_rows, max_seconds=max_seconds, guard=_GUARD, parameters=parameters
        )
    except QueryRefused as exc:
        raise WidgetDataError("read_only", str(exc)) from exc
    except QueryFailed as exc:
        raise WidgetDataError("sql_error", str(exc)[:500]) from exc
    return result.columns, result.rows


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def _sql(sql: str, window: TimeWindow, ctx: WidgetContext, common: dict[str, Any]) -> WidgetData:
    parameters = {
        "start": window.start.replace(tzinfo=None),
        "end": window.end.replace(tzinfo=None),
        "tz": window.zone.key,
        "week_start": ctx.week_start,
        "granularity": common["granularity"].value,
    }
    columns, rows = run_read_only(ctx.client, sql, parameters, ctx.sql_max_seconds, ctx.sql_max_rows)
    if "t" in columns:
        return WidgetData(kind="series", series=_as_series(columns, rows, window.zone), **common)
    return WidgetData(
        kind="table", table=TableData(columns=columns, rows=[[_plain(v) for v in r] for r in rows]), **common
    )


def _as_series(columns: list[str], rows: list[list[Any]], zone: ZoneInfo) -> list[Series]:
    t_index = columns.index("t")
    named = "series" in columns
    value_columns = ["value"] if named else [c for c in columns if c != "t"]
    by_name: dict[str, list[Point]] = {}
    for row in rows:
        t = row[t_index]
        if isinstance(t, date) and not isinstance(t, datetime):
            t = datetime(t.year, t.month, t.day, tzinfo=zone)
        elif isinstance(t, datetime):
            t = (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(zone)
        elif isinstance(t, int | float):
            t = datetime.fromtimestamp(t, tz=UTC).astimezone(zone)
        else:
            raise WidgetDataError("bad_series", "the t column must be a date, a datetime or unix seconds")
        for column in value_columns:
            name = str(row[columns.index("series")]) if named else column
            value = row[columns.index(column)]
            by_name.setdefault(name, []).append(Point(t=t, value=float(value or 0)))
    return [
        Series(name=name, points=sorted(points, key=lambda p: p.t), total=float(sum(p.value for p in points)))
        for name, points in by_name.items()
    ]


def _analysis(
    source: AnalysisSource, window: TimeWindow, filters: DashboardFilters, ctx: WidgetContext, common: dict[str, Any]
) -> WidgetData:
    saved = ctx.saved_query(source.saved_query_id)
    if saved is None:
        raise WidgetDataError("not_found", f"saved analysis {source.saved_query_id} not found")
    if saved.kind == "sql":
        return _sql(str(saved.definition.get("sql", "")), window, ctx, common)
    runner = ANALYSIS_RUNNERS.get(saved.kind)
    if runner is None:
        raise WidgetDataError("unsupported_analysis", f"no runner for analyses of kind {saved.kind!r}")
    return WidgetData.model_validate({**common, **runner(saved.definition, window, list(filters.filters), ctx.client)})
