"""Detectors by name: configuration says ``name`` + ``params``, the registry builds the detector.

``TIDEMARK_ANOMALY_DETECTOR=seasonal_robust_z`` and
``TIDEMARK_ANOMALY_DETECTOR_PARAMS='{"slot_window": 12}'`` pick and tune the detector of
every series without a code change. New detectors register a factory with
:func:`register`.

The default, ``seasonal_likelihood``, is the anomaly likelihood of the seasonal robust
z-score with the settings chosen on the NAB corpus (see ``bench/anomaly_nab.py``); it beat
the Holt-Winters forecast residual there (NAB standard 64.7 against at best 36.9, and
39.8 for the likelihood of the Holt-Winters residual). NAB's series are
sampled every few minutes and trust a season slot after 8 values; hourly business series
would need 8 weeks for that, so the series bank's default (:data:`BUSINESS_PARAMS`) trusts
the hour-of-week slot's median after 3 weeks (NAB standard 54.0 with that alone), takes
the spread from the hour-of-day slot until the weekly slot holds 8 values (a MAD of three
values made clean demo traffic page several times a week), never trusts a spread below half
the series' recent spread (small counts' slots often look calmer than they are, and the
raw scores they produce would swamp the likelihood's sense of normal), and does not score a series
that has been constant over its recent window (a rare event's first occurrence against
a history of zeros is not an incident). NAB standard with these business parameters: 55.1
(reward-low-FP 43.0, reward-low-FN 63.5); the default's NAB settings are unchanged (64.7).

>>> build_detector("seasonal_robust_z", {"warm_up": 10}).warm_up
10
>>> sorted(DETECTORS)
['forecast_holt_winters', 'forecast_snarimax', 'seasonal_likelihood', 'seasonal_robust_z']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from streams.anomaly.base import SeriesDetector
from streams.anomaly.forecast import ForecastResidual
from streams.anomaly.likelihood import AnomalyLikelihood
from streams.anomaly.seasonal import SeasonalRobustZ

DetectorFactory = Callable[..., SeriesDetector]

DEFAULT_DETECTOR = "seasonal_likelihood"
#: Inner settings of the default, chosen once on the whole NAB corpus.
SEASONAL_INNER = {"slot_window": 24, "min_slot_obs": 8}
#: Parameters of the default detector for business series (hourly/daily periods).
BUSINESS_PARAMS: dict[str, Any] = {
    "inner_params": {
        "slot_window": 24, "min_slot_obs": 3, "min_scale_obs": 8, "min_scale": 0.5, "judge_constant": False
    }
}

DETECTORS: dict[str, DetectorFactory] = {
    "seasonal_robust_z": SeasonalRobustZ,
    "seasonal_likelihood": lambda **params: AnomalyLikelihood(
        **{"inner": "seasonal_robust_z", "inner_params": SEASONAL_INNER, **params}
    ),
    "forecast_holt_winters": lambda **params: ForecastResidual(forecaster="holt_winters", **params),
    "forecast_snarimax": lambda **params: ForecastResidual(forecaster="snarimax", **params),
}


def register(name: str, factory: DetectorFactory) -> None:
    """Make a detector available to configuration under ``name``."""
    DETECTORS[name] = factory


def build_detector(name: str, params: Mapping[str, Any] | None = None) -> SeriesDetector:
    """A fresh detector of kind ``name`` with ``params``; a clear error for an unknown name or parameter."""
    try:
        factory = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown anomaly detector {name!r}; known: {', '.join(sorted(DETECTORS))}") from None
    try:
        return factory(**dict(params or {}))
    except TypeError as exc:
        raise ValueError(f"bad parameters for anomaly detector {name!r}: {exc}") from exc
