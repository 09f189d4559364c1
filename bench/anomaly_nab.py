"""NAB evaluation of Tidemark's streaming anomaly detectors.

Streams every CSV of a folder in NAB layout (``data/<group>/<file>.csv`` with columns
``timestamp,value`` and ``combined_windows.json`` keyed by ``<group>/<file>.csv``) through a
detector one point at a time (``score_one`` then ``learn_one``), turns scores into pages
with the same alert lifecycle the series bank uses, and prints the NAB score of each
profile with the threshold optimised once over the whole corpus, plus the detector's cost
per point.

    python bench/anomaly_nab.py --data path/to/nab
    python bench/anomaly_nab.py --data path/to/nab --detector forecast_holt_winters
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.anomaly.lifecycle import firing_rows  # noqa: E402
from streams.anomaly.nab import PROFILES, SeriesLabels, optimise_threshold, window_indices  # noqa: E402
from streams.anomaly.registry import DEFAULT_DETECTOR, build_detector  # noqa: E402


@dataclass
class ScoredFile:
    """One file's labels and the detector's score at each row."""

    name: str
    labels: SeriesLabels
    scores: list[float]


def parse_time(text: str) -> datetime:
    """NAB timestamps (``2014-02-19 10:50:00`` or with ``.000000``), read as UTC."""
    return datetime.fromisoformat(text.strip()).replace(tzinfo=UTC)


def load_corpus(root: Path) -> list[tuple[str, list[datetime], list[float], tuple[tuple[int, int], ...]]]:
    """Every labelled file of a NAB-layout folder: name, timestamps, values, windows as row ranges."""
    windows = json.loads((root / "combined_windows.json").read_text(encoding="utf-8"))
    corpus = []
    for name in sorted(windows):
        path = root / "data" / name
        if not path.exists():
            continue
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        stamps = [parse_time(row["timestamp"]) for row in rows]
        values = [float(row["value"]) for row in rows]
        spans = [(parse_time(a), parse_time(b)) for a, b in windows[name]]
        corpus.append((name, stamps, values, window_indices(stamps, spans)))
    return corpus


def run_detector(
    corpus: list[tuple[str, list[datetime], list[float], tuple[tuple[int, int], ...]]],
    detector: str,
    params: dict[str, object],
) -> tuple[list[ScoredFile], float]:
    """Stream each file through a fresh detector; return the scores and the mean cost per point in µs."""
    scored = []
    elapsed = 0.0
    points = 0
    for name, stamps, values, windows in corpus:
        model = build_detector(detector, params)
        scores = []
        started = time.perf_counter()
        for t, v in zip(stamps, values, strict=True):
            x: dict[Hashable, object] = {"value": v, "t": t}
            scores.append(model.score_one(x))
            model.learn_one(x)
        elapsed += time.perf_counter() - started
        points += len(values)
        scored.append(ScoredFile(name, SeriesLabels(len(values), windows), scores))
    return scored, 1e6 * elapsed / max(points, 1)


def candidate_thresholds(scored: list[ScoredFile], count: int = 120) -> list[float]:
    """Thresholds spread over the upper quantiles of every score seen (no per-file choice)."""
    every = sorted(s for f in scored for s in f.scores if s > 0)
    if not every:
        return [1.0]
    picks = {every[min(len(every) - 1, int(len(every) * (1 - 0.5 ** (k / 8))))] for k in range(count)}
    return sorted(picks)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per profile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder in NAB layout")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR)
    parser.add_argument("--params", default="{}", help="detector parameters as JSON")
    parser.add_argument("--recovery", type=int, default=5, help="calm observations before an alert resolves")
    parser.add_argument("--resolve-ratio", type=float, default=0.5)
    args = parser.parse_args(argv)

    corpus = load_corpus(args.data)
    if not corpus:
        print(f"no labelled CSV files under {args.data}", file=sys.stderr)
        return 2
    params = json.loads(args.params)
    scored, cost = run_detector(corpus, args.detector, params)
    thresholds = candidate_thresholds(scored)
    files = [(f.labels, f.scores) for f in scored]

    def detect(scores: Sequence[float], threshold: float) -> list[int]:
        return firing_rows(scores, threshold, args.recovery, args.resolve_ratio)

    print(
        f"detector={args.detector} params={json.dumps(params)} recovery={args.recovery} "
        f"files={len(corpus)} points={sum(f.labels.length for f in scored)}"
    )
    for profile in PROFILES:
        threshold, result = optimise_threshold(files, detect, thresholds, profile)
        print(
            f"{profile.name:20s} score={result.normalised:6.1f} threshold={threshold:.3f} "
            f"raw={result.raw:.2f} null={result.null:.1f} perfect={result.perfect:.1f}"
        )
    print(f"cost_per_point_us={cost:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
