"""Retention, churn and reactivation, and lifecycle: who comes back, who stops, who returns.

Periods
-------
Periods (hour, day, week, month) are cut in the reporting timezone
(:class:`api.analyses.models.AnalysisSettings`): ``toStartOfHour/Day/Week/Month(timestamp, tz)``,
weeks starting Monday (``week_start=1``) or Sunday (``week_start=7``). Period 0 is the period
containing ``time_range.start``; an analysis covers ``periods`` consecutive *whole* periods
(period 0 includes its events before ``time_range.start``), and only events before
``time_range.end`` count; periods starting at or after ``time_range.end`` are not reported.
A DST day is simply a 23- or 25-hour day; hours are real hours (the repeated local hour of an
autumn night is two periods).

Retention
---------
- Cohorts: ``first_time`` puts a person in the period of their first start event ever (also
  before the range; if that is before period 0 they are in no cohort); ``recurring`` puts them
  in every period where they did the start event.
- Column 0 is the cohort's size. A person of cohort *i* counts in column *k* ≥ 1 when they
  did the return event in period *i + k* (``on``), or in period *i + k* or later within the
  analysed periods (``on_or_after``).
- A cell exists while period *i + k* starts before ``time_range.end`` and *i + k* < ``periods``.
- Percentages are of column 0 and of the previous column. Column averages: *weighted* =
  Σ count / Σ cohort size over the cohorts that have the cell; *simple* = the mean of those
  cohorts' percentages (cohorts of size 0 are skipped).
- Analysis-wide filters apply to both events; ``cohort_id`` restricts the people.
- Week and month matrices without property filters (up to 64 periods) read the weekly activity
  rollup ``activity_weeks`` instead of every event (:func:`_rollup_per_person`); the answer is
  the same, it is only cheaper.

Churn and reactivation (over the activity event, any event by default)
----------------------------------------------------------------------
A person active in the analysed periods *churned after period p* when p is their last
active period and p is not the last analysed period. They *reactivated in period p* when
they are active in p, not in p − 1, and were active in some earlier analysed period.

Lifecycle (PostHog-like, over the activity event; period −1 is also read)
-------------------------------------------------------------------------
For period p: *new* = active in p and their first activity ever is in p; *returning* = active
in p and p − 1; *resurrecting* = active in p, not in p − 1, first activity before p;
*dormant* = active in p − 1 and not in p (reported as a positive count).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from api.analyses.models import AnalysisSettings
from api.analyses.query import ANY_EVENT, PropertyFilter, SQLBuilder, TimeRange, run
from sinks.migrations import ACTIVITY_BUCKET_SECONDS, ANY_EVENT_NAME

Period = Literal["hour", "day", "week", "month"]

#: UTC, weeks starting Monday.
DEFAULT_SETTINGS = AnalysisSettings()


class EventSpec(BaseModel):
    """An event name (or ``$any``) with filters."""

    model_config = ConfigDict(frozen=True)

    event_name: str = Field(min_length=1, max_length=200)
    filters: tuple[PropertyFilter, ...] = ()


class RetentionDefinition(BaseModel):
    """What a retention analysis asks."""

    model_config = ConfigDict(frozen=True)

    start_event: EventSpec
    return_event: EventSpec = EventSpec(event_name=ANY_EVENT)
    period: Period = "week"
    periods: int = Field(8, ge=1, le=400)
    cohort_type: Literal["first_time", "recurring"] = "first_time"
    return_type: Literal["on", "on_or_after"] = "on"


class RetentionCohort(BaseModel):
    """One row of the matrix."""

    period_start: datetime = Field(description="Start of the cohort's period (aware, reporting timezone).")
    size: int
    counts: list[int] = Field(description="Column k: people back in period i + k (column 0 = size).")
    of_start: list[float]
    of_previous: list[float]


class RetentionResult(BaseModel):
    """The retention matrix with its column averages."""

    period: Period
    cohorts: list[RetentionCohort]
    weighted_average: list[float | None]
    simple_average: list[float | None]


class ActivityDefinition(BaseModel):
    """What counts as being active, for churn/reactivation and lifecycle."""

    model_config = ConfigDict(frozen=True)

    event: EventSpec = EventSpec(event_name=ANY_EVENT)
    period: Period = "week"
    periods: int = Field(8, ge=1, le=400)


class ChurnPeriod(BaseModel):
    """Churned and reactivated people of one period (counts and a sample of ids)."""

    period_start: datetime
    active: int
    churned: int = Field(description="Last active in this period (not the last analysed period).")
    reactivated: int = Field(description="Back in this period after at least one inactive period.")
    churned_people: list[str]
    reactivated_people: list[str]


class ChurnResult(BaseModel):
    """Who stopped and when, who came back and when."""

    period: Period
    periods: list[ChurnPeriod]


class LifecyclePeriod(BaseModel):
    """Lifecycle counts of one period."""

    period_start: datetime
    new: int
    returning: int
    resurrecting: int
    dormant: int


class LifecycleResult(BaseModel):
    """Lifecycle per period."""

    period: Period
    periods: list[LifecyclePeriod]


# --- periods ----------------------------------------------------------------------------------


def _period_index(q: SQLBuilder, period: Period, settings: AnalysisSettings, start: datetime, ts: str) -> str:
    """SQL for the index of ``ts``'s period relative to the period containing ``start``."""
    tz = q.param(settings.timezone, "String")
    origin = q.param(start, "DateTime64(3, 'UTC')")

    def number(expr: str) -> str:
        if period == "hour":
            return f"intDiv(toUnixTimestamp(toStartOfHour({expr}, {tz})), 3600)"
        if period == "day":
            return f"toRelativeDayNum(toDate({expr}, {tz}))"
        if period == "week":
            return f"toRelativeDayNum(toStartOfWeek({expr}, {settings.week_mode}, {tz}))"
        return f"toRelativeMonthNum({expr}, {tz})"

    diff = f"(toInt64({number(ts)}) - toInt64({number(origin)}))"
    return f"intDiv({diff}, 7)" if period == "week" else diff


def period_starts(period: Period, settings: AnalysisSettings, start: datetime, count: int) -> list[datetime]:
    """Starts of ``count`` periods from the one containing ``start``, as aware datetimes in the reporting zone."""
    zone = ZoneInfo(settings.timezone)
    local = start.astimezone(zone)
    if period == "hour":
        # Whole real hours: the repeated hour of an autumn night is two periods.
        base = local.replace(minute=0, second=0, microsecond=0).timestamp()
        return [datetime.fromtimestamp(base + 3600 * i, zone) for i in range(count)]
    day = local.replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        naive = [day + timedelta(days=i) for i in range(count)]
    elif period == "week":
        back = day.weekday() if settings.week_start == 1 else (day.weekday() + 1) % 7
        naive = [day - timedelta(days=back) + timedelta(weeks=i) for i in range(count)]
    else:
        months = day.year * 12 + day.month - 1
        naive = [datetime((months + i) // 12, (months + i) % 12 + 1, 1) for i in range(count)]
    return [d.replace(tzinfo=zone) for d in naive]


def _observed(starts: list[datetime], end: datetime) -> int:
    """How many of the periods start before ``end`` (the rest are not observable yet)."""
    return sum(1 for s in starts if s < end)


# --- retention --------------------------------------------------------------------------------


def compute_retention(
    client: Any,
    definition: RetentionDefinition,
    time_range: TimeRange,
    settings: AnalysisSettings = DEFAULT_SETTINGS,
    filters: tuple[PropertyFilter, ...] = (),
    cohort_id: str | None = None,
) -> RetentionResult:
    """The retention matrix (semantics in the module docstring)."""
    q = SQLBuilder()
    n = definition.periods
    filters = tuple(filters)
    start_cond = q.event_condition(definition.start_event.event_name, definition.start_event.filters + filters)
    return_cond = q.event_condition(definition.return_event.event_name, definition.return_event.filters + filters)
    people = q.in_cohort(cohort_id)
    t = "DateTime64(3, 'UTC')"
    starts_local = period_starts(definition.period, settings, time_range.start, n)
    end = q.param(time_range.end, t)
    # The first period's start as an instant bounds the scan (whole periods count).
    lower = q.param(starts_local[0].astimezone(UTC), t)
    idx = _period_index(q, definition.period, settings, time_range.start, "timestamp")
    n_param = q.param(n, "Int64")
    in_periods = f"timestamp >= {lower} AND timestamp < {end} AND {idx} >= 0 AND {idx} < {n_param}"
    # Up to 64 periods, a person's periods are bits of one UInt64 (cheaper than arrays per person).
    bits = n <= 64
    per_person = ""

    def period_set(cond: str) -> str:
        if bits:
            return f"groupBitOrIf(bitShiftLeft(toUInt64(1), toUInt8({idx})), {cond})"
        return f"arrayMap(x -> toInt64(x), groupUniqArrayIf({idx}, {cond}))"

    placed = (
        bucket_periods(definition.period, settings, time_range, n)
        if bits
        and definition.period in ROLLUP_PERIODS
        and not (definition.start_event.filters or definition.return_event.filters or filters)
        else None
    )
    if placed is not None:
        per_person = _rollup_per_person(q, definition, time_range, settings, placed, cohort_id)
    elif definition.cohort_type == "first_time":
        first = f"minIf(timestamp, {start_cond})"
        first_idx = _period_index(q, definition.period, settings, time_range.start, first)
        only = f"bitShiftLeft(toUInt64(1), toUInt8({first_idx}))" if bits else f"[{first_idx}]"
        none = "toUInt64(0)" if bits else "CAST([] AS Array(Int64))"
        cohort_expr = (
            f"if(countIf({start_cond}) > 0 AND {first} < {end} AND {first_idx} >= 0 AND {first_idx} < {n_param}, "
            f"{only}, {none})"
        )
        # The first start event may be older than the periods: read start events of all time.
        where = f"({start_cond} OR ({return_cond} AND {in_periods}))"
    else:
        cohort_expr = period_set(f"{start_cond} AND {in_periods}")
        where = f"({start_cond} OR {return_cond}) AND {in_periods}"
    if not per_person:
        any_cohort = "cohorts != 0" if bits else "notEmpty(cohorts)"
        per_person = (
            f"SELECT person_id, {cohort_expr} AS cohorts, "
            f"{period_set(f'{return_cond} AND {in_periods} AND {idx} >= 1')} AS back "
            f"FROM events_resolved WHERE {where} AND {people} GROUP BY person_id HAVING {any_cohort}"
        )
    if bits:
        came_back = "bitTest(back, c + k)" if definition.return_type == "on" else "bitShiftRight(back, c + k) != 0"
        cohort_list = "arrayMap(x -> toInt64(x), bitPositionsToArray(cohorts))"
    else:
        came_back = "has(back, c + k)" if definition.return_type == "on" else "arrayExists(r -> r >= c + k, back)"
        cohort_list = "cohorts"
    sql = (
        f"SELECT c, k, count() FROM (SELECT c, back FROM ({per_person}) ARRAY JOIN {cohort_list} AS c) "
        f"ARRAY JOIN range(toUInt64({n_param} - c)) AS k WHERE k = 0 OR {came_back} GROUP BY c, k"
    )
    counts = [[0] * (n - i) for i in range(n)]
    for c, k, value in run(client, sql, q):
        counts[int(c)][int(k)] = int(value)
    observed = _observed(starts_local, time_range.end)
    cohorts: list[RetentionCohort] = []
    for i in range(observed):
        row = counts[i][: observed - i]
        width = len(row)
        size = row[0]
        cohorts.append(
            RetentionCohort(
                period_start=starts_local[i],
                size=size,
                counts=row,
                of_start=[v / size if size else 0.0 for v in row],
                of_previous=[1.0 if k == 0 else (row[k] / row[k - 1] if row[k - 1] else 0.0) for k in range(width)],
            )
        )
    weighted: list[float | None] = []
    simple: list[float | None] = []
    for k in range(n):
        rows = [c for c in cohorts if len(c.counts) > k and c.size > 0]
        total = sum(c.size for c in rows)
        weighted.append(sum(c.counts[k] for c in rows) / total if total else None)
        simple.append(sum(c.counts[k] / c.size for c in rows) / len(rows) if rows else None)
    return RetentionResult(period=definition.period, cohorts=cohorts, weighted_average=weighted, simple_average=simple)


#: Periods the weekly activity rollup answers exactly (a rollup bucket never holds two of their starts).
ROLLUP_PERIODS = ("week", "month")
_BUCKET = ACTIVITY_BUCKET_SECONDS
_LINKS = "SELECT anonymous_id, argMin(user_id, linked_at) AS user_id FROM identities GROUP BY anonymous_id"
_ALL_BUT_PERIOD_0 = "toUInt64(18446744073709551614)"


def _rollup_name(event_name: str) -> str:
    return ANY_EVENT_NAME if event_name == ANY_EVENT else event_name


def _ms(instant: datetime) -> int:
    return round(instant.timestamp() * 1000)


@dataclass(frozen=True)
class BucketPeriods:
    """Which period bit an instant gets in each rollup bucket of a range, found by one comparison.

    Bucket *j* (from 0) starts ``origin`` + *j* weeks (seconds since the epoch); ``origin`` is the
    bucket holding the first period's start. A bucket holds at most one period start, its turn:
    an instant (epoch milliseconds) in bucket *j* before ``cuts[j]`` gets ``early[j]``, one from
    ``cuts[j]`` to the range's end ``late[j]``, one at or after the end nothing. ``cuts[j]`` is
    the turn, or the end if that comes first. Bits of periods outside ``0..periods - 1`` are 0,
    and so is every bit past the arrays' last bucket.
    """

    origin: int
    end: int
    cuts: list[int]
    early: list[int]
    late: list[int]

    def bit(self, instant: datetime) -> int:
        """The period bit of ``instant``, as the SQL of the rollup path finds it."""
        j = (int(instant.timestamp()) - self.origin) // _BUCKET
        # Outside the arrays the SQL reads their defaults, zeros.
        cut, early, late = (self.cuts[j], self.early[j], self.late[j]) if 0 <= j < len(self.cuts) else (0, 0, 0)
        ms = _ms(instant)
        return early if ms < cut else late if ms < self.end else 0


def bucket_periods(
    period: Period, settings: AnalysisSettings, time_range: TimeRange, periods: int
) -> BucketPeriods | None:
    """Each rollup bucket's cut and period bits, from the first period's start up to the range's end.

    Computed once per request, so that no row needs date arithmetic in the reporting zone.
    ``None`` when a bucket holds two period starts: then an actor's first and last instant in it
    do not tell which periods they were active in (never for week and month periods, see
    sinks/migrations.py, migration 8; day periods always do).
    """
    starts = [s.astimezone(UTC) for s in period_starts(period, settings, time_range.start, periods + 1)]
    end = time_range.end.astimezone(UTC)
    origin = int(starts[0].timestamp()) // _BUCKET * _BUCKET
    out = BucketPeriods(origin=origin, end=_ms(end), cuts=[], early=[], late=[])

    def bit(i: int) -> int:
        return 1 << i if 0 <= i < periods else 0

    bucket = datetime.fromtimestamp(origin, UTC)
    # From the last period's end (or the range's end) on, every bit is 0: no entries needed.
    while bucket < min(end, starts[-1]):
        # Every instant before the first period is in "period -1": only starts[0..periods] count.
        base = bisect_right(starts, bucket) - 1
        following = starts[base + 1 : base + 3]
        if len(following) == 2 and following[1] < bucket + timedelta(seconds=_BUCKET):
            return None
        turn = following[0] if following else end
        out.cuts.append(_ms(min(turn, end)))
        out.early.append(bit(base))
        out.late.append(bit(base + 1))
        bucket += timedelta(seconds=_BUCKET)
    return out


def _rollup_per_person(
    q: SQLBuilder,
    definition: RetentionDefinition,
    time_range: TimeRange,
    settings: AnalysisSettings,
    placed: BucketPeriods,
    cohort_id: str | None,
) -> str:
    """Per person (``person_id``, ``cohorts``, ``back`` as period bits) from the weekly activity rollup.

    For week and month periods without property filters. ``activity_weeks`` keeps, per event name
    (and ``$any``), actor and 7-day UTC bucket, the first and last instant; a bucket holds at most
    one period start, so an actor's periods in a bucket are those of its first and last instants
    (sinks/migrations.py, migration 8). Each instant's period bit is looked up in the bucket's
    entry of ``placed`` and one comparison with the bucket's cut, instead of date arithmetic in
    the reporting zone per row.

    Two cuts are not period starts: ``time_range.start`` belongs to period 0, which counts whole,
    and ``time_range.end``. An instant at or after the end places nothing, so a row whose last
    instant is after the end contributes its first instant only; the events between the start of
    the end's period (or its bucket, if later) and the end are read from ``events``, and all lie
    in the end's period. Actors are stitched to people through ``identities`` as
    ``events_resolved`` does, in one pass over the rows (the join key is empty for actors that are
    users: reading the rows once per kind of actor cost more than the join saves); a person's first
    start event ever is the earliest first instant of their start-event rows.
    """
    t = "DateTime64(3, 'UTC')"
    end = q.param(time_range.end, t)
    end_ms = q.param(placed.end, "Int64")
    first_bucket = q.param(placed.origin // _BUCKET, "Int64")
    cuts = q.param(placed.cuts, "Array(Int64)")
    early = q.param(placed.early, "Array(UInt64)")
    late = q.param(placed.late, "Array(UInt64)")

    def bit(instant: str, bucket: str) -> str:
        # Entries count from 1; 0 (a bucket before the origin) reads the arrays' defaults: no bit. The
        # bucket number is taken of the (unsigned) timestamp before the origin's is subtracted: intDiv
        # rounds toward zero, so it would put an instant less than a bucket before the origin in bucket 0.
        j = f"greatest(toInt64(intDiv(toUnixTimestamp({bucket}), {_BUCKET})) - {first_bucket} + 1, 0)"
        ms = f"toUnixTimestamp64Milli({instant})"
        return f"if({ms} < {cuts}[{j}], {early}[{j}], if({ms} < {end_ms}, {late}[{j}], 0))"

    # The rollup's rows of every event are named like the analyses' "any event".
    start_name = q.param(_rollup_name(definition.start_event.event_name), "String")
    return_name = q.param(_rollup_name(definition.return_event.event_name), "String")
    in_range = f"bucket >= {q.param(datetime.fromtimestamp(placed.origin, UTC), t)} AND bucket < {end}"
    # First-time cohorts need every start event before the end, also before the periods.
    start_rows = f"bucket < {end}" if definition.cohort_type == "first_time" else in_range
    rollup = (
        f"SELECT anonymous, actor, event_name = {start_name} AS is_start, event_name = {return_name} AS is_return, "
        f"first_seen, bitOr({bit('first_seen', 'bucket')}, {bit('last_seen', 'bucket')}) AS periods "
        f"FROM activity_weeks WHERE (event_name = {start_name} AND {start_rows}) "
        f"OR (event_name = {return_name} AND {in_range})"
    )
    # The events after the last cut the rollup cannot place: from the end's period start (or the
    # end's bucket start, whichever is later) to the end.
    end_utc = time_range.end.astimezone(UTC)
    last_period = period_starts(definition.period, settings, end_utc - timedelta(milliseconds=1), 1)[0]
    bucket_start = datetime.fromtimestamp(int(end_utc.timestamp()) // _BUCKET * _BUCKET, UTC)
    edge = max(last_period.astimezone(UTC), bucket_start)
    start_cond = q.event_condition(definition.start_event.event_name)
    return_cond = q.event_condition(definition.return_event.event_name)
    edge_events = (
        f"SELECT user_id = '' AS anonymous, if(user_id != '', user_id, anonymous_id) AS actor, "
        f"{start_cond} AS is_start, {return_cond} AS is_return, timestamp AS first_seen, "
        f"{q.param(placed.bit(edge), 'UInt64')} AS periods "
        f"FROM events WHERE {q.time_range(TimeRange(start=edge, end=time_range.end))} "
        f"AND ({start_cond} OR {return_cond})"
    )
    stitched = (
        f"SELECT if(a.anonymous AND links.user_id != '', links.user_id, a.actor) AS person_id, is_start, is_return, "
        f"first_seen, periods FROM ({rollup} UNION ALL {edge_events}) AS a "
        f"LEFT ANY JOIN ({_LINKS}) AS links ON links.anonymous_id = if(a.anonymous, a.actor, '')"
    )
    if definition.cohort_type == "first_time":
        # Without start rows the minimum is the epoch, before every bucket: no bit.
        first = "minIf(first_seen, is_start)"
        cohorts = bit(first, first)
    else:
        cohorts = "groupBitOrIf(periods, is_start)"
    return (
        f"SELECT person_id, {cohorts} AS cohorts, bitAnd(groupBitOrIf(periods, is_return), {_ALL_BUT_PERIOD_0}) "
        f"AS back FROM ({stitched}) WHERE {q.in_cohort(cohort_id)} GROUP BY person_id HAVING cohorts != 0"
    )


# --- activity: churn, reactivation, lifecycle -------------------------------------------------


def _activity_sql(
    q: SQLBuilder,
    definition: ActivityDefinition,
    time_range: TimeRange,
    settings: AnalysisSettings,
    filters: tuple[PropertyFilter, ...],
    cohort_id: str | None,
    from_index: int,
) -> str:
    """Per person: the sorted distinct active period indices (from ``from_index``) and the first activity ever."""
    cond = q.event_condition(definition.event.event_name, definition.event.filters + tuple(filters))
    idx = _period_index(q, definition.period, settings, time_range.start, "timestamp")
    end = q.param(time_range.end, "DateTime64(3, 'UTC')")
    lo, hi = q.param(from_index, "Int64"), q.param(definition.periods, "Int64")
    first = _period_index(q, definition.period, settings, time_range.start, "min(timestamp)")
    return (
        f"SELECT person_id, arraySort(groupUniqArrayIf({idx}, {idx} >= {lo} AND {idx} < {hi} "
        f"AND timestamp < {end})) AS active, {first} AS first_index "
        f"FROM events_resolved WHERE {cond} AND {q.in_cohort(cohort_id)} AND timestamp < {end} "
        f"GROUP BY person_id HAVING notEmpty(active)"
    )


def compute_churn(
    client: Any,
    definition: ActivityDefinition,
    time_range: TimeRange,
    settings: AnalysisSettings = DEFAULT_SETTINGS,
    filters: tuple[PropertyFilter, ...] = (),
    cohort_id: str | None = None,
    people_limit: int = 100,
) -> ChurnResult:
    """Per period: active people, who churned after it and who reactivated in it (with samples of ids)."""
    starts = period_starts(definition.period, settings, time_range.start, definition.periods)
    observed = _observed(starts, time_range.end)
    q = SQLBuilder()
    per_person = _activity_sql(q, definition, time_range, settings, filters, cohort_id, 0)
    # Nobody has churned after the last period we can see yet.
    last = q.param(observed - 1, "Int64")
    limit = q.param(people_limit, "UInt64")
    sql = (
        f"SELECT p, count(), countIf(churned), countIf(reactivated), "
        f"arraySlice(arraySort(groupArrayIf(person_id, churned)), 1, {limit}), "
        f"arraySlice(arraySort(groupArrayIf(person_id, reactivated)), 1, {limit}) FROM ("
        f"SELECT person_id, p, p = active[-1] AND p < {last} AS churned, "
        f"NOT has(active, p - 1) AND active[1] < p AS reactivated "
        f"FROM ({per_person}) ARRAY JOIN active AS p) GROUP BY p ORDER BY p"
    )
    rows = {int(r[0]): r for r in run(client, sql, q)}
    out = []
    for i, start in enumerate(starts[:observed]):
        r = rows.get(i)
        out.append(
            ChurnPeriod(
                period_start=start,
                active=int(r[1]) if r else 0,
                churned=int(r[2]) if r else 0,
                reactivated=int(r[3]) if r else 0,
                churned_people=list(r[4]) if r else [],
                reactivated_people=list(r[5]) if r else [],
            )
        )
    return ChurnResult(period=definition.period, periods=out)


def compute_lifecycle(
    client: Any,
    definition: ActivityDefinition,
    time_range: TimeRange,
    settings: AnalysisSettings = DEFAULT_SETTINGS,
    filters: tuple[PropertyFilter, ...] = (),
    cohort_id: str | None = None,
) -> LifecycleResult:
    """New, returning, resurrecting and dormant people per period (semantics in the module docstring)."""
    q = SQLBuilder()
    per_person = _activity_sql(q, definition, time_range, settings, filters, cohort_id, -1)
    n = q.param(definition.periods, "Int64")
    # For every period p in 0..n-1, classify each person who was active in p or p-1.
    sql = (
        f"SELECT p, countIf(now_ AND first_index = p) AS new, countIf(now_ AND before AND first_index < p), "
        f"countIf(now_ AND NOT before AND first_index < p), countIf(before AND NOT now_) FROM ("
        f"SELECT p, has(active, p) AS now_, has(active, p - 1) AS before, first_index FROM ({per_person}) "
        f"ARRAY JOIN arrayDistinct(arrayFilter(x -> x >= 0 AND x < {n}, arrayConcat(active, "
        f"arrayMap(x -> x + 1, active)))) AS p) GROUP BY p ORDER BY p"
    )
    rows = {int(r[0]): r for r in run(client, sql, q)}
    starts = period_starts(definition.period, settings, time_range.start, definition.periods)
    out = []
    for i, start in enumerate(starts[: _observed(starts, time_range.end)]):
        r = rows.get(i, (i, 0, 0, 0, 0))
        out.append(
            LifecyclePeriod(
                period_start=start, new=int(r[1]), returning=int(r[2]), resurrecting=int(r[3]), dormant=int(r[4])
            )
        )
    return LifecycleResult(period=definition.period, periods=out)
