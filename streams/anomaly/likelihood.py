"""Anomaly likelihood: how surprising a detector's recent scores are for *this* series.

Raw scores are not comparable between series: a noisy series produces large robust
z-scores every day, a calm one never does. Following Numenta's anomaly likelihood
(Ahmad et al., "Unsupervised real-time anomaly detection for streaming data",
Neurocomputing 2017), this wrapper keeps the mean and variance of the inner detector's
last ``long_window`` raw scores and asks how unlikely the average of the last
``short_window`` scores is under a normal distribution with those moments. The score is
``-log10`` of that tail probability: 2 means "one in a hundred", 4 "one in ten thousand",
whatever the series. One threshold then suits every series, and the average over a short
window turns a sustained change (not only a single spike) into a high score.

Parameters
----------
inner
    Name of the raw detector (see :mod:`streams.anomaly.registry`).
inner_params
    Its parameters.
short_window, long_window
    Observations averaged for "now", and remembered for "usual".
warm_up
    Observations before any non-zero score (the long window must mean something).

Examples
--------
>>> import math
>>> from datetime import UTC, datetime, timedelta
>>> detector = AnomalyLikelihood(warm_up=200)
>>> start = datetime(2024, 1, 1, tzinfo=UTC)
>>> def x(i, bump=0.0):
...     return {"value": 50 + 10 * math.sin(2 * math.pi * i / 24) + (i * 7 % 5) + bump,
...             "t": start + timedelta(hours=i)}
>>> for i in range(24 * 21):
...     detector.learn_one(x(i))
>>> detector.score_one(x(24 * 21)) < 2.0
True
>>> detector.score_one(x(24 * 21, bump=-40.0)) > 4.0
True
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from streams.anomaly.base import Observation, SeriesDetector

SMALLEST_PROBABILITY = 1e-300


class AnomalyLikelihood(SeriesDetector):
    """``-log10`` tail probability of the short-term mean of an inner detector's scores."""

    def __init__(
        self,
        inner: str = "seasonal_robust_z",
        inner_params: dict[str, Any] | None = None,
        short_window: int = 5,
        long_window: int = 500,
        warm_up: int = 300,
    ) -> None:
        from streams.anomaly.registry import build_detector  # the registry imports this module

        self.inner = inner
        self.inner_params = dict(inner_params or {})
        self.short_window = short_window
        self.long_window = long_window
        self.warm_up = warm_up
        self.raw = build_detector(inner, self.inner_params)
        self.n_seen = 0
        self._short: deque[float] = deque(maxlen=short_window)
        self._long: deque[float] = deque(maxlen=long_window)
        self._sum = 0.0
        self._sum_sq = 0.0

    def expected_one(self, x: Observation) -> float | None:
        """What the inner detector expected."""
        return self.raw.expected_one(x)

    def score_one(self, x: Observation) -> float:
        """``-log10 P(short-term mean score ≥ observed)``; 0 during warm-up."""
        if self.n_seen < self.warm_up or len(self._long) < 2:
            return 0.0
        raw = self.raw.score_one(x)
        recent = (sum(self._short) + raw) / (len(self._short) + 1)
        n = len(self._long)
        mean = self._sum / n
        std = math.sqrt(max(self._sum_sq / n - mean * mean, 0.0)) or 1e-9
        tail = 0.5 * math.erfc((recent - mean) / (std * math.sqrt(2.0)))
        return -math.log10(max(tail, SMALLEST_PROBABILITY))

    def learn_one(self, x: Observation) -> None:
        """Record the inner detector's raw score of ``x``, then let it learn ``x``."""
        raw = self.raw.score_one(x)
        self._short.append(raw)
        if len(self._long) == self.long_window:
            dropped = self._long[0]
            self._sum -= dropped
            self._sum_sq -= dropped * dropped
        self._long.append(raw)
        self._sum += raw
        self._sum_sq += raw * raw
        self.raw.learn_one(x)
        self.n_seen += 1

    def state_dict(self) -> dict[str, Any]:
        """Raw-score windows, count and the inner detector's state, as JSON data."""
        return {
            "n_seen": self.n_seen,
            "short": list(self._short),
            "long": list(self._long),
            "inner": self.raw.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote; running sums are recomputed, not trusted."""
        self.n_seen = int(state["n_seen"])
        self._short = deque((float(v) for v in state["short"]), maxlen=self.short_window)
        self._long = deque((float(v) for v in state["long"]), maxlen=self.long_window)
        self._sum = math.fsum(self._long)
        self._sum_sq = math.fsum(v * v for v in self._long)
        self.raw.load_state_dict(state["inner"])
