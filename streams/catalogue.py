"""The metric catalogue: every business metric defined once, declaratively.

A :class:`MetricDefinition` says which events count (event names + property
conditions), how they are aggregated (count, sum of a property, distinct values,
average, ratio of two other metrics, churn), by which dimensions a metric may be broken
down, at which periods it is reported and its unit. The same definition compiles to

- stream window aggregations (:mod:`streams.aggregators`, used by the metrics agent), and
- ClickHouse SQL over raw events (:mod:`streams.sql`, used by the batch recompute),

and dashboards and anomaly detection read the catalogue by metric name. Adding a metric
is adding an entry, here or in a JSON/YAML file named by ``TIDEMARK_METRICS_FILE``.

Definitions of the seed's Key Metrics that need a choice
--------------------------------------------------------
- ``dau`` / ``wau`` / ``mau``: distinct people (after identity stitching) with any
  event in the reporting day / week / month.
- ``activation_rate``: people who funded a project per signup, same period (the
  cohort-exact version, "of the people who signed up, who funded within N days", is a
  funnel question).
- ``referral_rate``: accepted referrals per signup, same period.
- ``churn_rate``: share of the previous period's active people not active in this
  period (week and month; batch-computed).
- Revenue by source: ads = ``watch_ad.revenue``; processing fees = ``fund_project.fee``;
  loans = ``loan_repaid.interest`` + ``loan_disbursed.fee`` (the origination fee).
  ``revenue`` is their sum. ``arpu`` = revenue / active people in the same period.
- ``success_rate``: funded / (funded + expired) projects, by the period of the outcome.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from streams.periods import PERIODS, Period


class Aggregation(StrEnum):
    """How a metric turns matching events (or sessions) into one number per window."""

    count = "count"
    sum = "sum"
    distinct = "distinct"
    average = "average"
    ratio = "ratio"
    churn = "churn"


class Source(StrEnum):
    """What a metric aggregates: raw events, or sessions (by the period the session started in)."""

    events = "events"
    sessions = "sessions"


# Dimension name -> the event field it reads. The first five are materialised ClickHouse columns.
DIMENSIONS: dict[str, str] = {
    "community": "properties.community",
    "category": "properties.category",
    "country": "context.location.country",
    "device": "context.device.type",
    "utm_source": "context.campaign.source",
    "utm_medium": "context.campaign.medium",
    "utm_campaign": "context.campaign.name",
}

# Dimensions a session carries (its first-touch values), for session metrics.
SESSION_DIMENSIONS: tuple[str, ...] = ("country", "device", "utm_source", "utm_medium", "utm_campaign")

# Session fields a session metric can average.
SESSION_FIELDS: tuple[str, ...] = ("duration_seconds", "page_views", "events")

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_FIELD = re.compile(r"^(person|event_name|event_type|user_id|anonymous_id|(properties|context)(\.[A-Za-z0-9_]+)+)$")


class Operator(StrEnum):
    """Comparison in a property condition. Text operators compare strings; the others numbers."""

    eq = "eq"
    ne = "ne"
    in_ = "in"
    not_in = "not_in"
    gt = "gt"
    gte = "gte"
    lt = "lt"
    lte = "lte"


TEXT_OPERATORS = frozenset({Operator.eq, Operator.ne, Operator.in_, Operator.not_in})


@dataclass(frozen=True)
class Condition:
    """One property condition, e.g. ``Condition("properties.method", Operator.eq, "email")``.

    Text operators compare the value as a string (a missing or non-string value is '');
    numeric operators compare JSON numbers (a missing or non-numeric value never matches).
    """

    field: str
    op: Operator
    value: Any

    def __post_init__(self) -> None:
        if not _FIELD.match(self.field):
            raise ValueError(f"bad condition field {self.field!r}")
        object.__setattr__(self, "op", Operator(self.op))
        if self.op in (Operator.in_, Operator.not_in):
            if isinstance(self.value, str) or not isinstance(self.value, Iterable):
                raise ValueError(f"{self.op} needs a list of strings")
            object.__setattr__(self, "value", tuple(str(v) for v in self.value))
        elif self.op in TEXT_OPERATORS:
            object.__setattr__(self, "value", str(self.value))
        else:
            object.__setattr__(self, "value", float(self.value))


@dataclass(frozen=True)
class MetricDefinition:
    """One metric, declared once.

    Parameters
    ----------
    name: identifier (``metric_snapshots.metric_type``).
    description: what it means, for people.
    unit: ``count``, ``people``, ``currency``, ``seconds``, ``ratio``, ``days``, ...
    aggregation: see :class:`Aggregation`.
    events: event names that count (empty = every event).
    where: property conditions, all of which must hold.
    value: for ``sum``/``average``: the field summed, or a mapping event name -> field
        (revenue is ``watch_ad.revenue`` plus ``fund_project.fee`` ...). For session
        metrics: one of :data:`SESSION_FIELDS`.
    distinct: for ``distinct``: the field whose distinct values are counted (``person``).
    numerator, denominator: for ``ratio``: names of two other catalogue metrics.
    of: for ``churn``: the distinct metric whose membership is compared period to period.
    dimensions: dimension names the metric may be broken down by (see :data:`DIMENSIONS`).
    periods: periods the metric is reported at.
    source: ``events`` or ``sessions``.
    streaming: False for metrics only the batch recompute produces (``churn``).
    """

    name: str
    description: str
    unit: str
    aggregation: Aggregation
    events: tuple[str, ...] = ()
    where: tuple[Condition, ...] = ()
    value: str | Mapping[str, str] | None = None
    distinct: str = "person"
    numerator: str | None = None
    denominator: str | None = None
    of: str | None = None
    dimensions: tuple[str, ...] = ()
    periods: tuple[Period, ...] = PERIODS
    source: Source = Source.events
    streaming: bool = True
    tags: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"bad metric name {self.name!r}")
        object.__setattr__(self, "aggregation", Aggregation(self.aggregation))
        object.__setattr__(self, "source", Source(self.source))
        object.__setattr__(self, "periods", tuple(Period(p) for p in self.periods))
        object.__setattr__(self, "events", tuple(self.events))
        object.__setattr__(self, "where", tuple(self.where))
        object.__setattr__(self, "dimensions", tuple(self.dimensions))
        if isinstance(self.value, Mapping):
            object.__setattr__(self, "value", dict(self.value))
        allowed = SESSION_DIMENSIONS if self.source is Source.sessions else tuple(DIMENSIONS)
        for dim in self.dimensions:
            if dim not in allowed:
                raise ValueError(f"{self.name}: dimension {dim!r} is not one of {allowed}")
        agg = self.aggregation
        if agg in (Aggregation.sum, Aggregation.average) and not self.value:
            raise ValueError(f"{self.name}: {agg} needs a value field")
        if self.source is Source.sessions:
            if agg not in (Aggregation.count, Aggregation.average):
                raise ValueError(f"{self.name}: session metrics are counts or averages")
            if agg is Aggregation.average and self.value not in SESSION_FIELDS:
                raise ValueError(f"{self.name}: session field must be one of {SESSION_FIELDS}")
            return
        for path in self.value_fields().values():
            if not _FIELD.match(path):
                raise ValueError(f"{self.name}: bad value field {path!r}")
        if agg is Aggregation.distinct and not _FIELD.match(self.distinct):
            raise ValueError(f"{self.name}: bad distinct field {self.distinct!r}")
        if agg is Aggregation.ratio and not (self.numerator and self.denominator):
            raise ValueError(f"{self.name}: ratio needs numerator and denominator")
        if agg is Aggregation.churn and not self.of:
            raise ValueError(f"{self.name}: churn needs 'of' (a distinct metric)")

    def value_fields(self) -> dict[str, str]:
        """Event name -> value field ('' = any matching event), for sum and average."""
        if self.value is None:
            return {}
        if isinstance(self.value, str):
            return {"": self.value}
        return dict(self.value)

    def to_dict(self) -> dict[str, Any]:
        """The definition as plain data (the API's catalogue listing, the JSON file format)."""
        return {
            "name": self.name,
            "description": self.description,
            "unit": self.unit,
            "aggregation": self.aggregation.value,
            "events": list(self.events),
            "where": [{"field": c.field, "op": c.op.value, "value": c.value} for c in self.where],
            "value": self.value,
            "distinct": self.distinct,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "of": self.of,
            "dimensions": list(self.dimensions),
            "periods": [p.value for p in self.periods],
            "source": self.source.value,
            "streaming": self.streaming,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricDefinition:
        """Build a definition from plain data (a JSON/YAML catalogue file entry)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"metric {data.get('name')!r}: unknown keys {sorted(unknown)}")
        kwargs = dict(data)
        kwargs["where"] = tuple(
            Condition(c["field"], Operator(c["op"]), c["value"]) for c in data.get("where", ())
        )
        for key in ("events", "dimensions", "periods", "tags"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


class Catalogue(Mapping[str, MetricDefinition]):
    """The set of metric definitions, checked as a whole (ratio parts exist, dimensions fit)."""

    def __init__(self, definitions: Iterable[MetricDefinition]) -> None:
        self._by_name: dict[str, MetricDefinition] = {}
        for definition in definitions:
            if definition.name in self._by_name:
                raise ValueError(f"metric {definition.name!r} is defined twice")
            self._by_name[definition.name] = definition
        for definition in self._by_name.values():
            self._check(definition)

    def _check(self, d: MetricDefinition) -> None:
        if d.aggregation is Aggregation.ratio:
            for part_name in (d.numerator, d.denominator):
                part = self._by_name.get(part_name or "")
                if part is None:
                    raise ValueError(f"{d.name}: ratio part {part_name!r} is not in the catalogue")
                if part.aggregation in (Aggregation.ratio, Aggregation.churn):
                    raise ValueError(f"{d.name}: ratio parts must be plain aggregations")
                if part.source is not d.source:
                    raise ValueError(f"{d.name}: ratio parts must have the metric's source")
                if set(d.periods) - set(part.periods):
                    raise ValueError(f"{d.name}: part {part.name} is not reported at every period of the ratio")
                missing = set(d.dimensions) - set(part.dimensions)
                if missing:
                    raise ValueError(f"{d.name}: part {part.name} lacks dimensions {sorted(missing)}")
        if d.aggregation is Aggregation.churn:
            base = self._by_name.get(d.of or "")
            if base is None or base.aggregation is not Aggregation.distinct:
                raise ValueError(f"{d.name}: churn base {d.of!r} must be a distinct metric")
            if Period.minute in d.periods or d.streaming:
                raise ValueError(f"{d.name}: churn is batch-only and not per minute")

    def __getitem__(self, name: str) -> MetricDefinition:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def streaming(self) -> list[MetricDefinition]:
        """The definitions the stream computes."""
        return [d for d in self._by_name.values() if d.streaming]

    def select(self, names: Iterable[str] | None) -> list[MetricDefinition]:
        """Definitions by name (all when ``names`` is None); unknown names raise ``KeyError``."""
        if names is None:
            return list(self._by_name.values())
        out = []
        for name in names:
            if name not in self._by_name:
                raise KeyError(f"unknown metric {name!r}")
            out.append(self._by_name[name])
        return out

    def extended(self, definitions: Iterable[MetricDefinition]) -> Catalogue:
        """A new catalogue with ``definitions`` added."""
        return Catalogue([*self._by_name.values(), *definitions])


def load_definitions(path: Path) -> list[MetricDefinition]:
    """Read extra metric definitions from a JSON or YAML file: a list of entries (or ``{"metrics": [...]}``)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, Mapping):
        data = data.get("metrics", [])
    return [MetricDefinition.from_dict(entry) for entry in data]


_ALL = ("community", "category", "country", "device", "utm_source")
_PEOPLE = ("country", "device", "utm_source")
_PROJECT = ("community", "category", "country")
_SESSION = ("country", "device", "utm_source")
_DAY_UP = (Period.day, Period.week, Period.month)

DEFINITIONS: tuple[MetricDefinition, ...] = (
    # Engagement
    MetricDefinition("dau", "People active in the reporting day.", "people", Aggregation.distinct,
                     dimensions=_PEOPLE, periods=(Period.day,)),
    MetricDefinition("wau", "People active in the reporting week.", "people", Aggregation.distinct,
                     dimensions=_PEOPLE, periods=(Period.week,)),
    MetricDefinition("mau", "People active in the reporting month.", "people", Aggregation.distinct,
                     dimensions=_PEOPLE, periods=(Period.month,)),
    MetricDefinition("active_users", "People with any event in the period.", "people", Aggregation.distinct,
                     dimensions=_PEOPLE),
    MetricDefinition("page_views", "Pages viewed.", "count", Aggregation.count, events=("page_view",),
                     dimensions=_PEOPLE),
    MetricDefinition("sessions", "Sessions started in the period.", "count", Aggregation.count,
                     source=Source.sessions, dimensions=_SESSION),
    MetricDefinition("session_duration", "Average duration of the sessions started in the period.", "seconds",
                     Aggregation.average, value="duration_seconds", source=Source.sessions, dimensions=_SESSION),
    MetricDefinition("pages_per_session", "Average page views of the sessions started in the period.", "pages",
                     Aggregation.average, value="page_views", source=Source.sessions, dimensions=_SESSION),
    # Growth
    MetricDefinition("signups", "Accounts created.", "count", Aggregation.count, events=("signup",),
                     dimensions=_PEOPLE),
    MetricDefinition("activated_users", "People who funded a project.", "people", Aggregation.distinct,
                     events=("fund_project",), dimensions=_PEOPLE),
    MetricDefinition("activation_rate", "People who funded a project per signup, same period.", "ratio",
                     Aggregation.ratio, numerator="activated_users", denominator="signups", dimensions=_PEOPLE),
    MetricDefinition("referrals_accepted", "Referral invitations accepted.", "count", Aggregation.count,
                     events=("referral_accepted",), dimensions=_PEOPLE),
    MetricDefinition("referral_rate", "Accepted referrals per signup, same period.", "ratio", Aggregation.ratio,
                     numerator="referrals_accepted", denominator="signups", dimensions=_PEOPLE),
    MetricDefinition("churn_rate", "Share of the previous period's active people not active in this one.",
                     "ratio", Aggregation.churn, of="active_users", periods=(Period.week, Period.month),
                     streaming=False),
    # Revenue
    MetricDefinition("gmv", "Gross merchandise volume: money pledged to projects.", "currency", Aggregation.sum,
                     events=("fund_project",), value="properties.amount", dimensions=_ALL),
    MetricDefinition("ad_revenue", "Revenue from ads watched.", "currency", Aggregation.sum,
                     events=("watch_ad",), value="properties.revenue", dimensions=_PEOPLE),
    MetricDefinition("processing_fees", "Fees charged on project funding.", "currency", Aggregation.sum,
                     events=("fund_project",), value="properties.fee", dimensions=_ALL),
    MetricDefinition("loan_revenue", "Interest repaid plus origination fees on loans.", "currency",
                     Aggregation.sum, events=("loan_repaid", "loan_disbursed"),
                     value={"loan_repaid": "properties.interest", "loan_disbursed": "properties.fee"},
                     dimensions=_PEOPLE),
    MetricDefinition("revenue", "All revenue: ads + processing fees + loans.", "currency", Aggregation.sum,
                     events=("watch_ad", "fund_project", "loan_repaid", "loan_disbursed"),
                     value={"watch_ad": "properties.revenue", "fund_project": "properties.fee",
                            "loan_repaid": "properties.interest", "loan_disbursed": "properties.fee"},
                     dimensions=_PEOPLE),
    MetricDefinition("arpu", "Average revenue per active person.", "currency", Aggregation.ratio,
                     numerator="revenue", denominator="active_users", dimensions=_PEOPLE),
    # Financial
    MetricDefinition("transaction_volume", "Number of money movements (fundings, loans disbursed, repayments).",
                     "count", Aggregation.count, events=("fund_project", "loan_disbursed", "loan_repaid"),
                     dimensions=_PEOPLE),
    MetricDefinition("average_transaction_size", "Average amount pledged per funding.", "currency",
                     Aggregation.average, events=("fund_project",), value="properties.amount", dimensions=_ALL),
    # Projects
    MetricDefinition("projects_created", "Projects created.", "count", Aggregation.count,
                     events=("project_created",), dimensions=_PROJECT),
    MetricDefinition("projects_funded", "Projects that reached their goal.", "count", Aggregation.count,
                     events=("project_funded",), dimensions=_PROJECT),
    MetricDefinition("projects_expired", "Projects that expired unfunded.", "count", Aggregation.count,
                     events=("project_expired",), dimensions=_PROJECT),
    MetricDefinition("project_outcomes", "Projects that reached an outcome (funded or expired).", "count",
                     Aggregation.count, events=("project_funded", "project_expired"), dimensions=_PROJECT),
    MetricDefinition("success_rate", "Funded projects per project outcome.", "ratio", Aggregation.ratio,
                     numerator="projects_funded", denominator="project_outcomes", dimensions=_PROJECT),
    MetricDefinition("average_funding_time", "Average days from creation to full funding.", "days",
                     Aggregation.average, events=("project_funded",), value="properties.days_to_fund",
                     dimensions=_PROJECT, periods=_DAY_UP),
    MetricDefinition("loans_disbursed", "Amount of loans disbursed.", "currency", Aggregation.sum,
                     events=("loan_disbursed",), value="properties.amount", dimensions=("community", "country")),
    # Community
    MetricDefinition("active_communities", "Communities with any activity.", "communities", Aggregation.distinct,
                     distinct="properties.community", dimensions=("category", "country"), periods=_DAY_UP),
    MetricDefinition("new_members", "Community joins.", "count", Aggregation.count, events=("join_community",),
                     dimensions=("community", "country")),
    MetricDefinition("members", "Distinct people joining or active in a community event.", "people",
                     Aggregation.distinct, events=("join_community",), dimensions=("community", "country")),
    MetricDefinition("communities_with_projects", "Communities where projects were created.", "communities",
                     Aggregation.distinct, events=("project_created",), distinct="properties.community",
                     dimensions=("category", "country"), periods=_DAY_UP),
    MetricDefinition("projects_per_community", "Projects created per community creating projects.", "ratio",
                     Aggregation.ratio, numerator="projects_created", denominator="communities_with_projects",
                     dimensions=("category", "country"), periods=_DAY_UP),
    # Reliability
    MetricDefinition("errors", "Errors people ran into (error events).", "count", Aggregation.count,
                     events=("error",), dimensions=_PEOPLE),
)

CATALOGUE = Catalogue(DEFINITIONS)


def get_catalogue(extra_file: Path | None = None) -> Catalogue:
    """THE catalogue, extended with the entries of ``extra_file`` (``TIDEMARK_METRICS_FILE``) if given."""
    if extra_file is None:
        return CATALOGUE
    return CATALOGUE.extended(load_definitions(extra_file))
