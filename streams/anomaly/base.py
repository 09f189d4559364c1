"""The one protocol every Tidemark series detector follows.

A detector sees one observation of one series at a time, as a dict
``{"value": float, "t": datetime}`` (River's convention: features in a dict):

- ``score_one(x)`` says how unusual ``x`` is *before* learning it (0 = normal; higher = more
  unusual; scores are comparable across detectors of the same kind, not across kinds);
- ``learn_one(x)`` updates the detector with ``x``;
- ``expected_one(x)`` is what the detector expected instead of ``x`` (for alert texts);
- ``state_dict()`` / ``load_state_dict(state)`` turn the learned state into JSON-compatible
  data and back, so that detectors survive a restart.

Detectors subclass River's :class:`river.base.AnomalyDetector`, so they compose with
the rest of River, and are built by name from configuration (:mod:`streams.anomaly.registry`).
"""

from __future__ import annotations

import abc
from collections.abc import Hashable
from datetime import datetime
from typing import Any

from river import base as river_base

Observation = dict[Hashable, Any]  # River's feature dict: {"value": float, "t": datetime}


class SeriesDetector(river_base.AnomalyDetector):
    """A River anomaly detector of one univariate, timestamped series."""

    #: Observations learned so far; scores are 0 until ``warm_up`` of them have been seen.
    n_seen: int
    warm_up: int

    @abc.abstractmethod
    def expected_one(self, x: Observation) -> float | None:
        """The value this detector expected at ``x["t"]``; ``None`` while it knows too little."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The learned state as JSON-compatible data (parameters are not included)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the learned state written by :meth:`state_dict`."""

    @property
    def warmed_up(self) -> bool:
        """Whether enough observations were learned for scores to mean something."""
        return self.n_seen >= self.warm_up


def observation(value: float, t: datetime) -> Observation:
    """The dict a detector consumes.

    >>> from datetime import UTC, datetime
    >>> observation(3.0, datetime(2024, 1, 1, tzinfo=UTC))["value"]
    3.0
    """
    return {"value": float(value), "t": t}
