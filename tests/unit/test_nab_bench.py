"""The NAB benchmark harness on a small synthetic corpus in NAB layout (and on real NAB data when given)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_bench() -> ModuleType:
    """``bench/anomaly_nab.py`` is a script, not a package module: load it from its path."""
    spec = importlib.util.spec_from_file_location("bench_anomaly_nab", ROOT / "bench" / "anomaly_nab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def write_corpus(root: Path) -> None:
    """Two files of 5-minute data: one with a level drop inside a labelled window, one clean."""
    rng = random.Random(11)
    start = datetime(2024, 3, 1)
    windows: dict[str, list[list[str]]] = {}
    for name, drop in (("synthetic/with_drop.csv", True), ("synthetic/clean.csv", False)):
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        stamps = [start + timedelta(minutes=5 * i) for i in range(2016)]  # one week
        rows = []
        for i, t in enumerate(stamps):
            value = 100 + 30 * math.sin(2 * math.pi * i / 288) + rng.gauss(0, 2)
            if drop and 1500 <= i < 1560:
                value -= 80
            rows.append(f"{t:%Y-%m-%d %H:%M:%S},{value:.3f}")
        path.write_text("timestamp,value\n" + "\n".join(rows) + "\n", encoding="utf-8")
        windows[name] = (
            [[f"{stamps[1450]:%Y-%m-%d %H:%M:%S}.000000", f"{stamps[1550]:%Y-%m-%d %H:%M:%S}.000000"]] if drop else []
        )
    (root / "combined_windows.json").write_text(json.dumps(windows), encoding="utf-8")


def test_harness_scores_a_synthetic_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_corpus(tmp_path)
    corpus = bench.load_corpus(tmp_path)
    assert [name for name, *_ in corpus] == ["synthetic/clean.csv", "synthetic/with_drop.csv"]
    assert corpus[1][3] == ((1450, 1550),)
    assert bench.main(["--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    scores = {m[0]: float(m[1]) for m in re.findall(r"^(\w+)\s+score=\s*(-?[\d.]+)", out, re.M)}
    assert set(scores) == {"standard", "reward_low_FP_rate", "reward_low_FN_rate"}
    # The drop starts 50 rows into a 101-row window; detecting it soon after earns well over half.
    assert scores["standard"] > 50
    assert re.search(r"cost_per_point_us=\d+\.\d", out)


def test_harness_rejects_a_folder_without_labels(tmp_path: Path) -> None:
    (tmp_path / "combined_windows.json").write_text("{}", encoding="utf-8")
    assert bench.main(["--data", str(tmp_path)]) == 2


@pytest.mark.skipif(
    not os.environ.get("TIDEMARK_NAB_DIR"), reason="set TIDEMARK_NAB_DIR to a folder in NAB layout to run this"
)
def test_harness_reads_a_real_nab_file() -> None:
    root = Path(os.environ["TIDEMARK_NAB_DIR"])
    corpus = bench.load_corpus(root)
    assert corpus, f"no labelled CSV under {root}"
    name, stamps, values, windows = min(corpus, key=lambda item: len(item[2]))
    assert len(stamps) == len(values) and all(a <= b < len(values) for a, b in windows)
    scored, cost = bench.run_detector([(name, stamps, values, windows)], "seasonal_likelihood", {})
    assert len(scored[0].scores) == len(values) and cost > 0
