"""Experiment statistics against independent computations (formulas, other scipy routines)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from api.analyses.experiments import (
    compare_means,
    compare_proportions,
    probability_to_beat,
    required_sample_size,
    sample_ratio_check,
)

TOL = 1e-6


@pytest.mark.parametrize(("xc", "nc", "xt", "nt"), [(120, 1000, 150, 1000), (33, 480, 31, 520), (5, 60, 12, 55)])
def test_two_proportion_z_test_by_formula(xc, nc, xt, nt):
    got = compare_proportions(xc, nc, xt, nt)
    pc, pt = xc / nc, xt / nt
    pooled = (xc + xt) / (nc + nt)
    z = (pt - pc) / math.sqrt(pooled * (1 - pooled) * (1 / nc + 1 / nt))
    p = 2 * stats.norm.sf(abs(z))
    se = math.sqrt(pc * (1 - pc) / nc + pt * (1 - pt) / nt)
    q = stats.norm.ppf(0.975)
    assert got.z == pytest.approx(z, abs=TOL)
    assert got.p_value == pytest.approx(p, abs=TOL)
    assert got.ci_low == pytest.approx(pt - pc - q * se, abs=TOL)
    assert got.ci_high == pytest.approx(pt - pc + q * se, abs=TOL)
    assert got.relative_lift == pytest.approx((pt - pc) / pc, abs=TOL)
    assert got.significant == (p < 0.05)


def test_welch_t_test_by_formula():
    rng = np.random.default_rng(1)
    control = rng.gamma(2.0, 10.0, size=400)
    treatment = rng.gamma(2.0, 11.5, size=350)
    got = compare_means(control, treatment)
    m1, m2 = treatment.mean(), control.mean()
    v1, v2 = treatment.var(ddof=1) / len(treatment), control.var(ddof=1) / len(control)
    t = (m1 - m2) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (len(treatment) - 1) + v2**2 / (len(control) - 1))
    p = 2 * stats.t.sf(abs(t), df)
    half = stats.t.ppf(0.975, df) * math.sqrt(v1 + v2)
    assert got.t == pytest.approx(t, abs=TOL)
    assert got.df == pytest.approx(df, abs=TOL)
    assert got.p_value == pytest.approx(p, abs=TOL)
    assert got.ci_low == pytest.approx(m1 - m2 - half, abs=TOL)
    assert got.ci_high == pytest.approx(m1 - m2 + half, abs=TOL)


def _beat_closed_form(xc: int, nc: int, xt: int, nt: int) -> float:
    """Evan Miller's exact sum for P(B > A) with Beta posteriors (integer parameters)."""
    a_a, b_a = 1 + xc, 1 + nc - xc
    a_b, b_b = 1 + xt, 1 + nt - xt
    total = 0.0
    for i in range(a_b):
        log_term = special.betaln(a_a + i, b_a + b_b) - math.log(b_b + i)
        total += math.exp(log_term - special.betaln(1 + i, b_b) - special.betaln(a_a, b_a))
    return total


@pytest.mark.parametrize(
    ("xc", "nc", "xt", "nt"), [(120, 1000, 150, 1000), (33, 480, 31, 520), (0, 10, 1, 10), (400, 5000, 400, 5000)]
)
def test_probability_to_beat_control_matches_closed_form(xc, nc, xt, nt):
    assert probability_to_beat(xc, nc, xt, nt) == pytest.approx(_beat_closed_form(xc, nc, xt, nt), abs=TOL)


def test_sample_ratio_mismatch():
    ok = sample_ratio_check({"control": 5030, "treatment": 4970}, {"control": 0.5, "treatment": 0.5})
    chi2 = (5030 - 5000) ** 2 / 5000 + (4970 - 5000) ** 2 / 5000
    assert ok.chi2 == pytest.approx(chi2, abs=TOL)
    assert ok.p_value == pytest.approx(stats.chi2.sf(chi2, 1), abs=TOL)
    assert not ok.mismatch
    bad = sample_ratio_check({"a": 2000, "b": 3000, "c": 5000}, {"a": 1, "b": 1, "c": 2})
    assert bad.mismatch and bad.expected == {"a": 2500, "b": 2500, "c": 5000}


@pytest.mark.parametrize(("baseline", "mde"), [(0.10, 0.02), (0.30, -0.05), (0.05, 0.01)])
def test_required_sample_size_by_solving_the_power_equation(baseline, mde):
    h = abs(2 * math.asin(math.sqrt(baseline + mde)) - 2 * math.asin(math.sqrt(baseline)))
    z = stats.norm.ppf(0.975)

    def power(n: float) -> float:
        shift = h * math.sqrt(n / 2)
        return stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift) - 0.8

    n = optimize.brentq(power, 2, 10_000_000, xtol=1e-10)
    assert required_sample_size(baseline, mde) == math.ceil(n - TOL)
    # the classic approximation lands in the same place
    assert abs(required_sample_size(baseline, mde) - 2 * ((z + stats.norm.ppf(0.8)) / h) ** 2) < 2


def test_welch_is_reported_undefined_when_neither_group_varies() -> None:
    from api.analyses.experiments import compare_means

    result = compare_means([0.0] * 50, [0.0] * 40)
    assert (result.t, result.p_value, result.significant) == (None, None, False)
    assert result.difference == 0.0
