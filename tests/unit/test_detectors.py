"""Streaming detectors, the per-series bank and its alert lifecycle, on synthetic seasonal series."""

from __future__ import annotations

import copy
import doctest
import importlib
import math
import random
import statistics
from datetime import UTC, datetime, timedelta

import pytest

from schemas.anomaly import Anomaly, AnomalyStatus, anomaly_codec
from schemas.streams import MetricSnapshot
from streams.anomaly.registry import DETECTORS, build_detector
from streams.anomaly.seasonal import SeasonalRobustZ, season_slot
from streams.anomaly.series import BankConfig, DetectorBank, anomaly_messages

MODULES = [
    "streams.anomaly.base",
    "streams.anomaly.seasonal",
    "streams.anomaly.forecast",
    "streams.anomaly.likelihood",
    "streams.anomaly.lifecycle",
    "streams.anomaly.registry",
    "streams.anomaly.severity",
    "streams.anomaly.series",
    "streams.anomaly.nab",
]
START = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0


def business_day(i: int, rng: random.Random) -> float:
    """Hourly signups: busy office hours, quiet nights and weekends, with noise."""
    t = START + timedelta(hours=i)
    level = 40.0 + 60.0 * math.exp(-(((t.hour - 14) / 4) ** 2))
    if t.weekday() >= 5:
        level *= 0.6
    return level + rng.gauss(0, 3)


def snapshots(values: list[float], metric: str = "signups", dims: dict[str, str] | None = None) -> list[MetricSnapshot]:
    return [
        MetricSnapshot(
            metric_type=metric,
            period="hour",
            period_start=START + timedelta(hours=i),
            period_end=START + timedelta(hours=i + 1),
            value=v,
            dimensions=dims or {},
            computed_at=START + timedelta(hours=i + 1),
        )
        for i, v in enumerate(values)
    ]


def test_seasonal_score_is_the_robust_z_of_the_slot() -> None:
    detector = SeasonalRobustZ(seasons=("hour_of_day",), slot_window=8, min_slot_obs=4, warm_up=0, min_scale=0)
    rng = random.Random(1)
    values = [business_day(i, rng) for i in range(24 * 10)]
    for i, v in enumerate(values):
        detector.learn_one({"value": v, "t": START + timedelta(hours=i)})
    t = START + timedelta(hours=24 * 10 + 14)
    slot = [values[i] for i in range(len(values)) if i % 24 == 14][-8:]  # independent reference
    median = statistics.median(slot)
    mad = statistics.median([abs(v - median) for v in slot]) * 1.4826
    assert detector.expected_one({"value": 0.0, "t": t}) == pytest.approx(median)
    assert detector.score_one({"value": 10.0, "t": t}) == pytest.approx(abs(10.0 - median) / mad)


def test_seasons_follow_local_time_across_daylight_saving() -> None:
    detector = SeasonalRobustZ(seasons=("hour_of_day",), timezone="Europe/Berlin")
    # 2024-03-31 01:30 UTC is 03:30 in Berlin (CEST, after the switch); 00:30 UTC is 01:30 (CET).
    assert detector._keys(datetime(2024, 3, 31, 1, 30, tzinfo=UTC)) == ["hd3"]
    assert detector._keys(datetime(2024, 3, 31, 0, 30, tzinfo=UTC)) == ["hd1"]
    assert season_slot("day_of_week", datetime(2024, 1, 7)) == "dw6"


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_detector_scores_zero_during_warm_up_and_flags_a_drop(name: str) -> None:
    detector = build_detector(name, {"warm_up": 200})
    rng = random.Random(2)
    scores = []
    train = 24 * 23 + 10  # up to a Wednesday, 10:00
    for i in range(train):
        x = {"value": business_day(i, rng), "t": START + timedelta(hours=i)}
        scores.append(detector.score_one(x))
        detector.learn_one(x)
    assert all(s == 0.0 for s in scores[:200])

    def worst(model: object, values: list[float]) -> float:
        found = []
        for k, v in enumerate(values):
            x = {"value": v, "t": START + timedelta(hours=train + k)}
            found.append(model.score_one(x))  # type: ignore[attr-defined]
            model.learn_one(x)  # type: ignore[attr-defined]
        return max(found)

    normal = worst(copy.deepcopy(detector), [business_day(train + k, random.Random(3)) for k in range(3)])
    drop = worst(detector, [business_day(train + k, random.Random(3)) * 0.1 for k in range(3)])
    assert drop > 3 * normal
    assert drop > 1.5


def test_registry_rejects_unknown_names_and_parameters() -> None:
    with pytest.raises(ValueError, match="unknown anomaly detector"):
        build_detector("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        build_detector("seasonal_robust_z", {"window": 3})
    with pytest.raises(ValueError, match="unknown season"):
        build_detector("seasonal_robust_z", {"seasons": ["hour_of_year"]})


def _series_with_incident(days: int = 28, drop_at: int = 24 * 24 + 10, length: int = 4) -> list[float]:
    rng = random.Random(4)
    values = [business_day(i, rng) for i in range(24 * days)]
    for i in range(drop_at, drop_at + length):
        values[i] *= 0.1  # revenue/sign-ups collapse for a few hours
    return values


def test_bank_fires_once_per_incident_then_resolves() -> None:
    bank = DetectorBank(BankConfig(recovery=3))
    drop_at = 24 * 24 + 10
    found = [(i, a) for i, s in enumerate(snapshots(_series_with_incident(drop_at=drop_at))) for a in bank.process(s)]
    opened = [(i, a) for i, a in found if a.status == AnomalyStatus.open]
    resolved = [(i, a) for i, a in found if a.status == AnomalyStatus.resolved]
    first_open = min(i for i, _ in opened)
    # Judged when the next hour arrives: the first low hour is reported one snapshot later.
    assert drop_at + 1 <= first_open <= drop_at + 3
    assert len({a.id for _, a in opened}) == 1  # one episode: escalations reuse its id
    assert len(resolved) == 1 and resolved[0][1].id == opened[0][1].id
    assert resolved[0][1].resolved_by == "detector"
    assert resolved[0][0] > drop_at + 4
    episode = opened[0][1]
    assert episode.actual < episode.expected and episode.deviation == pytest.approx(episode.actual - episode.expected)
    assert START + timedelta(hours=drop_at) <= episode.window_start <= START + timedelta(hours=drop_at + 2)
    assert "signups (hour)" in episode.description
    ((key, value),) = anomaly_messages([episode])
    assert key == b"signups|hour|"
    assert Anomaly.from_avro(anomaly_codec().decode(value)) == episode


def test_clean_series_never_fires() -> None:
    rng = random.Random(5)
    bank = DetectorBank()
    values = [business_day(i, rng) for i in range(24 * 60)]
    assert [a for s in snapshots(values) for a in bank.process(s)] == []


def test_state_survives_a_restart_with_identical_results() -> None:
    values = _series_with_incident()
    stream = snapshots(values) + snapshots(values, dims={"country": "DE"})
    stream.sort(key=lambda s: s.period_start)
    cut = 24 * 24

    straight = DetectorBank()
    expected = [
        (a.metric_type, a.dimensions, a.status, a.severity, round(a.score, 6))
        for s in stream
        for a in straight.process(s)
    ]

    first = DetectorBank()
    before = [a for s in stream[: 2 * cut] for a in first.process(s)]
    restored = DetectorBank.from_bytes(first.to_bytes())
    after = [a for s in stream[2 * cut :] for a in restored.process(s)]
    got = [(a.metric_type, a.dimensions, a.status, a.severity, round(a.score, 6)) for a in before + after]
    assert expected, "the incident must be found"
    assert got == expected
    assert len(restored) == 2


def test_state_of_another_detector_is_not_reused() -> None:
    bank = DetectorBank(BankConfig(detector="seasonal_robust_z", params={}))
    for s in snapshots([1.0, 2.0, 3.0]):
        bank.process(s)
    other = DetectorBank.from_bytes(bank.to_bytes(), BankConfig(detector="forecast_holt_winters", params={}))
    assert len(other) == 0
    key = "signups|hour|"
    data = bank.series_state(key)
    assert data is not None
    assert DetectorBank(BankConfig(detector="seasonal_robust_z", params={})).load_series_state(key, data)
    assert not DetectorBank().load_series_state(key, data)


def test_replayed_and_growing_snapshots_are_judged_once() -> None:
    bank = DetectorBank(BankConfig(detector="seasonal_robust_z", params={"warm_up": 0}))
    first, second = snapshots([10.0, 11.0])
    partial = first.model_copy(update={"value": 1.0})
    assert bank.process(partial) == []
    assert bank.process(first) == []  # replaces the partial value
    bank.process(second)
    watch = bank._series["signups|hour|"]
    assert watch.detector.n_seen == 1 and watch.detector._recent[-1] == 10.0
    bank.process(first)  # a replay of a judged period
    assert watch.detector.n_seen == 1


def test_close_due_judges_a_series_that_went_silent() -> None:
    bank = DetectorBank(BankConfig(detector="seasonal_robust_z", params={"warm_up": 0}))
    (only,) = snapshots([5.0], dims={"country": "A&B"})
    bank.process(only)
    assert bank.close_due(only.period_end, grace_seconds=60) == []
    watch = bank._series["signups|hour|country=A%26B"]
    assert watch.pending
    bank.close_due(only.period_end + timedelta(seconds=61), grace_seconds=60)
    assert not watch.pending and watch.detector.n_seen == 1


def test_silent_periods_of_additive_metrics_count_as_zeros() -> None:
    """Revenue collapses to nothing: no snapshot is published, yet the series fires (counts and sums only)."""
    rng = random.Random(6)
    values = [business_day(i, rng) for i in range(24 * 24 + 14)]
    silent_from = len(values)
    history = snapshots(values, metric="gmv") + snapshots(values, metric="conversion_rate")

    def run(is_additive: bool) -> tuple[list[Anomaly], DetectorBank]:
        bank = DetectorBank(is_additive=lambda metric: is_additive and metric == "gmv")
        found = [a for s in history for a in bank.process(s)]
        # Nothing arrives for 4 hours; the timer closes the periods once their grace has passed.
        now = START + timedelta(hours=silent_from + 4, minutes=5)
        found += bank.close_due(now, grace_seconds=300)
        return found, bank

    found, bank = run(True)
    fired = [a for a in found if a.status == AnomalyStatus.open]
    # One episode (an escalation is published again under the episode's id).
    assert {a.metric_type for a in fired} == {"gmv"} and len({a.id for a in fired}) == 1
    assert fired[0].actual == 0.0 and fired[0].expected > 50
    gmv = bank._series["gmv|hour|"]
    # The last real hour and the four silent ones (the fourth ended exactly a grace ago) are judged.
    assert gmv.last_period_ms is not None
    assert datetime.fromtimestamp(gmv.last_period_ms / 1000, tz=UTC) == START + timedelta(hours=silent_from + 3)
    assert gmv.detector.n_seen == silent_from + 4
    assert bank.close_due(START + timedelta(hours=silent_from + 4, minutes=59), grace_seconds=300) == []
    assert gmv.detector.n_seen == silent_from + 4  # the fifth silent hour is still within its grace
    ratio = bank._series["conversion_rate|hour|"]
    assert ratio.detector.n_seen == silent_from  # a ratio is undefined without events: not filled

    found, _ = run(False)
    assert [a for a in found if a.status == AnomalyStatus.open] == []

    # A snapshot after a gap also fills the gap with zeros (additive metrics).
    bank = DetectorBank(BankConfig(detector="seasonal_robust_z", params={"warm_up": 0}), is_additive=lambda m: True)
    first, *_, last = snapshots([10.0, 11.0, 12.0, 13.0])
    bank.process(first)
    bank.process(last)
    watch = bank._series["signups|hour|"]
    assert watch.detector.n_seen == 3 and list(watch.detector._recent) == [10.0, 0.0, 0.0]
