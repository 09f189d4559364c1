"""Deterministic demo traffic of the community-funding platform (see :mod:`tidemark.demo.traffic`).

Public API::

    from tidemark.demo import TrafficConfig, generate_events, generate_records, InjectedAnomaly

    config = TrafficConfig(start=..., end=..., seed=7, sessions_per_day=2000, timezone="Europe/Berlin")
    for event in generate_events(config):  # AnalyticsEvent, in timestamp order
        ...
"""

from tidemark.demo.anomalies import ANOMALY_KINDS, InjectedAnomaly, parse_duration
from tidemark.demo.experiments import AA_TEST, BUILT_IN_EXPERIMENTS, CHECKOUT_BUTTON, assign_variant
from tidemark.demo.live import live_config, paced
from tidemark.demo.seasonality import Seasonality
from tidemark.demo.traffic import (
    EVENTS_PER_SESSION,
    SESSION_GAP,
    TrafficConfig,
    TrafficSimulator,
    days_of_traffic,
    generate_events,
    generate_records,
    with_anomalies,
)

__all__ = [
    "AA_TEST",
    "ANOMALY_KINDS",
    "BUILT_IN_EXPERIMENTS",
    "CHECKOUT_BUTTON",
    "EVENTS_PER_SESSION",
    "SESSION_GAP",
    "InjectedAnomaly",
    "Seasonality",
    "TrafficConfig",
    "TrafficSimulator",
    "assign_variant",
    "days_of_traffic",
    "generate_events",
    "generate_records",
    "live_config",
    "paced",
    "parse_duration",
    "with_anomalies",
]
