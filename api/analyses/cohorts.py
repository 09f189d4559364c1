"""Cohorts: who belongs to a group of people, computed in ClickHouse and stored there.

Definitions (``CohortDefinition``, one of four kinds)
-----------------------------------------------------
- ``acquisition``: people whose first acquisition event ever (``signup`` by default) is in
  ``[start, end)``.
- ``behavioural``: people who did ``event_name`` (with filters) at least ``min_count`` times
  in ``[start, end)`` — or, with ``within_days``, in the days before the computation.
- ``demographic``: people whose *latest* value of each trait matches. Traits are the
  properties of ``identify`` events; a trait's latest value is the one on the person's most
  recent ``identify`` event that carries that trait (filters use the usual operators).
- ``custom``: an analyst's read-only ``SELECT`` whose first column is the person id. It runs
  as a subquery (so only a SELECT parses) with ``readonly=2`` and time/row limits.

Storage and use
---------------
A computation writes the members to ``cohort_members (cohort_id, person_id, computed_at)``,
then one row to ``cohorts_computed (cohort_id, user_count, computed_at, expires_at)``, then
deletes the members of older computations; analyses taking ``cohort_id`` read the latest
finished computation
(:meth:`api.analyses.query.SQLBuilder.in_cohort`). Recompute when ``expires_at`` has passed
(:func:`cohort_is_stale`), on a schedule or on demand.

Comparison and lifetime value
-----------------------------
:func:`compare_cohorts` puts sizes and retention side by side. :func:`lifetime_value` is the
cumulative revenue per member by period since the member's acquisition (their first
acquisition event): revenue is the sum of a numeric property over revenue events —
by default the platform's own income: ``fund_project.fee`` and ``watch_ad.revenue``. Column
*k* averages over members whose period *k* after acquisition has started before
``time_range.end`` (members without an acquisition event are left out).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.analyses.models import AnalysisSettings
from api.analyses.query import PropertyFilter, SQLBuilder, TimeRange, run
from api.analyses.retention import (
    DEFAULT_SETTINGS,
    Period,
    RetentionDefinition,
    RetentionResult,
    compute_retention,
    period_starts,
)

CohortKind = Literal["acquisition", "behavioural", "demographic", "custom"]

IDENTIFY_EVENT = "identify"


class CohortDefinition(BaseModel):
    """What a cohort is (the metadata database stores this document with an id)."""

    model_config = ConfigDict(frozen=True)

    kind: CohortKind
    start: datetime | None = None
    end: datetime | None = None
    acquisition_event: str = "signup"
    event_name: str | None = Field(None, max_length=200)
    filters: tuple[PropertyFilter, ...] = ()
    min_count: int = Field(1, ge=1)
    within_days: int | None = Field(None, ge=1, le=3650)
    traits: tuple[PropertyFilter, ...] = ()
    sql: str | None = Field(None, max_length=20_000)
    ttl_seconds: int = Field(24 * 3600, ge=60, description="How long a computation stays fresh.")

    @model_validator(mode="after")
    def _complete(self) -> CohortDefinition:
        if self.kind == "acquisition" and (self.start is None or self.end is None):
            raise ValueError("an acquisition cohort needs start and end")
        if self.kind == "behavioural":
            if not self.event_name:
                raise ValueError("a behavioural cohort needs event_name")
            if self.within_days is None and (self.start is None or self.end is None):
                raise ValueError("a behavioural cohort needs start and end, or within_days")
        if self.kind == "demographic" and not self.traits:
            raise ValueError("a demographic cohort needs at least one trait filter")
        if self.kind == "custom":
            if not self.sql or not self.sql.strip():
                raise ValueError("a custom cohort needs sql")
            if ";" in self.sql.strip().rstrip(";"):
                raise ValueError("custom cohort sql must be one statement")
        return self


class CohortComputation(BaseModel):
    """One finished computation of a cohort."""

    cohort_id: str
    user_count: int
    computed_at: datetime
    expires_at: datetime


def _ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def membership_sql(q: SQLBuilder, definition: CohortDefinition, now: datetime) -> str:
    """SELECT person_id of the members (for every kind but ``custom``)."""
    t = "DateTime64(3, 'UTC')"
    if definition.kind == "acquisition":
        assert definition.start is not None and definition.end is not None
        event = q.param(definition.acquisition_event, "String")
        return (
            f"SELECT person_id FROM events_resolved WHERE event_name = {event} "
            f"GROUP BY person_id HAVING min(timestamp) >= {q.param(definition.start, t)} "
            f"AND min(timestamp) < {q.param(definition.end, t)}"
        )
    if definition.kind == "behavioural":
        assert definition.event_name is not None
        if definition.within_days is not None:
            start, end = now - timedelta(days=definition.within_days), now
        else:
            assert definition.start is not None and definition.end is not None
            start, end = definition.start, definition.end
        cond = q.event_condition(definition.event_name, definition.filters)
        return (
            f"SELECT person_id FROM events_resolved WHERE {cond} AND {q.time_range(TimeRange(start=start, end=end))} "
            f"GROUP BY person_id HAVING count() >= {q.param(definition.min_count, 'UInt64')}"
        )
    if definition.kind == "demographic":
        # Traits are JSON in ``properties`` of the latest identify event carrying each trait:
        # a builder without hot columns reads them from that JSON.
        traits = SQLBuilder(use_hot_columns=False, properties_column="traits")
        traits.parameters = q.parameters  # one parameter namespace for the whole query
        parts = []
        for f in definition.traits:
            key = q.param(f.key, "String")
            parts.append(
                f"person_id IN (SELECT person_id FROM (SELECT person_id, argMaxIf(properties, timestamp, "
                f"JSONHas(properties, {key})) AS traits FROM events_resolved WHERE event_name = "
                f"{q.param(IDENTIFY_EVENT, 'String')} AND JSONHas(properties, {key}) GROUP BY person_id) "
                f"WHERE {traits.property_filter(f)})"
            )
        identify = q.param(IDENTIFY_EVENT, "String")
        return f"SELECT DISTINCT person_id FROM events_resolved WHERE event_name = {identify} AND {' AND '.join(parts)}"
    raise ValueError(f"no SQL membership for {definition.kind} cohorts")


def compute_cohort(
    client: Any,
    cohort_id: str,
    definition: CohortDefinition,
    now: datetime | None = None,
    custom_limits: tuple[int, int] = (30, 1_000_000),
) -> CohortComputation:
    """Compute membership now, store it, and return the computation's summary.

    ``custom_limits`` = (max execution seconds, max result rows) for custom SQL.
    """
    computed_at = _ms((now or datetime.now(UTC)).astimezone(UTC))
    expires_at = computed_at + timedelta(seconds=definition.ttl_seconds)
    t = "DateTime64(3, 'UTC')"
    if definition.kind == "custom":
        assert definition.sql is not None
        seconds, rows = custom_limits
        # The same guard as the analysts' /v1/sql (readonly alone still allows file()/url() and
        # INTO OUTFILE); as a subquery only a SELECT parses. Limits go in the statement's SETTINGS.
        from api.readonly import ReadOnlyGuard, run_readonly

        sql = f"SELECT * FROM ({definition.sql.strip().rstrip(';')})"
        answer = run_readonly(client, sql, max_rows=rows, max_seconds=seconds, guard=ReadOnlyGuard())
        if answer.truncated:
            raise ValueError(f"custom cohort sql returned more than {rows} rows")
        result = answer.rows
        members = sorted({str(r[0]) for r in result if r and r[0] is not None and str(r[0]) != ""})
        if members:
            client.insert(
                "cohort_members",
                [[cohort_id] * len(members), members, [computed_at] * len(members)],
                column_names=["cohort_id", "person_id", "computed_at"],
                column_oriented=True,
            )
    else:
        q = SQLBuilder()
        members_sql = membership_sql(q, definition, computed_at)
        client.command(
            f"INSERT INTO cohort_members (cohort_id, person_id, computed_at) "
            f"SELECT {q.param(cohort_id, 'String')}, person_id, {q.param(computed_at, t)} FROM ({members_sql})",
            parameters=q.parameters,
        )
    q = SQLBuilder()
    count = run(
        client,
        f"SELECT uniqExact(person_id) FROM cohort_members WHERE cohort_id = {q.param(cohort_id, 'String')} "
        f"AND computed_at = {q.param(computed_at, t)}",
        q,
    )[0][0]
    client.insert(
        "cohorts_computed",
        [[cohort_id, int(count), computed_at, expires_at]],
        column_names=["cohort_id", "user_count", "computed_at", "expires_at"],
    )
    # Analyses already read the new computation; the superseded members can go.
    q = SQLBuilder()
    client.command(
        f"DELETE FROM cohort_members WHERE cohort_id = {q.param(cohort_id, 'String')} "
        f"AND computed_at < {q.param(computed_at, t)}",
        parameters=q.parameters,
    )
    return CohortComputation(
        cohort_id=cohort_id, user_count=int(count), computed_at=computed_at, expires_at=expires_at
    )


def latest_computation(client: Any, cohort_id: str) -> CohortComputation | None:
    """The latest finished computation of a cohort, if any."""
    q = SQLBuilder()
    rows = run(
        client,
        "SELECT user_count, computed_at, expires_at FROM cohorts_computed FINAL "
        f"WHERE cohort_id = {q.param(cohort_id, 'String')} ORDER BY computed_at DESC LIMIT 1",
        q,
    )
    if not rows:
        return None
    count, computed_at, expires_at = rows[0]
    return CohortComputation(
        cohort_id=cohort_id,
        user_count=int(count),
        computed_at=computed_at.replace(tzinfo=UTC),
        expires_at=expires_at.replace(tzinfo=UTC),
    )


def cohort_is_stale(client: Any, cohort_id: str, now: datetime | None = None) -> bool:
    """Whether a cohort was never computed or its latest computation has expired."""
    latest = latest_computation(client, cohort_id)
    return latest is None or latest.expires_at <= (now or datetime.now(UTC))


def cohort_members(client: Any, cohort_id: str, limit: int = 100, offset: int = 0) -> list[str]:
    """One page of the latest finished computation's members, by person id."""
    q = SQLBuilder()
    sql = (
        f"SELECT DISTINCT person_id FROM cohort_members WHERE cohort_id = {q.param(cohort_id, 'String')} "
        f"AND {q.in_cohort(cohort_id)} ORDER BY person_id "
        f"LIMIT {q.param(limit, 'UInt64')} OFFSET {q.param(offset, 'UInt64')}"
    )
    return [r[0] for r in run(client, sql, q)]


# --- comparison and lifetime value -----------------------------------------------------------------


class CohortRetention(BaseModel):
    """One cohort's size and retention."""

    cohort_id: str
    size: int
    retention: RetentionResult


class CohortComparison(BaseModel):
    """Several cohorts side by side."""

    cohorts: list[CohortRetention]


def compare_cohorts(
    client: Any,
    cohort_ids: list[str],
    retention: RetentionDefinition,
    time_range: TimeRange,
    settings: AnalysisSettings = DEFAULT_SETTINGS,
) -> CohortComparison:
    """Size (latest computation) and the same retention analysis restricted to each cohort."""
    out = []
    for cohort_id in cohort_ids:
        latest = latest_computation(client, cohort_id)
        out.append(
            CohortRetention(
                cohort_id=cohort_id,
                size=latest.user_count if latest else 0,
                retention=compute_retention(client, retention, time_range, settings, cohort_id=cohort_id),
            )
        )
    return CohortComparison(cohorts=out)


class RevenueSource(BaseModel):
    """An event that brings revenue and the numeric property holding the amount."""

    model_config = ConfigDict(frozen=True)

    event_name: str = Field(min_length=1, max_length=200)
    property: str = Field(min_length=1, max_length=200)


DEFAULT_REVENUE: tuple[RevenueSource, ...] = (
    RevenueSource(event_name="fund_project", property="fee"),
    RevenueSource(event_name="watch_ad", property="revenue"),
)


class LifetimeValueDefinition(BaseModel):
    """How lifetime value is measured."""

    model_config = ConfigDict(frozen=True)

    acquisition_event: str = "signup"
    revenue: tuple[RevenueSource, ...] = DEFAULT_REVENUE
    period: Period = "month"
    periods: int = Field(12, ge=1, le=400)


class LifetimeValue(BaseModel):
    """Cumulative revenue per member by period since acquisition."""

    cohort_id: str | None
    members: list[int] = Field(description="Column k: members whose period k has started.")
    cumulative_revenue_per_member: list[float | None]


def lifetime_value(
    client: Any,
    definition: LifetimeValueDefinition,
    time_range: TimeRange,
    cohort_id: str | None = None,
    settings: AnalysisSettings = DEFAULT_SETTINGS,
) -> LifetimeValue:
    """LTV curve of a cohort's members (or of everyone acquired in ``time_range`` without a cohort)."""
    q = SQLBuilder()
    tz = q.param(settings.timezone, "String")

    def number(expr: str) -> str:
        # Period number in the reporting timezone; weeks via their first day.
        return {
            "hour": f"intDiv(toUnixTimestamp(toStartOfHour({expr}, {tz})), 3600)",
            "day": f"toRelativeDayNum(toDate({expr}, {tz}))",
            "week": f"intDiv(toRelativeDayNum(toStartOfWeek({expr}, {settings.week_mode}, {tz})) + 4, 7)",
            "month": f"toRelativeMonthNum({expr}, {tz})",
        }[definition.period]

    t = "DateTime64(3, 'UTC')"
    end = q.param(time_range.end, t)
    last = f"({end} - toIntervalMillisecond(1))"
    acquired = (
        f"SELECT person_id, min(timestamp) AS acquired_at FROM events_resolved "
        f"WHERE event_name = {q.param(definition.acquisition_event, 'String')} AND {q.in_cohort(cohort_id)} "
        f"GROUP BY person_id HAVING acquired_at < {end}"
    )
    if cohort_id is None:
        acquired += f" AND acquired_at >= {q.param(time_range.start, t)}"
    revenue_terms = [
        f"if(event_name = {q.param(r.event_name, 'String')}, "
        f"ifNull({q.property_number(r.property)}, 0), 0)"
        for r in definition.revenue
    ]
    names = q.param([r.event_name for r in definition.revenue], "Array(String)")
    revenue = (
        f"SELECT person_id, timestamp, {' + '.join(revenue_terms)} AS value FROM events_resolved "
        f"WHERE event_name IN {names} AND timestamp < {end}"
    )
    n = q.param(definition.periods, "Int64")
    sql = (
        f"SELECT k1 - 1 AS k, count(), sum(revenue) FROM ("
        f"SELECT a.person_id, toInt64({number(last)}) - toInt64({number('a.acquired_at')}) AS horizon, "
        f"arrayMap(k -> arraySum(arrayMap((t, v) -> if(toInt64({number('t')}) - toInt64({number('a.acquired_at')})"
        f" <= k AND t >= a.acquired_at, v, 0), r.ts, r.vs)), range(toUInt64(least(horizon + 1, {n})))) AS cumulative "
        f"FROM ({acquired}) AS a LEFT JOIN (SELECT person_id, groupArray(timestamp) AS ts, groupArray(value) AS vs "
        f"FROM ({revenue}) GROUP BY person_id) AS r ON r.person_id = a.person_id"
        ") ARRAY JOIN cumulative AS revenue, arrayEnumerate(cumulative) AS k1 GROUP BY k ORDER BY k"
    )
    rows = {int(k): (int(m), float(v)) for k, m, v in run(client, sql, q, {"join_use_nulls": 0})}
    members = [rows.get(k, (0, 0.0))[0] for k in range(definition.periods)]
    values = [rows[k][1] / rows[k][0] if k in rows and rows[k][0] else None for k in range(definition.periods)]
    return LifetimeValue(cohort_id=cohort_id, members=members, cumulative_revenue_per_member=values)


__all__ = [
    "CohortComparison",
    "CohortComputation",
    "CohortDefinition",
    "LifetimeValue",
    "LifetimeValueDefinition",
    "RevenueSource",
    "cohort_is_stale",
    "cohort_members",
    "compare_cohorts",
    "compute_cohort",
    "latest_computation",
    "lifetime_value",
    "membership_sql",
    "period_starts",
]
