"""The Numenta Anomaly Benchmark (NAB) score, implemented from its published definition.

Reference: A. Lavin and S. Ahmad, "Evaluating Real-time Anomaly Detection Algorithms --
the Numenta Anomaly Benchmark", ICMLA 2015 (arXiv:1510.03336), and the NAB wiki.

The definition, as used here:

- Each labelled anomaly has a *window* ``[start, end]`` (inclusive indices). A detection
  inside a window earns ``A_TP * σ(y) / σ(-1)`` where ``y = -(end - i + 1) / width`` is the
  relative position (``-1`` at the window's left edge, close to ``0`` at its right edge) and
  ``σ(y) = 2 / (1 + e^{5y}) - 1`` is the *scaled sigmoid*. Only the best (that is, the
  earliest) detection of a window counts; a window without detection costs ``-A_FN``.
- A detection outside every window costs ``A_FP * σ(y)`` (σ is negative there): ``y`` is the
  distance past the previous window's right edge in units of that window's width minus one,
  and ``y = 3`` (the full penalty, ``σ = -1``) before the first window or far from any window.
- The first 15 % of each file (at most 750 rows) is a *probationary period*: detections there
  are ignored, and a window lying entirely inside it is not scored.
- A corpus' raw score is the sum over files; the normalised score is
  ``100 · (S - S_null) / (S_perfect - S_null)`` where the null detector never detects
  (``-A_FN`` per window) and the perfect one detects at each window's first row
  (``A_TP`` per window).

A detector's threshold may be optimised once per profile over the whole corpus
(:func:`optimise_threshold`); every other setting stays fixed for the whole corpus.

>>> s = SeriesLabels(length=100, windows=((40, 49),))
>>> round(score_series(s, [40], STANDARD, probation_percent=0.0), 4)
1.0
>>> round(score_series(s, [], STANDARD, probation_percent=0.0), 4)
-1.0
>>> round(score_series(s, [10, 40], STANDARD, probation_percent=0.0), 4)
0.89
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

PROBATION_PERCENT = 0.15
PROBATION_MAX_ROWS_FACTOR = 5000  # NAB caps the probationary period at 15 % of 5000 rows


@dataclass(frozen=True)
class CostProfile:
    """The weights of one NAB application profile (all positive; signs are applied by the scorer)."""

    name: str
    tp: float
    fp: float
    fn: float


STANDARD = CostProfile("standard", tp=1.0, fp=0.11, fn=1.0)
REWARD_LOW_FP = CostProfile("reward_low_FP_rate", tp=1.0, fp=0.22, fn=1.0)
REWARD_LOW_FN = CostProfile("reward_low_FN_rate", tp=1.0, fp=0.11, fn=2.0)
PROFILES: tuple[CostProfile, ...] = (STANDARD, REWARD_LOW_FP, REWARD_LOW_FN)


@dataclass(frozen=True)
class SeriesLabels:
    """One labelled file: its number of rows and its anomaly windows as inclusive row indices."""

    length: int
    windows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CorpusScore:
    """A corpus' raw score, the null and perfect detectors' raw scores, and the normalised score."""

    profile: str
    raw: float
    null: float
    perfect: float

    @property
    def normalised(self) -> float:
        """``100 · (raw - null) / (perfect - null)``: 0 for the null detector, 100 for the perfect one."""
        if self.perfect == self.null:
            return 0.0
        return 100.0 * (self.raw - self.null) / (self.perfect - self.null)


def scaled_sigmoid(position: float) -> float:
    """NAB's reward shape ``2 / (1 + e^{5·position}) - 1``; ``-1`` from three widths past a window.

    >>> round(scaled_sigmoid(-1.0), 5), scaled_sigmoid(0.0), scaled_sigmoid(3.0)
    (0.98661, 0.0, -1.0)
    """
    if position >= 3.0:
        return -1.0
    # 2 / (1 + e^{5y}) - 1 == -tanh(5y / 2), which never overflows.
    return 0.0 - math.tanh(2.5 * position) + 0.0  # "+ 0.0" turns -0.0 into 0.0


def probationary_length(length: int, percent: float = PROBATION_PERCENT) -> int:
    """Rows at the start of a file that are not scored: ``min(floor(p·n), p·5000)``.

    >>> probationary_length(4032), probationary_length(10000), probationary_length(100, 0.0)
    (604, 750, 0)
    """
    return int(min(math.floor(percent * length), percent * PROBATION_MAX_ROWS_FACTOR))


def window_indices(
    timestamps: Sequence[datetime], windows: Iterable[tuple[datetime, datetime]]
) -> tuple[tuple[int, int], ...]:
    """Map windows given as timestamps to inclusive row indices (rows inside ``[start, end]``).

    Windows that cover no row are dropped.
    """
    out = []
    for start, end in windows:
        first = bisect.bisect_left(timestamps, start)
        last = bisect.bisect_right(timestamps, end) - 1
        if first <= last:
            out.append((first, last))
    return tuple(sorted(out))


def point_rewards(labels: SeriesLabels, profile: CostProfile) -> tuple[list[float], list[int | None]]:
    """What a detection at each row would earn, and the window (index into ``labels.windows``) it falls in.

    Inside a window the reward is positive (earlier is better); outside it is a penalty.
    """
    max_tp = scaled_sigmoid(-1.0)
    rewards: list[float] = [0.0] * labels.length
    window_of: list[int | None] = [None] * labels.length
    prev_right: int | None = None
    prev_width = 0
    cursor = 0
    for k, (left, right) in enumerate([*labels.windows, (labels.length, labels.length)]):
        for i in range(cursor, min(left, labels.length)):  # rows before this window
            position = 3.0 if prev_right is None or prev_width <= 1 else abs(i - prev_right) / (prev_width - 1)
            rewards[i] = profile.fp * scaled_sigmoid(position)
        if left >= labels.length:
            break
        width = right - left + 1
        for i in range(left, right + 1):
            rewards[i] = profile.tp * scaled_sigmoid(-(right - i + 1) / width) / max_tp
            window_of[i] = k
        prev_right, prev_width, cursor = right, width, right + 1
    return rewards, window_of


def _scorable_windows(labels: SeriesLabels, probation: int) -> list[int]:
    return [k for k, (_, right) in enumerate(labels.windows) if right >= probation]


def score_series(
    labels: SeriesLabels,
    detections: Iterable[int],
    profile: CostProfile,
    probation_percent: float = PROBATION_PERCENT,
) -> float:
    """The raw NAB score of one file given the row indices where the detector fired."""
    rewards, window_of = point_rewards(labels, profile)
    probation = probationary_length(labels.length, probation_percent)
    best: dict[int, float] = {k: -profile.fn for k in _scorable_windows(labels, probation)}
    false_positives = 0.0
    for i in set(detections):
        if i < probation or i >= labels.length:
            continue
        k = window_of[i]
        if k is None:
            false_positives += rewards[i]
        else:
            best[k] = max(best[k], rewards[i])
    return false_positives + sum(best.values())


def null_score(labels: SeriesLabels, profile: CostProfile, probation_percent: float = PROBATION_PERCENT) -> float:
    """The raw score of a detector that never fires: every scorable window is missed."""
    return -profile.fn * len(_scorable_windows(labels, probationary_length(labels.length, probation_percent)))


def perfect_score(labels: SeriesLabels, profile: CostProfile, probation_percent: float = PROBATION_PERCENT) -> float:
    """The raw score of a detector that fires exactly at each scorable window's first row."""
    return profile.tp * len(_scorable_windows(labels, probationary_length(labels.length, probation_percent)))


def score_corpus(
    corpus: Sequence[tuple[SeriesLabels, Iterable[int]]],
    profile: CostProfile,
    probation_percent: float = PROBATION_PERCENT,
) -> CorpusScore:
    """Raw, null, perfect and normalised scores of a detector's detections over a whole corpus."""
    raw = null = perfect = 0.0
    for labels, detections in corpus:
        raw += score_series(labels, detections, profile, probation_percent)
        null += null_score(labels, profile, probation_percent)
        perfect += perfect_score(labels, profile, probation_percent)
    return CorpusScore(profile.name, raw, null, perfect)


def optimise_threshold(
    corpus: Sequence[tuple[SeriesLabels, Sequence[float]]],
    detect: Callable[[Sequence[float], float], Iterable[int]],
    thresholds: Iterable[float],
    profile: CostProfile,
    probation_percent: float = PROBATION_PERCENT,
) -> tuple[float, CorpusScore]:
    """The single threshold (same for every file) that maximises the corpus score, and that score.

    ``detect(scores, threshold)`` turns one file's anomaly scores into detection rows; it
    is where a detector's alerting rule (e.g. one alert until recovery) lives.
    """
    best: tuple[float, CorpusScore] | None = None
    for threshold in thresholds:
        result = score_corpus(
            [(labels, detect(scores, threshold)) for labels, scores in corpus], profile, probation_percent
        )
        if best is None or result.raw > best[1].raw:
            best = (threshold, result)
    if best is None:
        raise ValueError("no threshold to try")
    return best
