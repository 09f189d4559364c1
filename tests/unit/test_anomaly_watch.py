"""What the detector bank watches by default, and the business detector's guards against counting noise."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.streams import MetricSnapshot
from streams.aggregators import compile_catalogue
from streams.anomaly.registry import BUSINESS_PARAMS, build_detector
from streams.anomaly.seasonal import SeasonalRobustZ
from streams.anomaly.series import BankConfig, DetectorBank
from streams.catalogue import CATALOGUE, Aggregation
from streams.events import StreamEvent
from tidemark.settings import Settings

START = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday


def snapshot(i: int, value: float, period: str = "hour", dims: dict[str, str] | None = None) -> MetricSnapshot:
    step = timedelta(minutes=1) if period == "minute" else timedelta(hours=1)
    return MetricSnapshot(
        metric_type="signups", period=period, period_start=START + i * step, period_end=START + (i + 1) * step,
        value=value, dimensions=dims or {}, computed_at=START + (i + 1) * step,
    )


def test_settings_watch_totals_per_hour_and_day() -> None:
    config = BankConfig.from_settings(Settings())
    assert config.periods == ("hour", "day") and config.dimensions == ()
    assert config.params == BUSINESS_PARAMS
    bank = DetectorBank(config)
    for i in range(3):
        assert bank.process(snapshot(i, 5.0, period="minute")) == []
        assert bank.process(snapshot(i, 5.0, dims={"country": "DE"})) == []
        bank.process(snapshot(i, 5.0))
    assert len(bank) == 1  # only signups|hour| (the total)


def test_breakdowns_are_opted_into_by_name() -> None:
    config = BankConfig.from_settings(Settings(anomaly_dimensions=["country"], anomaly_periods=["minute"]))
    bank = DetectorBank(config)
    for i in range(3):
        bank.process(snapshot(i, 5.0, period="minute", dims={"country": "DE"}))
        bank.process(snapshot(i, 5.0, period="minute", dims={"device": "mobile"}))
        bank.process(snapshot(i, 5.0, period="hour"))
    assert len(bank) == 1  # signups|minute|country=DE


def test_a_restored_bank_drops_series_no_longer_watched() -> None:
    everything = DetectorBank(BankConfig(periods=("minute", "hour")))
    for i in range(3):
        everything.process(snapshot(i, 5.0, period="minute"))
        everything.process(snapshot(i, 5.0))
    restored = DetectorBank.from_bytes(everything.to_bytes(), BankConfig(periods=("hour",)))
    assert len(everything) == 2 and len(restored) == 1


def test_a_rare_event_after_a_constant_history_is_not_an_anomaly() -> None:
    def score_after_zeros(judge_constant: bool, value: float) -> float:
        detector = SeasonalRobustZ(warm_up=10, judge_constant=judge_constant)
        for i in range(60):
            detector.learn_one({"value": 0.0, "t": START + timedelta(hours=i)})
        return detector.score_one({"value": value, "t": START + timedelta(hours=60)})

    assert score_after_zeros(True, 1.0) > 1e6  # against a spread of nothing: "infinitely" unusual
    assert score_after_zeros(False, 1.0) == 0.0
    assert score_after_zeros(False, 500.0) == 0.0  # no measured noise, no judgement either way


def test_a_young_weekly_slot_borrows_the_daily_spread() -> None:
    """Three almost equal Monday-noon values must not make an ordinary Monday noon look extreme."""
    def detector(min_scale_obs: int | None) -> SeasonalRobustZ:
        found = SeasonalRobustZ(warm_up=10, min_slot_obs=3, slot_window=24, min_scale=0.0,
                                min_scale_obs=min_scale_obs)
        for day in range(21):
            for hour in range(24):
                t = START + timedelta(days=day, hours=hour)
                # Noon: 100 +- 10 on most days, but the three Mondays happen to be 100, 101, 100.
                noise = [0.0, 1.0, 0.0][day // 7] if t.weekday() == 0 else [-10.0, 10.0, 0.0, 5.0, -5.0][day % 5]
                found.learn_one({"value": 100.0 + noise if hour == 12 else 50.0, "t": t})
        return found

    monday_noon = {"value": 112.0, "t": START + timedelta(days=21, hours=12)}
    assert detector(None).score_one(monday_noon) > 10.0  # spread of the three Mondays: luck
    assert detector(8).score_one(monday_noon) < 2.0  # spread of all noons: ordinary noise
    assert detector(8).expected_one(monday_noon) == 100.0  # the expected value is still the Monday's


def test_the_business_default_is_the_registry_default_detector() -> None:
    detector = build_detector("seasonal_likelihood", BUSINESS_PARAMS)
    assert detector.raw.min_scale_obs == 8 and detector.raw.judge_constant is False  # type: ignore[attr-defined]


def test_errors_are_a_catalogued_count() -> None:
    definition = CATALOGUE["errors"]
    assert definition.aggregation is Aggregation.count and definition.events == ("error",)
    errors = compile_catalogue(CATALOGUE, ["errors"])["errors"]
    acc = errors.new()
    for name in ("error", "page_view", "error"):
        event = StreamEvent("e", name, "error", "u", "", 0, {}, {})
        if errors.matches(event):
            acc.add(errors.observe(event))
    assert acc.value() == 2.0
