"""The NAB scorer against hand-computed cases from the published definition.

Hand arithmetic used below: the scaled sigmoid ``2 / (1 + e^{5y}) - 1`` equals ``-tanh(2.5·y)``,
so a detection at relative position ``y`` in a window earns ``tanh(-2.5·y) / tanh(2.5)``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from streams.anomaly.nab import (
    REWARD_LOW_FN,
    REWARD_LOW_FP,
    STANDARD,
    SeriesLabels,
    optimise_threshold,
    probationary_length,
    scaled_sigmoid,
    score_corpus,
    score_series,
    window_indices,
)

ONE_WINDOW = SeriesLabels(length=100, windows=((40, 49),))  # width 10


def test_profiles_have_the_published_weights() -> None:
    assert (STANDARD.tp, STANDARD.fp, STANDARD.fn) == (1.0, 0.11, 1.0)
    assert (REWARD_LOW_FP.tp, REWARD_LOW_FP.fp, REWARD_LOW_FP.fn) == (1.0, 0.22, 1.0)
    assert (REWARD_LOW_FN.tp, REWARD_LOW_FN.fp, REWARD_LOW_FN.fn) == (1.0, 0.11, 2.0)


def test_scaled_sigmoid_matches_its_formula() -> None:
    for y in (-1.0, -0.5, -0.1, 0.0, 0.3, 1.0, 2.9):
        assert scaled_sigmoid(y) == pytest.approx(2 / (1 + math.exp(5 * y)) - 1)
    assert scaled_sigmoid(3.0) == -1.0
    assert scaled_sigmoid(10.0) == -1.0


def test_perfect_detector_scores_100_and_null_scores_0() -> None:
    perfect = score_corpus([(ONE_WINDOW, [40])], STANDARD, probation_percent=0.0)
    null = score_corpus([(ONE_WINDOW, [])], STANDARD, probation_percent=0.0)
    assert perfect.raw == pytest.approx(1.0)
    assert null.raw == pytest.approx(-1.0)
    assert perfect.normalised == pytest.approx(100.0)
    assert null.normalised == pytest.approx(0.0)


def test_detection_at_window_end_earns_less_than_at_start() -> None:
    # Last row of the window: y = -(49 - 49 + 1) / 10 = -0.1.
    at_end = score_series(ONE_WINDOW, [49], STANDARD, probation_percent=0.0)
    assert at_end == pytest.approx(math.tanh(0.25) / math.tanh(2.5))  # 0.24824...
    assert at_end == pytest.approx(0.248242, abs=1e-5)
    # Middle: row 45, y = -(49 - 45 + 1) / 10 = -0.5.
    middle = score_series(ONE_WINDOW, [45], STANDARD, probation_percent=0.0)
    assert middle == pytest.approx(math.tanh(1.25) / math.tanh(2.5))


def test_only_the_first_detection_in_a_window_counts() -> None:
    assert score_series(ONE_WINDOW, [41, 42, 45, 49], STANDARD, probation_percent=0.0) == pytest.approx(
        score_series(ONE_WINDOW, [41], STANDARD, probation_percent=0.0)
    )


def test_false_positive_far_from_window_costs_the_full_fp_weight() -> None:
    # Before the first window: full penalty -A_FP; the missed window adds -A_FN.
    assert score_series(ONE_WINDOW, [10], STANDARD, probation_percent=0.0) == pytest.approx(-0.11 - 1.0)
    # 41 rows past a window of width 10: y = 41 / 9 > 3, full penalty.
    assert score_series(ONE_WINDOW, [40, 90], STANDARD, probation_percent=0.0) == pytest.approx(1.0 - 0.11)
    assert score_series(ONE_WINDOW, [40, 90], REWARD_LOW_FP, probation_percent=0.0) == pytest.approx(1.0 - 0.22)


def test_false_positive_just_after_a_window_is_forgiven_a_little() -> None:
    # Row 50: y = |49 - 50| / (10 - 1) = 1/9, penalty 0.11 · tanh(2.5 / 9).
    score = score_series(ONE_WINDOW, [40, 50], STANDARD, probation_percent=0.0)
    assert score == pytest.approx(1.0 - 0.11 * math.tanh(2.5 / 9))


def test_missed_window_costs_twice_in_reward_low_fn() -> None:
    assert score_series(ONE_WINDOW, [], REWARD_LOW_FN, probation_percent=0.0) == pytest.approx(-2.0)
    corpus = score_corpus([(ONE_WINDOW, [49])], REWARD_LOW_FN, probation_percent=0.0)
    # (0.24824 - (-2)) / (1 - (-2)) = 74.94...
    assert corpus.normalised == pytest.approx(100 * (math.tanh(0.25) / math.tanh(2.5) + 2) / 3)


def test_probationary_period_ignores_early_detections_and_windows() -> None:
    assert probationary_length(100) == 15
    assert probationary_length(4032) == 604
    assert probationary_length(20000) == 750
    early = SeriesLabels(length=100, windows=((5, 10), (60, 69)))
    # The first window lies inside the probationary period: not scored, detections there ignored.
    assert score_series(early, [3, 5, 60], STANDARD) == pytest.approx(1.0)
    assert score_series(early, [], STANDARD) == pytest.approx(-1.0)


def test_corpus_normalisation_sums_files_before_normalising() -> None:
    two = SeriesLabels(length=100, windows=((20, 29), (70, 79)))
    no_window = SeriesLabels(length=100, windows=())
    corpus = [(ONE_WINDOW, [40]), (two, [25]), (no_window, [50])]
    result = score_corpus(corpus, STANDARD, probation_percent=0.0)
    tp_25 = math.tanh(2.5 * 5 / 10) / math.tanh(2.5)  # row 25: y = -(29 - 25 + 1) / 10
    assert result.raw == pytest.approx(1.0 + tp_25 - 1.0 - 0.11)
    assert result.null == pytest.approx(-3.0)
    assert result.perfect == pytest.approx(3.0)
    assert result.normalised == pytest.approx(100 * (result.raw + 3) / 6)


def test_window_timestamps_map_to_inclusive_rows() -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    stamps = [start + timedelta(minutes=5 * i) for i in range(20)]
    windows = [(stamps[3], stamps[6]), (stamps[10] + timedelta(seconds=1), stamps[12])]
    assert window_indices(stamps, windows) == ((3, 6), (11, 12))


def test_threshold_optimisation_picks_one_threshold_for_the_whole_corpus() -> None:
    scores_a = [0.0] * 100
    scores_a[40] = 0.9
    scores_a[80] = 0.5  # a false positive, only above a low threshold
    scores_b = [0.0] * 100
    scores_b[20] = 0.6  # a true positive needing threshold <= 0.6

    def detect(scores: list[float], threshold: float) -> list[int]:
        return [i for i, s in enumerate(scores) if s >= threshold]

    corpus = [(ONE_WINDOW, scores_a), (SeriesLabels(100, ((20, 29),)), scores_b)]
    threshold, result = optimise_threshold(corpus, detect, [0.95, 0.85, 0.55, 0.45], STANDARD, 0.0)
    assert threshold == 0.55
    assert result.normalised == pytest.approx(100.0)
