"""Distinct counting: exact while small, HLL within 1 % when large, mergeable in any grouping."""

from __future__ import annotations

import random

from streams.aggregators import DistinctAccumulator, compile_catalogue, decode_state, encode_state, merged_value
from streams.catalogue import CATALOGUE
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


def test_union_count_is_exact_over_exact_parts_and_leaves_them_as_they_are() -> None:
    # Parts of 600 keys each, overlapping: the union (1,850 keys) is past the limit of every part.
    parts = [DistinctCounter(exact_limit=1_000) for _ in range(4)]
    for n, part in enumerate(parts):
        for i in range(n * 400, n * 400 + 600):
            part.add(f"u{i}")
    before = [set(part.keys or ()) for part in parts]
    assert DistinctCounter.union_count(parts) == len(set().union(*before)) == 1_800
    assert [part.keys for part in parts] == before and all(part.exact for part in parts)


def test_union_count_over_sketched_and_exact_parts_is_within_one_percent() -> None:
    rng = random.Random(9)
    ids = [f"user-{rng.getrandbits(64)}" for _ in range(30_000)]
    sketched, exact = DistinctCounter(exact_limit=1_000), DistinctCounter(exact_limit=1_000)
    for key in ids[:25_000]:
        sketched.add(key)
    for key in ids[24_500:25_400]:  # overlaps the sketched part, stays exact
        exact.add(key)
    assert not sketched.exact and exact.exact
    assert abs(DistinctCounter.union_count([sketched, exact]) - 25_400) / 25_400 <= 0.01


def test_merged_value_of_ratio_parts_equals_merging_them() -> None:
    # arpu's partials: revenue (a sum) over active people (distinct), from three partitions.
    arpu = compile_catalogue(CATALOGUE, ["arpu"])["arpu"]
    parts = []
    for partition in range(3):
        acc = arpu.new_partial()
        acc.num.total = 10.0 * (partition + 1)
        for i in range(partition * 3, partition * 3 + 5):
            acc.den.add(f"u{i}")
        parts.append(decode_state(encode_state(acc)))
    merged = arpu.new_partial()
    for part in parts:
        merged.merge(part)
    assert merged_value(arpu.new_partial(), parts) == merged.value() == 60.0 / 11
    assert merged_value(arpu.new_partial(), [decode_state(encode_state(arpu.new_partial()))]) is None
