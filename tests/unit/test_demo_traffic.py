"""The demo traffic generator: determinism, order, taxonomy, realism, experiments, injected incidents.

Every property is measured in plain Python over the generated events.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from schemas.models import AnalyticsEvent
from schemas.taxonomy import EVENT_TYPES
from tidemark.demo import (
    EVENTS_PER_SESSION,
    InjectedAnomaly,
    TrafficConfig,
    TrafficSimulator,
    assign_variant,
    generate_events,
    generate_records,
    with_anomalies,
)
from tidemark.demo.traffic import to_event, to_record

BERLIN = ZoneInfo("Europe/Berlin")
# Four weeks around the EU switch to summer time (2026-03-29), in Berlin local time.
START = datetime(2026, 3, 9, tzinfo=UTC)
MONTH = TrafficConfig(
    start=START, end=START + timedelta(days=28), sessions_per_day=1000, seed=11, timezone="Europe/Berlin"
)

# Key properties per event name (DESIGN.md's taxonomy).
REQUIRED_PROPERTIES: dict[str, set[str]] = {
    "page_view": {"path", "title"},
    "signup": {"method"},
    "login": set(),
    "identify": set(),
    "join_community": {"community"},
    "project_created": {"project_id", "community", "category", "goal_amount"},
    "fund_project": {"project_id", "community", "category", "amount", "currency", "fee"},
    "project_funded": {"project_id", "community", "category", "goal_amount", "raised_amount", "days_to_fund"},
    "project_expired": {"project_id", "community", "category"},
    "watch_ad": {"ad_id", "project_id", "revenue"},
    "create_loan": {"loan_id", "community", "amount"},
    "loan_disbursed": {"loan_id", "community", "amount"},
    "loan_repaid": {"loan_id", "amount"},
    "referral_sent": {"referral_code"},
    "referral_accepted": {"referral_code"},
    "experiment_exposure": {"experiment", "variant"},
    "error": {"message", "code", "path"},
}
SERVER_EVENTS = {"project_funded", "project_expired", "loan_disbursed", "loan_repaid"}


@pytest.fixture(scope="module")
def month() -> list[AnalyticsEvent]:
    return list(generate_events(MONTH))


def _small(**changes: object) -> TrafficConfig:
    base = {"start": START, "end": START + timedelta(days=2), "sessions_per_day": 300, "seed": 5}
    base.update(changes)
    return TrafficConfig(**base)  # type: ignore[arg-type]


def test_same_seed_same_events_byte_for_byte() -> None:
    first = [event.to_avro() for event in generate_events(_small())]
    second = [event.to_avro() for event in generate_events(_small())]
    assert len(first) > 1000
    assert first == second


def test_another_seed_gives_other_events() -> None:
    first = [event.id for event in generate_events(_small(seed=5))]
    other = [event.id for event in generate_events(_small(seed=6))]
    assert not set(first) & set(other)


def test_fast_records_equal_validated_events() -> None:
    simulator_items = list(TrafficSimulator(_small(session_ids=True)))
    assert [to_record(item) for item in simulator_items] == [to_event(item).to_avro() for item in simulator_items]
    assert [r["id"] for r in generate_records(_small())] == [str(e.id) for e in generate_events(_small())]


def test_events_are_in_timestamp_order_within_the_range(month: list[AnalyticsEvent]) -> None:
    stamps = [event.timestamp for event in month]
    assert stamps == sorted(stamps)
    assert stamps[0] >= MONTH.start
    assert stamps[-1] < MONTH.end  # type: ignore[operator]
    assert len({event.id for event in month}) == len(month)


def test_every_event_follows_the_taxonomy(month: list[AnalyticsEvent]) -> None:
    names = Counter(event.event_name for event in month)
    assert set(names) == set(REQUIRED_PROPERTIES)  # every kind of event occurs, and nothing else
    for event in month:
        AnalyticsEvent.model_validate(event.model_dump())  # survives a round trip through validation
        assert event.event_type == EVENT_TYPES[event.event_name]
        missing = REQUIRED_PROPERTIES[event.event_name] - set(event.properties)
        assert not missing, (event.event_name, missing)
        assert event.source == "demo"
    for event in month:
        if event.event_name == "fund_project":
            props = event.properties
            assert props["currency"] == "USD"
            assert props["amount"] > 0
            assert props["fee"] == round(props["amount"] * 0.029 + 0.30, 2)


def test_browser_events_carry_the_collector_context_shape(month: list[AnalyticsEvent]) -> None:
    browser_events = [event for event in month if event.event_name not in SERVER_EVENTS]
    campaigns = referrers = 0
    for event in browser_events:
        ctx = event.context
        assert ctx["device"]["type"] in {"desktop", "mobile", "tablet"}
        assert ctx["browser"]["name"] and ctx["os"]["name"] and ctx["locale"]
        assert len(ctx["location"]["country"]) == 2
        assert ctx["page"]["path"].startswith("/") and ctx["page"]["title"]
        assert event.anonymous_id
        if "campaign" in ctx:
            campaigns += 1
            assert set(ctx["campaign"]) == {"source", "medium", "name"}
        if "referrer" in ctx:
            referrers += 1
            assert ctx["referrer"]["url"].startswith("https://")
    assert campaigns > len(browser_events) * 0.05
    assert referrers > len(browser_events) * 0.05
    for event in month:
        if event.event_name == "page_view":
            assert event.context["page"] == {"path": event.properties["path"], "title": event.properties["title"]}


def test_sessions_are_separated_by_more_than_the_inactivity_gap() -> None:
    gap = timedelta(minutes=30)
    by_session: dict[str, list[AnalyticsEvent]] = defaultdict(list)
    sessions_of_device: dict[str, list[str]] = defaultdict(list)
    for event in generate_events(_small(session_ids=True, end=START + timedelta(days=4))):
        if event.session_id is None:
            assert event.event_name in SERVER_EVENTS
            continue
        if not by_session[event.session_id]:
            sessions_of_device[event.anonymous_id or ""].append(event.session_id)
        by_session[event.session_id].append(event)
    multi = 0
    for sessions in sessions_of_device.values():
        for earlier, later in zip(sessions, sessions[1:], strict=False):
            multi += 1
            assert by_session[later][0].timestamp - by_session[earlier][-1].timestamp > gap
    for events in by_session.values():
        assert {event.anonymous_id for event in events} == {events[0].anonymous_id}
        for before, after in zip(events, events[1:], strict=False):
            assert after.timestamp - before.timestamp < gap
    assert multi > 100  # plenty of devices come back


def test_daily_and_weekly_seasonality_follow_local_time(month: list[AnalyticsEvent]) -> None:
    by_hour = Counter(event.timestamp.astimezone(BERLIN).hour for event in month)
    assert by_hour[14] > 3 * by_hour[4]
    assert by_hour[20] > 3 * by_hour[3]
    by_day = Counter(event.timestamp.astimezone(BERLIN).date() for event in month)
    weekend = [n for day, n in by_day.items() if day.weekday() >= 5]
    weekday = [n for day, n in by_day.items() if day.weekday() < 5]
    assert sum(weekend) / len(weekend) < 0.9 * sum(weekday) / len(weekday)
    # Weekends start later: a smaller share of the day's traffic before 10:00 local.
    morning = Counter(
        event.timestamp.astimezone(BERLIN).weekday() >= 5
        for event in month
        if event.timestamp.astimezone(BERLIN).hour < 10
    )
    assert morning[True] / sum(weekend) < morning[False] / sum(weekday)


def test_the_configured_rate_is_the_average_rate() -> None:
    config = TrafficConfig.for_rate(0.5, start=START, end=START + timedelta(days=7), seed=3)
    count = sum(1 for _ in TrafficSimulator(config))
    rate = count / (7 * 86400)
    assert 0.4 < rate < 0.6, rate
    assert abs(count / (config.sessions_per_day * 7) - EVENTS_PER_SESSION) < 0.2 * EVENTS_PER_SESSION


def test_signups_link_anonymous_history_to_the_user(month: list[AnalyticsEvent]) -> None:
    signups = [event for event in month if event.event_name == "signup"]
    assert len(signups) > 200
    first_seen: dict[str, datetime] = {}
    for event in month:
        if event.anonymous_id and event.user_id is None:
            first_seen.setdefault(event.anonymous_id, event.timestamp)
    stitched = 0
    for signup in signups:
        assert signup.user_id and signup.anonymous_id
        if first_seen.get(signup.anonymous_id, signup.timestamp) < signup.timestamp:
            stitched += 1  # the device browsed anonymously before: those events belong to the user now
    assert stitched == len(signups)
    identifies = {event.user_id: event for event in month if event.event_name == "identify"}
    assert set(identifies) == {signup.user_id for signup in signups}
    assert all({"signup_method", "country", "age_band"} <= set(e.properties) for e in identifies.values())
    # Members switch devices sometimes: some users are seen with more than one anonymous id.
    devices: dict[str, set[str]] = defaultdict(set)
    for event in month:
        if event.user_id and event.anonymous_id:
            devices[event.user_id].add(event.anonymous_id)
    assert sum(1 for ids in devices.values() if len(ids) > 1) > 20


def test_referrals_are_sent_and_accepted_with_the_same_code(month: list[AnalyticsEvent]) -> None:
    sent = {event.properties["referral_code"] for event in month if event.event_name == "referral_sent"}
    accepted = [event for event in month if event.event_name == "referral_accepted"]
    assert accepted
    assert all(event.properties["referral_code"] in sent for event in accepted)
    signup_codes = {e.user_id: e.properties.get("referral_code") for e in month if e.event_name == "signup"}
    assert all(signup_codes[event.user_id] == event.properties["referral_code"] for event in accepted)


def test_projects_are_funded_or_expire_and_loans_are_disbursed(month: list[AnalyticsEvent]) -> None:
    raised: dict[str, float] = defaultdict(float)
    ended: dict[str, str] = {}
    for event in month:
        props = event.properties
        if event.event_name == "fund_project":
            assert props["project_id"] not in ended  # nobody funds a closed project
            raised[props["project_id"]] += props["amount"]
        elif event.event_name in {"project_funded", "project_expired"}:
            assert props["project_id"] not in ended
            ended[props["project_id"]] = event.event_name
            if event.event_name == "project_funded":
                assert props["raised_amount"] >= props["goal_amount"]
    outcomes = Counter(ended.values())
    assert outcomes["project_funded"] > 10 and outcomes["project_expired"] > 5
    loans = {e.properties["loan_id"]: e for e in month if e.event_name == "create_loan"}
    for event in month:
        if event.event_name in {"loan_disbursed", "loan_repaid"} and event.properties["loan_id"] in loans:
            created = loans[event.properties["loan_id"]]
            assert event.timestamp > created.timestamp
            assert event.properties["amount"] == created.properties["amount"]
            assert event.user_id == created.user_id


def _conversion_z(events: list[AnalyticsEvent], experiment: str) -> tuple[float, float, float]:
    """Two-proportion z for 'funded after first exposure', per user: (control rate, treatment rate, z)."""
    first_exposure: dict[str, datetime] = {}
    variant: dict[str, str] = {}
    converted: set[str] = set()
    for event in events:
        if event.event_name == "experiment_exposure" and event.properties["experiment"] == experiment:
            assert event.user_id
            first_exposure.setdefault(event.user_id, event.timestamp)
            assert variant.setdefault(event.user_id, event.properties["variant"]) == event.properties["variant"]
        elif event.event_name == "fund_project" and event.user_id in first_exposure:
            converted.add(event.user_id)
    exposed = Counter(variant.values())
    wins = Counter(variant[user] for user in converted)
    p_c, p_t = wins["control"] / exposed["control"], wins["treatment"] / exposed["treatment"]
    pooled = (wins["control"] + wins["treatment"]) / (exposed["control"] + exposed["treatment"])
    se = math.sqrt(pooled * (1 - pooled) * (1 / exposed["control"] + 1 / exposed["treatment"]))
    return p_c, p_t, (p_t - p_c) / se


def _exposure_conversion_z(events: list[AnalyticsEvent], experiment: str) -> tuple[float, float]:
    """Per exposure: contributions / checkout exposures in each variant; (relative lift, z).

    Every ``fund_project`` follows a ``checkout_button`` exposure of the same visit, so this is
    the per-visit conversion the simulator draws (many more trials than people: a sharp test).
    """
    variant_of: dict[str, str] = {}
    exposures: Counter[str] = Counter()
    funds: Counter[str] = Counter()
    for event in events:
        if event.event_name == "experiment_exposure" and event.properties["experiment"] == experiment:
            variant_of[event.user_id or ""] = event.properties["variant"]
            exposures[event.properties["variant"]] += 1
        elif event.event_name == "fund_project":
            funds[variant_of[event.user_id or ""]] += 1
    p_c, p_t = funds["control"] / exposures["control"], funds["treatment"] / exposures["treatment"]
    pooled = (funds["control"] + funds["treatment"]) / (exposures["control"] + exposures["treatment"])
    se = math.sqrt(pooled * (1 - pooled) * (1 / exposures["control"] + 1 / exposures["treatment"]))
    return p_t / p_c - 1, (p_t - p_c) / se


def test_checkout_button_treatment_really_lifts_funding(month: list[AnalyticsEvent]) -> None:
    lift, z = _exposure_conversion_z(month, "checkout_button")
    assert 0.10 < lift < 0.30  # the configured +20 %, measured
    assert z > 3
    # Per person (funded after the first exposure) the lift is diluted by repeat visits but still there.
    control, treatment, person_z = _conversion_z(month, "checkout_button")
    assert treatment / control - 1 > 0.05
    assert person_z > 1


def test_aa_test_shows_no_difference(month: list[AnalyticsEvent]) -> None:
    control, treatment, z = _conversion_z(month, "aa_test")
    assert abs(z) < 1.96
    assert abs(treatment / control - 1) < 0.10


def test_assignment_is_sticky_and_balanced() -> None:
    users = [f"usr_{n:012x}" for n in range(4000)]
    variants = Counter(assign_variant("checkout_button", user) for user in users)
    assert abs(variants["control"] - 2000) < 150
    assert [assign_variant("checkout_button", u) for u in users[:50]] == [
        assign_variant("checkout_button", u) for u in users[:50]
    ]
    assert Counter(assign_variant("x", u, (("a", 0.9), ("b", 0.1))) for u in users)["b"] < 550


def _in(event: AnalyticsEvent, anomaly: InjectedAnomaly) -> bool:
    return anomaly.start <= event.timestamp < anomaly.start + anomaly.duration


def test_revenue_drop_collapses_funding_only_inside_its_span() -> None:
    clean_config = _small(end=START + timedelta(days=2), sessions_per_day=2000)
    drop = InjectedAnomaly.of("revenue_drop", START + timedelta(days=1, hours=10), timedelta(hours=8))
    clean = list(generate_events(clean_config))
    dirty = list(generate_events(with_anomalies(clean_config, drop)))
    # Nothing changes before: a visit is simulated whole when it starts, so only visits that
    # started less than a visit's length (< 8 h) before the span can differ at all.
    settled = drop.start - timedelta(hours=8)
    before = [e.to_avro() for e in clean if e.timestamp < settled]
    assert len(before) > 1000
    assert before == [e.to_avro() for e in dirty if e.timestamp < settled]

    def gmv(events: list[AnalyticsEvent]) -> tuple[int, float]:
        funds = [e for e in events if e.event_name == "fund_project" and _in(e, drop)]
        return len(funds), sum(e.properties["amount"] for e in funds)

    clean_n, clean_gmv = gmv(clean)
    dirty_n, dirty_gmv = gmv(dirty)
    assert clean_n > 60
    assert dirty_n < 0.5 * clean_n  # volume x0.3
    assert dirty_gmv < 0.2 * clean_gmv  # volume x0.3 and amounts x0.3
    visits = Counter(e.event_name for e in dirty if _in(e, drop))
    clean_visits = Counter(e.event_name for e in clean if _in(e, drop))
    assert 0.8 < visits["page_view"] / clean_visits["page_view"] < 1.25  # traffic itself is unchanged


def test_signup_spike_multiplies_signups_inside_its_span() -> None:
    config = _small(end=START + timedelta(days=3), sessions_per_day=800)
    spike = InjectedAnomaly.of("signup_spike", START + timedelta(days=1, hours=12), timedelta(hours=6))
    clean = sum(1 for e in generate_events(config) if e.event_name == "signup" and _in(e, spike))
    spiked = sum(
        1 for e in generate_events(with_anomalies(config, spike)) if e.event_name == "signup" and _in(e, spike)
    )
    assert clean > 5
    assert spiked > 3 * clean


def test_error_burst_raises_the_error_rate_inside_its_span() -> None:
    burst = InjectedAnomaly.of("error_burst", START + timedelta(hours=30), timedelta(hours=2), 0.3)
    events = list(generate_events(with_anomalies(_small(sessions_per_day=800), burst)))

    def error_rate(inside: bool) -> float:
        names = Counter(e.event_name for e in events if _in(e, burst) == inside)
        return names["error"] / names["page_view"]

    assert 0.2 < error_rate(True) < 0.4
    assert error_rate(False) < 0.02


def test_anomaly_specs_parse_and_reject_nonsense() -> None:
    now = datetime(2026, 11, 25, 10, tzinfo=UTC)
    relative = InjectedAnomaly.parse("signup_spike@+10m/1h*8", now=now)
    assert relative.start == now + timedelta(minutes=10)
    assert relative.duration == timedelta(hours=1) and relative.magnitude == 8
    for bad in ("meteor@+1m/1h", "error_burst@2026-11-25T10:00/1h", "error_burst@+1m/1y", "error_burst"):
        with pytest.raises(ValueError):
            InjectedAnomaly.parse(bad, now=now)


def test_config_rejects_naive_or_empty_ranges() -> None:
    with pytest.raises(ValueError):
        TrafficConfig(start=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        TrafficConfig(start=START, end=START)


def test_another_start_gives_other_ids() -> None:
    first = {event.id for event in generate_events(_small())}
    later = {event.id for event in generate_events(_small(start=START + timedelta(minutes=1)))}
    assert not first & later


def test_history_scale_thins_only_the_history() -> None:
    switch = START + timedelta(days=1)
    config = _small(history_until=switch, history_scale=0.25, seasonality=0.0, sessions_per_day=1000)
    events = list(generate_events(config))
    history = sum(1 for event in events if event.timestamp < switch)
    live = len(events) - history
    assert 0.15 < history / live < 0.35
