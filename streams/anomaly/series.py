"""The detector bank: one detector and one alert lifecycle per series, fed metric snapshots.

A *series* is one metric, one period (minute, hour, day, ...) and one set of dimension
values (``signups`` per ``hour`` for ``country=DE``). The bank watches the periods and
dimension breakdowns its configuration names (:attr:`BankConfig.periods`,
:attr:`BankConfig.dimensions`); the settings' default is every metric's total per hour
and per day. Minute windows of a business metric are mostly counting noise, and every breakdown value
is one more series that can page: at one-in-ten-thousand per series and period, a
thousand breakdown series page several times a day on perfectly clean traffic.
Breakdowns are opted into by name (``TIDEMARK_ANOMALY_DIMENSIONS='["country"]'``).
:meth:`DetectorBank.process` takes one
:class:`~schemas.streams.MetricSnapshot` and returns the :class:`~schemas.anomaly.Anomaly`
messages to publish on ``anomalies``:

- a new episode (status ``open``) when the series fires;
- the same episode again when its severity escalates (on-call is updated, not re-paged);
- the same episode with status ``resolved`` (``resolved_by="detector"``) after the series
  stayed normal for ``recovery`` periods: the "recovered" signal alert delivery resolves on.

The stream processors re-publish a period's snapshot as it fills up, so a period is
judged once, when it is *complete*: when a snapshot of a later period of the same series
arrives, or when :meth:`DetectorBank.close_due` is called after the period's end plus the
stream's grace (call it on a timer, so that a series whose events stopped altogether is
still judged). Until then the latest value replaces the earlier ones. For counts and sums
(``is_additive``), periods without any snapshot are judged as zeros, so a collapse to
nothing is seen too. Snapshots of a
period already judged (a replay after a restart, a late correction) are ignored, so
replays neither double-learn nor re-page. The whole bank's state -- detectors, pending
values, open episodes, the last period judged per series -- serialises to JSON bytes
(:meth:`DetectorBank.to_bytes`) so it survives a restart; :meth:`DetectorBank.series_state`
and :meth:`DetectorBank.load_series_state` do the same per series for a table keyed by series.

>>> from datetime import UTC, datetime, timedelta
>>> from schemas.streams import MetricSnapshot
>>> bank = DetectorBank(BankConfig(detector="seasonal_robust_z", params={"warm_up": 24}, recovery=2,
...                                severity_thresholds={"low": 5, "medium": 8, "high": 12, "critical": 20}))
>>> start = datetime(2024, 1, 1, tzinfo=UTC)
>>> def snapshot(i, value):
...     t = start + timedelta(hours=i)
...     return MetricSnapshot(metric_type="signups", period="hour", period_start=t,
...                           period_end=t + timedelta(hours=1), value=value, computed_at=t)
>>> quiet = [bank.process(snapshot(i, 100.0 + i % 5)) for i in range(72)]
>>> sum(len(found) for found in quiet)
0
>>> bank.process(snapshot(72, 150.0)), bank.process(snapshot(72, 400.0))  # hour 72 fills up
([], [])
>>> [(a.status.value, a.severity.value) for a in bank.process(snapshot(73, 103.0))]  # hour 72 complete
[('open', 'critical')]
>>> bank.process(snapshot(72, 400.0))  # hour 72 again: already judged
[]
>>> [a.status.value for i in (74, 75) for a in bank.process(snapshot(i, 100.0 + i % 5))]
['resolved']
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from schemas.anomaly import Anomaly, AnomalyStatus, Severity
from schemas.models import now_millis
from schemas.streams import series_key
from streams.anomaly.base import Observation, SeriesDetector
from streams.anomaly.lifecycle import AlertLifecycle
from streams.anomaly.registry import BUSINESS_PARAMS, DEFAULT_DETECTOR, build_detector
from streams.anomaly.severity import DEFAULT_THRESHOLDS, SeverityScale, describe

log = logging.getLogger(__name__)

STATE_FORMAT = 1
MAX_GAP_FILL = 1000  # periods filled with zeros at most, per gap
MAX_FILL_STEP_MS = 8 * 24 * 3600 * 1000  # months vary in length: only fixed-length periods are filled
RESOLVED_BY_DETECTOR = "detector"
DEFAULT_PERIODS: tuple[str, ...] = ("hour", "day")


class SnapshotLike(Protocol):
    """What the bank reads from a metric snapshot (``schemas.streams.MetricSnapshot`` fits)."""

    metric_type: str
    period: str
    period_start: datetime
    period_end: datetime
    value: float
    dimensions: dict[str, str]


@dataclass(frozen=True)
class BankConfig:
    """How every series is watched: which detector, how scores become severities, when alerts resolve."""

    detector: str = DEFAULT_DETECTOR
    params: Mapping[str, Any] = field(default_factory=lambda: dict(BUSINESS_PARAMS))
    severity_thresholds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    recovery: int = 5
    resolve_ratio: float = 0.5
    periods: tuple[str, ...] = DEFAULT_PERIODS
    dimensions: tuple[str, ...] | None = None  # breakdowns watched; None: all of them
    # True: a period is complete when its ``final`` snapshot comes (the stream worker's metrics
    # stage marks it); False: when a snapshot of a later period comes (series fed in order).
    wait_for_final: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> BankConfig:
        """The configuration from :class:`tidemark.settings.Settings` (``anomaly_*`` fields)."""
        return cls(
            detector=settings.anomaly_detector,
            params=dict(settings.anomaly_detector_params),
            severity_thresholds=dict(settings.anomaly_severity_thresholds),
            recovery=settings.anomaly_recovery_periods,
            resolve_ratio=settings.anomaly_resolve_ratio,
            periods=tuple(settings.anomaly_periods),
            dimensions=tuple(settings.anomaly_dimensions),
            wait_for_final=True,
        )

    def watches(self, period: str, dimensions: Mapping[str, str]) -> bool:
        """Whether series of this period and breakdown are watched (totals of a watched period always are).

        >>> config = BankConfig(periods=("hour",), dimensions=("country",))
        >>> [config.watches("hour", {}), config.watches("hour", {"country": "DE"}),
        ...  config.watches("hour", {"device": "mobile"}), config.watches("minute", {})]
        [True, True, False, False]
        """
        if period not in self.periods:
            return False
        return self.dimensions is None or all(name in self.dimensions for name in dimensions)

    @property
    def identity(self) -> str:
        """Detector name and parameters: stored state is reused only by the same detector."""
        return json.dumps([self.detector, dict(self.params)], sort_keys=True, default=str)


@dataclass
class SeriesWatch:
    """One series' detector, alert lifecycle, open episode and last judged period."""

    detector: SeriesDetector
    lifecycle: AlertLifecycle
    last_period_ms: int | None = None
    last_end_ms: int | None = None
    pending: dict[int, tuple[int, float]] = field(default_factory=dict)  # start ms -> (end ms, latest value)
    episode: Anomaly | None = None


def anomaly_messages(anomalies: list[Anomaly]) -> list[tuple[bytes, bytes]]:
    """Kafka (key, value) pairs for the ``anomalies`` topic: keyed by series, Avro single-object encoded.

    >>> anomaly_messages([])
    []
    """
    from schemas.anomaly import anomaly_codec

    codec = anomaly_codec()
    return [(a.series_key.encode(), codec.encode(a.to_avro())) for a in anomalies]


def _millis(value: datetime) -> int:
    return int(value.timestamp()) * 1000 + value.microsecond // 1000


@dataclass
class _Held:
    """A complete period of one series, as judged."""

    metric_type: str
    period: str
    dimensions: dict[str, str]
    period_start: datetime = datetime.min.replace(tzinfo=UTC)
    period_end: datetime = datetime.min.replace(tzinfo=UTC)
    value: float = 0.0


def _dimensions_from_key(key: str) -> dict[str, str]:
    from urllib.parse import unquote

    text = key.split("|", 2)[2]
    return dict((k, unquote(v)) for k, v in (part.split("=", 1) for part in text.split("&"))) if text else {}


class DetectorBank:
    """Per-series detectors fed one metric snapshot at a time."""

    def __init__(self, config: BankConfig | None = None, is_additive: Callable[[str], bool] | None = None) -> None:
        self.config = config or BankConfig()
        # Counts and sums are 0 in a period without events, and the stream then publishes no
        # snapshot at all: for those metrics, missing periods are judged as zeros (a revenue
        # collapse must not go silent). Ratios and averages are undefined there: not filled.
        self.is_additive = is_additive or (lambda _metric: False)
        self.scale = SeverityScale(self.config.severity_thresholds)
        build_detector(self.config.detector, self.config.params)  # a bad configuration fails now, not per series
        self._series: dict[str, SeriesWatch] = {}

    @classmethod
    def from_settings(cls, settings: Any, is_additive: Callable[[str], bool] | None = None) -> DetectorBank:
        """A bank configured from :class:`tidemark.settings.Settings`; ``is_additive`` says which metrics
        are counts or sums (zero when no snapshot came), e.g. from the metric catalogue's aggregations."""
        return cls(BankConfig.from_settings(settings), is_additive)

    def __len__(self) -> int:
        return len(self._series)

    def _new_watch(self) -> SeriesWatch:
        return SeriesWatch(
            detector=build_detector(self.config.detector, self.config.params),
            lifecycle=AlertLifecycle(self.scale.firing, self.config.recovery, self.config.resolve_ratio),
        )

    def process(self, snapshot: SnapshotLike) -> list[Anomaly]:
        """Take one snapshot; return the anomaly messages (new, escalated or resolved episodes) to publish.

        The snapshot's period is held until complete -- its ``final`` snapshot came
        (``wait_for_final``), or else a later period of the series began -- and what is
        returned concerns the periods judged now. Snapshots of series the configuration
        does not watch are ignored.
        """
        if not self.config.watches(snapshot.period, snapshot.dimensions):
            return []
        key = series_key(snapshot.metric_type, snapshot.period, snapshot.dimensions)
        watch = self._series.get(key)
        if watch is None:
            watch = self._series[key] = self._new_watch()
        start_ms = _millis(snapshot.period_start)
        if watch.last_period_ms is not None and start_ms <= watch.last_period_ms:
            return []  # this period was already judged
        series = _Held(snapshot.metric_type, snapshot.period, dict(snapshot.dimensions))
        found: list[Anomaly] = []
        if not self.config.wait_for_final:
            if watch.pending and start_ms < min(watch.pending):
                return []  # older than the period being filled: late, ignored
            found = self._judge_before(watch, series, start_ms)
            found += self._fill_gap(watch, series, start_ms)
        watch.pending[start_ms] = (_millis(snapshot.period_end), float(snapshot.value))
        if self.config.wait_for_final and getattr(snapshot, "final", False):
            found = self._judge_before(watch, series, start_ms + 1)
        return found

    def close_due(
        self, now: datetime | None, grace_seconds: float = 0.0, limit_for: Callable[[str], int | None] | None = None
    ) -> list[Anomaly]:
        """Judge every held period that ended more than ``grace_seconds`` before ``now``.

        ``limit_for(series key)``, when given, replaces ``now`` minus the grace per series:
        the time (ms) up to which that series' periods are known complete (``None``: not yet
        known). Periods without a snapshot up to the limit are judged as zeros (additive metrics).
        """
        common = None if now is None else _millis(now) - int(grace_seconds * 1000)
        found: list[Anomaly] = []
        for key, watch in self._series.items():
            limit = limit_for(key) if limit_for is not None else common
            if limit is None:
                continue
            metric_type, period, _ = key.split("|", 2)
            series = _Held(metric_type, period, _dimensions_from_key(key))
            ended = [start for start, (end, _value) in watch.pending.items() if end <= limit]
            if ended:
                found.extend(self._judge_before(watch, series, max(ended) + 1))
            found.extend(self._fill_gap(watch, series, min([limit, *watch.pending])))
        return found

    def _judge_before(self, watch: SeriesWatch, series: Any, until_ms: int) -> list[Anomaly]:
        """Judge, in period order, every held period starting before ``until_ms`` (zeros in the gaps)."""
        found: list[Anomaly] = []
        for start in sorted(s for s in watch.pending if s < until_ms):
            end, value = watch.pending.pop(start)
            found.extend(self._fill_gap(watch, series, start))
            found.extend(self._judge(watch, series, start, end, value))
        return found

    def _fill_gap(self, watch: SeriesWatch, series: Any, until_ms: int) -> list[Anomaly]:
        """Judge zeros for the whole periods between the last judged one and ``until_ms`` (additive metrics)."""
        if watch.last_end_ms is None or watch.last_period_ms is None or not self.is_additive(series.metric_type):
            return []
        step = watch.last_end_ms - watch.last_period_ms
        if not 0 < step <= MAX_FILL_STEP_MS:
            return []
        missing = (until_ms - watch.last_end_ms) // step
        found: list[Anomaly] = []
        first = watch.last_end_ms + max(0, missing - MAX_GAP_FILL) * step
        for k in range(min(missing, MAX_GAP_FILL)):
            start = first + k * step
            found.extend(self._judge(watch, series, start, start + step, 0.0))
        return found

    def _judge(self, watch: SeriesWatch, series: Any, start_ms: int, end_ms: int, value: float) -> list[Anomaly]:
        """Score, learn and advance the lifecycle with one complete period of ``watch``."""
        period_start = datetime.fromtimestamp(start_ms / 1000, tz=UTC)
        period_end = datetime.fromtimestamp(end_ms / 1000, tz=UTC)
        x: Observation = {"value": value, "t": period_start}
        score = watch.detector.score_one(x)
        expected = watch.detector.expected_one(x)
        watch.detector.learn_one(x)
        watch.last_period_ms = start_ms
        watch.last_end_ms = end_ms
        snapshot = _Held(series.metric_type, series.period, dict(series.dimensions), period_start, period_end, value)
        transition = watch.lifecycle.step(score)
        if transition is None:
            return []
        expected = float(snapshot.value) if expected is None else float(expected)
        actual = float(snapshot.value)
        if transition == "fire":
            severity = self.scale.classify(score) or Severity.low
            watch.episode = Anomaly(
                metric_type=snapshot.metric_type,
                period=snapshot.period,
                dimensions=dict(snapshot.dimensions),
                detected_at=snapshot.period_end,
                window_start=snapshot.period_start,
                severity=severity,
                expected=expected,
                actual=actual,
                deviation=actual - expected,
                score=score,
                detector=self.config.detector,
                description=describe(
                    snapshot.metric_type, snapshot.dimensions, snapshot.period, expected, actual, score
                ),
            )
            return [watch.episode]
        episode = watch.episode
        if episode is None:  # state restored without its episode: nothing to update or resolve
            return []
        if transition == "update":
            escalated = self.scale.classify(score)
            if escalated is None or escalated.rank <= episode.severity.rank:
                return []  # still abnormal, not worse: on-call already knows
            watch.episode = episode.model_copy(
                update={
                    "severity": escalated,
                    "expected": expected,
                    "actual": actual,
                    "deviation": actual - expected,
                    "score": score,
                    "window_start": snapshot.period_start,
                    "description": describe(
                        snapshot.metric_type, snapshot.dimensions, snapshot.period, expected, actual, score
                    ),
                    "updated_at": now_millis(),
                }
            )
            return [watch.episode]
        resolved = episode.model_copy(
            update={
                "status": AnomalyStatus.resolved,
                "resolved_by": RESOLVED_BY_DETECTOR,
                "resolved_at": snapshot.period_end,
                "updated_at": now_millis(),
            }
        )
        watch.episode = None
        return [resolved]

    # --- state -----------------------------------------------------------------------------

    def _watch_state(self, watch: SeriesWatch) -> dict[str, Any]:
        return {
            "detector": watch.detector.state_dict(),
            "open": watch.lifecycle.is_open,
            "calm": watch.lifecycle.calm_streak,
            "last": watch.last_period_ms,
            "last_end": watch.last_end_ms,
            "pending": [[start, end, value] for start, (end, value) in sorted(watch.pending.items())],
            "episode": watch.episode.model_dump(mode="json", by_alias=True) if watch.episode else None,
        }

    def _load_watch(self, state: Mapping[str, Any]) -> SeriesWatch:
        watch = self._new_watch()
        watch.detector.load_state_dict(state["detector"])
        watch.lifecycle.is_open = bool(state["open"])
        watch.lifecycle.calm_streak = int(state["calm"])
        watch.last_period_ms = state["last"]
        watch.last_end_ms = state.get("last_end")
        pending = state.get("pending") or []
        if pending and not isinstance(pending[0], list):
            pending = [pending]  # written when a series held one period at most
        watch.pending = {int(start): (int(end), float(value)) for start, end, value in pending}
        watch.episode = Anomaly.model_validate(state["episode"]) if state.get("episode") else None
        return watch

    def series_state(self, key: str) -> bytes | None:
        """One series' state as JSON bytes (for a table keyed by series), ``None`` if unknown."""
        watch = self._series.get(key)
        if watch is None:
            return None
        return json.dumps({"identity": self.config.identity, **self._watch_state(watch)}).encode()

    def load_series_state(self, key: str, data: bytes) -> bool:
        """Restore one series from :meth:`series_state`; False (fresh start) if another detector wrote it."""
        state = json.loads(data)
        if state.get("identity") != self.config.identity:
            return False
        self._series[key] = self._load_watch(state)
        return True

    def to_bytes(self) -> bytes:
        """The whole bank's state as JSON bytes."""
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "identity": self.config.identity,
                "saved_at": datetime.now(UTC).isoformat(),
                "series": {key: self._watch_state(watch) for key, watch in self._series.items()},
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(
        cls, data: bytes, config: BankConfig | None = None, is_additive: Callable[[str], bool] | None = None
    ) -> DetectorBank:
        """A bank restored from :meth:`to_bytes`; starts fresh if the detector configuration changed."""
        bank = cls(config, is_additive)
        state = json.loads(data)
        if state.get("format") != STATE_FORMAT or state.get("identity") != bank.config.identity:
            log.warning(
                "Anomaly detector state written by another configuration: starting %d series fresh",
                len(state.get("series", {})),
            )
            return bank
        for key, watch_state in state["series"].items():
            _metric, period, _ = key.split("|", 2)
            if bank.config.watches(period, _dimensions_from_key(key)):  # no longer watched: dropped
                bank._series[key] = bank._load_watch(watch_state)
        log.info("Restored anomaly detectors of %d series", len(bank._series))
        return bank
