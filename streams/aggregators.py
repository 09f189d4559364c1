"""Catalogue definitions compiled to stream aggregations.

Every definition becomes a :class:`MetricAggregator`: it decides whether an event (or a
session) counts, what it contributes (``observe``), and under which dimension values
(``dimension_values``); ``new()`` makes an empty :class:`Accumulator` for one window.

Accumulators follow one small protocol: ``add(observation)``, ``merge(other)``,
``value()`` and ``partial()`` (the mergeable state sent downstream). Merging is
associative and commutative, so a window's value is the same whether its events were
added one by one, merged minute by minute, or merged from several partitions.

>>> from streams.catalogue import CATALOGUE
>>> acc = compile_catalogue(CATALOGUE)["gmv"].new()
>>> acc.add(10.0); acc.add(2.5); acc.value()
12.5
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

from streams.catalogue import (
    DIMENSIONS,
    Aggregation,
    Catalogue,
    Condition,
    MetricDefinition,
    Operator,
    Source,
)
from streams.events import StreamEvent, as_number, as_text, field_reader
from streams.sketches import DEFAULT_EXACT_LIMIT, DistinctCounter


class Accumulator(Protocol):
    """One window's running aggregate."""

    def add(self, observation: Any) -> None:
        """Fold in one observation (what :meth:`MetricAggregator.observe` returned)."""

    def merge(self, other: Any) -> None:
        """Fold in another accumulator's :meth:`partial` of the same metric."""

    def value(self) -> float | None:
        """The metric's value, or None when undefined (average of nothing, ratio over zero)."""

    def partial(self) -> Any:
        """A mergeable, picklable copy of the state, to combine with other partitions' partials."""


class CountAccumulator:
    """Number of matching events."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def add(self, observation: Any) -> None:
        self.n += 1

    def merge(self, other: CountAccumulator) -> None:
        self.n += other.n

    def value(self) -> float | None:
        return float(self.n)

    def partial(self) -> CountAccumulator:
        clone = CountAccumulator()
        clone.n = self.n
        return clone

    def __getstate__(self) -> int:
        return self.n

    def __setstate__(self, state: int) -> None:
        self.n = state


class SumAccumulator:
    """Sum of a numeric field over matching events (events without the field add nothing)."""

    __slots__ = ("total",)

    def __init__(self) -> None:
        self.total = 0.0

    def add(self, observation: float | None) -> None:
        if observation is not None:
            self.total += observation

    def merge(self, other: SumAccumulator) -> None:
        self.total += other.total

    def value(self) -> float | None:
        return self.total

    def partial(self) -> SumAccumulator:
        clone = SumAccumulator()
        clone.total = self.total
        return clone

    def __getstate__(self) -> float:
        return self.total

    def __setstate__(self, state: float) -> None:
        self.total = state


class AverageAccumulator:
    """Mean of a numeric field over the matching events that carry it."""

    __slots__ = ("total", "n")

    def __init__(self) -> None:
        self.total = 0.0
        self.n = 0

    def add(self, observation: float | None) -> None:
        if observation is not None:
            self.total += observation
            self.n += 1

    def merge(self, other: AverageAccumulator) -> None:
        self.total += other.total
        self.n += other.n

    def value(self) -> float | None:
        return self.total / self.n if self.n else None

    def partial(self) -> AverageAccumulator:
        clone = AverageAccumulator()
        clone.total, clone.n = self.total, self.n
        return clone

    def __getstate__(self) -> tuple[float, int]:
        return (self.total, self.n)

    def __setstate__(self, state: tuple[float, int]) -> None:
        self.total, self.n = state


class DistinctAccumulator:
    """Distinct non-empty values of a field (exact, then HLL: see :class:`DistinctCounter`)."""

    __slots__ = ("counter",)

    def __init__(self, exact_limit: int = DEFAULT_EXACT_LIMIT) -> None:
        self.counter = DistinctCounter(exact_limit)

    def add(self, observation: str) -> None:
        if observation:
            self.counter.add(observation)

    def merge(self, other: DistinctAccumulator) -> None:
        self.counter.merge(other.counter)

    def rename(self, old: str, new: str) -> None:
        """Identity stitching: ``old`` turned out to be ``new``."""
        self.counter.rename(old, new)

    def value(self) -> float | None:
        return float(self.counter.estimate())

    def partial(self) -> DistinctAccumulator:
        clone = DistinctAccumulator(self.counter.exact_limit)
        clone.counter = self.counter.copy()
        return clone

    def __getstate__(self) -> Any:
        return self.counter.__getstate__()

    def __setstate__(self, state: Any) -> None:
        self.counter = DistinctCounter()
        self.counter.__setstate__(state)


class RatioAccumulator:
    """numerator / denominator over the same window; undefined when the denominator is 0."""

    __slots__ = ("num", "den")

    def __init__(self, num: Any, den: Any) -> None:
        self.num = num
        self.den = den

    def add(self, observation: tuple[Any, Any]) -> None:
        num_obs, den_obs = observation
        if num_obs is not _SKIP:
            self.num.add(num_obs)
        if den_obs is not _SKIP:
            self.den.add(den_obs)

    def merge(self, other: RatioAccumulator) -> None:
        self.num.merge(other.num)
        self.den.merge(other.den)

    def rename(self, old: str, new: str) -> None:
        for part in (self.num, self.den):
            if isinstance(part, DistinctAccumulator):
                part.rename(old, new)

    def value(self) -> float | None:
        num, den = self.num.value(), self.den.value()
        if num is None or not den:
            return None
        return num / den

    def partial(self) -> RatioAccumulator:
        return RatioAccumulator(self.num.partial(), self.den.partial())

    def __getstate__(self) -> tuple[Any, Any]:
        return (self.num, self.den)

    def __setstate__(self, state: tuple[Any, Any]) -> None:
        self.num, self.den = state


def merged_value(empty: Any, parts: list[Any]) -> float | None:
    """The value of ``parts`` (partials of one window) merged, ``empty`` being the metric's :meth:`new_partial`.

    What merging them into ``empty`` and asking its value gives, without building the merged
    state where that is the cost: distinct counts are counted over the union of the parts'
    keys (:meth:`DistinctCounter.union_count`), a ratio's sides each so. ``parts`` are not changed.
    """
    kind = type(empty)
    if kind is DistinctAccumulator:
        return float(DistinctCounter.union_count([part.counter for part in parts]))
    if kind is RatioAccumulator:
        num = merged_value(empty.num, [part.num for part in parts])
        den = merged_value(empty.den, [part.den for part in parts])
        return None if num is None or not den else num / den
    for part in parts:
        empty.merge(part)
    value: float | None = empty.value()
    return value


class SessionAccumulator:
    """Sessions started in a window, by session id: a newer version of a session replaces the older.

    The partial sent downstream is the (count, total) over this partition's sessions: a
    device's sessions live on one partition, so partitions never share a session.
    """

    __slots__ = ("values", "average")

    def __init__(self, average: bool) -> None:
        self.values: dict[str, float] = {}
        self.average = average

    def add(self, observation: tuple[str, float]) -> None:
        session_id, value = observation
        self.values[session_id] = value

    def merge(self, other: SessionAccumulator | SessionPartial) -> None:
        if isinstance(other, SessionAccumulator):
            self.values.update(other.values)
        else:
            raise TypeError("merge partials with SessionPartial")

    def value(self) -> float | None:
        return self.partial().value()

    def partial(self) -> SessionPartial:
        return SessionPartial(len(self.values), sum(self.values.values()), self.average)

    def __getstate__(self) -> tuple[dict[str, float], bool]:
        return (self.values, self.average)

    def __setstate__(self, state: tuple[dict[str, float], bool]) -> None:
        self.values, self.average = state


class SessionPartial:
    """Per-partition (count, total) of session values; partials of different partitions add up."""

    __slots__ = ("n", "total", "average")

    def __init__(self, n: int = 0, total: float = 0.0, average: bool = False) -> None:
        self.n, self.total, self.average = n, total, average

    def merge(self, other: SessionPartial) -> None:
        self.n += other.n
        self.total += other.total

    def value(self) -> float | None:
        if not self.average:
            return float(self.n)
        return self.total / self.n if self.n else None

    def partial(self) -> SessionPartial:
        return SessionPartial(self.n, self.total, self.average)

    def __getstate__(self) -> tuple[int, float, bool]:
        return (self.n, self.total, self.average)

    def __setstate__(self, state: tuple[int, float, bool]) -> None:
        self.n, self.total, self.average = state


class SessionTotals:
    """What every session metric needs of one window, kept once for all of them.

    The sessions that started in the window (``n``) and the sums of their duration (ms),
    page views and events. A session is folded in as the difference from what it
    contributed before (:meth:`add` takes ``(sessions, duration_ms, page_views,
    events)`` deltas), so the totals are additive: a window's totals are the same
    whether its sessions were folded one by one or as minutes of deltas merged together.
    Each session metric reads its :class:`SessionPartial` off them (:meth:`session_partial`).

    >>> totals = SessionTotals()
    >>> totals.add((1, 60_000, 2, 3)); totals.add((0, 30_000, 1, 1))  # a session, then its update
    >>> totals.session_partial("duration_seconds", True).value()
    90.0
    """

    __slots__ = ("n", "duration_ms", "page_views", "events")

    def __init__(self, n: int = 0, duration_ms: int = 0, page_views: int = 0, events: int = 0) -> None:
        self.n, self.duration_ms, self.page_views, self.events = n, duration_ms, page_views, events

    def add(self, delta: Any) -> None:
        n, duration_ms, page_views, events = delta
        self.n += n
        self.duration_ms += duration_ms
        self.page_views += page_views
        self.events += events

    def merge(self, other: SessionTotals) -> None:
        self.add((other.n, other.duration_ms, other.page_views, other.events))

    def value(self) -> float | None:
        return float(self.n)

    def partial(self) -> SessionTotals:
        return SessionTotals(self.n, self.duration_ms, self.page_views, self.events)

    def session_partial(self, field: str | None, average: bool) -> SessionPartial:
        """The partial of the session metric averaging ``field`` (or counting sessions: ``None``)."""
        if field == "duration_seconds":
            total = self.duration_ms / 1000.0
        elif field == "page_views":
            total = float(self.page_views)
        elif field == "events":
            total = float(self.events)
        else:
            total = float(self.n)
        return SessionPartial(self.n, total, average)

    def __getstate__(self) -> tuple[int, int, int, int]:
        return (self.n, self.duration_ms, self.page_views, self.events)

    def __setstate__(self, state: tuple[int, int, int, int]) -> None:
        self.n, self.duration_ms, self.page_views, self.events = state


class _Skip:
    """Marker: the event does not count for this metric (distinct from a None value)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIP"


_SKIP: Any = _Skip()
SKIP: Any = _SKIP


def _count_one(event: StreamEvent) -> int:
    return 1


def _no_value(event: StreamEvent) -> None:
    return None


def _skip(event: StreamEvent) -> Any:
    return _SKIP


def condition_predicate(condition: Condition) -> Callable[[StreamEvent], bool]:
    """A predicate implementing ``condition`` with ClickHouse's JSONExtract semantics."""
    read = field_reader(condition.field)
    op, expected = condition.op, condition.value
    if op is Operator.eq:
        return lambda e: as_text(read(e)) == expected
    if op is Operator.ne:
        return lambda e: as_text(read(e)) != expected
    if op is Operator.in_:
        return lambda e: as_text(read(e)) in expected
    if op is Operator.not_in:
        return lambda e: as_text(read(e)) not in expected
    compare: Callable[[float, float], bool] = {
        Operator.gt: float.__gt__,
        Operator.gte: float.__ge__,
        Operator.lt: float.__lt__,
        Operator.lte: float.__le__,
    }[op]

    def numeric(e: StreamEvent) -> bool:
        number = as_number(read(e))
        return number is not None and compare(number, expected)

    return numeric


class MetricAggregator:
    """A :class:`MetricDefinition` compiled for the stream."""

    def __init__(self, definition: MetricDefinition, catalogue: Catalogue, exact_limit: int) -> None:
        self.definition = definition
        self.name = definition.name
        self.periods = definition.periods
        self.source = definition.source
        self.dimensions = definition.dimensions
        self._exact_limit = exact_limit
        agg = definition.aggregation
        self.stitched = (agg is Aggregation.distinct and definition.distinct == "person") or (
            agg is Aggregation.ratio
            and any(
                catalogue[p].aggregation is Aggregation.distinct and catalogue[p].distinct == "person"
                for p in (definition.numerator or "", definition.denominator or "")
            )
        )
        self._parts: tuple[MetricAggregator, MetricAggregator] | None = None
        if agg is Aggregation.ratio:
            self._parts = (
                MetricAggregator(catalogue[definition.numerator or ""], catalogue, exact_limit),
                MetricAggregator(catalogue[definition.denominator or ""], catalogue, exact_limit),
            )
            self.event_names: frozenset[str] | None = (
                None
                if any(p.event_names is None for p in self._parts)
                else frozenset().union(*(p.event_names or () for p in self._parts))
            )
        else:
            self.event_names = frozenset(definition.events) if definition.events else None
        self._predicates = tuple(condition_predicate(c) for c in definition.where)
        value_fields = definition.value_fields() if definition.source is Source.events else {}
        self._value_readers = {name: field_reader(path) for name, path in value_fields.items()}
        self._distinct_reader = field_reader(definition.distinct) if agg is Aggregation.distinct else None

    @property
    def ratio_parts(self) -> tuple[MetricAggregator, MetricAggregator] | None:
        """For a ratio: the (numerator, denominator) aggregators; None for any other metric."""
        return self._parts

    def observation_signature(self) -> tuple[Any, ...]:
        """Equal for metrics that observe every event identically (their accumulators can be shared)."""
        d = self.definition
        if d.aggregation is Aggregation.ratio:
            return ("ratio", d.numerator, d.denominator)
        value = tuple(sorted(d.value_fields().items()))
        return (d.aggregation.value, d.source.value, tuple(sorted(d.events)), d.where, value, d.distinct)

    def matches(self, event: StreamEvent) -> bool:
        """Whether ``event`` passes the event-name filter and every condition."""
        if self.event_names is not None and event.event_name not in self.event_names:
            return False
        return all(p(event) for p in self._predicates)

    def observe(self, event: StreamEvent) -> Any:
        """What ``event`` contributes, or :data:`SKIP` when it does not count."""
        if self._parts is not None:
            num, den = (p.observe(event) for p in self._parts)
            if num is _SKIP and den is _SKIP:
                return _SKIP
            return (num, den)
        if not self.matches(event):
            return _SKIP
        agg = self.definition.aggregation
        if agg is Aggregation.count:
            return 1
        if agg is Aggregation.distinct:
            assert self._distinct_reader is not None
            return as_text(self._distinct_reader(event))
        readers = self._value_readers
        read = readers.get("") or readers.get(event.event_name)
        return as_number(read(event)) if read is not None else None

    def observer(self, event_name: str) -> Callable[[StreamEvent], Any]:
        """:meth:`observe` for events named ``event_name``, which passed the name filter (the hot path)."""
        if self._parts is not None:
            num, den = (
                p.observer(event_name) if p.event_names is None or event_name in p.event_names else _skip
                for p in self._parts
            )

            def both(event: StreamEvent) -> Any:
                num_obs, den_obs = num(event), den(event)
                return _SKIP if num_obs is _SKIP and den_obs is _SKIP else (num_obs, den_obs)

            return both
        if self._predicates:
            predicates = self._predicates
            plain = self._plain_observer(event_name)
            return lambda event: plain(event) if all(p(event) for p in predicates) else _SKIP
        return self._plain_observer(event_name)

    def _plain_observer(self, event_name: str) -> Callable[[StreamEvent], Any]:
        agg = self.definition.aggregation
        if agg is Aggregation.count:
            return _count_one
        if agg is Aggregation.distinct:
            assert self._distinct_reader is not None
            read = self._distinct_reader
            return lambda event: as_text(read(event))
        value_read = self._value_readers.get("") or self._value_readers.get(event_name)
        if value_read is None:
            return _no_value
        return lambda event: as_number(value_read(event))

    @property
    def session_field(self) -> str | None:
        """For a session metric: the session field it averages (None: it counts sessions)."""
        if self.definition.aggregation is Aggregation.average:
            return self.definition.value if isinstance(self.definition.value, str) else None
        return None

    def observe_session(self, session: Any) -> tuple[str, float]:
        """A session's contribution to a session metric: (session id, value)."""
        field = self.definition.value
        if field == "duration_seconds":
            return session.session_id, session.duration_ms / 1000.0
        if field == "page_views":
            return session.session_id, float(session.page_views)
        if field == "events":
            return session.session_id, float(session.events)
        return session.session_id, 1.0

    def new(self) -> Any:
        """An empty accumulator for one window."""
        agg = self.definition.aggregation
        if self.source is Source.sessions:
            return SessionAccumulator(average=agg is Aggregation.average)
        if agg is Aggregation.count:
            return CountAccumulator()
        if agg is Aggregation.sum:
            return SumAccumulator()
        if agg is Aggregation.average:
            return AverageAccumulator()
        if agg is Aggregation.distinct:
            return DistinctAccumulator(self._exact_limit)
        if agg is Aggregation.ratio:
            assert self._parts is not None
            return RatioAccumulator(self._parts[0].new(), self._parts[1].new())
        raise ValueError(f"{self.name}: {agg} is not computed by the stream")

    def new_partial(self) -> Any:
        """An empty accumulator of partials (what stage-two merging starts from)."""
        if self.source is Source.sessions:
            return SessionPartial(average=self.definition.aggregation is Aggregation.average)
        return self.new()


def compile_catalogue(
    catalogue: Catalogue,
    names: Iterable[str] | None = None,
    exact_limit: int = DEFAULT_EXACT_LIMIT,
) -> dict[str, MetricAggregator]:
    """Aggregators for the streaming definitions of ``catalogue`` (or just ``names``)."""
    wanted = set(names) if names is not None else None
    return {
        d.name: MetricAggregator(d, catalogue, exact_limit)
        for d in catalogue.streaming()
        if wanted is None or d.name in wanted
    }


def dimension_readers(names: Iterable[str]) -> dict[str, Callable[[StreamEvent], Any]]:
    """Readers of the named dimensions."""
    return {name: field_reader(DIMENSIONS[name]) for name in names}


def encode_state(acc: Any) -> Any:
    """An accumulator (or partial) as JSON-able data, for topics and checkpoints (no pickle on the wire).

    >>> encode_state(SessionPartial(2, 90.0, True))
    ['p', True, 2, 90.0]
    """
    # Dispatched on the type: a checkpoint encodes every open window, an isinstance chain per window showed.
    encode = _ENCODERS.get(type(acc))
    if encode is None:
        encode = next((_ENCODERS[c] for c in type(acc).__mro__ if c in _ENCODERS), None)
        if encode is None:
            raise TypeError(f"cannot encode {type(acc).__name__}")
    return encode(acc)


def _encode_distinct(acc: DistinctAccumulator) -> list[Any]:
    import base64

    counter = acc.counter
    if counter.keys is not None:
        return ["d", counter.exact_limit, list(counter.keys)]
    return ["h", counter.exact_limit, base64.b64encode(counter.sketch.serialize_compact()).decode("ascii")]


_ENCODERS: dict[type, Callable[[Any], Any]] = {
    CountAccumulator: lambda acc: ["c", acc.n],
    SumAccumulator: lambda acc: ["s", acc.total],
    AverageAccumulator: lambda acc: ["a", acc.total, acc.n],
    DistinctAccumulator: _encode_distinct,
    RatioAccumulator: lambda acc: ["r", encode_state(acc.num), encode_state(acc.den)],
    SessionAccumulator: lambda acc: ["S", acc.average, acc.values],
    SessionPartial: lambda acc: ["p", acc.average, acc.n, acc.total],
    SessionTotals: lambda acc: ["T", acc.n, acc.duration_ms, acc.page_views, acc.events],
}


class _Encoded:
    """A state already encoded as JSON text, in the place of a ratio's part (see :func:`state_json`)."""

    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text


_ENCODERS[_Encoded] = lambda encoded: orjson.Fragment(encoded.text)


def state_json(acc: Any, encoded: dict[int, bytes]) -> bytes:
    """``orjson.dumps(encode_state(acc))``, each state object encoded once while ``encoded`` is kept.

    Metrics sharing a window publish the same state object (dau, active_users and the
    denominator of arpu: one set of thousands of ids); ``encoded`` holds the text of every
    state encoded so far, by object id, so the caller must keep those objects alive as long
    as it keeps ``encoded``. A ratio is a new object per partial: its parts are looked up,
    and the ratio's own encoder writes their texts in.
    """
    if type(acc) is RatioAccumulator:
        parts = RatioAccumulator(_Encoded(state_json(acc.num, encoded)), _Encoded(state_json(acc.den, encoded)))
        return orjson.dumps(encode_state(parts))
    text = encoded.get(id(acc))
    if text is None:
        text = encoded[id(acc)] = orjson.dumps(encode_state(acc))
    return text


def decode_state(data: Any) -> Any:
    """The inverse of :func:`encode_state`."""
    import base64

    tag = data[0]
    if tag == "c":
        count = CountAccumulator()
        count.n = int(data[1])
        return count
    if tag == "s":
        total = SumAccumulator()
        total.total = float(data[1])
        return total
    if tag == "a":
        average = AverageAccumulator()
        average.total, average.n = float(data[1]), int(data[2])
        return average
    if tag in ("d", "h"):
        distinct = DistinctAccumulator(int(data[1]))
        payload = data[2] if tag == "d" else base64.b64decode(data[2])
        distinct.counter = DistinctCounter.from_state((0 if tag == "d" else 1, payload), int(data[1]))
        return distinct
    if tag == "r":
        return RatioAccumulator(decode_state(data[1]), decode_state(data[2]))
    if tag == "S":
        session = SessionAccumulator(bool(data[1]))
        session.values = {str(k): float(v) for k, v in data[2].items()}
        return session
    if tag == "p":
        return SessionPartial(int(data[2]), float(data[3]), bool(data[1]))
    if tag == "T":
        return SessionTotals(int(data[1]), int(data[2]), int(data[3]), int(data[4]))
    raise ValueError(f"unknown accumulator tag {tag!r}")
