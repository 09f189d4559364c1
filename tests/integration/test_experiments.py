"""Experiment results from ClickHouse against the plain-Python reference, with a real lift and an A/A test."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from scipy import stats

from api.analyses.experiments import (
    ExperimentDefinition,
    MetricSpec,
    assign_variant,
    compare_means,
    compare_proportions,
    compute_experiment,
)
from api.analyses.query import TimeRange
from tests.analysis_reference import Event, at, experiment_reference, insert_events

pytestmark = pytest.mark.integration

START, END = at("2026-03-01 00:00:00"), at("2026-03-15 00:00:00")
RANGE = TimeRange(start=START, end=END)
VARIANTS = [("control", 0.5), ("treatment", 0.5)]


def simulate(key: str, rates: dict[str, float], users: int, seed: int) -> list[Event]:
    """Users exposed once (sticky assignment), converting with the variant's rate after exposure."""
    rng = random.Random(seed)
    events = []
    for i in range(users):
        user = f"{key}_u{i:05d}"
        variant = assign_variant(key, user, VARIANTS)
        t = START + timedelta(seconds=rng.randint(0, 10 * 86400))
        events.append(Event("experiment_exposure", t, user_id=user, properties={"experiment": key, "variant": variant}))
        if rng.random() < rates[variant]:
            amount = round(rng.uniform(5, 50) * (1.3 if rates[variant] > 0.15 else 1.0), 2)
            events.append(Event("fund_project", t + timedelta(minutes=rng.randint(1, 600)), user_id=user,
                                properties={"amount": amount}))
    return events


def definition(key: str) -> ExperimentDefinition:
    return ExperimentDefinition(
        key=key,
        conversion=MetricSpec(event_name="fund_project"),
        continuous=MetricSpec(event_name="fund_project", property="amount"),
        minimum_detectable_effect=0.02,
    )


def compare_with_reference(ch_db, events, d):
    got = compute_experiment(ch_db, d, RANGE)
    want, multiple = experiment_reference(events, d, START, END)
    assert got.multiple_variant_people == multiple
    for v in got.variants:
        users, conversions, values = want.get(v.name, (0, 0, []))
        assert (v.exposed, v.conversions) == (users, conversions)
    control = want["control"]
    for v in got.variants[1:]:
        users, conversions, values = want[v.name]
        expected = compare_proportions(control[1], control[0], conversions, users)
        assert v.conversion_vs_control.p_value == pytest.approx(expected.p_value, abs=1e-9)
        assert v.conversion_vs_control.probability_to_beat_control == pytest.approx(
            expected.probability_to_beat_control, abs=1e-9
        )
        means = compare_means(control[2], values)
        assert v.metric_vs_control.p_value == pytest.approx(means.p_value, abs=1e-9)
        assert v.metric_vs_control.ci_low == pytest.approx(means.ci_low, abs=1e-9)
    return got


def test_real_lift_is_significant_and_aa_is_not(ch_db):
    lift = simulate("checkout_button", {"control": 0.10, "treatment": 0.20}, 2000, seed=1)
    aa = simulate("aa_test", {"control": 0.12, "treatment": 0.12}, 2000, seed=2)
    insert_events(ch_db, lift + aa)
    got = compare_with_reference(ch_db, lift + aa, definition("checkout_button"))
    treatment = got.variants[1]
    assert treatment.conversion_vs_control.significant
    assert treatment.conversion_vs_control.probability_to_beat_control > 0.99
    assert treatment.conversion_vs_control.ci_low > 0
    assert not got.sample_ratio.mismatch
    assert got.required_sample_size is not None and got.required_sample_size > 1000
    got_aa = compare_with_reference(ch_db, lift + aa, definition("aa_test"))
    assert not got_aa.variants[1].conversion_vs_control.significant
    assert not got_aa.variants[1].metric_vs_control.significant
    assert not got_aa.sample_ratio.mismatch


def test_multi_variant_people_and_conversions_before_exposure(ch_db):
    t = START + timedelta(days=1)
    events = [
        # converted before exposure: not a conversion
        Event("fund_project", t - timedelta(hours=1), user_id="early", properties={"amount": 10}),
        Event("experiment_exposure", t, user_id="early", properties={"experiment": "e", "variant": "control"}),
        # exposed to both variants (anonymous device stitched to the user): excluded and counted
        Event("experiment_exposure", t, anonymous_id="dev", properties={"experiment": "e", "variant": "control"}),
        Event("login", t + timedelta(minutes=1), anonymous_id="dev", user_id="both"),
        Event("experiment_exposure", t + timedelta(minutes=2), user_id="both",
              properties={"experiment": "e", "variant": "treatment"}),
        # converts in the same millisecond as the exposure: counts
        Event("experiment_exposure", t, user_id="same", properties={"experiment": "e", "variant": "treatment"}),
        Event("fund_project", t, user_id="same", properties={"amount": 7.5}),
        Event("fund_project", t + timedelta(days=1), user_id="same", properties={"amount": 2.5}),
        # another experiment's exposure is ignored
        Event("experiment_exposure", t, user_id="other", properties={"experiment": "x", "variant": "control"}),
        Event("experiment_exposure", t, user_id="plain", properties={"experiment": "e", "variant": "control"}),
        Event("experiment_exposure", t, user_id="plain2", properties={"experiment": "e", "variant": "treatment"}),
    ]
    insert_events(ch_db, events)
    got = compare_with_reference(ch_db, events, definition("e"))
    assert got.multiple_variant_people == 1
    control, treatment = got.variants
    assert (control.exposed, control.conversions) == (2, 0)
    assert (treatment.exposed, treatment.conversions) == (2, 1)
    assert treatment.metric_mean == pytest.approx(5.0)


@pytest.mark.slow
def test_demo_generator_experiments(ch_db):
    """The demo platform's checkout_button has a real lift (found); its aa_test has none (not found)."""
    import uuid
    from datetime import UTC, datetime

    from tidemark.demo.traffic import TrafficConfig, generate_events

    config = TrafficConfig(
        start=datetime(2026, 3, 1, tzinfo=UTC), end=datetime(2026, 3, 11, tzinfo=UTC), seed=7, sessions_per_day=2000
    )
    generated = list(generate_events(config))
    events = [
        Event(
            e.event_name,
            e.timestamp,
            user_id=e.user_id or "",
            anonymous_id=e.anonymous_id or "",
            properties=dict(e.properties),
            context=dict(e.context),
            event_id=str(uuid.UUID(str(e.id))),
        )
        for e in generated
    ]
    insert_events(ch_db, events)
    time_range = TimeRange(start=config.start, end=config.end)
    checkout = compute_experiment(ch_db, definition("checkout_button"), time_range)
    aa = compute_experiment(ch_db, definition("aa_test"), time_range)
    for got, key in ((checkout, "checkout_button"), (aa, "aa_test")):
        want, multiple = experiment_reference(events, definition(key), config.start, config.end)
        assert [(v.exposed, v.conversions) for v in got.variants] == [want[v.name][:2] for v in got.variants]
        assert got.multiple_variant_people == multiple
        # The sample-ratio check is the chi-square of these very counts (whatever this sample's split is).
        observed = [want[name][0] for name in ("control", "treatment")]
        assert got.sample_ratio.p_value == pytest.approx(stats.chisquare(observed).pvalue, abs=1e-12)
    lift = checkout.variants[1].conversion_vs_control
    assert lift.significant and lift.difference > 0 and lift.probability_to_beat_control > 0.95
    assert not aa.variants[1].conversion_vs_control.significant
