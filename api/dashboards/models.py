"""The API contract of dashboards, widgets and shares (pydantic models)."""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from api.deps import RowRef
from api.metrics_query import (
    Comparison,
    DimensionFilter,
    Granularity,
    RelativeRange,
    Series,
)

T = TypeVar("T")
#: Deliberately loose: one "@", something on each side, no spaces (delivery is not our job).
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+$"
#: A range bound of a dashboard: a local day, or an instant with its offset. Stored and returned
#: as given, so no naive date-time (not RFC 3339, no client could read it back); a naive local
#: midnight reads as that day.
DayOrInstant = AwareDatetime | date


class Page(BaseModel, Generic[T]):
    """One page of a list: ``items`` from ``offset``, at most ``limit`` of ``total``."""

    items: list[T]
    total: int
    limit: int
    offset: int


class WidgetType(StrEnum):
    """How a widget draws its data."""

    metric_card = "metric_card"
    line = "line"
    bar = "bar"
    pie = "pie"
    table = "table"
    funnel = "funnel"
    geo_map = "geo_map"
    heatmap = "heatmap"
    sparkline = "sparkline"


class Permission(StrEnum):
    """What a share allows."""

    view = "view"
    edit = "edit"


class Position(BaseModel):
    """Where a widget sits on the dashboard grid (columns and rows)."""

    x: int = Field(0, ge=0, le=1000)
    y: int = Field(0, ge=0, le=10000)
    w: int = Field(4, ge=1, le=48)
    h: int = Field(3, ge=1, le=100)


class MetricSource(BaseModel):
    """A catalogue metric, optionally broken down and compared."""

    kind: Literal["metric"] = "metric"
    metric: str = Field(min_length=1, max_length=100, examples=["dau"])
    granularity: Granularity | None = Field(None, description="Default: the dashboard's granularity.")
    breakdown: str | None = None
    top_n: int = Field(5, ge=1, le=50)
    filters: list[DimensionFilter] = Field(default_factory=list, max_length=20)
    compare: Comparison | None = None


class MetricsSource(BaseModel):
    """Several catalogue metrics on one chart, one series each (e.g. revenue by source)."""

    kind: Literal["metrics"] = "metrics"
    metrics: list[str] = Field(min_length=1, max_length=10)
    labels: list[str] | None = Field(None, description="Series names, one per metric (default: metric names).")
    granularity: Granularity | None = None
    filters: list[DimensionFilter] = Field(default_factory=list, max_length=20)


class SqlSource(BaseModel):
    """A read-only ClickHouse query. It may use the placeholders ``{start:DateTime64(3, 'UTC')}``,
    ``{end:DateTime64(3, 'UTC')}``, ``{tz:String}`` and ``{week_start:UInt8}``.

    A result with a ``t`` column becomes time series (one per ``series`` value, or one per
    numeric column); anything else is returned as table rows.
    """

    kind: Literal["sql"] = "sql"
    sql: str = Field(min_length=1, max_length=20000)


class AnalysisSource(BaseModel):
    """A saved analysis (``saved_queries`` row) computed by its analysis runner."""

    kind: Literal["analysis"] = "analysis"
    saved_query_id: RowRef


DataSource = Annotated[MetricSource | MetricsSource | SqlSource | AnalysisSource, Field(discriminator="kind")]


class WidgetIn(BaseModel):
    """A widget as created or replaced."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=200)
    widget_type: WidgetType
    data_source: DataSource
    config: dict[str, Any] = Field(default_factory=dict, description="Chart options (colours, axes, units...).")
    position: Position = Field(default_factory=lambda: Position())
    refresh_seconds: int = Field(300, ge=10, le=86400)


class WidgetPatch(BaseModel):
    """Fields of a widget to change."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, min_length=1, max_length=200)
    widget_type: WidgetType | None = None
    data_source: DataSource | None = None
    config: dict[str, Any] | None = None
    position: Position | None = None
    refresh_seconds: int | None = Field(None, ge=10, le=86400)


class WidgetOut(BaseModel):
    """A widget as stored."""

    id: int
    dashboard_id: int
    title: str
    widget_type: WidgetType
    data_source: dict[str, Any]
    config: dict[str, Any]
    position: Position
    refresh_seconds: int
    created_at: datetime
    updated_at: datetime


class DashboardFilters(BaseModel):
    """Filters every widget of a dashboard is computed with (a request may override them)."""

    model_config = ConfigDict(extra="forbid")

    range: RelativeRange | None = RelativeRange.last_30_days
    start: DayOrInstant | None = Field(None, description="A local date or an instant with its offset.")
    end: DayOrInstant | None = Field(None, description="Exclusive: a local date or an instant with its offset.")
    granularity: Granularity = Granularity.day
    filters: list[DimensionFilter] = Field(default_factory=list, max_length=20)
    timezone: str | None = None


class DashboardIn(BaseModel):
    """A dashboard as created."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=5000)
    is_public: bool = False
    layout: dict[str, Any] = Field(default_factory=dict, description="Grid options (columns, row height...).")
    default_filters: DashboardFilters = Field(default_factory=DashboardFilters)
    widgets: list[WidgetIn] = Field(default_factory=list, max_length=100)


class DashboardPatch(BaseModel):
    """Fields of a dashboard to change."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, max_length=5000)
    is_public: bool | None = None
    layout: dict[str, Any] | None = None
    default_filters: DashboardFilters | None = None


class DuplicateIn(BaseModel):
    """Options of a duplicate."""

    name: str | None = Field(None, min_length=1, max_length=200)


class DashboardSummary(BaseModel):
    """A dashboard in a list."""

    id: int
    name: str
    description: str
    owner_email: str
    is_public: bool
    prebuilt: str | None
    permission: Literal["owner", "edit", "view"]
    widget_count: int
    updated_at: datetime


class DashboardOut(DashboardSummary):
    """A dashboard with its layout, filters and widgets."""

    layout: dict[str, Any]
    default_filters: DashboardFilters
    widgets: list[WidgetOut]
    created_at: datetime


class ShareIn(BaseModel):
    """Share a dashboard with a person (by email) at view or edit permission."""

    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=320, pattern=EMAIL_PATTERN, examples=["ana@example.org"])
    permission: Permission = Permission.view

    @field_validator("email")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class ShareOut(BaseModel):
    """A share as stored."""

    id: int
    dashboard_id: int
    email: str
    user_id: int | None
    permission: Permission
    created_at: datetime


class TableData(BaseModel):
    """Rows of a table-shaped result."""

    columns: list[str]
    rows: list[list[Any]]


class WidgetData(BaseModel):
    """A widget's data, chart-ready: time series, table rows, or one value (metric cards)."""

    widget_id: int
    widget_type: WidgetType
    kind: Literal["series", "table", "value"]
    start: datetime
    end: datetime
    timezone: str
    granularity: Granularity
    unit: str | None = None
    series: list[Series] | None = None
    table: TableData | None = None
    value: float | None = None
    previous_value: float | None = None
    change: float | None = None
    computed_at: datetime | None = Field(None, description="When this result was computed.")
    cached: bool = Field(False, description="Served from the cache (younger than the widget's refresh interval).")
