"""Deterministic, sticky variant assignment."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from scipy import stats

from api.analyses.experiments import assign_variant, bucket


def test_sticky_and_independent_of_call_order():
    variants = [("control", 0.5), ("treatment", 0.5)]
    first = [assign_variant("checkout_button", f"user_{i}", variants) for i in range(1000)]
    again = [assign_variant("checkout_button", f"user_{i}", variants) for i in reversed(range(1000))][::-1]
    assert first == again


def test_bucket_is_sha256_of_experiment_and_user():
    # Recomputed by hand: the first 8 bytes of sha256("exp:u1") as a fraction of 2**64.
    digest = hashlib.sha256(b"exp:u1").hexdigest()
    assert bucket("exp", "u1") == int(digest[:16], 16) / 2**64
    assert 0 <= bucket("exp", "u1") < 1


def test_experiments_are_independent():
    a = [assign_variant("exp_a", f"u{i}", [("c", 1), ("t", 1)]) for i in range(20_000)]
    b = [assign_variant("exp_b", f"u{i}", [("c", 1), ("t", 1)]) for i in range(20_000)]
    table = Counter(zip(a, b, strict=True))
    observed = [[table[("c", "c")], table[("c", "t")]], [table[("t", "c")], table[("t", "t")]]]
    assert stats.chi2_contingency(observed).pvalue > 0.001


@pytest.mark.parametrize(
    "variants",
    [
        [("control", 0.5), ("treatment", 0.5)],
        [("control", 0.2), ("b", 0.3), ("c", 0.5)],
        [("control", 1.0), ("rare", 0.05)],
    ],
)
def test_split_matches_weights_on_100k_users(variants):
    counts = Counter(assign_variant("split_test", f"user_{i:06d}", variants) for i in range(100_000))
    total_weight = sum(w for _, w in variants)
    observed = [counts[name] for name, _ in variants]
    expected = [100_000 * w / total_weight for _, w in variants]
    # Strict level: a correct hash splits like a fair multinomial draw, so p is rarely below 0.001.
    assert stats.chisquare(observed, expected).pvalue > 0.001


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError):
        assign_variant("x", "u", [])
    with pytest.raises(ValueError):
        assign_variant("x", "u", [("a", 0.0)])
    with pytest.raises(ValueError):
        assign_variant("x", "u", [("a", -1.0), ("b", 2.0)])
