"""Metrics over time: any catalogue metric, bucketed by hour/day/week/month in the reporting timezone.

A query names a metric, a time range (absolute, or relative like the last 7 days), a
granularity, dimension filters, an optional breakdown by one dimension (top N and
"Other"), and an optional comparison period (the previous period, or the same period
a year earlier). The answer is chart-ready: ``series -> points -> {t, value}``.

Where the answer comes from
---------------------------
``metric_snapshots`` (written by the stream workers and the batch recompute) hold one
value per (metric, period, period_start, dimensions). A bucket is read from there when
the request has no filters and no breakdown, the bucket lies wholly inside the requested
range, and a snapshot for the total (``dimensions_key = ''``) exists. Every other bucket
is computed from raw events (``events_resolved``: deduplicated, identity-stitched) with the
same definition, so both roads give the same number.

Why range totals are their own query: distinct-user metrics (DAU, WAU) and ratios are
not additive, so a range total is never the sum of its buckets unless the metric is a
count or a sum.

Never is user input formatted into SQL: values are server-side parameters
(``{name:Type}``), and the only identifiers emitted come from fixed allow-lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator, model_validator

# --- the catalogue, as this module reads it -------------------------------------------------------


class Aggregation(StrEnum):
    """How a metric folds the events it selects into one number."""

    count = "count"  # type: ignore[assignment]  # (shadows str.count, harmlessly)
    sum = "sum"
    avg = "avg"
    distinct_users = "distinct_users"
    distinct_values = "distinct_values"
    ratio = "ratio"


@dataclass(frozen=True)
class CatalogueMetric:
    """One metric definition in the shape the query engine compiles to SQL.

    ``events`` selects rows by event name; ``where`` narrows them further; ``value_property``
    is the summed/averaged property (``sum``, ``avg``) or the counted dimension
    (``distinct_values``). A ratio is ``scale * numerator / denominator`` of two other metrics.
    """

    name: str
    aggregation: Aggregation
    events: tuple[str, ...] = ()
    value_property: str | None = None
    #: For sums over several events with a different property each (revenue = ad revenue + fees ...).
    values_by_event: tuple[tuple[str, str], ...] = ()
    where: tuple[DimensionFilter, ...] = ()
    numerator: str | None = None
    denominator: str | None = None
    scale: float = 1.0
    unit: str = "count"
    description: str = ""
    dimensions: tuple[str, ...] = ()

    @property
    def additive(self) -> bool:
        """Whether the metric over a range is the sum of the metric over its buckets."""
        return self.aggregation in (Aggregation.count, Aggregation.sum)


class UnknownMetric(LookupError):
    """A metric name the catalogue does not define."""


class MetricCatalogue:
    """Metric definitions by name."""

    def __init__(self, metrics: Sequence[CatalogueMetric]) -> None:
        self._metrics = {m.name: m for m in metrics}

    def get(self, name: str) -> CatalogueMetric:
        """The definition of ``name``; :class:`UnknownMetric` if there is none."""
        try:
            return self._metrics[name]
        except KeyError:
            raise UnknownMetric(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._metrics

    def all(self) -> list[CatalogueMetric]:
        """Every definition, by name."""
        return [self._metrics[n] for n in sorted(self._metrics)]


# --- request / response models ------------------------------------------------------------------


class Granularity(StrEnum):
    """Bucket size of a time series."""

    hour = "hour"
    day = "day"
    week = "week"
    month = "month"


class RelativeRange(StrEnum):
    """Ranges relative to the current local day; "last N days" includes today (so far)."""

    today = "today"
    yesterday = "yesterday"
    last_7_days = "last_7_days"
    last_14_days = "last_14_days"
    last_30_days = "last_30_days"
    last_90_days = "last_90_days"
    last_365_days = "last_365_days"
    this_month = "this_month"
    last_month = "last_month"


class Comparison(StrEnum):
    """Which period a result is compared with."""

    previous_period = "previous_period"
    previous_year = "previous_year"


FilterOp = Literal["eq", "neq", "in", "not_in", "contains"]

#: Dimensions a metric can be filtered or broken down by, and the column each reads.
DIMENSION_COLUMNS: dict[str, str] = {
    "community": "community",
    "category": "category",
    "country": "country",
    "device_type": "device_type",
    "device": "device_type",
    "utm_source": "utm_source",
    "currency": "currency",
    "project_id": "project_id",
    "event_name": "event_name",
    "event_type": "event_type",
}
#: Dimensions read from the context JSON (not materialised): name -> JSON path.
CONTEXT_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "utm_medium": ("campaign", "medium"),
    "utm_campaign": ("campaign", "name"),
    "browser": ("browser", "name"),
    "os": ("os", "name"),
}
_PROPERTY_DIMENSION = re.compile(r"^properties\.([A-Za-z0-9_\-]{1,64})$")
MAX_BUCKETS = 5000


def dimension_names() -> list[str]:
    """Every dimension name accepted (besides ``properties.<key>``)."""
    return sorted([*DIMENSION_COLUMNS, *CONTEXT_DIMENSIONS])


class DimensionFilter(BaseModel):
    """One condition on a dimension: equals, not equals, in, not in, or contains (case-insensitive)."""

    dimension: str = Field(min_length=1, max_length=80, examples=["country"])
    op: FilterOp = "eq"
    value: str | list[str] = Field(examples=["US"])

    @field_validator("dimension")
    @classmethod
    def _known_dimension(cls, value: str) -> str:
        if value not in DIMENSION_COLUMNS and value not in CONTEXT_DIMENSIONS and not _PROPERTY_DIMENSION.match(value):
            raise ValueError(f"unknown dimension {value!r}; use one of {dimension_names()} or properties.<key>")
        return value

    @model_validator(mode="after")
    def _value_shape(self) -> DimensionFilter:
        if self.op in ("in", "not_in"):
            if isinstance(self.value, str):
                self.value = [self.value]
            if len(self.value) > 1000:
                raise ValueError("at most 1000 values")
        elif not isinstance(self.value, str):
            raise ValueError(f"operator {self.op} takes one string value")
        return self


class MetricQuery(BaseModel):
    """What to compute: metric over a time range, bucketed, filtered, broken down, compared."""

    range: RelativeRange | None = Field(None, description="A relative range; ignored when start is given.")
    start: datetime | date | None = Field(
        None, description="Range start: a local date (midnight in the reporting timezone) or an instant."
    )
    end: datetime | date | None = Field(
        None, description="Range end, exclusive: a local date (its midnight) or an instant. Default: now."
    )
    granularity: Granularity = Granularity.day
    filters: list[DimensionFilter] = Field(default_factory=list, max_length=20)
    breakdown: str | None = Field(None, description="Break the series down by this dimension.")
    top_n: int = Field(5, ge=1, le=50, description="Breakdown: this many largest values, the rest as Other.")
    compare: Comparison | None = None
    timezone: str | None = Field(None, description="IANA timezone; default: the reporting timezone setting.")
    whole_buckets: bool = Field(
        False, description="Widen the range to whole buckets (a weekly chart then shows whole weeks)."
    )
    include_total: bool = Field(
        True, description="Compute range totals of non-additive metrics (people, averages, ratios): one more query."
    )

    @field_validator("breakdown")
    @classmethod
    def _known_breakdown(cls, value: str | None) -> str | None:
        if value is not None and value not in dimension_names() and not _PROPERTY_DIMENSION.match(value):
            raise ValueError(f"unknown dimension {value!r}; use one of {dimension_names()} or properties.<key>")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown timezone {value!r}") from exc
        return value


class Point(BaseModel):
    """One bucket: its start (ISO 8601 with the local offset) and value."""

    t: datetime
    value: float


class Series(BaseModel):
    """A named line of points (one per bucket), with the range total."""

    name: str
    points: list[Point]
    total: float | None = Field(description="The metric over the whole range (null when not asked for).")


class ComparisonResult(BaseModel):
    """The same query over the comparison period, with the change of the totals."""

    kind: Comparison
    start: datetime
    end: datetime
    series: list[Series]
    change: dict[str, float | None] = Field(description="Per series: (current - previous) / previous.")


class MetricResult(BaseModel):
    """A metric over time, chart-ready."""

    metric: str
    unit: str
    granularity: Granularity
    timezone: str
    start: datetime
    end: datetime
    series: list[Series]
    source: Literal["snapshots", "raw", "mixed"]
    comparison: ComparisonResult | None = None


class MetricInfo(BaseModel):
    """A catalogue entry as the API shows it."""

    name: str
    description: str
    unit: str
    aggregation: str
    dimensions: list[str]


class QueryError(ValueError):
    """A request that is well-formed but cannot be answered (e.g. an unknown metric, an empty range)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- time ranges ---------------------------------------------------------------------------------

#: What ``DateTime64(3)`` holds: instants outside it cannot even be sent to ClickHouse as parameters.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(2262, 1, 1, tzinfo=UTC)


def storable(start: datetime, end: datetime) -> bool:
    """Whether ClickHouse timestamps hold every instant from ``start`` to ``end``."""
    return start >= EARLIEST and end <= LATEST


@dataclass(frozen=True)
class TimeWindow:
    """A half-open range ``[start, end)`` of aware instants, with the zone its calendar follows."""

    start: datetime
    end: datetime
    zone: ZoneInfo


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone)


def _as_instant(value: datetime | date, zone: ZoneInfo) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=zone)
    return _local_midnight(value, zone)


def _add_months(day: date, months: int) -> date:
    """``day`` moved by whole months, clamped to the target month's length (Feb 29 -> Feb 28)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    following = date(year + month // 12, month % 12 + 1, 1)
    last = (following - timedelta(days=1)).day
    return date(year, month, min(day.day, last))


def resolve_window(query: MetricQuery, zone: ZoneInfo, now: datetime) -> TimeWindow:
    """The instants a query covers. Relative ranges are whole local days ending with today."""
    if query.start is not None:
        start = _as_instant(query.start, zone)
        end = _as_instant(query.end, zone) if query.end is not None else now
    else:
        today = now.astimezone(zone).date()
        tomorrow = today + timedelta(days=1)
        relative = query.range or RelativeRange.last_30_days
        match relative:
            case RelativeRange.today:
                first, last = today, tomorrow
            case RelativeRange.yesterday:
                first, last = today - timedelta(days=1), today
            case RelativeRange.this_month:
                first, last = today.replace(day=1), tomorrow
            case RelativeRange.last_month:
                last = today.replace(day=1)
                first = _add_months(last, -1)
            case _:
                days = int(relative.value.split("_")[1])
                first, last = tomorrow - timedelta(days=days), tomorrow
        start, end = _local_midnight(first, zone), _local_midnight(last, zone)
    if end <= start:
        raise QueryError("empty_range", "the range end must be after its start")
    return _stored_instants(lambda: TimeWindow(start.astimezone(UTC), end.astimezone(UTC), zone), "the range")


def _stored_instants(make: Callable[[], TimeWindow], what: str) -> TimeWindow:
    """The window ``make`` builds, if its instants exist and ClickHouse timestamps hold them (else a 400).

    Dates near year 1 or 9999 overflow once moved to UTC or a year back; the API says so
    rather than failing with a 500.
    """
    try:
        window = make()
    except (OverflowError, ValueError):
        window = None
    if window is None or not storable(window.start, window.end):
        raise QueryError("out_of_range", f"{what} must lie within {EARLIEST.year}..{LATEST.year} (UTC)")
    return window


def _is_local_midnight(instant: datetime, zone: ZoneInfo) -> bool:
    local = instant.astimezone(zone)
    return (local.hour, local.minute, local.second, local.microsecond) == (0, 0, 0, 0)


def comparison_window(window: TimeWindow, kind: Comparison) -> TimeWindow:
    """The period a window is compared with (a 400 when it would leave the instants ClickHouse holds).

    - previous period, whole calendar months (e.g. March): the same number of months before
      (February, whatever its length);
    - previous period, whole local days: the same number of days right before (DST-safe);
    - previous period, anything else: the same duration right before;
    - previous year: the same local dates a year earlier (Feb 29 maps to Feb 28).
    """
    return _stored_instants(lambda: _comparison_window(window, kind), "the comparison period")


def _comparison_window(window: TimeWindow, kind: Comparison) -> TimeWindow:
    zone = window.zone
    start_local, end_local = window.start.astimezone(zone), window.end.astimezone(zone)
    whole_days = _is_local_midnight(window.start, zone) and _is_local_midnight(window.end, zone)
    if kind is Comparison.previous_year:
        if whole_days:
            first = _add_months(start_local.date(), -12)
            last = _add_months(end_local.date(), -12)
            return TimeWindow(
                _local_midnight(first, zone).astimezone(UTC), _local_midnight(last, zone).astimezone(UTC), zone
            )
        moved = datetime.combine(_add_months(start_local.date(), -12), start_local.timetz())
        return TimeWindow(moved.astimezone(UTC), (moved + (window.end - window.start)).astimezone(UTC), zone)
    if whole_days:
        first, last = start_local.date(), end_local.date()
        if first.day == 1 and last.day == 1:
            months = (last.year - first.year) * 12 + last.month - first.month
            previous_first = _add_months(first, -months)
        else:
            previous_first = first - (last - first)
        return TimeWindow(
            _local_midnight(previous_first, zone).astimezone(UTC), _local_midnight(first, zone).astimezone(UTC), zone
        )
    duration = window.end - window.start
    return TimeWindow(window.start - duration, window.start, zone)


def bucket_starts(window: TimeWindow, granularity: Granularity, week_start: int) -> list[datetime]:
    """The start instant of every bucket that intersects the window (the first may begin before it)."""
    zone = window.zone
    out: list[datetime] = []
    if granularity is Granularity.hour:
        local = window.start.astimezone(zone)
        cursor = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        if window.end - cursor > timedelta(hours=MAX_BUCKETS):  # counted before any is made
            raise _too_many_buckets()
        while cursor < window.end:
            out.append(cursor)
            cursor += timedelta(hours=1)
        return out
    day = window.start.astimezone(zone).date()
    if granularity is Granularity.week:
        day -= timedelta(days=(day.isoweekday() - week_start) % 7)
    elif granularity is Granularity.month:
        day = day.replace(day=1)
    while True:
        instant = _local_midnight(day, zone).astimezone(UTC)
        if instant >= window.end:
            return out
        out.append(instant)
        if len(out) > MAX_BUCKETS:
            raise _too_many_buckets()
        if granularity is Granularity.day:
            day += timedelta(days=1)
        elif granularity is Granularity.week:
            day += timedelta(days=7)
        else:
            day = _add_months(day, 1)


def _too_many_buckets() -> QueryError:
    return QueryError("too_many_buckets", f"more than {MAX_BUCKETS} buckets: choose a coarser granularity")


def bucket_end(start: datetime, granularity: Granularity, zone: ZoneInfo) -> datetime:
    """The end (exclusive) of the bucket starting at ``start``."""
    if granularity is Granularity.hour:
        return start + timedelta(hours=1)
    day = start.astimezone(zone).date()
    following = {
        Granularity.day: day + timedelta(days=1),
        Granularity.week: day + timedelta(days=7),
        Granularity.month: _add_months(day, 1),
    }[granularity]
    return _local_midnight(following, zone).astimezone(UTC)


# --- SQL ------------------------------------------------------------------------------------------


@dataclass
class ParameterisedSQL:
    """SQL text with ``{name:Type}`` placeholders and the values that fill them."""

    parameters: dict[str, Any] = field(default_factory=dict)

    def param(self, value: Any, ch_type: str) -> str:
        """A placeholder for ``value``; the value travels beside the SQL, never inside it."""
        name = f"p{len(self.parameters)}"
        self.parameters[name] = value
        return f"{{{name}:{ch_type}}}"


def _dimension_expr(sql: ParameterisedSQL, dimension: str) -> str:
    column = DIMENSION_COLUMNS.get(dimension)
    if column is not None:
        return f"toString({column})"
    path = CONTEXT_DIMENSIONS.get(dimension)
    if path is not None:  # constants from the allow-list above, never user text
        return "JSONExtractString(context, " + ", ".join(f"'{part}'" for part in path) + ")"
    match = _PROPERTY_DIMENSION.match(dimension)
    if match is None:  # validated by the models already; defensive for direct callers
        raise QueryError("unknown_dimension", f"unknown dimension {dimension!r}")
    return f"JSONExtractString(properties, {sql.param(match.group(1), 'String')})"


def _filter_expr(sql: ParameterisedSQL, f: DimensionFilter) -> str:
    column = _dimension_expr(sql, f.dimension)
    if f.op == "eq":
        return f"{column} = {sql.param(f.value, 'String')}"
    if f.op == "neq":
        return f"{column} != {sql.param(f.value, 'String')}"
    if f.op == "in":
        return f"{column} IN {sql.param(list(f.value), 'Array(String)')}"
    if f.op == "not_in":
        return f"{column} NOT IN {sql.param(list(f.value), 'Array(String)')}"
    return f"positionCaseInsensitiveUTF8({column}, {sql.param(f.value, 'String')}) > 0"


def _bucket_expr(granularity: Granularity, sql: ParameterisedSQL, tz: str, week_start: int) -> str:
    """Unix seconds of the local bucket start (the same boundaries as ``bucket_starts``)."""
    zone = sql.param(tz, "String")
    local_day = f"toDate(timestamp, {zone})"
    match granularity:
        case Granularity.hour:
            return f"toUnixTimestamp(toStartOfHour(timestamp, {zone}))"
        case Granularity.day:
            return f"toUnixTimestamp(toDateTime({local_day}, {zone}))"
        case Granularity.week:
            shift = sql.param(week_start, "UInt8")
            return f"toUnixTimestamp(toDateTime({local_day} - ((toDayOfWeek({local_day}) + 7 - {shift}) % 7), {zone}))"
        case Granularity.month:
            return f"toUnixTimestamp(toDateTime(toStartOfMonth({local_day}), {zone}))"
    raise AssertionError(granularity)


def _aggregate_expr(sql: ParameterisedSQL, metric: CatalogueMetric, catalogue: MetricCatalogue) -> tuple[str, str]:
    """``(aggregate expression, row condition)`` of a metric over ``events_resolved``."""
    if metric.aggregation is Aggregation.ratio:
        numerator = catalogue.get(metric.numerator or "")
        denominator = catalogue.get(metric.denominator or "")
        num, num_cond = _aggregate_expr(sql, numerator, catalogue)
        den, den_cond = _aggregate_expr(sql, denominator, catalogue)
        scale = sql.param(metric.scale, "Float64")
        return (
            f"if(({den}) = 0, 0, {scale} * ({num}) / ({den}))",
            f"(({num_cond}) OR ({den_cond}))",
        )
    conditions = [f"event_name IN {sql.param(list(metric.events), 'Array(String)')}"] if metric.events else ["1"]
    for f in metric.where:
        conditions.append(_filter_expr(sql, f))
    cond = " AND ".join(conditions)
    value = _value_expr(sql, metric.value_property)
    if metric.values_by_event:
        branches = ", ".join(
            f"event_name = {sql.param(event, 'String')}, {_value_expr(sql, prop)}"
            for event, prop in metric.values_by_event
        )
        value = f"multiIf({branches}, 0)"
    match metric.aggregation:
        case Aggregation.count:
            return f"toFloat64(countIf({cond}))", cond
        case Aggregation.sum:
            return f"toFloat64(sumIf({value}, {cond}))", cond
        case Aggregation.avg:
            return f"toFloat64(ifNotFinite(avgIf({value}, {cond}), 0))", cond
        case Aggregation.distinct_users:
            return f"toFloat64(uniqExactIf(person_id, {cond}))", cond
        case Aggregation.distinct_values:
            return f"toFloat64(uniqExactIf({_dimension_expr(sql, metric.value_property or '')}, {cond}))", cond
    raise AssertionError(metric.aggregation)


def _value_expr(sql: ParameterisedSQL, prop: str | None) -> str:
    if prop is None:
        return "1"
    if prop == "amount":
        return "ifNull(amount, 0)"
    return f"JSONExtractFloat(properties, {sql.param(prop, 'String')})"


@dataclass
class MetricPlan:
    """The pieces of one metric's raw-events query, shared by bucketed, total and top-N queries.

    ``source`` is what the query reads ``FROM``: the deduplicated events, joined to the
    identity links only when the metric counts people (the join is the expensive part).
    """

    sql: ParameterisedSQL
    aggregate: str
    where: str
    source: str


#: The event columns a metric query may read (materialised ones are not in ``SELECT *``).
_EVENT_COLUMNS = (
    "event_id, event_type, event_name, user_id, anonymous_id, timestamp, properties, context, amount, currency, "
    "project_id, community, category, country, device_type, utm_source"
)


def _needs_person(metric: CatalogueMetric, catalogue: MetricCatalogue) -> bool:
    if metric.aggregation is Aggregation.ratio:
        return any(
            _needs_person(catalogue.get(part), catalogue) for part in (metric.numerator or "", metric.denominator or "")
        )
    return metric.aggregation is Aggregation.distinct_users


def _stitched_events(start: str, end: str) -> str:
    """Events in ``[start, end)`` with ``person_id`` as ``events_resolved`` defines it.

    Same rows and persons as the view, but the identity links are read only for the anonymous
    ids that occur without a user id in the range (the view joins every link there is).
    """
    in_range = f"timestamp >= {start} AND timestamp < {end}"
    return (
        "(SELECT e.*, multiIf(e.user_id != '', e.user_id, i.user_id != '', i.user_id, e.anonymous_id) AS person_id "
        f"FROM (SELECT {_EVENT_COLUMNS} FROM events FINAL WHERE {in_range}) AS e "
        "LEFT JOIN (SELECT anonymous_id, argMin(user_id, linked_at) AS user_id FROM identities "
        f"WHERE anonymous_id IN (SELECT anonymous_id FROM events WHERE user_id = '' AND {in_range}) "
        "GROUP BY anonymous_id) AS i ON i.anonymous_id = e.anonymous_id)"
    )


def _plan(
    metric: CatalogueMetric, catalogue: MetricCatalogue, window: TimeWindow, filters: Sequence[DimensionFilter]
) -> MetricPlan:
    sql = ParameterisedSQL()
    aggregate, condition = _aggregate_expr(sql, metric, catalogue)
    start = sql.param(window.start.replace(tzinfo=None), "DateTime64(3, 'UTC')")
    end = sql.param(window.end.replace(tzinfo=None), "DateTime64(3, 'UTC')")
    where = [f"timestamp >= {start}", f"timestamp < {end}", f"({condition})"]
    where += [_filter_expr(sql, f) for f in filters]
    source = _stitched_events(start, end) if _needs_person(metric, catalogue) else "events FINAL"
    return MetricPlan(sql, aggregate, " AND ".join(where), source)


# --- running queries -----------------------------------------------------------------------------


OTHER = "Other"
_DATETIME_ARRAY = "Array(DateTime64(3, 'UTC'))"
_OTHER_KEY = "\x00other"


class MetricsEngine:
    """Answers metric queries from ``metric_snapshots`` and ``events_resolved`` in one ClickHouse database."""

    def __init__(
        self,
        client: Any,
        catalogue: MetricCatalogue,
        timezone: str = "UTC",
        week_start: int = 1,
        use_snapshots: bool = True,
    ) -> None:
        self.use_snapshots = use_snapshots
        self.client = client
        self.catalogue = catalogue
        self.timezone = timezone
        self.week_start = week_start

    def run(self, metric_name: str, query: MetricQuery, now: datetime | None = None) -> MetricResult:
        """Answer ``query`` for the catalogue metric ``metric_name``."""
        metric = self.catalogue.get(metric_name)
        zone = ZoneInfo(query.timezone or self.timezone)
        now = now or datetime.now(UTC)
        window = resolve_window(query, zone, now)
        if query.whole_buckets:
            starts = bucket_starts(window, query.granularity, self.week_start)
            window = TimeWindow(starts[0], bucket_end(starts[-1], query.granularity, zone), zone)
        series, source = self._series(metric, query, window)
        comparison = None
        if query.compare is not None:
            previous = comparison_window(window, query.compare)
            previous_series, _ = self._series(metric, query, previous)
            totals = {s.name: s.total for s in previous_series}
            change: dict[str, float | None] = {}
            for s in series:
                before = totals.get(s.name)
                change[s.name] = None if not before or s.total is None else (s.total - before) / before
            comparison = ComparisonResult(
                kind=query.compare, start=previous.start, end=previous.end, series=previous_series, change=change
            )
        return MetricResult(
            metric=metric.name,
            unit=metric.unit,
            granularity=query.granularity,
            timezone=zone.key,
            start=window.start.astimezone(zone),
            end=window.end.astimezone(zone),
            series=series,
            source=source,
            comparison=comparison,
        )

    def total(self, metric_name: str, window: TimeWindow, filters: Sequence[DimensionFilter] = ()) -> float:
        """The metric over the whole window (one number)."""
        metric = self.catalogue.get(metric_name)
        plan = _plan(metric, self.catalogue, window, filters)
        rows = self._query(f"SELECT {plan.aggregate} FROM {plan.source} WHERE {plan.where}", plan.sql)
        return float(rows[0][0]) if rows else 0.0

    # -- internals --

    def _query(self, text: str, sql: ParameterisedSQL) -> list[tuple[Any, ...]]:
        return list(self.client.query(text, parameters=sql.parameters).result_rows)

    def _series(
        self, metric: CatalogueMetric, query: MetricQuery, window: TimeWindow
    ) -> tuple[list[Series], Literal["snapshots", "raw", "mixed"]]:
        starts = bucket_starts(window, query.granularity, self.week_start)
        if query.breakdown is not None:
            return self._breakdown(metric, query, window, starts), "raw"
        values: dict[datetime, float] = {}
        from_snapshots: set[datetime] = set()
        if self.use_snapshots and not query.filters:
            values = self._snapshot_values(metric, query.granularity, window, starts)
            from_snapshots = set(values)
        missing = [s for s in starts if s not in values]
        if missing:
            values.update(self._raw_values(metric, query, window, missing))
        total = self._range_total(metric, query, window, values) if metric.additive or query.include_total else None
        points = [Point(t=s.astimezone(window.zone), value=values.get(s, 0.0)) for s in starts]
        source: Literal["snapshots", "raw", "mixed"] = (
            "raw" if not from_snapshots else ("snapshots" if not missing else "mixed")
        )
        return [Series(name=metric.name, points=points, total=total)], source

    def _range_total(
        self, metric: CatalogueMetric, query: MetricQuery, window: TimeWindow, values: dict[datetime, float]
    ) -> float:
        if metric.additive:
            return float(sum(values.values()))
        return self.total(metric.name, window, query.filters)

    def _snapshot_values(
        self, metric: CatalogueMetric, granularity: Granularity, window: TimeWindow, starts: list[datetime]
    ) -> dict[datetime, float]:
        """Snapshot values of the buckets that lie wholly inside the window."""
        inside = [s for s in starts if s >= window.start and bucket_end(s, granularity, window.zone) <= window.end]
        if not inside:
            return {}
        sql = ParameterisedSQL()
        starts_param = sql.param([s.replace(tzinfo=None) for s in inside], _DATETIME_ARRAY)
        text = (
            "SELECT toUnixTimestamp(period_start), value FROM metric_snapshots FINAL "
            f"WHERE metric_type = {sql.param(metric.name, 'String')} "
            f"AND period = {sql.param(granularity.value, 'String')} AND dimensions_key = '' "
            f"AND period_start IN {starts_param}"
        )
        wanted = set(inside)
        out: dict[datetime, float] = {}
        for ts, value in self._query(text, sql):
            instant = datetime.fromtimestamp(int(ts), tz=UTC)
            if instant in wanted:
                out[instant] = float(value)
        return out

    def _raw_values(
        self, metric: CatalogueMetric, query: MetricQuery, window: TimeWindow, buckets: list[datetime]
    ) -> dict[datetime, float]:
        # Only the span of the missing buckets is scanned (clipped to the window).
        first = max(window.start, buckets[0])
        last = min(window.end, bucket_end(buckets[-1], query.granularity, window.zone))
        plan = _plan(metric, self.catalogue, TimeWindow(first, last, window.zone), query.filters)
        bucket = _bucket_expr(query.granularity, plan.sql, window.zone.key, self.week_start)
        rows = self._query(
            f"SELECT {bucket} AS t, {plan.aggregate} AS v FROM {plan.source} WHERE {plan.where} GROUP BY t",
            plan.sql,
        )
        wanted = set(buckets)
        out: dict[datetime, float] = {}
        for ts, value in rows:
            instant = datetime.fromtimestamp(int(ts), tz=UTC)
            if instant in wanted:
                out[instant] = float(value)
        return out

    def _breakdown(
        self, metric: CatalogueMetric, query: MetricQuery, window: TimeWindow, starts: list[datetime]
    ) -> list[Series]:
        assert query.breakdown is not None
        plan = _plan(metric, self.catalogue, window, query.filters)
        dim = _dimension_expr(plan.sql, query.breakdown)
        ranked = self._query(
            f"SELECT {dim} AS d, {plan.aggregate} AS v FROM {plan.source} WHERE {plan.where} "
            f"GROUP BY d ORDER BY v DESC, d LIMIT {int(query.top_n) + 1}",
            plan.sql,
        )
        top = [row[0] for row in ranked[: query.top_n]]
        has_other = len(ranked) > query.top_n
        top_param = plan.sql.param(top, "Array(String)")
        other_param = plan.sql.param(_OTHER_KEY, "String")
        group = f"if({dim} IN {top_param}, {dim}, {other_param})"
        bucket = _bucket_expr(query.granularity, plan.sql, window.zone.key, self.week_start)
        rows = self._query(
            f"SELECT {bucket} AS t, {group} AS g, {plan.aggregate} AS v FROM {plan.source} "
            f"WHERE {plan.where} GROUP BY t, g",
            plan.sql,
        )
        totals = self._query(
            f"SELECT {group} AS g, {plan.aggregate} AS v FROM {plan.source} WHERE {plan.where} GROUP BY g",
            plan.sql,
        )
        by_group: dict[str, dict[datetime, float]] = {}
        for ts, g, value in rows:
            by_group.setdefault(g, {})[datetime.fromtimestamp(int(ts), tz=UTC)] = float(value)
        total_of = {g: float(v) for g, v in totals}
        names = top + ([_OTHER_KEY] if has_other else [])
        out = []
        for g in names:
            values = by_group.get(g, {})
            out.append(
                Series(
                    name=OTHER if g == _OTHER_KEY else (g or "(none)"),
                    points=[Point(t=s.astimezone(window.zone), value=values.get(s, 0.0)) for s in starts],
                    total=total_of.get(g, 0.0),
                )
            )
        return out


# --- the metric catalogue ------------------------------------------------------------------------------
#
# The catalogue is ``streams.catalogue`` (one definition per metric, shared with the stream workers and
# the batch recompute), read through ``from_stream_definition``. The API adds a few chart-only metrics
# (API_METRICS) that the streams do not snapshot; they are always computed from raw events.


def _m(
    name: str, aggregation: Aggregation, *events: str, unit: str = "count", description: str = "", **kwargs: Any
) -> CatalogueMetric:
    return CatalogueMetric(
        name=name,
        aggregation=aggregation,
        events=events,
        unit=unit,
        description=description,
        dimensions=tuple(dimension_names()),
        **kwargs,
    )


_A = Aggregation
_HAS_COMMUNITY = (DimensionFilter(dimension="community", op="neq", value=""),)

#: Chart-only metrics the pre-built dashboards need beyond the streaming catalogue.
API_METRICS: tuple[CatalogueMetric, ...] = (
    _m("events", _A.count, description="Events of any kind"),
    _m("transactions", _A.count, "fund_project", description="Contributions to projects"),
    _m("backers", _A.distinct_users, "fund_project", unit="people", description="People who contributed"),
    _m(
        "project_viewers",
        _A.distinct_users,
        "page_view",
        unit="people",
        where=(DimensionFilter(dimension="properties.path", op="contains", value="/projects/"),),
        description="People who opened a project page",
    ),
    _m(
        "backer_conversion",
        _A.ratio,
        numerator="backers",
        denominator="project_viewers",
        unit="ratio",
        description="Contributors / project page viewers",
    ),
    _m("community_activity", _A.count, where=_HAS_COMMUNITY, description="Events that belong to a community"),
    _m(
        "events_per_user",
        _A.ratio,
        numerator="events",
        denominator="active_users",
        unit="events/person",
        description="Member engagement: events per active person",
    ),
    _m("loans_disbursed_count", _A.count, "loan_disbursed", description="Number of loans disbursed"),
)

#: The streaming catalogue's Key Metrics, for when ``streams.catalogue`` is not importable.
FALLBACK_METRICS: tuple[CatalogueMetric, ...] = (
    _m("dau", _A.distinct_users, unit="people", description="People active in the reporting day"),
    _m("wau", _A.distinct_users, unit="people", description="People active in the reporting week"),
    _m("mau", _A.distinct_users, unit="people", description="People active in the reporting month"),
    _m("active_users", _A.distinct_users, unit="people", description="People with any event in the period"),
    _m("page_views", _A.count, "page_view", description="Pages viewed"),
    _m("signups", _A.count, "signup", description="Accounts created"),
    _m("gmv", _A.sum, "fund_project", value_property="amount", unit="currency", description="Money pledged"),
    _m("ad_revenue", _A.sum, "watch_ad", value_property="revenue", unit="currency", description="Ad revenue"),
    _m(
        "processing_fees",
        _A.sum,
        "fund_project",
        value_property="fee",
        unit="currency",
        description="Fees charged on project funding",
    ),
    _m(
        "average_transaction_size",
        _A.avg,
        "fund_project",
        value_property="amount",
        unit="currency",
        description="Average amount pledged per funding",
    ),
    _m("projects_created", _A.count, "project_created", description="Projects created"),
    _m("projects_funded", _A.count, "project_funded", description="Projects that reached their goal"),
    _m("projects_expired", _A.count, "project_expired", description="Projects that expired unfunded"),
    _m("project_outcomes", _A.count, "project_funded", "project_expired", description="Funded or expired"),
    _m(
        "success_rate",
        _A.ratio,
        numerator="projects_funded",
        denominator="project_outcomes",
        unit="ratio",
        description="Funded projects per project outcome",
    ),
    _m(
        "average_funding_time",
        _A.avg,
        "project_funded",
        value_property="days_to_fund",
        unit="days",
        description="Average days from creation to full funding",
    ),
    _m(
        "loans_disbursed",
        _A.sum,
        "loan_disbursed",
        value_property="amount",
        unit="currency",
        description="Amount of loans disbursed",
    ),
    _m("new_members", _A.count, "join_community", description="Community joins"),
    _m("members", _A.distinct_users, "join_community", unit="people", description="People joining a community"),
    _m(
        "active_communities",
        _A.distinct_values,
        value_property="community",
        unit="communities",
        where=_HAS_COMMUNITY,
        description="Communities with any activity",
    ),
)

_STREAM_AGGREGATIONS = {"count": _A.count, "sum": _A.sum, "average": _A.avg, "ratio": _A.ratio}


def _property_key(path: str) -> str | None:
    """``properties.amount`` -> ``amount``; anything deeper or elsewhere is not a property key."""
    head, _, key = path.partition(".")
    return key if head == "properties" and key and "." not in key else None


def from_stream_definition(definition: Any) -> CatalogueMetric | None:
    """The query-engine view of a ``streams.catalogue.MetricDefinition`` (None: not answerable from events)."""
    if getattr(definition.source, "value", definition.source) != "events":
        return None  # session metrics are read from the sessions table, not answered here yet
    kind = definition.aggregation.value
    where: list[DimensionFilter] = []
    for condition in definition.where:
        key = _property_key(condition.field)
        op = {"eq": "eq", "ne": "neq", "in": "in", "not_in": "not_in"}.get(condition.op.value)
        if key is None or op is None:
            return None
        value = list(condition.value) if isinstance(condition.value, tuple) else condition.value
        where.append(DimensionFilter(dimension=f"properties.{key}", op=op, value=value))  # type: ignore[arg-type]
    fields: dict[str, Any] = {}
    if kind == "distinct":
        if definition.distinct == "person":
            aggregation = _A.distinct_users
        else:
            key = _property_key(definition.distinct)
            if key not in DIMENSION_COLUMNS:
                return None
            aggregation, fields["value_property"] = _A.distinct_values, key
            where.append(DimensionFilter(dimension=key, op="neq", value=""))
    elif kind in _STREAM_AGGREGATIONS:
        aggregation = _STREAM_AGGREGATIONS[kind]
        value_fields = definition.value_fields() if kind in ("sum", "average") else {}
        keys = {event: _property_key(path) for event, path in value_fields.items()}
        if any(k is None for k in keys.values()):
            return None
        if set(keys) == {""}:
            fields["value_property"] = keys[""]
        elif keys:
            fields["values_by_event"] = tuple((event, str(k)) for event, k in keys.items())
        fields["numerator"], fields["denominator"] = definition.numerator, definition.denominator
    else:
        return None  # churn: batch-only, read from snapshots by the analyses
    return CatalogueMetric(
        name=definition.name,
        aggregation=aggregation,
        events=tuple(definition.events),
        where=tuple(where),
        unit=definition.unit,
        description=definition.description,
        dimensions=tuple(definition.dimensions),
        **fields,
    )


def default_catalogue() -> MetricCatalogue:
    """The metrics the API serves: the streaming catalogue plus the API's chart-only metrics."""
    try:
        from streams.catalogue import get_catalogue
    except ImportError:
        base = list(FALLBACK_METRICS)
    else:
        converted = (from_stream_definition(d) for d in get_catalogue().values())
        base = [m for m in converted if m is not None]
    names = {m.name for m in base}
    return MetricCatalogue(base + [m for m in API_METRICS if m.name not in names])
