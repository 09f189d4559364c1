"""Funnels: how many people go through a sequence of steps within a conversion window.

Semantics (each one mirrored by the plain-Python reference in the tests)
-----------------------------------------------------------------------
People are ``person_id`` of ``events_resolved`` (after identity stitching), so a device's
anonymous events and the same person's logged-in events form one path. Only events in the
time range ``[start, end)`` are considered. A step matches an event when its event name and
its filters *and* the analysis-wide filters match. Time is compared in milliseconds.

The per-person level is ClickHouse's ``windowFunnel(window_ms[, mode])``:

- An event matching several steps counts for each of them. Events are ordered by
  ``(timestamp, step number)``, so two steps in the **same millisecond** count as in order.
- The window is **inclusive**: step *k* converts when ``t_k <= t_1 + window``.
- A later step-1 event restarts the attempt from that time (a later start leaves more of the
  window), keeping the steps already reached; the level is the highest step reached by any
  attempt; the first full conversion wins.

Orders:

- ``ordered``: steps in order; other events (and out-of-order steps) in between are allowed.
- ``strict`` (``'strict_order'`` mode; every event of the person in the range is fed in):
  after the person's first step-1 event, the funnel **stops** at the first event that is not
  any step, or that is a step whose previous step has not been reached yet. Repeats of steps
  already reached, and new step-1 events, are allowed. So ``A X B`` stops at 1 and
  ``A C B`` stops at 1 for steps ``A, B, C``, while ordered reaches 2 in both.
- ``unordered``: the level is the largest number of distinct steps done within one window
  ``[t, t + window]`` that starts at one of the person's step events (in any order). Step *k*
  means "did *k* of the steps"; times are between the first time each step was done in that
  window, sorted. Exclusions are not defined for unordered funnels.

Times to convert come from one attempt per person that reaches their level (for strict
funnels a ``throwIf`` guards that its length equals ``windowFunnel``'s level; for ordered ones
the tests compare the two, and the attempt alone is computed, which halves the cost):

- ordered: an attempt starts at a step-1 event and takes, for each next step, the first
  matching event at or after the previous step. The attempt reported is the **first to
  reach the person's level** (its last step is the earliest), and of attempts reaching it
  on that same event, the one with the latest start -- PostHog's rule. So a step-1 event
  repeated before the next step restarts the clock: for steps ``A, B`` and events
  ``A 09:00, A 09:10, B 09:30`` the time to convert is 20 minutes, not 30; with
  ``A 09:00, B 09:05, A 09:10, B 09:12`` it is 5 minutes (the first conversion). Step-to-step
  times come from the same attempt. A person who reached step 1 only is measured from their
  first step-1 event (exclusions use it);
- strict: the latest attempt that reached the level, replayed with ``arrayFold`` by the same
  rules as ``strict_order``;
- unordered: the earliest window start with the most distinct steps.

Medians and p90 are ``quantileExactInclusive`` (linear interpolation, like
``numpy.percentile``), in seconds.

Exclusions ``{event_name, from_step, to_step}``: a person whose attempt reached
``from_step`` is excluded (from every step, and counted in ``excluded``) when the excluded
event happened strictly after their ``from_step`` time and strictly before their
``to_step`` time — or, when they never reached ``to_step``, at most at the end of their
window (``t_1 + window``).

Breakdown: a person's value is the property on their earliest step-1 event in the range
(the smallest value on a tie); the top *N* values by people entering the funnel are kept and
the rest are merged into "Other".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.analyses.query import ANY_EVENT, PropertyFilter, SQLBuilder, TimeRange, run

FunnelOrder = Literal["ordered", "strict", "unordered"]

#: windowFunnel handles at most 32 conditions.
MAX_STEPS = 32
#: A person's step events are ``time_ms * STEP_SLOTS + step`` in one UInt64 array, so that one
#: numeric sort orders them by time and, within a millisecond, by step (step 0 is any other
#: event, for strict funnels); every step number fits below it.
STEP_SLOTS = 64


class FunnelStep(BaseModel):
    """One step: an event name and the filters its event must pass."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=200)
    event_name: str = Field(min_length=1, max_length=200)
    filters: tuple[PropertyFilter, ...] = ()


class FunnelExclusion(BaseModel):
    """People who did ``event_name`` between two of their steps are left out."""

    model_config = ConfigDict(frozen=True)

    event_name: str = Field(min_length=1, max_length=200)
    filters: tuple[PropertyFilter, ...] = ()
    from_step: int = Field(ge=1, description="1-based step after which the event excludes.")
    to_step: int = Field(ge=2, description="1-based step before which the event excludes.")


class Breakdown(BaseModel):
    """Split results by a property: the top ``limit`` values plus "Other"."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(min_length=1, max_length=200)
    source: Literal["event", "context"] = "event"
    limit: int = Field(10, ge=1, le=100)


class FunnelDefinition(BaseModel):
    """What a saved funnel is (the metadata database stores this document)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    steps: tuple[FunnelStep, ...] = Field(min_length=2, max_length=MAX_STEPS)
    window_seconds: float = Field(14 * 24 * 3600, gt=0, description="Conversion window (milliseconds precision).")
    order: FunnelOrder = "ordered"
    exclusions: tuple[FunnelExclusion, ...] = ()
    breakdown: Breakdown | None = None

    @property
    def window_ms(self) -> int:
        """The window in whole milliseconds, as ``windowFunnel`` takes it."""
        return round(self.window_seconds * 1000)

    @model_validator(mode="after")
    def _exclusions_fit(self) -> FunnelDefinition:
        for exclusion in self.exclusions:
            if self.order == "unordered":
                raise ValueError("exclusions are not defined for unordered funnels")
            if not exclusion.from_step < exclusion.to_step <= len(self.steps):
                raise ValueError("an exclusion needs 1 <= from_step < to_step <= number of steps")
        return self


class ConversionTime(BaseModel):
    """Seconds from one step to another, over the people who made it."""

    mean: float | None = None
    median: float | None = None
    p90: float | None = None


class FunnelStepResult(BaseModel):
    """One step's numbers."""

    step: int
    name: str
    count: int = Field(description="People who reached this step.")
    conversion_from_start: float = Field(description="count / count of step 1.")
    conversion_from_previous: float = Field(description="count / count of the previous step.")
    dropped: int = Field(description="People who reached the previous step but not this one (0 for step 1).")
    time_from_previous: ConversionTime = Field(default_factory=ConversionTime)


class FunnelSeries(BaseModel):
    """All steps for one group of people (everyone, or one breakdown value)."""

    steps: list[FunnelStepResult]
    overall_conversion: float
    time_to_convert: ConversionTime = Field(description="From step 1 to the last step.")


class FunnelBreakdownValue(FunnelSeries):
    """The series of the people with one breakdown value ("Other" merges the rest)."""

    value: str
    is_other: bool = False


class FunnelResult(FunnelSeries):
    """What a funnel computes."""

    name: str
    order: FunnelOrder
    window_seconds: float
    excluded: int = Field(0, description="People left out by exclusion events.")
    breakdown: list[FunnelBreakdownValue] = Field(default_factory=list)


class FunnelPeople(BaseModel):
    """One page of the people at a step (or dropped right after it)."""

    step: int
    status: Literal["reached", "dropped"]
    total: int
    people: list[str]


def _per_person_sql(
    q: SQLBuilder,
    definition: FunnelDefinition,
    time_range: TimeRange,
    filters: tuple[PropertyFilter, ...],
    cohort_id: str | None,
) -> str:
    """One row per person: level, the attempt's step times (``chain``), breakdown value, excluded flag."""
    n = len(definition.steps)
    window = q.param(definition.window_ms, "UInt64")
    step_conds = [q.event_condition(s.event_name, s.filters + filters) for s in definition.steps]
    excl_conds = [q.event_condition(x.event_name, x.filters) for x in definition.exclusions]
    bv = (
        q.property_string(definition.breakdown.key, definition.breakdown.source)
        if definition.breakdown is not None
        else "''"
    )
    row_cols = ", ".join(f"toUInt8({c}) AS s{i}" for i, c in enumerate(step_conds, 1))
    excl_cols = "".join(f", toUInt8({c}) AS x{j}" for j, c in enumerate(excl_conds, 1))
    names = {s.event_name for s in definition.steps}
    one_step_a_row = len(names) == n and ANY_EVENT not in names
    if one_step_a_row:
        # Each step names another event, so an event matches one step at most: one entry a row.
        row_cols += ", multiIf(" + ", ".join(f"s{k} = 1, {k}" for k in range(1, n + 1)) + ", 0) AS step"
    where = [q.time_range(time_range), q.in_cohort(cohort_id)]
    if definition.order != "strict":
        # Strict funnels must see every event (any other event ends the attempt).
        where.append("(" + " OR ".join([f"({c})" for c in step_conds + excl_conds]) + ")")
    rows = (
        f"SELECT person_id, toUInt64(toUnixTimestamp64Milli(timestamp)) AS t, {row_cols}{excl_cols}, {bv} AS bv "
        f"FROM events_resolved WHERE {' AND '.join(where)}"
    )
    # Step 0 is any other event: strict funnels keep it (it ends the attempt), others drop it.
    if one_step_a_row:
        packed = f"t * {STEP_SLOTS} + step"
        entries = f"groupArray({packed})" if definition.order == "strict" else f"groupArrayIf({packed}, step != 0)"
    else:
        flags = "[" + ", ".join(f"s{k}" for k in range(1, n + 1)) + "]"
        matched = f"arrayFilter(k -> {flags}[k] = 1, range(1, {n + 1}))"
        if definition.order == "strict":
            matched = f"if(empty({matched}), [0], {matched})"
        entries = f"groupArrayArray(arrayMap(k -> t * {STEP_SLOTS} + k, {matched}))"
    conds = ", ".join(f"s{i} = 1" for i in range(1, n + 1))
    breakdown_value = "argMinIf(bv, (t, bv), s1 = 1)" if definition.breakdown is not None else "''"
    aggregates = [f"{window} AS w", f"arraySort({entries}) AS packed", f"{breakdown_value} AS breakdown_value"]
    aggregates += [f"groupArrayIf(t, x{j} = 1) AS xs{j}" for j in range(1, len(excl_conds) + 1)]
    # Replays and windows of strict and unordered funnels read (time, step) pairs.
    def as_pairs(events: str) -> str:
        return f"arrayMap(x -> (intDiv(x, {STEP_SLOTS}), toUInt8(x % {STEP_SLOTS})), {events}) AS entries"

    layers: list[list[str]]
    if definition.order == "unordered":
        in_window = "e.1 >= a AND e.1 <= a + w"
        candidates = (
            f"arrayMap(a -> arraySort(arrayMap(j -> arrayMin(arrayMap(e -> e.1, arrayFilter(e -> e.2 = j AND "
            f"{in_window}, entries))), arrayDistinct(arrayMap(e -> e.2, arrayFilter(e -> {in_window}, entries))))), "
            "arrayMap(e -> e.1, entries))"
        )
        layers = [
            [as_pairs("packed")],
            [f"{candidates} AS cand"],
            ["arrayFirst(c -> length(c) = arrayMax(arrayMap(c -> length(c), cand)), cand) AS chain"],
            ["toUInt8(length(chain)) AS level", "toUInt8(0) AS guard"],
        ]
    elif definition.order == "strict":
        aggregates.append(f"windowFunnel({definition.window_ms}, 'strict_order')(t, {conds}) AS wf_level")
        m = STEP_SLOTS
        # The replay skips every event before the first step-1 event and stops at the first other
        # event after it, so it only folds over the run between them (a few events, not all).
        layers = [
            [f"arrayFirstIndex(x -> x % {m} = 1, packed) AS first_start"],
            ["if(first_start = 0, CAST([] AS Array(UInt64)), arraySlice(packed, first_start)) AS from_start"],
            [f"arrayFirstIndex(x -> x % {m} = 0, from_start) AS first_other"],
            ["if(first_other = 0, from_start, arraySlice(from_start, 1, first_other - 1)) AS run"],
            [as_pairs("run")],
            [f"{_attempt_fold(n)} AS fold"],
            ["arrayFilter(c -> notEmpty(c), fold.2) AS reached"],
            ["if(empty(reached), CAST([] AS Array(UInt64)), reached[-1]) AS chain"],
            ["toUInt8(length(chain)) AS level"],
            ["throwIf(level != wf_level, 'funnel attempt disagrees with windowFunnel') AS guard"],
        ]
    else:
        layers = _ordered_attempts(n)
        layers.append(["toUInt8(0) AS guard"])
    excluded_terms = []
    for j, x in enumerate(definition.exclusions, 1):
        a, b = x.from_step, x.to_step
        excluded_terms.append(
            f"(level >= {a} AND arrayExists(v -> v > chain[{a}] AND "
            f"if(level >= {b}, v < chain[{b}], v <= chain[1] + w), xs{j}))"
        )
    layers.append([f"toUInt8({' OR '.join(excluded_terms) or '0'}) AS excluded"])
    grouped = f"SELECT person_id, {', '.join(aggregates)} FROM ({rows}) GROUP BY person_id"
    return (
        "SELECT person_id, level, chain, guard, breakdown_value, excluded "
        f"FROM ({_stacked(grouped, layers)})"
    )


def _stacked(base: str, layers: list[list[str]]) -> str:
    """``base`` with each layer's columns added on top of the columns before, one subquery a layer.

    Why subqueries: within one SELECT, ClickHouse's analyzer replaces every use of an alias
    by a copy of its expression tree. Attempt columns use the previous step's columns several
    times over, so one SELECT's tree grew exponentially with the steps, and planning a 5-step
    funnel took about 0.4 s before it read a row. A subquery's column is one node to the query
    above it (its name in the plan still spells the whole expression: see ``_series_columns``).
    """
    sql = base
    for columns in layers:
        sql = f"SELECT *, {', '.join(columns)} FROM ({sql})"
    return sql


def _ordered_attempts(n: int) -> list[list[str]]:
    """Ordered funnels: a person's level and the step times of the attempt reported, from ``packed``.

    ``packed`` holds the person's step events sorted by (time, step). An attempt starts at a
    step-1 event and takes, for each next step, the first event of that step at or after the
    previous step and at most ``start + window`` (taking the earliest is optimal for a fixed
    start, so the best attempt reaches ``windowFunnel``'s level; the tests compare them).

    Only starts directly followed, among the step-1 and step-2 events, by a step-2 event are
    tried (a handful per person rather than every step-1 event). A start followed by
    another step-1 event first is dominated by that later one: both take the same step-2
    event and so the same later steps, and the later one has more of its window left and
    a shorter time to convert. Among the attempts reaching the person's level, the one
    reported is the first to get there (its last step is the earliest) and, of those ending
    on that same event, the one with the latest start: the attempt a replay of the events
    in order keeps (the module docstring; the plain-Python reference replays it). A person
    whose level is 1 reports their first step-1 event.

    ``c{k}[i]`` is the time of step ``k`` of the ``i``-th start (0 once it fell short); each
    step is looked up in ``packed`` itself (a bound on packed values selects the step and
    the time span), which costs less than splitting it into one time array a step first.
    """
    m = STEP_SLOTS
    start_then_2 = f"x % {m} = 1 AND y % {m} = 2"
    layers = [
        [
            f"arrayFilter(x -> x % {m} <= 2, packed) AS steps12",  # packed holds steps 1..n only
            f"intDiv(arrayFirst(x -> x % {m} = 1, packed), {m}) AS first1",
        ],
        ["arrayShiftLeft(steps12, 1) AS after12"],
        [
            f"arrayMap(x -> intDiv(x, {m}), arrayFilter((x, y) -> {start_then_2}, steps12, after12)) AS c1",
            f"arrayMap(y -> intDiv(y, {m}), arrayFilter((y, x) -> {start_then_2}, after12, steps12)) AS next2",
        ],
        ["arrayMap((s, y) -> if(y <= s + w, y, 0), c1, next2) AS c2"],
    ]
    for k in range(3, n + 1):
        # Step k at or after p, at most s + w: packed values in [p * m, (s + w) * m + m - 1] of step k.
        found = f"arrayFirst(x -> x % {m} = {k} AND x >= p * {m} AND x <= (s + w) * {m} + {m - 1}, packed)"
        layers.append([f"arrayMap((s, p) -> if(p = 0, toUInt64(0), intDiv({found}, {m})), c1, c{k - 1}) AS c{k}"])
    # One tuple per start, ordered as the attempt to report should win: the highest level, then
    # the earliest last step (steps only grow along an attempt, so its last step is the
    # greatest), then the latest start; its step times ride along. The first step-1 event
    # alone is one more candidate, winning among attempts that never got past step 1.
    lambda_args = ", ".join(f"v{k}" for k in range(1, n + 1))
    level = "toUInt8(1 + " + " + ".join(f"(v{k} != 0)" for k in range(2, n + 1)) + ")"
    last = f"greatest({', '.join(f'v{k}' for k in range(2, n + 1))})" if n > 2 else "v2"
    ranked = f"({level}, -toInt64({last}), v1, arraySlice([{lambda_args}], 1, {level}))"
    first_only = (
        "(toUInt8(first1 != 0), toInt64(0), toUInt64(18446744073709551615), arraySlice([first1], 1, first1 != 0))"
    )
    args = ", ".join(f"c{k}" for k in range(1, n + 1))
    layers += [
        [f"arrayPushBack(arrayMap(({lambda_args}) -> {ranked}, {args}), {first_only}) AS attempts"],
        ["arrayMax(attempts).4 AS chain"],
        ["toUInt8(length(chain)) AS level"],
    ]
    return layers


def _attempt_fold(n: int) -> str:
    """Strict funnels: ``arrayFold`` replaying windowFunnel's ``strict_order`` over sorted ``(t, step)`` entries.

    The entries are a person's run from their first step-1 event up to the first event of no
    step (see the strict layers of the per-person query), so the replay starts at a step 1 and
    never meets another event. Accumulator ``(stopped, attempts)`` where ``attempts[k]`` holds
    the step times of the latest attempt that reached step ``k``; a step whose previous step
    was never reached stops it, as strict order does. Kept in SQL so ClickHouse does the work
    per person and times come from the attempt that gave the level.
    """

    def set_slot(k: str, value: str) -> str:
        return f"arrayMap((c, j) -> if(j = {k}, {value}, c), acc.2, arrayEnumerate(acc.2))"

    body = (
        f"if(acc.1 = 1 OR notEmpty(acc.2[{n}]), acc, "
        f"if(e.2 = 1, (acc.1, {set_slot('1', '[e.1]')}), "
        "if(empty(acc.2[e.2 - 1]), (toUInt8(1), acc.2), "
        f"if(e.1 <= acc.2[e.2 - 1][1] + w, (acc.1, {set_slot('e.2', 'arrayPushBack(acc.2[e.2 - 1], e.1)')}), "
        "acc))))"
    )
    init = f"(toUInt8(0), arrayMap(i -> CAST([] AS Array(UInt64)), range({n})))"
    return f"arrayFold((acc, e) -> {body}, entries, {init})"


def _series_columns(n: int, mode: Literal["", "State", "Merge"] = "") -> str:
    """Aggregates over per-person rows: people per step, times between steps and overall.

    Excluded people are left out of every step (they are counted apart). ``kept`` is a
    person's step times (empty when excluded) and ``gaps`` the seconds between them, so the
    ``k``-th element of a ``-ForEach`` aggregate is over the people who reached step ``k``
    (``k + 1`` for gaps). Arrays past the furthest step anyone reached are shorter.
    Few references to the per-person columns keep the plan small: ClickHouse names every
    column by its whole expression, so each reference copies the attempts' text.

    ``mode`` "State" gives the aggregates' states (as ``state_<name>``), and "Merge"
    combines such states: a breakdown merges the values outside its top ones into "Other".
    """
    total = f"toFloat64(kept[{n}] - kept[1]) / 1000"
    complete = f"length(kept) = {n}"
    aggregates = (
        ("counts", "countForEach", "", "kept"),
        ("means", "avgForEach", "", "gaps"),
        ("quantiles", "quantilesExactInclusiveForEach", "(0.5, 0.9)", "gaps"),
        ("mean_total", "avgIf", "", f"{total}, {complete}"),
        ("q_total", "quantilesExactInclusiveIf", "(0.5, 0.9)", f"{total}, {complete}"),
    )
    if mode == "State":
        return ", ".join(f"{f}State{p}({args}) AS state_{name}" for name, f, p, args in aggregates)
    return ", ".join(
        f"{f}{mode}{p}({f'state_{name}' if mode else args}) AS {name}" for name, f, p, args in aggregates
    )


#: Columns of a row of :func:`_series_columns`.
_SERIES_NAMES = ("counts", "means", "quantiles", "mean_total", "q_total")


def _with_gaps(per_person: str, where: str) -> str:
    """``per_person`` rows passing ``where``, with the ``kept`` and ``gaps`` that :func:`_series_columns` reads."""
    return (
        "SELECT *, if(excluded = 0, chain, CAST([] AS Array(UInt64))) AS kept, "
        "arrayMap(d -> toFloat64(d) / 1000, arrayPopFront(arrayDifference(kept))) AS gaps "
        f"FROM ({per_person}) WHERE {where}"
    )


def _conversion_time(mean: Any, quantiles: Any, count: int) -> ConversionTime:
    if count == 0:
        return ConversionTime()
    return ConversionTime(mean=float(mean), median=float(quantiles[0]), p90=float(quantiles[1]))


def _series(definition: FunnelDefinition, row: dict[str, Any]) -> FunnelSeries:
    n = len(definition.steps)
    counts = [int(c) for c in row["counts"]] + [0] * (n - len(row["counts"]))
    steps = []
    for k in range(1, n + 1):
        count, prev = counts[k - 1], counts[k - 2] if k > 1 else counts[0]
        steps.append(
            FunnelStepResult(
                step=k,
                name=definition.steps[k - 1].name,
                count=count,
                conversion_from_start=count / counts[0] if counts[0] else 0.0,
                conversion_from_previous=count / prev if prev else 0.0,
                dropped=prev - count if k > 1 else 0,
                time_from_previous=(
                    _conversion_time(row["means"][k - 2], row["quantiles"][k - 2], count)
                    if k > 1 and count
                    else ConversionTime()
                ),
            )
        )
    return FunnelSeries(
        steps=steps,
        overall_conversion=counts[-1] / counts[0] if counts[0] else 0.0,
        time_to_convert=_conversion_time(row["mean_total"], row["q_total"], counts[-1]),
    )


def compute_funnel(
    client: Any,
    definition: FunnelDefinition,
    time_range: TimeRange,
    filters: tuple[PropertyFilter, ...] = (),
    cohort_id: str | None = None,
) -> FunnelResult:
    """Compute a funnel over ``events_resolved`` (semantics in the module docstring)."""
    q = SQLBuilder()
    n = len(definition.steps)
    per_person = _per_person_sql(q, definition, time_range, tuple(filters), cohort_id)
    sql = (
        f"SELECT {_series_columns(n)}, countIf(excluded = 1) AS excluded_people "
        f"FROM ({_with_gaps(per_person, 'guard = 0 AND (level >= 1 OR excluded = 1)')})"
    )
    names = [*_SERIES_NAMES, "excluded_people"]
    (row,) = run(client, sql, q)
    overall = _series(definition, dict(zip(names, row, strict=True)))
    result = FunnelResult(
        name=definition.name,
        order=definition.order,
        window_seconds=definition.window_seconds,
        excluded=int(row[-1]),
        **overall.model_dump(),
    )
    if definition.breakdown is not None:
        result.breakdown = _breakdown(client, definition, time_range, tuple(filters), cohort_id, names)
    return result


def _breakdown(
    client: Any,
    definition: FunnelDefinition,
    time_range: TimeRange,
    filters: tuple[PropertyFilter, ...],
    cohort_id: str | None,
    names: list[str],
) -> list[FunnelBreakdownValue]:
    assert definition.breakdown is not None
    q = SQLBuilder()
    n = len(definition.steps)
    per_person = _per_person_sql(q, definition, time_range, filters, cohort_id)
    limit = q.param(definition.breakdown.limit, "UInt64")
    # One pass over the people: aggregate states per value, then merge the values outside the
    # top ones into "Other" (a second reference to the people would compute them again).
    per_value = (
        f"SELECT breakdown_value, count() AS people, {_series_columns(n, 'State')} "
        f"FROM ({_with_gaps(per_person, 'level >= 1 AND excluded = 0 AND guard = 0')}) GROUP BY breakdown_value"
    )
    ranked = (
        f"SELECT *, row_number() OVER (ORDER BY people DESC, breakdown_value) <= {limit} AS is_top "
        f"FROM ({per_value})"
    )
    sql = (
        f"SELECT {_series_columns(n, 'Merge')}, 0 AS excluded_people, is_top, "
        f"if(is_top, breakdown_value, '') AS value FROM ({ranked}) "
        "GROUP BY is_top, value ORDER BY is_top DESC, counts[1] DESC, value"
    )
    out: list[FunnelBreakdownValue] = []
    for row in run(client, sql, q):
        series = _series(definition, dict(zip(names, row[: len(names)], strict=True)))
        is_top = bool(row[len(names)])
        out.append(
            FunnelBreakdownValue(value=row[-1] if is_top else "Other", is_other=not is_top, **series.model_dump())
        )
    return out


def funnel_people(
    client: Any,
    definition: FunnelDefinition,
    time_range: TimeRange,
    step: int,
    status: Literal["reached", "dropped"] = "reached",
    filters: tuple[PropertyFilter, ...] = (),
    cohort_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> FunnelPeople:
    """People who reached ``step`` (1-based), or who reached it and went no further, by person id."""
    n = len(definition.steps)
    if not 1 <= step <= n:
        raise ValueError(f"step must be within 1..{n}")
    if status == "dropped" and step == n:
        raise ValueError("nobody drops after the last step")
    q = SQLBuilder()
    per_person = _per_person_sql(q, definition, time_range, tuple(filters), cohort_id)
    cond = f"level >= {step}" if status == "reached" else f"level = {step}"
    lim, off = q.param(limit, "UInt64"), q.param(offset, "UInt64")
    # The total is a window count over the same rows: a second reference to a CTE would
    # compute the whole per-person query again. A page past the end has no row to carry it.
    sql = (
        f"SELECT count() OVER () AS total, person_id FROM ({per_person}) "
        f"WHERE excluded = 0 AND guard = 0 AND {cond} ORDER BY person_id LIMIT {lim} OFFSET {off}"
    )
    rows = run(client, sql, q)
    total = int(rows[0][0]) if rows else _count_only(client, definition, time_range, filters, cohort_id, cond)
    return FunnelPeople(step=step, status=status, total=total, people=[r[1] for r in rows])


def _count_only(
    client: Any,
    definition: FunnelDefinition,
    time_range: TimeRange,
    filters: tuple[PropertyFilter, ...],
    cohort_id: str | None,
    cond: str,
) -> int:
    q = SQLBuilder()
    per_person = _per_person_sql(q, definition, time_range, tuple(filters), cohort_id)
    sql = f"SELECT count() FROM ({per_person}) WHERE excluded = 0 AND guard = 0 AND {cond}"
    return int(run(client, sql, q)[0][0])
