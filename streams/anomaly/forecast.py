"""Forecast residuals: a River forecaster predicts the next value, the robust z-score of its error is the score.

This is River's ``PredictiveAnomalyDetection`` idea (score = how far the actual value is from
the forecast, relative to recent forecast errors) with two changes that matter for streams:
scoring does not mutate state (River's ``score_one`` updates its error statistics), and the
error spread is a median/MAD over the last ``error_window`` errors, so one large error does
not mask the next.

The forecaster is River's :class:`~river.time_series.HoltWinters` (additive) or
:class:`~river.time_series.SNARIMAX`. Their season is a number of *observations*; the
detector measures the series' sampling interval over its first ``probe`` observations and
converts ``season_seconds`` (one day by default) into that number, so the same settings fit
series sampled every minute, five minutes or hour.

Examples
--------
>>> import math
>>> from datetime import UTC, datetime, timedelta
>>> detector = ForecastResidual(season_seconds=24 * 3600, warm_up=72)
>>> start = datetime(2024, 1, 1, tzinfo=UTC)
>>> for i in range(24 * 6):
...     x = {"value": 100 + 20 * math.sin(2 * math.pi * i / 24) + (i % 2), "t": start + timedelta(hours=i)}
...     detector.learn_one(x)
>>> t = start + timedelta(hours=24 * 6)
>>> detector.score_one({"value": detector.expected_one({"t": t}), "t": t}) < 1.0
True
>>> detector.score_one({"value": 400.0, "t": t}) > 10.0
True
"""

from __future__ import annotations

import base64
import pickle
import statistics
from collections import deque
from typing import Any

from river import time_series

from streams.anomaly.base import Observation, SeriesDetector
from streams.anomaly.seasonal import robust_location_scale

FORECASTERS = ("holt_winters", "snarimax")


class ForecastResidual(SeriesDetector):
    """Robust z-score of the error of a River forecaster's one-step-ahead forecast."""

    def __init__(
        self,
        forecaster: str = "holt_winters",
        season_seconds: float = 24 * 3600,
        max_season_points: int = 288,
        alpha: float = 0.3,
        beta: float = 0.01,
        gamma: float = 0.3,
        error_window: int = 96,
        probe: int = 10,
        warm_up: int = 48,
        min_scale: float = 1e-6,
    ) -> None:
        if forecaster not in FORECASTERS:
            raise ValueError(f"unknown forecaster {forecaster!r}; expected one of {FORECASTERS}")
        self.forecaster = forecaster
        self.season_seconds = season_seconds
        self.max_season_points = max_season_points
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.error_window = error_window
        self.probe = probe
        self.warm_up = warm_up
        self.min_scale = min_scale
        self.n_seen = 0
        self._model: Any = None
        self._probe_times: list[float] = []
        self._probe_values: list[float] = []
        self._errors: deque[float] = deque(maxlen=error_window)
        self._last: float | None = None

    def _build(self) -> Any:
        gaps = [b - a for a, b in zip(self._probe_times, self._probe_times[1:], strict=False) if b > a]
        step = statistics.median(gaps) if gaps else self.season_seconds
        season = int(round(self.season_seconds / step)) if step > 0 else 0
        season = season if 2 <= season <= self.max_season_points else 0
        if self.forecaster == "snarimax":
            return time_series.SNARIMAX(p=2, d=0, q=1, m=max(season, 1), sp=1 if season else 0, sq=0)
        return time_series.HoltWinters(
            alpha=self.alpha, beta=self.beta, gamma=self.gamma if season else None, seasonality=season
        )

    def _forecast(self) -> float | None:
        if self._model is None:
            return self._last
        try:
            forecast = self._model.forecast(horizon=1)
        except (ValueError, ZeroDivisionError, IndexError):
            return self._last  # Holt-Winters still initialising its season
        return float(forecast[0]) if forecast else self._last

    def expected_one(self, x: Observation) -> float | None:
        """The one-step-ahead forecast (the last value until the forecaster is initialised)."""
        return self._forecast()

    def score_one(self, x: Observation) -> float:
        """Robust z-score of the forecast error; 0 during warm-up."""
        if self.n_seen < self.warm_up or len(self._errors) < 3:
            return 0.0
        forecast = self._forecast()
        if forecast is None:
            return 0.0
        location, scale = robust_location_scale(self._errors)
        return abs(float(x["value"]) - forecast - location) / max(scale, self.min_scale)

    def learn_one(self, x: Observation) -> None:
        """Record the forecast error, then teach the forecaster the actual value."""
        value = float(x["value"])
        forecast = self._forecast()
        if forecast is not None and self.n_seen >= self.probe:
            self._errors.append(value - forecast)
        if self._model is None:
            self._probe_times.append(x["t"].timestamp())
            self._probe_values.append(value)
            if len(self._probe_times) >= self.probe:
                self._model = self._build()
                for past in self._probe_values:
                    self._model.learn_one(past)
        else:
            self._model.learn_one(value)
        self._last = value
        self.n_seen += 1

    def state_dict(self) -> dict[str, Any]:
        """Counters and errors as JSON; the River forecaster as base64 pickle (River models pickle)."""
        return {
            "n_seen": self.n_seen,
            "errors": list(self._errors),
            "last": self._last,
            "probe_times": self._probe_times,
            "probe_values": self._probe_values,
            "model": base64.b64encode(pickle.dumps(self._model)).decode("ascii") if self._model is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote. Only load state this process's own kind wrote (pickle)."""
        self.n_seen = int(state["n_seen"])
        self._errors = deque((float(v) for v in state["errors"]), maxlen=self.error_window)
        self._last = state["last"]
        self._probe_times = list(state["probe_times"])
        self._probe_values = list(state["probe_values"])
        model = state.get("model")
        self._model = pickle.loads(base64.b64decode(model)) if model else None  # noqa: S301 - own state
