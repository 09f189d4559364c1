"""Catalogue definitions compiled to ClickHouse SQL over raw events (the batch side of every metric).

One query per (metric, period): events from ``events_resolved`` (deduplicated, identity
stitched) in a time range aligned to whole periods, grouped by the period start in the
reporting timezone and by each dimension value (``ARRAY JOIN`` of the metric's
dimensions plus the total). Session metrics sessionise raw events in SQL with the same
rules as :mod:`streams.sessions` (``arrayFold`` over each device's sorted events).

Nothing from a definition is formatted into the SQL text except what the catalogue has
validated against a fixed grammar (dimension names from a fixed list, SQL keywords
chosen here); every name, key, value, time and timezone travels as a server-side
parameter (``{p0:String}``).

Value semantics match the stream's (:mod:`streams.events`): a text field is the JSON
string or ''; a numeric field is a JSON number (``Int64``/``UInt64``/``Double``) or NULL
(ClickHouse's ``JSONExtract(..., 'Float64')`` would also read ``true`` or ``"12"``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client

from streams.catalogue import (
    DIMENSIONS,
    SESSION_DIMENSIONS,
    TEXT_OPERATORS,
    Aggregation,
    Catalogue,
    Condition,
    MetricDefinition,
    Operator,
    Source,
)
from streams.periods import Period, PeriodCalendar
from streams.windows import MetricValue

log = logging.getLogger(__name__)

# Dimensions that are materialised columns of ``events`` (the rest are read from JSON).
_DIMENSION_COLUMNS = {
    "community": "community",
    "category": "category",
    "country": "country",
    "device": "device_type",
    "utm_source": "utm_source",
}
_PLAIN_FIELDS = {
    "person": "person_id",
    "event_name": "event_name",
    "event_type": "event_type",
    "user_id": "user_id",
    "anonymous_id": "anonymous_id",
}
_NUMERIC_JSON = "('Int64', 'UInt64', 'Double')"
_COMPARE = {Operator.gt: ">", Operator.gte: ">=", Operator.lt: "<", Operator.lte: "<="}


@dataclass
class Query:
    """SQL text and its server-side parameters."""

    sql: str
    parameters: dict[str, Any] = field(default_factory=dict)


class _Params:
    """Collects parameters and hands out ``{name:Type}`` placeholders."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def add(self, value: Any, type_: str) -> str:
        name = f"p{len(self.values)}"
        self.values[name] = value
        return "{" + f"{name}:{type_}" + "}"


class MetricSql:
    """Builds the batch query of a metric for one period and time range, in one reporting timezone."""

    def __init__(
        self,
        catalogue: Catalogue,
        calendar: PeriodCalendar,
        session_gap_ms: int = 30 * 60_000,
        session_max_length_ms: int = 24 * 3_600_000,
    ) -> None:
        self.catalogue = catalogue
        self.calendar = calendar
        self.session_gap_ms = session_gap_ms
        self.session_max_length_ms = session_max_length_ms

    # ------------------------------------------------------------------ expressions
    def period_start(self, column: str, period: Period, p: _Params) -> str:
        """Epoch ms of the start of ``column``'s period in the reporting timezone."""
        if period is Period.minute:
            return f"intDiv(toUnixTimestamp64Milli({column}), 60000) * 60000"
        tz = p.add(self.calendar.timezone, "String")
        if period is Period.hour:
            return f"toInt64(toUnixTimestamp(toStartOfHour({column}, {tz}))) * 1000"
        if period is Period.day:
            local_date = f"toDate({column}, {tz})"
        elif period is Period.week:
            week_start = p.add(self.calendar.week_start, "UInt8")
            local_date = f"(toDate({column}, {tz}) - ((toDayOfWeek({column}, 0, {tz}) + 7 - {week_start}) % 7))"
        else:
            local_date = f"toStartOfMonth({column}, {tz})"
        return f"toInt64(toUnixTimestamp(toDateTime({local_date}, {tz}))) * 1000"

    def _json_args(self, path: str, p: _Params) -> str:
        root, *keys = path.split(".")
        return ", ".join([root, *(p.add(k, "String") for k in keys)])

    def text(self, path: str, p: _Params) -> str:
        """A field as text ('' when missing or not a string)."""
        if path in _PLAIN_FIELDS:
            return _PLAIN_FIELDS[path]
        return f"JSONExtractString({self._json_args(path, p)})"

    def number(self, path: str, p: _Params) -> str:
        """A field as a nullable number (NULL unless it is a JSON number)."""
        args = self._json_args(path, p)
        return f"if(JSONType({args}) IN {_NUMERIC_JSON}, JSONExtractFloat({args}), NULL)"

    def condition(self, cond: Condition, p: _Params) -> str:
        """One property condition."""
        if cond.op in TEXT_OPERATORS:
            value = self.text(cond.field, p)
            if cond.op in (Operator.in_, Operator.not_in):
                sql_op = "IN" if cond.op is Operator.in_ else "NOT IN"
                return f"{value} {sql_op} {p.add(list(cond.value), 'Array(String)')}"
            return f"{value} {'=' if cond.op is Operator.eq else '!='} {p.add(cond.value, 'String')}"
        number = self.number(cond.field, p)
        return f"ifNull({number} {_COMPARE[cond.op]} {p.add(cond.value, 'Float64')}, 0)"

    def event_filter(self, d: MetricDefinition, p: _Params) -> str:
        """Event names and conditions of a plain definition."""
        parts = []
        if d.events:
            parts.append(f"event_name IN {p.add(list(d.events), 'Array(String)')}")
        parts += [self.condition(c, p) for c in d.where]
        return " AND ".join(f"({x})" for x in parts) or "1"

    def value_of(self, d: MetricDefinition, p: _Params) -> str:
        """The numeric value a sum/average adds up (per event name when it is a mapping)."""
        fields = d.value_fields()
        if "" in fields:
            return self.number(fields[""], p)
        branches = []
        for name, path in fields.items():
            branches += [f"event_name = {p.add(name, 'String')}", self.number(path, p)]
        return f"multiIf({', '.join(branches)}, NULL)"

    def aggregate(self, d: MetricDefinition, cond: str, p: _Params) -> str:
        """The aggregate expression of a plain definition over the rows where ``cond`` holds."""
        agg = d.aggregation
        if agg is Aggregation.count:
            return f"toFloat64(countIf({cond}))"
        if agg is Aggregation.distinct:
            key = self.text(d.distinct, p)
            return f"toFloat64(uniqExactIf({key}, ({cond}) AND {key} != ''))"
        value = self.value_of(d, p)
        if agg is Aggregation.sum:
            return f"sumIf(ifNull({value}, 0), {cond})"
        if agg is Aggregation.average:
            present = f"({cond}) AND isNotNull({value})"
            return f"if(countIf({present}) > 0, sumIf(assumeNotNull({value}), {present}) / countIf({present}), NULL)"
        raise ValueError(f"{d.name}: {agg} is not a plain aggregation")

    def dimensions(self, names: Iterable[str], session: bool = False) -> str:
        """``ARRAY JOIN`` source: the total ('', '') plus each non-empty dimension value."""
        items = ["('', '')"]
        for name in names:
            if session:
                column = f"dim_{name}"
            else:
                # Dimension names and paths come from the fixed DIMENSIONS table, never from input.
                root, *keys = DIMENSIONS[name].split(".")
                column = _DIMENSION_COLUMNS.get(name) or f"JSONExtractString({root}, '{keys[0]}', '{keys[1]}')"
            items.append(f"('{name}', toString({column}))")
        return f"arrayFilter(d -> d.1 = '' OR d.2 != '', [{', '.join(items)}])"

    # ------------------------------------------------------------------ queries
    def query(self, d: MetricDefinition, period: Period, from_ms: int, to_ms: int) -> Query:
        """The query of ``d`` at ``period`` for every period intersecting ``[from_ms, to_ms)``."""
        lo = self.calendar.bounds(period, from_ms)[0]
        hi = self.calendar.bounds(period, to_ms - 1)[1]
        p = _Params()
        if d.aggregation is Aggregation.churn:
            return self._churn(d, period, lo, hi, p)
        if d.source is Source.sessions:
            return self._sessions(d, period, lo, hi, p)
        if d.aggregation is Aggregation.ratio:
            num, den = self.catalogue[d.numerator or ""], self.catalogue[d.denominator or ""]
            num_cond, den_cond = self.event_filter(num, p), self.event_filter(den, p)
            num_value = self.aggregate(num, num_cond, p)
            den_value = self.aggregate(den, den_cond, p)
            value = f"if(ifNull({den_value}, 0) != 0, {num_value} / {den_value}, NULL)"
            where = f"(({num_cond}) OR ({den_cond}))"
        else:
            where = self.event_filter(d, p)
            value = self.aggregate(d, "1", p)
        start = self.period_start("timestamp", period, p)
        lo_p, hi_p = p.add(lo, "Int64"), p.add(hi, "Int64")
        sql = f"""
            SELECT {start} AS period_start, dim.1 AS dimension, dim.2 AS dimension_value, {value} AS value
            FROM events_resolved
            ARRAY JOIN {self.dimensions(d.dimensions)} AS dim
            WHERE timestamp >= fromUnixTimestamp64Milli({lo_p}, 'UTC')
              AND timestamp < fromUnixTimestamp64Milli({hi_p}, 'UTC')
              AND {where}
            GROUP BY period_start, dimension, dimension_value
            HAVING isNotNull(value)
            ORDER BY period_start, dimension, dimension_value
        """
        return Query(sql, p.values)

    def sessions_sql(self, lo: int, hi: int, p: _Params) -> str:
        """Sessions that started in ``[lo, hi)``, sessionised from raw events like the stream does.

        A session's start depends on the device's earlier events (up to the maximum length
        back), so events from ``2 x max_length`` before ``lo`` are read too.
        """
        gap, max_len = p.add(self.session_gap_ms, "Int64"), p.add(self.session_max_length_ms, "Int64")
        read_lo = p.add(lo - 2 * self.session_max_length_ms, "Int64")
        read_hi = p.add(hi + self.session_max_length_ms, "Int64")
        lo_p, hi_p = p.add(lo, "Int64"), p.add(hi, "Int64")
        dims = ", ".join(
            f"JSONExtractString(first_context, {p.add(path.split('.')[1], 'String')}, "
            f"{p.add(path.split('.')[2], 'String')}) AS dim_{name}"
            for name, path in DIMENSIONS.items()
            if name in SESSION_DIMENSIONS
        )
        return f"""
            SELECT device_id, started_at, last_seen_at, events, page_views, {dims}
            FROM (
                SELECT device_id, s AS started_at, max(e.1) AS last_seen_at, count() AS events,
                       countIf(e.2) AS page_views, argMin(e.3, e.1) AS first_context
                FROM (
                    SELECT device_id, evs,
                           arrayFold((acc, x) -> if(x.1 - acc.3 >= {gap} OR x.1 - acc.2 >= {max_len},
                                                    (arrayPushBack(acc.1, x.1), x.1, x.1),
                                                    (arrayPushBack(acc.1, acc.2), acc.2, x.1)),
                                     evs,
                                     (CAST([] AS Array(Int64)), toInt64(-4e15), toInt64(-4e15))).1 AS starts
                    FROM (
                        SELECT if(anonymous_id != '', anonymous_id, user_id) AS device_id,
                               arraySort(x -> x.1, groupArray((toUnixTimestamp64Milli(timestamp),
                                                               event_type = 'page_view', context))) AS evs
                        FROM events FINAL
                        WHERE timestamp >= fromUnixTimestamp64Milli({read_lo}, 'UTC')
                          AND timestamp < fromUnixTimestamp64Milli({read_hi}, 'UTC')
                        GROUP BY device_id
                    )
                )
                ARRAY JOIN evs AS e, starts AS s
                GROUP BY device_id, started_at
            )
            WHERE started_at >= {lo_p} AND started_at < {hi_p}
        """

    def _sessions(self, d: MetricDefinition, period: Period, lo: int, hi: int, p: _Params) -> Query:
        inner = self.sessions_sql(lo, hi, p)
        start = self.period_start("fromUnixTimestamp64Milli(started_at, 'UTC')", period, p)
        if d.aggregation is Aggregation.count:
            value = "toFloat64(count())"
        elif d.value == "duration_seconds":
            value = "avg((last_seen_at - started_at) / 1000)"
        else:
            value = f"avg(toFloat64({'page_views' if d.value == 'page_views' else 'events'}))"
        sql = f"""
            SELECT {start} AS period_start, dim.1 AS dimension, dim.2 AS dimension_value, {value} AS value
            FROM ({inner})
            ARRAY JOIN {self.dimensions(d.dimensions, session=True)} AS dim
            GROUP BY period_start, dimension, dimension_value
            ORDER BY period_start, dimension, dimension_value
        """
        return Query(sql, p.values)

    def _churn(self, d: MetricDefinition, period: Period, lo: int, hi: int, p: _Params) -> Query:
        base = self.catalogue[d.of or ""]
        read_lo = self.calendar.bounds(period, lo - 1)[0]  # the previous period is compared too
        where = self.event_filter(base, p)
        key = self.text(base.distinct, p)
        start = self.period_start("timestamp", period, p)
        prev = self.period_start("fromUnixTimestamp64Milli(period_start - 1, 'UTC')", period, p)
        lo_p, hi_p, read_lo_p = p.add(lo, "Int64"), p.add(hi, "Int64"), p.add(read_lo, "Int64")
        sql = f"""
            WITH members AS (
                SELECT {start} AS period_start, groupUniqArray({key}) AS people
                FROM events_resolved
                WHERE timestamp >= fromUnixTimestamp64Milli({read_lo_p}, 'UTC')
                  AND timestamp < fromUnixTimestamp64Milli({hi_p}, 'UTC')
                  AND {where} AND {key} != ''
                GROUP BY period_start
            )
            SELECT cur.period_start AS period_start, '' AS dimension, '' AS dimension_value,
                   (length(prev.people) - length(arrayIntersect(prev.people, cur.people))) / length(prev.people)
                       AS value
            FROM (SELECT period_start, people, {prev} AS previous_start FROM members) AS cur
            INNER JOIN members AS prev ON prev.period_start = cur.previous_start
            WHERE cur.period_start >= {lo_p} AND length(prev.people) > 0
            ORDER BY period_start
        """
        return Query(sql, p.values)


def compute_metrics(
    client: Client,
    builder: MetricSql,
    definitions: Iterable[MetricDefinition],
    from_ms: int,
    to_ms: int,
) -> list[MetricValue]:
    """Every snapshot of ``definitions`` for the periods intersecting ``[from_ms, to_ms)``, from raw events."""
    out: list[MetricValue] = []
    for d in definitions:
        for period in d.periods:
            started = time.monotonic()
            query = builder.query(d, period, from_ms, to_ms)
            rows = client.query(query.sql, parameters=query.parameters).result_rows
            for start, dim, value_of_dim, value in rows:
                end = builder.calendar.bounds(period, int(start))[1]
                dims = {dim: value_of_dim} if dim else {}
                out.append(MetricValue(d.name, period, int(start), end, dims, float(value)))
            log.debug("Computed %s/%s: %d rows in %.3fs", d.name, period.value, len(rows), time.monotonic() - started)
    return out
