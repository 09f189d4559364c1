"""The one small SQL builder every analysis uses.

Why a builder: analyses take user input (event names, property keys and values, cohort
ids, time ranges). None of it is ever formatted into SQL text. Values become ClickHouse
server-side parameters (``{p3:String}``, sent with clickhouse-connect's ``parameters=``);
the only identifiers the builder emits come from fixed allow-lists below (hot columns,
ClickHouse types, funnel modes). Property keys are values too: they go into
``JSONExtract*(properties, {p:String})`` as parameters.

Property filters
----------------
A :class:`PropertyFilter` names a key of the event's ``properties`` (``source="event"``)
or a dotted path into its ``context`` (``source="context"``, e.g. ``"location.country"``).
Hot keys are read from their materialised columns (no JSON parsing):

- event: ``amount`` (Nullable(Float64)), ``currency``, ``project_id``, ``community``, ``category``
- context: ``location.country`` → ``country``, ``device.type`` → ``device_type``,
  ``campaign.source`` → ``utm_source``

Operators and how values compare (mirrored by the plain-Python reference in the tests):

- ``eq``/``neq``/``in``/``not_in``: a string value compares with the property as a JSON string
  (a missing or non-string property reads as ``""``); a numeric value compares numerically
  (a missing or non-numeric property reads as NULL, so ``eq`` is false and ``neq`` true).
- ``contains``: case-insensitive substring of the string value.
- ``gt``/``lt``: numeric; a missing property never matches.
- ``is_set``: the key is present in the JSON (hot string columns: not empty; amount: not NULL).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Operator = Literal["eq", "neq", "in", "not_in", "contains", "gt", "lt", "is_set"]

#: Hot event properties and their materialised columns (see sinks/migrations.py, migration 1).
HOT_EVENT_COLUMNS: dict[str, str] = {
    "amount": "amount",
    "currency": "currency",
    "project_id": "project_id",
    "community": "community",
    "category": "category",
}
#: Hot context paths and their materialised columns.
HOT_CONTEXT_COLUMNS: dict[str, str] = {
    "location.country": "country",
    "device.type": "device_type",
    "campaign.source": "utm_source",
}
_NUMERIC_HOT_COLUMNS = frozenset({"amount"})

#: The only ClickHouse types a parameter may be declared with.
PARAMETER_TYPES = frozenset(
    {
        "String",
        "UInt8",
        "UInt64",
        "Int64",
        "Float64",
        "Array(String)",
        "Array(Float64)",
        "Array(Int64)",
        "Array(UInt64)",
        "DateTime64(3, 'UTC')",
    }
)

#: The event name meaning "any event" (retention's return event, lifecycle activity).
ANY_EVENT = "$any"


class PropertyFilter(BaseModel):
    """One condition on an event property (or context path)."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(min_length=1, max_length=200)
    operator: Operator = "eq"
    value: str | float | bool | list[str] | list[float] | None = None
    source: Literal["event", "context"] = "event"

    @field_validator("value")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        # Booleans would silently compare as numbers; keep the contract small and explicit.
        if isinstance(value, bool):
            raise ValueError("boolean property values are not supported; compare with 'true'/'false' strings")
        return value


class TimeRange(BaseModel):
    """A half-open interval of event time, ``[start, end)``, in UTC."""

    model_config = ConfigDict(frozen=True)

    start: datetime
    end: datetime

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("time range bounds must be timezone-aware")
        return value.astimezone(UTC)


class SQLBuilder:
    """Collects SQL fragments and the server-side parameters they refer to.

    >>> q = SQLBuilder()
    >>> q.event_condition("signup", [PropertyFilter(key="method", value="email")])
    '(event_name = {p0:String} AND JSONExtractString(properties, {p1:String}) = {p2:String})'
    >>> q.parameters
    {'p0': 'signup', 'p1': 'method', 'p2': 'email'}
    """

    def __init__(self, use_hot_columns: bool = True, properties_column: Literal["properties", "traits"] = "properties"):
        self.parameters: dict[str, Any] = {}
        # Off when the JSON is not an event's own properties (e.g. a person's latest identify traits).
        self.use_hot_columns = use_hot_columns
        if properties_column not in ("properties", "traits"):
            raise ValueError(f"unknown JSON column {properties_column!r}")
        self.properties_column = properties_column

    def param(self, value: Any, ch_type: str) -> str:
        """A placeholder for ``value`` declared as ``ch_type`` (from :data:`PARAMETER_TYPES`)."""
        if ch_type not in PARAMETER_TYPES:
            raise ValueError(f"parameter type {ch_type!r} is not allowed")
        name = f"p{len(self.parameters)}"
        self.parameters[name] = value
        return "{" + name + ":" + ch_type + "}"

    # --- properties -------------------------------------------------------------------------

    def property_string(self, key: str, source: Literal["event", "context"] = "event") -> str:
        """The property as a string expression (``""`` when missing or not a string)."""
        hot = self._hot_column(key, source)
        if hot is not None and hot not in _NUMERIC_HOT_COLUMNS:
            return hot
        return f"JSONExtractString({self._json_args(key, source)})"

    def property_number(self, key: str, source: Literal["event", "context"] = "event") -> str:
        """The property as ``Nullable(Float64)`` (NULL when missing or not a number)."""
        hot = self._hot_column(key, source)
        if hot in _NUMERIC_HOT_COLUMNS:
            return hot
        return f"JSONExtract({self._json_args(key, source)}, 'Nullable(Float64)')"

    def property_is_set(self, key: str, source: Literal["event", "context"] = "event") -> str:
        """Whether the key is present."""
        hot = self._hot_column(key, source)
        if hot in _NUMERIC_HOT_COLUMNS:
            return f"isNotNull({hot})"
        if hot is not None:
            return f"{hot} != ''"
        return f"JSONHas({self._json_args(key, source)})"

    def property_filter(self, f: PropertyFilter) -> str:
        """The SQL condition of one :class:`PropertyFilter`."""
        op, value = f.operator, f.value
        if op == "is_set":
            return self.property_is_set(f.key, f.source)
        if op in ("gt", "lt"):
            if not isinstance(value, int | float):
                raise ValueError(f"operator {op} needs a number")
            sign = ">" if op == "gt" else "<"
            return f"ifNull({self.property_number(f.key, f.source)} {sign} {self.param(float(value), 'Float64')}, 0)"
        if op == "contains":
            if not isinstance(value, str):
                raise ValueError("operator contains needs a string")
            return (
                f"positionCaseInsensitiveUTF8({self.property_string(f.key, f.source)}, "
                f"{self.param(value, 'String')}) > 0"
            )
        if op in ("in", "not_in"):
            if not isinstance(value, list) or not value:
                raise ValueError(f"operator {op} needs a non-empty list")
            if all(isinstance(v, str) for v in value):
                cond = f"{self.property_string(f.key, f.source)} IN {self.param(list(value), 'Array(String)')}"
            elif all(isinstance(v, int | float) for v in value):
                nums = [float(v) for v in value]
                cond = f"ifNull({self.property_number(f.key, f.source)} IN {self.param(nums, 'Array(Float64)')}, 0)"
            else:
                raise ValueError(f"operator {op} needs a list of all strings or all numbers")
            return cond if op == "in" else f"NOT ({cond})"
        # eq / neq
        if isinstance(value, str):
            cond = f"{self.property_string(f.key, f.source)} = {self.param(value, 'String')}"
        elif isinstance(value, int | float):
            cond = f"ifNull({self.property_number(f.key, f.source)} = {self.param(float(value), 'Float64')}, 0)"
        else:
            raise ValueError(f"operator {op} needs a string or a number")
        return cond if op == "eq" else f"NOT ({cond})"

    def all_of(self, filters: list[PropertyFilter] | tuple[PropertyFilter, ...]) -> str:
        """All filters ANDed (``1`` when there are none)."""
        parts = [self.property_filter(f) for f in filters]
        return "(" + " AND ".join(parts) + ")" if parts else "1"

    # --- events, time, people ---------------------------------------------------------------

    def event_condition(self, event_name: str, filters: list[PropertyFilter] | tuple[PropertyFilter, ...] = ()) -> str:
        """The event is ``event_name`` (or any event for ``$any``) and passes ``filters``."""
        parts = [] if event_name == ANY_EVENT else [f"event_name = {self.param(event_name, 'String')}"]
        parts += [self.property_filter(f) for f in filters]
        return "(" + " AND ".join(parts) + ")" if parts else "1"

    def time_range(self, time_range: TimeRange, column: str = "timestamp") -> str:
        """``column`` within ``[start, end)``; ``column`` must be a known timestamp column.

        For event time the UTC day is bounded too, from the start's day to the day of the last
        instant in the range. It changes no result, but ``events`` is sorted by
        ``(event_name, toDate(timestamp), ...)`` and the primary index only prunes granules by
        day on a condition written on ``toDate(timestamp)``: without it a 30-day range over a
        quarter of events read every granule of the named events.

        >>> q = SQLBuilder()
        >>> bounds = TimeRange(start=datetime(2026, 3, 1, tzinfo=UTC), end=datetime(2026, 3, 2, tzinfo=UTC))
        >>> q.time_range(bounds, "received_at")
        "(received_at >= {p0:DateTime64(3, 'UTC')} AND received_at < {p1:DateTime64(3, 'UTC')})"
        """
        if column not in ("timestamp", "received_at"):
            raise ValueError(f"unknown time column {column!r}")
        t = "DateTime64(3, 'UTC')"
        start, end = self.param(time_range.start, t), self.param(time_range.end, t)
        cond = f"{column} >= {start} AND {column} < {end}"
        if column == "timestamp":
            # Every table and view with event time stores it as DateTime64(3, 'UTC'), so
            # toDate(timestamp) is the UTC day, like toDate() of the UTC parameters.
            cond += f" AND toDate({column}) BETWEEN toDate({start}) AND toDate(subtractMilliseconds({end}, 1))"
        return f"({cond})"

    def in_cohort(self, cohort_id: str | None) -> str:
        """People in the latest finished computation of a cohort (``1`` when no cohort is given).

        A computation is finished once its row is in ``cohorts_computed`` (written after the
        members), so a half-written recomputation is never visible.
        """
        if cohort_id is None:
            return "1"
        cid = self.param(cohort_id, "String")
        return (
            f"person_id IN (SELECT person_id FROM cohort_members WHERE cohort_id = {cid} AND computed_at = "
            f"(SELECT max(computed_at) FROM cohorts_computed WHERE cohort_id = {cid}))"
        )

    # --- helpers ------------------------------------------------------------------------------

    def _hot_column(self, key: str, source: Literal["event", "context"]) -> str | None:
        if not self.use_hot_columns:
            return None
        return (HOT_EVENT_COLUMNS if source == "event" else HOT_CONTEXT_COLUMNS).get(key)

    def _json_args(self, key: str, source: Literal["event", "context"]) -> str:
        if source == "event":
            return f"{self.properties_column}, {self.param(key, 'String')}"
        path = key.split(".")
        if any(not part for part in path):
            raise ValueError(f"bad context path {key!r}")
        return "context, " + ", ".join(self.param(part, "String") for part in path)


def run(client: Any, sql: str, builder: SQLBuilder, settings: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Run ``sql`` with the builder's parameters; return its rows."""
    return client.query(sql, parameters=builder.parameters, settings=settings or {}).result_rows
