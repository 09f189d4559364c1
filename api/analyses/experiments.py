"""A/B experiments: sticky assignment, statistics per variant, and results from ClickHouse.

Assignment
----------
:func:`assign_variant` hashes ``f"{experiment}:{unit}"`` with SHA-256, reads the first 8 bytes
as a position in ``[0, 1)`` and picks the first variant whose cumulative (normalised) weight
exceeds it. Deterministic and sticky across processes; the order of the variants is part of
the experiment (reordering them reassigns people). Same scheme as ``tidemark.demo``.

Statistics (library calls; numbers agree with scipy/statsmodels)
----------------------------------------------------------------
- Conversion: two-proportion z-test with the pooled standard error
  (``statsmodels.stats.proportion.proportions_ztest``, two-sided); CI of the difference
  (treatment − control) is the unpooled Wald interval (``confint_proportions_2indep``).
- Continuous metric: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) with its
  confidence interval of the difference of means (Welch–Satterthwaite degrees of freedom).
- Relative lift: ``(treatment − control) / control``.
- Bayesian probability to beat control: Beta(1 + conversions, 1 + non-conversions) posteriors
  (uniform prior); ``P(p_t > p_c) = ∫ f_t(x) F_c(x) dx`` by adaptive quadrature
  (``scipy.integrate.quad``), exact to ~1e-9 and deterministic (no Monte Carlo).
- Sample-ratio mismatch: ``scipy.stats.chisquare`` of the exposed counts against the weights;
  flagged when p < ``srm_alpha`` (0.001 by default).
- Required sample size per variant for a minimum detectable effect (absolute, on a
  baseline rate): ``NormalIndPower().solve_power`` on Cohen's h
  (``proportion_effectsize``), equal group sizes, two-sided.

Results from ClickHouse
-----------------------
Exposures are ``experiment_exposure`` events with properties ``experiment`` and ``variant``
in the time range; a person's first exposure starts their observation. People exposed to
more than one variant are excluded (and counted). A person converts when they did the
conversion event at or after their first exposure and before the range ends; the
continuous metric is the sum of a numeric property over the metric event in the same
interval (0 for people who never did it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import integrate, stats
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_effectsize, proportions_ztest

from api.analyses.assignment import assign_variant, bucket
from api.analyses.query import PropertyFilter, SQLBuilder, TimeRange, run

__all__ = ["assign_variant", "bucket"]  # assignment lives apart (no scipy import); re-exported here

EXPOSURE_EVENT = "experiment_exposure"


# --- statistics -----------------------------------------------------------------------------------


class ProportionComparison(BaseModel):
    """A treatment's conversion against control's."""

    rate_control: float
    rate_treatment: float
    difference: float
    relative_lift: float | None
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    probability_to_beat_control: float
    significant: bool


class MeanComparison(BaseModel):
    """A treatment's continuous metric against control's (Welch)."""

    mean_control: float
    mean_treatment: float
    difference: float
    relative_lift: float | None
    # None when Welch's test is undefined: both groups without variance (e.g. nobody converted).
    t: float | None
    df: float | None
    p_value: float | None
    ci_low: float | None
    ci_high: float | None
    significant: bool


class SampleRatioCheck(BaseModel):
    """Whether the exposed counts match the weights."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    mismatch: bool


def compare_proportions(
    conversions_control: int, users_control: int, conversions_treatment: int, users_treatment: int, alpha: float = 0.05
) -> ProportionComparison:
    """Two-proportion z-test, Wald CI of the difference, lift and P(treatment beats control)."""
    if users_control <= 0 or users_treatment <= 0:
        raise ValueError("both groups need people")
    rc, rt = conversions_control / users_control, conversions_treatment / users_treatment
    pooled = (conversions_control + conversions_treatment) / (users_control + users_treatment)
    if 0 < pooled < 1:
        z, p = proportions_ztest(
            [conversions_treatment, conversions_control], [users_treatment, users_control], alternative="two-sided"
        )
    else:  # nobody or everybody converted: no evidence of a difference
        z, p = 0.0, 1.0
    low, high = confint_proportions_2indep(
        conversions_treatment, users_treatment, conversions_control, users_control,
        method="wald", compare="diff", alpha=alpha,
    )
    return ProportionComparison(
        rate_control=rc,
        rate_treatment=rt,
        difference=rt - rc,
        relative_lift=(rt - rc) / rc if rc else None,
        z=float(z),
        p_value=float(p),
        ci_low=float(low),
        ci_high=float(high),
        probability_to_beat_control=probability_to_beat(
            conversions_control, users_control, conversions_treatment, users_treatment
        ),
        significant=bool(p < alpha),
    )


def probability_to_beat(
    conversions_control: int, users_control: int, conversions_treatment: int, users_treatment: int
) -> float:
    """P(p_treatment > p_control) under Beta(1 + x, 1 + n − x) posteriors, by quadrature."""
    control = stats.beta(1 + conversions_control, 1 + users_control - conversions_control)
    treatment = stats.beta(1 + conversions_treatment, 1 + users_treatment - conversions_treatment)
    # Integrate where the treatment posterior has its mass: quad must not miss a narrow peak.
    lo, hi = treatment.ppf(1e-12), treatment.isf(1e-12)
    value, _ = integrate.quad(lambda x: treatment.pdf(x) * control.cdf(x), lo, hi, limit=200, epsabs=1e-12)
    return float(min(1.0, max(0.0, value)))


def compare_means(control: Sequence[float], treatment: Sequence[float], alpha: float = 0.05) -> MeanComparison:
    """Welch's t-test of treatment against control, with the CI of the difference of means."""
    a, b = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two values per group")
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence_level=1 - alpha)
    mc, mt = float(b.mean()), float(a.mean())

    def defined(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    p_value = defined(result.pvalue)
    return MeanComparison(
        mean_control=mc,
        mean_treatment=mt,
        difference=mt - mc,
        relative_lift=(mt - mc) / mc if mc else None,
        t=defined(result.statistic),
        df=defined(result.df),
        p_value=p_value,
        ci_low=defined(ci.low),
        ci_high=defined(ci.high),
        significant=p_value is not None and p_value < alpha,
    )


def sample_ratio_check(observed: dict[str, int], weights: dict[str, float], alpha: float = 0.001) -> SampleRatioCheck:
    """Chi-square goodness of fit of the exposed counts against the variant weights."""
    names = list(weights)
    total_weight = sum(weights.values())
    total = sum(observed.get(n, 0) for n in names)
    expected = {n: total * weights[n] / total_weight for n in names}
    if total == 0:
        return SampleRatioCheck(observed=observed, expected=expected, chi2=0.0, p_value=1.0, mismatch=False)
    chi2, p = stats.chisquare([observed.get(n, 0) for n in names], [expected[n] for n in names])
    return SampleRatioCheck(
        observed={n: observed.get(n, 0) for n in names},
        expected=expected,
        chi2=float(chi2),
        p_value=float(p),
        mismatch=bool(p < alpha),
    )


def required_sample_size(
    baseline_rate: float, minimum_detectable_effect: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """People needed per variant to detect ``baseline → baseline + mde`` (absolute) with this power."""
    target = baseline_rate + minimum_detectable_effect
    if not 0 < baseline_rate < 1 or not 0 < target < 1 or minimum_detectable_effect == 0:
        raise ValueError("baseline and baseline + effect must be within (0, 1) and differ")
    effect = proportion_effectsize(target, baseline_rate)
    n = NormalIndPower().solve_power(effect_size=effect, alpha=alpha, power=power, ratio=1.0, alternative="two-sided")
    return math.ceil(float(n))


# --- results from ClickHouse -----------------------------------------------------------------------


class Variant(BaseModel):
    """A variant and its share of the traffic."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=100)
    weight: float = Field(gt=0)


class MetricSpec(BaseModel):
    """An event (with filters) and, for continuous metrics, the numeric property summed per person."""

    model_config = ConfigDict(frozen=True)

    event_name: str = Field(min_length=1, max_length=200)
    filters: tuple[PropertyFilter, ...] = ()
    property: str | None = Field(None, max_length=200)


class ExperimentDefinition(BaseModel):
    """What an experiment measures (the metadata database stores status, owner, dates)."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(min_length=1, max_length=200)
    variants: tuple[Variant, ...] = (Variant(name="control", weight=0.5), Variant(name="treatment", weight=0.5))
    control: str = "control"
    conversion: MetricSpec
    continuous: MetricSpec | None = None
    alpha: float = Field(0.05, gt=0, lt=1)
    minimum_detectable_effect: float | None = Field(None, description="Absolute, on the control's conversion rate.")
    power: float = Field(0.8, gt=0, lt=1)

    @model_validator(mode="after")
    def _control_is_a_variant(self) -> ExperimentDefinition:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        if self.control not in names:
            raise ValueError("control must be one of the variants")
        if self.continuous is not None and self.continuous.property is None:
            raise ValueError("a continuous metric needs a property")
        return self


class VariantResult(BaseModel):
    """One variant's numbers and its comparison with control."""

    name: str
    exposed: int
    conversions: int
    conversion_rate: float
    metric_mean: float | None = None
    conversion_vs_control: ProportionComparison | None = None
    metric_vs_control: MeanComparison | None = None


class ExperimentResult(BaseModel):
    """Results per variant plus the health checks."""

    key: str
    variants: list[VariantResult]
    multiple_variant_people: int = Field(description="Exposed to more than one variant: excluded.")
    unknown_variant_people: int = Field(0, description="Exposed only to variants not in the definition: excluded.")
    sample_ratio: SampleRatioCheck
    required_sample_size: int | None = None


def _exposure_sql(
    q: SQLBuilder, definition: ExperimentDefinition, time_range: TimeRange, cohort_id: str | None
) -> str:
    key = q.param(definition.key, "String")
    return (
        "SELECT person_id, min(timestamp) AS first_exposure, groupUniqArray(variant) AS variants FROM ("
        f"SELECT person_id, timestamp, JSONExtractString(properties, 'variant') AS variant FROM events_resolved "
        f"WHERE event_name = {q.param(EXPOSURE_EVENT, 'String')} AND "
        f"JSONExtractString(properties, 'experiment') = {key} AND {q.time_range(time_range)} "
        f"AND {q.in_cohort(cohort_id)}) GROUP BY person_id"
    )


def compute_experiment(
    client: Any, definition: ExperimentDefinition, time_range: TimeRange, cohort_id: str | None = None
) -> ExperimentResult:
    """Exposures, conversions and the metric per variant from ClickHouse, then the statistics."""
    q = SQLBuilder()
    exposures = _exposure_sql(q, definition, time_range, cohort_id)
    conv = q.event_condition(definition.conversion.event_name, definition.conversion.filters)
    metric = definition.continuous
    metric_cond = q.event_condition(metric.event_name, metric.filters) if metric else "0"
    metric_value = f"ifNull({q.property_number(metric.property)}, 0)" if metric and metric.property else "0"
    outcomes = (
        f"SELECT person_id, groupArrayIf(timestamp, {conv}) AS conv_times, "
        f"groupArrayIf(timestamp, {metric_cond}) AS metric_times, "
        f"groupArrayIf(toFloat64({metric_value}), {metric_cond}) AS metric_values "
        f"FROM events_resolved WHERE ({conv} OR {metric_cond}) AND {q.time_range(time_range)} GROUP BY person_id"
    )
    names = q.param([v.name for v in definition.variants], "Array(String)")
    sql = (
        f"SELECT if(length(variants) > 1, '', variants[1]) AS variant, length(variants) > 1 AS multiple, "
        f"has({names}, variants[1]) AS known, count(), countIf(converted), groupArray(value) FROM ("
        f"SELECT x.variants AS variants, arrayExists(t -> t >= x.first_exposure, o.conv_times) AS converted, "
        f"arraySum(arrayMap((t, v) -> if(t >= x.first_exposure, v, 0), o.metric_times, o.metric_values)) AS value "
        f"FROM ({exposures}) AS x LEFT JOIN ({outcomes}) AS o ON o.person_id = x.person_id"
        ") GROUP BY variant, multiple, known"
    )
    per_variant: dict[str, tuple[int, int, list[float]]] = {}
    multiple = unknown = 0
    for variant, is_multiple, known, users, conversions, values in run(client, sql, q, {"join_use_nulls": 0}):
        if is_multiple:
            multiple += int(users)
        elif not known:
            unknown += int(users)
        else:
            per_variant[variant] = (int(users), int(conversions), [float(v) for v in values])
    return _results(definition, per_variant, multiple, unknown)


def _results(
    definition: ExperimentDefinition, per_variant: dict[str, tuple[int, int, list[float]]], multiple: int, unknown: int
) -> ExperimentResult:
    control = per_variant.get(definition.control, (0, 0, []))
    out: list[VariantResult] = []
    for v in definition.variants:
        users, conversions, values = per_variant.get(v.name, (0, 0, []))
        result = VariantResult(
            name=v.name,
            exposed=users,
            conversions=conversions,
            conversion_rate=conversions / users if users else 0.0,
            metric_mean=float(np.mean(values)) if definition.continuous is not None and values else None,
        )
        if v.name != definition.control and users and control[0]:
            result.conversion_vs_control = compare_proportions(
                control[1], control[0], conversions, users, definition.alpha
            )
            if definition.continuous is not None and len(values) >= 2 and len(control[2]) >= 2:
                result.metric_vs_control = compare_means(control[2], values, definition.alpha)
        out.append(result)
    srm = sample_ratio_check(
        {v.name: per_variant.get(v.name, (0, 0, []))[0] for v in definition.variants},
        {v.name: v.weight for v in definition.variants},
    )
    needed = None
    if definition.minimum_detectable_effect is not None and control[0]:
        baseline = control[1] / control[0]
        try:
            needed = required_sample_size(
                baseline, definition.minimum_detectable_effect, definition.alpha, definition.power
            )
        except ValueError:
            needed = None
    return ExperimentResult(
        key=definition.key,
        variants=out,
        multiple_variant_people=multiple,
        unknown_variant_people=unknown,
        sample_ratio=srm,
        required_sample_size=needed,
    )
