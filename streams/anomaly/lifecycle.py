"""The alert lifecycle of one series: fire once, stay open while abnormal, resolve after recovery.

A series *fires* when its score reaches ``threshold`` while no alert is open. While the
alert is open, further high scores only *update* it (no new page: no alert storms). The
alert *resolves* after ``recovery`` consecutive observations scoring below
``threshold * resolve_ratio`` (hysteresis, so a series hovering at the threshold does not
flap).

The NAB harness replays exactly this rule, so the benchmarked detections are the pages
on-call would have received.

>>> lifecycle = AlertLifecycle(threshold=5.0, recovery=2)
>>> [lifecycle.step(s) for s in (1.0, 6.0, 9.0, 1.0, 4.0, 1.0, 1.0, 7.0)]
[None, 'fire', 'update', None, None, None, 'resolve', 'fire']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Transition = Literal["fire", "update", "resolve"]


@dataclass
class AlertLifecycle:
    """Open/closed state of one series' alert, advanced one score at a time."""

    threshold: float
    recovery: int = 3
    resolve_ratio: float = 0.5
    is_open: bool = False
    calm_streak: int = 0

    def step(self, score: float) -> Transition | None:
        """Advance with the latest score; say what changed (``None``: nothing to tell on-call)."""
        if not self.is_open:
            if score >= self.threshold:
                self.is_open, self.calm_streak = True, 0
                return "fire"
            return None
        if score >= self.threshold:
            self.calm_streak = 0
            return "update"
        if score < self.threshold * self.resolve_ratio:
            self.calm_streak += 1
            if self.calm_streak >= self.recovery:
                self.is_open, self.calm_streak = False, 0
                return "resolve"
        else:
            self.calm_streak = 0
        return None


def firing_rows(scores: Iterable[float], threshold: float, recovery: int = 3, resolve_ratio: float = 0.5) -> list[int]:
    """Rows at which a series with these scores would page on-call.

    >>> firing_rows([0, 9, 9, 0, 0, 0, 9], threshold=5, recovery=2)
    [1, 6]
    """
    lifecycle = AlertLifecycle(threshold, recovery, resolve_ratio)
    return [i for i, score in enumerate(scores) if lifecycle.step(score) == "fire"]
