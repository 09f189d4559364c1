"""Weeks of clean demo traffic page nobody; the same run with injected incidents does page.

Three weeks of the demo simulation -- daily and weekly seasonality, members churning and
signing up, projects funded and expired, loans repaid -- go through the stream
processors and the anomaly agent in-process (:class:`tests.anomaly_replay.AnomalyReplay`:
what ``tidemark worker`` runs, without Kafka; the Kafka path is covered by
``test_anomaly_end_to_end.py``) with the detector bank exactly as the default
:class:`~tidemark.settings.Settings` configure it: every metric's total per hour and per
day, the default detector, its 300-period warm-up and the default severity thresholds.

Why these numbers:

- 22 days: the default detector judges an hourly series after 300 hours (12.5 days), and
  trusts the hour-of-week slot after three weeks, so the run covers both the hour-of-day
  and the hour-of-week baselines (27 hourly series, most judged for 4 to 9 days). Daily
  series stay in warm-up (300 days): they are not what this run checks.
- 1,500 sessions a day (~7,000 events, ~300 an hour): what the processors get through in
  well under a minute on a busy machine. Hourly totals are then small counts -- a few
  signups, a couple of errors and a handful of fundings an hour, none at night -- the
  hardest case for false alarms.
- The incidents are sized for that volume: an error burst (25 % of page views, one hour)
  and a signup spike (10x for three hours) are far outside it. A checkout outage is not
  injected here: with ~5 fundings an hour, an hour without any is ordinary at night and
  not unusual by day, which is exactly what the default detector says.

Three partitions instead of the topic's six: the partition count changes no merged value,
only the processing time. The injected run continues the clean history from a copy of the whole state taken before
the first incident (same seed, so the same events until then), so both runs share their
first 17 days of processing (every series is past its warm-up by then).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from schemas.anomaly import Anomaly
from tests.anomaly_replay import HOUR_MS, AnomalyReplay, demo_stream_events
from tidemark.demo import InjectedAnomaly, TrafficConfig, with_anomalies
from tidemark.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
DAYS = 22
FORK = START + timedelta(days=17)
SESSIONS_PER_DAY = 1500.0
SEED = 11
ERROR_BURST = InjectedAnomaly.of("error_burst", FORK + timedelta(hours=10), timedelta(hours=2))
SIGNUP_SPIKE = InjectedAnomaly.of("signup_spike", FORK + timedelta(hours=34), timedelta(hours=3), 10.0)
INJECTED_UNTIL = FORK + timedelta(days=3)
MAX_DELAY = 2  # windows from the incident's start to the window of its first alert


def first_alert(found: list[Anomaly], metric: str) -> Anomaly:
    matching = [a for a in found if a.metric_type == metric and a.dimensions == {} and a.period == "hour"]
    assert matching, f"no {metric} alert among {[a.description for a in found]}"
    return min(matching, key=lambda a: a.window_start)


def test_weeks_of_clean_traffic_page_nobody_and_incidents_do() -> None:
    settings = Settings()  # the defaults: what a deployment gets without configuring anything
    clean_config = TrafficConfig(
        start=START, end=START + timedelta(days=DAYS), sessions_per_day=SESSIONS_PER_DAY, seed=SEED
    )
    clean = AnomalyReplay(settings, partitions=3)
    events = demo_stream_events(clean_config)
    clean.feed(events, until=FORK)
    injected = clean.fork()
    shared = clean.events
    clean.feed(events)
    clean.flush(clean.clock_ms + HOUR_MS)  # the last hour is complete: judge it too

    # The run means something: every hourly total was judged long after its warm-up.
    bank = clean.agent.bank
    hourly = [key for key in bank._series if key.split("|")[1] == "hour"]
    assert len(hourly) >= 25
    judged = {key: bank._series[key].detector.n_seen for key in hourly}
    # (Counts and sums start with their first event; ratios and averages skip hours they are undefined in.)
    assert sum(n >= 300 + 100 for n in judged.values()) >= 24, judged  # 100+ hours judged past the warm-up
    assert clean.opened() == [], [f"{a.description} at {a.window_start}" for a in clean.opened()]

    # The same history with incidents: the first 17 days are the same events.
    incidents = replace(with_anomalies(clean_config, ERROR_BURST, SIGNUP_SPIKE), end=INJECTED_UNTIL)
    skipped = 0
    events = demo_stream_events(incidents)
    fork_ms = int(FORK.timestamp() * 1000)
    for event in events:
        if event.ts >= fork_ms:
            injected.feed([event])
            break
        skipped += 1
    assert skipped == shared
    injected.feed(events)
    injected.flush(injected.clock_ms + HOUR_MS)

    found = injected.opened()
    assert all(a.window_start >= ERROR_BURST.start for a in found)  # nothing before the first incident
    for incident, metric in ((ERROR_BURST, "errors"), (SIGNUP_SPIKE, "signups")):
        alert = first_alert(found, metric)
        delay = (alert.window_start - incident.start) // timedelta(hours=1)
        assert 0 <= delay < MAX_DELAY, f"{metric} alert for the window {delay} hours after the incident began"
        print(f"{incident.kind}: {metric} fired for the window {delay} h after its start, score {alert.score:.1f}")
        assert alert.actual > alert.expected
        resolved = [a for a in injected.resolved() if a.id == alert.id]
        assert resolved, f"{metric} did not resolve after the incident"
        assert resolved[0].resolved_at is not None and resolved[0].resolved_at > incident.start + incident.duration
