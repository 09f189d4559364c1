"""Funnels on the embedded ClickHouse engine against the plain-Python reference."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from api.analyses.funnels import (
    Breakdown,
    FunnelDefinition,
    FunnelExclusion,
    FunnelStep,
    compute_funnel,
    funnel_people,
)
from api.analyses.query import PropertyFilter, TimeRange
from tests.analysis_reference import Event, at, funnel_reference, insert_events

pytestmark = pytest.mark.integration

START, END = at("2026-03-01 00:00:00"), at("2026-04-01 00:00:00")
RANGE = TimeRange(start=START, end=END)


def steps(*names: str) -> tuple[FunnelStep, ...]:
    return tuple(FunnelStep(name=n, event_name=n) for n in names)


def check(ch_db, events, definition, filters=()):
    """Compare the ClickHouse result with the reference, step by step."""
    insert_events(ch_db, events)
    got = compute_funnel(ch_db, definition, RANGE, filters=tuple(filters))
    want = funnel_reference(events, definition, START, END, filters)
    assert [s.count for s in got.steps] == want["counts"]
    assert got.excluded == want["excluded"]
    for s, times in zip(got.steps[1:], want["step_times"], strict=True):
        for key in ("mean", "median", "p90"):
            assert getattr(s.time_from_previous, key) == pytest.approx(times[key], abs=1e-6)
    for key in ("mean", "median", "p90"):
        assert getattr(got.time_to_convert, key) == pytest.approx(want["total_time"][key], abs=1e-6)
    return got, want


def test_window_edge_is_inclusive(ch_db):
    t0 = at("2026-03-02 10:00:00")
    events = [
        # converts exactly at the edge (t1 + 60 s)
        Event("a", t0, user_id="edge"), Event("b", t0 + timedelta(seconds=60), user_id="edge"),
        # one millisecond too late
        Event("a", t0, user_id="late"), Event("b", t0 + timedelta(seconds=60, milliseconds=1), user_id="late"),
    ]
    definition = FunnelDefinition(name="edge", steps=steps("a", "b"), window_seconds=60)
    got, want = check(ch_db, events, definition)
    assert want["levels"] == {"edge": 2, "late": 1}
    assert [s.count for s in got.steps] == [2, 1]
    assert got.time_to_convert.median == pytest.approx(60.0)


def test_time_range_is_half_open_to_the_millisecond(ch_db):
    # Bounds inside days (the day is also bounded, to prune the sort key): [start, end) still
    # decides alone, on both days.
    start, end = at("2026-03-10 12:00:00"), at("2026-03-12 06:30:00")
    ms = timedelta(milliseconds=1)
    events = [
        Event("a", start, user_id="inside"), Event("b", end - ms, user_id="inside"),
        Event("a", start - ms, user_id="early"), Event("b", start + ms, user_id="early"),
        Event("a", end - 2 * ms, user_id="late"), Event("b", end, user_id="late"),
    ]
    insert_events(ch_db, events)
    definition = FunnelDefinition(name="range", steps=steps("a", "b"), window_seconds=3 * 86400)
    got = compute_funnel(ch_db, definition, TimeRange(start=start, end=end))
    want = funnel_reference(events, definition, start, end)
    assert want["levels"] == {"inside": 2, "late": 1}
    assert [s.count for s in got.steps] == want["counts"] == [2, 1]
    # A range ending at midnight ends with the last millisecond of the day before.
    midnight = at("2026-03-13 00:00:00")
    last_day = [
        Event("a", midnight - 2 * ms, user_id="by_midnight"), Event("b", midnight - ms, user_id="by_midnight"),
        Event("a", midnight - ms, user_id="at_midnight"), Event("b", midnight, user_id="at_midnight"),
    ]
    insert_events(ch_db, last_day)
    got = compute_funnel(ch_db, definition, TimeRange(start=end, end=midnight))
    want = funnel_reference(events + last_day, definition, end, midnight)
    assert want["levels"] == {"by_midnight": 2, "at_midnight": 1}
    assert [s.count for s in got.steps] == want["counts"] == [2, 1]


def test_same_millisecond_counts_as_in_order(ch_db):
    t0 = at("2026-03-02 10:00:00.123")
    events = [
        # inserted "b" first; same millisecond still converts (steps are ordered by step number on ties)
        Event("b", t0, user_id="u1"), Event("a", t0, user_id="u1"),
        Event("c", t0, user_id="u1"),
    ]
    definition = FunnelDefinition(name="same-ms", steps=steps("a", "b", "c"), window_seconds=10)
    got, _ = check(ch_db, events, definition)
    assert [s.count for s in got.steps] == [1, 1, 1]
    assert got.time_to_convert.mean == 0.0


@pytest.mark.parametrize("order", ["ordered", "strict", "unordered"])
def test_out_of_order_steps(ch_db, order):
    t0 = at("2026-03-03 08:00:00")
    s = timedelta(seconds=1)
    events = [
        # a c b: ordered reaches 2 (c is just another event), strict stops at 1, unordered does 3 steps
        Event("a", t0, user_id="p1"), Event("c", t0 + s, user_id="p1"), Event("b", t0 + 2 * s, user_id="p1"),
        # a x b c: strict stops at x
        Event("a", t0, user_id="p2"), Event("x", t0 + s, user_id="p2"),
        Event("b", t0 + 2 * s, user_id="p2"), Event("c", t0 + 3 * s, user_id="p2"),
        # a a b b c: repeats allowed everywhere
        Event("a", t0, user_id="p3"), Event("a", t0 + s, user_id="p3"), Event("b", t0 + 2 * s, user_id="p3"),
        Event("b", t0 + 3 * s, user_id="p3"), Event("c", t0 + 4 * s, user_id="p3"),
        # b c a: only unordered converts
        Event("b", t0, user_id="p4"), Event("c", t0 + s, user_id="p4"), Event("a", t0 + 2 * s, user_id="p4"),
        # x before the first step does not matter for strict
        Event("x", t0, user_id="p5"), Event("a", t0 + s, user_id="p5"), Event("b", t0 + 2 * s, user_id="p5"),
        Event("c", t0 + 3 * s, user_id="p5"),
    ]
    definition = FunnelDefinition(name="order", steps=steps("a", "b", "c"), window_seconds=3600, order=order)
    _, want = check(ch_db, events, definition)
    expected = {
        "ordered": {"p1": 2, "p2": 3, "p3": 3, "p4": 1, "p5": 3},
        "strict": {"p1": 1, "p2": 1, "p3": 3, "p4": 1, "p5": 3},
        "unordered": {"p1": 3, "p2": 3, "p3": 3, "p4": 3, "p5": 3},
    }[order]
    assert want["levels"] == expected


def test_identity_stitching_merges_device_and_user(ch_db):
    t0 = at("2026-03-04 12:00:00")
    events = [
        Event("a", t0, anonymous_id="dev1"),  # anonymous before login
        Event("login", t0 + timedelta(minutes=1), user_id="alice", anonymous_id="dev1"),
        Event("b", t0 + timedelta(minutes=2), user_id="alice"),
        Event("a", t0, anonymous_id="dev2"),  # never logs in: its own person
    ]
    definition = FunnelDefinition(name="stitch", steps=steps("a", "b"), window_seconds=3600)
    got, want = check(ch_db, events, definition)
    assert want["levels"] == {"alice": 2, "dev2": 1}
    people = funnel_people(ch_db, definition, RANGE, step=2)
    assert people.people == ["alice"] and people.total == 1
    dropped = funnel_people(ch_db, definition, RANGE, step=1, status="dropped")
    assert dropped.people == ["dev2"]


def test_exclusions(ch_db):
    t0 = at("2026-03-05 12:00:00")
    m = timedelta(minutes=1)
    events = [
        Event("a", t0, user_id="clean"), Event("b", t0 + 2 * m, user_id="clean"),
        Event("a", t0, user_id="dirty"), Event("cancel", t0 + m, user_id="dirty"),
        Event("b", t0 + 2 * m, user_id="dirty"),
        # cancel after converting does not exclude
        Event("a", t0, user_id="after"), Event("b", t0 + m, user_id="after"),
        Event("cancel", t0 + 2 * m, user_id="after"),
        # did not convert, cancelled within the window: excluded
        Event("a", t0, user_id="stuck"), Event("cancel", t0 + 5 * m, user_id="stuck"),
        # did not convert, cancelled after the window: kept
        Event("a", t0, user_id="outside"), Event("cancel", t0 + 90 * m, user_id="outside"),
        # cancelled, then started again and converted: the attempt measured starts after the cancel
        Event("a", t0, user_id="restarted"), Event("cancel", t0 + m, user_id="restarted"),
        Event("a", t0 + 2 * m, user_id="restarted"), Event("b", t0 + 3 * m, user_id="restarted"),
    ]
    definition = FunnelDefinition(
        name="excl",
        steps=steps("a", "b"),
        window_seconds=3600,
        exclusions=(FunnelExclusion(event_name="cancel", from_step=1, to_step=2),),
    )
    got, want = check(ch_db, events, definition)
    assert got.excluded == 2
    assert want["levels"] == {"clean": 2, "after": 2, "outside": 1, "restarted": 2}


def _random_events(rng: random.Random, people: int = 120) -> list[Event]:
    names = ["view", "cart", "pay", "noise"]
    communities = ["lagos", "nairobi", "accra", "kano", "abuja"]
    events: list[Event] = []
    for p in range(people):
        user = f"u{p:03d}"
        t = START + timedelta(days=rng.randint(0, 25), seconds=rng.randint(0, 86400), milliseconds=rng.randint(0, 999))
        for _ in range(rng.randint(1, 12)):
            t += timedelta(milliseconds=rng.choice([0, 1, 500, 30_000, 600_000, 3_600_000, 40_000_000]))
            events.append(
                Event(
                    rng.choice(names),
                    t,
                    user_id=user,
                    properties={"community": rng.choice(communities), "amount": rng.choice([5, 10, 50])},
                )
            )
    return events


@pytest.mark.parametrize("order", ["ordered", "strict", "unordered"])
def test_random_paths_match_reference(ch_db, order):
    rng = random.Random(6 + len(order))
    events = _random_events(rng)
    definition = FunnelDefinition(
        name="random",
        steps=(
            FunnelStep(name="view", event_name="view"),
            FunnelStep(name="cart", event_name="cart"),
            FunnelStep(name="pay", event_name="pay", filters=(PropertyFilter(key="amount", operator="gt", value=6),)),
        ),
        window_seconds=2 * 3600,
        order=order,
        breakdown=Breakdown(key="community", limit=3),
    )
    filters = (PropertyFilter(key="community", operator="neq", value="kano"),)
    got, want = check(ch_db, events, definition, filters=filters)
    assert got.steps[0].count > 20 and got.steps[-1].count > 0
    assert {b.value: [s.count for s in b.steps] for b in got.breakdown} == want["breakdown"]
    assert sum(b.steps[0].count for b in got.breakdown) == got.steps[0].count
    everyone = funnel_people(ch_db, definition, RANGE, step=1, filters=filters, limit=1000)
    assert everyone.people == sorted(want["levels"])
    page = funnel_people(ch_db, definition, RANGE, step=1, filters=filters, limit=5, offset=5)
    assert page.people == sorted(want["levels"])[5:10] and page.total == len(want["levels"])


@pytest.mark.parametrize("order", ["ordered", "strict", "unordered"])
def test_events_matching_several_steps_match_reference(ch_db, order):
    # Steps sharing an event name: one event can be two steps (and the same millisecond orders them).
    rng = random.Random(17 + len(order))
    events = _random_events(rng)
    definition = FunnelDefinition(
        name="shared",
        steps=(
            FunnelStep(name="view", event_name="view"),
            FunnelStep(name="big", event_name="view", filters=(PropertyFilter(key="amount", operator="gt", value=6),)),
            FunnelStep(name="cart", event_name="cart"),
            FunnelStep(name="anything", event_name="$any"),
        ),
        window_seconds=3 * 3600,
        order=order,
    )
    got, want = check(ch_db, events, definition)
    assert got.steps[0].count > 20 and got.steps[-1].count > 0


def test_times_come_from_the_first_attempt_to_reach_the_furthest_step(ch_db):
    t0 = at("2026-03-06 09:00:00")

    def path(user: str, *steps_at: tuple[str, int]) -> list[Event]:
        return [Event(name, t0 + timedelta(seconds=sec), user_id=user) for name, sec in steps_at]

    events = [
        # a repeated step 1 restarts the attempt: measured from the last one before the step 2
        *path("restart", ("a", 0), ("a", 10), ("b", 30), ("c", 40)),
        # the first start is too old for the window: the second one converts
        *path("too_old", ("a", 0), ("a", 50), ("b", 70), ("c", 75)),
        # the first attempt to finish is reported, not a later (shorter or not) one
        *path("first_done", ("a", 0), ("b", 5), ("c", 8), ("a", 10), ("b", 12), ("c", 15)),
        # two attempts finish on the same step-3 event: the later start (the shorter attempt)
        *path("caught_up", ("a", 0), ("b", 5), ("a", 10), ("b", 12), ("c", 20)),
        # a step 1 after the step 2 does not discard the attempt that moved on
        *path("moved_on", ("a", 0), ("b", 5), ("a", 10), ("c", 20)),
    ]
    definition = FunnelDefinition(name="times", steps=steps("a", "b", "c"), window_seconds=60)
    got, want = check(ch_db, events, definition)
    assert set(want["levels"].values()) == {3} and got.steps[2].count == 5
    # (restart, too_old, first_done, caught_up, moved_on)
    assert got.steps[1].time_from_previous.mean == pytest.approx((20 + 20 + 5 + 2 + 5) / 5)
    assert got.steps[2].time_from_previous.mean == pytest.approx((10 + 5 + 3 + 8 + 15) / 5)
    assert got.time_to_convert.mean == pytest.approx((30 + 25 + 8 + 10 + 20) / 5)


def test_ordered_levels_equal_clickhouse_window_funnel(ch_db):
    """The ordered funnel's attempts reach exactly the level of ClickHouse's own ``windowFunnel``."""
    events = _random_events(random.Random(41), people=150)
    insert_events(ch_db, events)
    definition = FunnelDefinition(name="wf", steps=steps("view", "cart", "pay"), window_seconds=2 * 3600)
    got = compute_funnel(ch_db, definition, RANGE)
    levels = ch_db.query(
        "SELECT level, count() FROM ("
        " SELECT person_id, windowFunnel({w:UInt64})(toUInt64(toUnixTimestamp64Milli(timestamp)),"
        "  event_name = 'view', event_name = 'cart', event_name = 'pay') AS level"
        " FROM events_resolved WHERE timestamp >= {s:DateTime64(3, 'UTC')} AND timestamp < {e:DateTime64(3, 'UTC')}"
        " GROUP BY person_id) GROUP BY level",
        parameters={"w": definition.window_ms, "s": START, "e": END},
    ).result_rows
    reached = dict(levels)
    assert [s.count for s in got.steps] == [sum(c for lv, c in reached.items() if lv >= k) for k in (1, 2, 3)]
    assert got.steps[-1].count > 0
