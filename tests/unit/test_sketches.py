"""Distinct counting: exact while small, HLL within 1 % when large, mergeable in any grouping."""

from __future__ import annotations

import random

from streams.aggregators import DistinctAccumulator, decode_state, encode_state
from streams.sketches import DistinctCounter


def test_exact_below_the_limit_and_renames() -> None:
    counter = DistinctCounter(exact_limit=100)
    for i in range(80):
        counter.add(f"u{i % 50}")
    assert counter.exact and counter.estimate() == 50
    counter.rename("u1", "u2")
    assert counter.estimate() == 49


def test_hll_within_one_percent_and_merge_is_a_union() -> None:
    rng = random.Random(4)
    ids = [f"user-{rng.getrandbits(64)}" for _ in range(120_000)]
    parts = [DistinctCounter(exact_limit=1_000) for _ in range(4)]
    for i, key in enumerate(ids):
        parts[i % 4].add(key)
        if i % 3 == 0:
            parts[(i + 1) % 4].add(key)  # overlap between parts
    merged = DistinctCounter(exact_limit=1_000)
    for part in parts:
        merged.merge(part)
    assert not merged.exact
    assert abs(merged.estimate() - len(ids)) / len(ids) <= 0.01
    # Another grouping of the same merges gives the same estimate.
    left, right = parts[0].copy(), parts[2].copy()
    left.merge(parts[1])
    right.merge(parts[3])
    left.merge(right)
    assert left.estimate() == merged.estimate()


def test_exact_merged_into_sketch_and_back_through_state() -> None:
    big = DistinctAccumulator(exact_limit=10)
    small = DistinctAccumulator(exact_limit=10)
    for i in range(50):
        big.add(f"a{i}")
    for i in range(5):
        small.add(f"b{i}")
    small.merge(big)
    restored = decode_state(encode_state(small))
    assert restored.value() == small.value() == 55.0
    exact = decode_state(encode_state(DistinctAccumulator()))
    assert exact.value() == 0.0
