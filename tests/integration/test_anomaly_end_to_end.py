"""Injected demo incidents reach on-call: demo traffic → Kafka → ``tidemark worker`` → ``anomalies`` → alert
delivery → a webhook receiver, with a resolve once each series recovers.

What runs: the real broker; the demo simulation with three injected incidents, produced to
``events.raw`` keyed like the collector does; a real ``tidemark worker`` child process
(sessions, metrics and anomaly agents); the alert consumer (:class:`AlertConsumer`, what
``tidemark alerts`` runs) in a thread; and a plain HTTP server on 127.0.0.1 that records the
generic JSON webhook's posts.

Choices, and why
----------------
- **Hourly windows, flat traffic.** Hourly totals are what the bank watches by default
  (``anomaly_periods``). Traffic without daily seasonality lets a detector judge an hour
  against the recent hours; with seasonal traffic it would need days of history per
  hour-of-day slot, far more events than the worker gets through in a test. Weeks of seasonal
  traffic with the default settings are covered in-process by ``test_anomaly_clean_run.py``.
- **Volume: 4,500 sessions a day** (~900 events an hour, 30 hours, ~28,000 events): the worker
  computes every catalogue metric at five periods with its breakdowns, which on a busy 2-core
  machine is a few hundred events a second.
- **Detector: the default (``seasonal_likelihood``) with the business parameters, and a short
  memory.** The default waits 300 periods (12.5 days of hours) before judging and averages the
  last six raw scores; here the inner z-score starts after 6 hours, the likelihood after 12,
  and each hour is judged on its own (``short_window: 0``): the incidents last one to four
  hours, which a six-hour average would dilute at this volume. Severity thresholds, recovery
  (5 calm hours) and routing are the defaults. So short a history makes the detector jumpy;
  the seed is one whose clean hours page nobody (fixed seed: the same events, the same
  judgements, every run).
- **Incidents**, after 13 hours of clean history, one after another so each alert is
  attributable: an error burst (25 % of page views, 13:00-14:00), a checkout outage
  (``revenue_drop`` x0, 14:00-18:00) and a signup spike (x8, 18:00-20:00; it brings page views
  and so errors too, which is why the error burst comes first). At ~16 fundings an hour GMV
  varies by ±35 % from hour to hour by chance: a page on any revenue-family metric (GMV,
  revenue, processing fees, transaction count) counts for the outage.
- **A backlog, caught up at full speed.** All events are in ``events.raw`` (six partitions,
  keyed like the collector keys them) before the worker starts, as after an outage. The
  worker fetches a partition in batches of thousands of events, so one partition runs hours
  of event time ahead of another, and the snapshots of an hour arrive long before the hour
  is complete. The bank judges an hour on its ``final`` snapshot only (published when every
  partition has passed the hour's end plus the grace period), so every judgement is made on
  the complete hour. The test checks that too: every final hourly total of the checked
  metrics equals the count in the generated events.
- **Bounded delay:** an incident must page for a window starting at most ``MAX_WINDOWS - 1``
  hours after it began, and resolve after it ended. Observed with this seed: each pages for
  its first hour (the outage through ``revenue``), and resolves 5-6 hours after it ended.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from confluent_kafka import Consumer

from consumers.alerts.consumer import AlertConsumer
from schemas.models import AnalyticsEvent
from schemas.streams import MetricSnapshot, metric_snapshot_codec
from tests.fixtures.server import wait_until
from tests.integration.stream_worker import WorkerProcess, produce_events
from tidemark.demo import InjectedAnomaly, TrafficConfig, generate_events
from tidemark.settings import Settings
from tidemark.topics import METRICS, ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(720)]

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
HOURS = 30
SEED = 6
SESSIONS_PER_DAY = 4500.0
INCIDENTS = (
    InjectedAnomaly.parse("error_burst@2026-03-02T13:00Z/1h"),
    InjectedAnomaly.parse("revenue_drop@2026-03-02T14:00Z/4h*0"),
    InjectedAnomaly.parse("signup_spike@2026-03-02T18:00Z/2h*8"),
)
ALERTING_METRICS = {
    "revenue_drop": {"gmv", "revenue", "processing_fees", "transaction_volume"},
    "signup_spike": {"signups"},
    "error_burst": {"errors"},
}
MAX_WINDOWS = 2
DETECTOR_PARAMS = {
    "warm_up": 12,
    "short_window": 0,
    "inner_params": {
        "warm_up": 6, "slot_window": 24, "min_slot_obs": 3, "min_scale_obs": 8, "min_scale": 0.5,
        "judge_constant": False,
    },
}
# Hourly totals checked against the generated events: the event names each counts.
CHECKED = {
    "page_views": {"page_view"},
    "signups": {"signup"},
    "errors": {"error"},
    "transaction_volume": {"fund_project", "loan_disbursed", "loan_repaid"},
}
HOUR = timedelta(hours=1)


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 (free port) recording the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"null")
                with receiver.lock:
                    receiver.bodies.append(body)
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.bodies)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


class HourlyTotals:
    """Reads ``metrics``: the final hourly total of each checked metric, by hour."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"check-{uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        self.consumer.subscribe([settings.topic(METRICS.name)])
        self.codec = metric_snapshot_codec()
        self.finals: dict[tuple[str, datetime], list[float]] = defaultdict(list)

    def poll(self) -> None:
        for message in self.consumer.consume(5000, timeout=0.2):
            if message.error():
                continue
            snapshot = MetricSnapshot.from_avro(self.codec.decode(message.value()))
            if (snapshot.final and snapshot.period == "hour" and not snapshot.dimensions
                    and snapshot.metric_type in CHECKED):
                self.finals[(snapshot.metric_type, snapshot.period_start)].append(snapshot.value)


def hourly_counts(events: list[AnalyticsEvent]) -> dict[datetime, dict[str, int]]:
    """The reference: each checked metric's count per hour, straight from the generated events."""
    names: dict[datetime, Counter[str]] = defaultdict(Counter)
    for event in events:
        names[event.timestamp.replace(minute=0, second=0, microsecond=0)][event.event_name] += 1
    return {
        hour: {metric: sum(counter[name] for name in wanted) for metric, wanted in CHECKED.items()}
        for hour, counter in names.items()
    }


def test_injected_incidents_page_on_call_and_resolve(
    kafka_settings: Settings, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    config = TrafficConfig(
        start=START, end=START + timedelta(hours=HOURS), sessions_per_day=SESSIONS_PER_DAY, seed=SEED,
        seasonality=0.0, anomalies=INCIDENTS,
    )
    events = list(generate_events(config))
    reference = hourly_counts(events)

    # Topics of this test's own, as deployed; the whole backlog is there before the worker starts.
    settings = kafka_settings.model_copy(update={
        "topic_prefix": kafka_settings.topic_prefix + "e2e.",
        "consumer_group_prefix": kafka_settings.consumer_group_prefix + ".e2e",
        "alert_webhook_url": receiver.url,
    })
    ensure_topics(settings)
    assert produce_events(settings, events) == len(events)

    worker = WorkerProcess(settings, tmp_path / "worker", extra_env={
        "TIDEMARK_ANOMALY_DETECTOR_PARAMS": json.dumps(DETECTOR_PARAMS),
        # The deployed flush cadence (WorkerProcess's small batches suit short tests, not 28,000 events).
        "TIDEMARK_STREAM_FLUSH_SECONDS": str(Settings.model_fields["stream_flush_seconds"].default),
        "TIDEMARK_STREAM_FLUSH_EVENTS": str(Settings.model_fields["stream_flush_events"].default),
    })
    alerts = AlertConsumer(settings)
    totals = HourlyTotals(settings)
    worker.start()
    alerts.start()
    try:
        def paged_and_resolved() -> bool:
            worker.check_alive()
            assert alerts.is_alive(), "alert delivery stopped"
            totals.poll()
            posts = receiver.received()
            return all(_resolve_of(posts, _first_trigger(posts, incident)) for incident in INCIDENTS)

        wait_until(paged_and_resolved, 480, "a trigger and a resolve for every incident", interval=0.5)

        # Every hour that ended before the last events (plus grace) goes out final, once, and complete.
        judged_hours = [START + k * HOUR for k in range(HOURS - 1)]

        missing: list[str] = []

        def all_final() -> bool:
            worker.check_alive()
            totals.poll()
            missing[:] = [f"{metric} {hour:%d %H}:00" for hour in judged_hours
                          for metric, count in reference.get(hour, {}).items()
                          if count and (metric, hour) not in totals.finals]
            return not missing

        try:
            wait_until(all_final, 120, "final hourly totals of every checked metric", interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; missing: {missing[:20]}") from None
    finally:
        worker.stop()
        alerts.stop()
        totals.consumer.close()

    wrong = {
        (metric, f"{hour:%d %H}:00"): (values, reference.get(hour, {}).get(metric, 0))
        for (metric, hour), values in totals.finals.items()
        if any(value != reference.get(hour, {}).get(metric, 0) for value in values)
    }
    assert not wrong, f"final totals that differ from the events (final values, expected): {wrong}"

    posts = receiver.received()
    assert all(post["version"] == "1" for post in posts)
    before = [p for p in posts if _window(p) < INCIDENTS[0].start and p["action"] == "trigger"]
    assert not [p["anomaly"]["description"] for p in before if p["anomaly"]["metricType"] in CHECKED]
    for incident in INCIDENTS:
        trigger = _first_trigger(posts, incident)
        assert trigger is not None
        anomaly = trigger["anomaly"]
        delay = (_window(trigger) - incident.start) // HOUR
        assert 0 <= delay < MAX_WINDOWS, f"{incident.kind}: first alert {delay} windows after the start"
        assert anomaly["status"] == "open" and anomaly["period"] == "hour" and anomaly["dimensions"] == {}
        if incident.kind == "revenue_drop":
            assert anomaly["actual"] < anomaly["expected"]
        else:
            assert anomaly["actual"] > anomaly["expected"]
        resolve = _resolve_of(posts, trigger)
        assert resolve is not None
        assert resolve["anomaly"]["status"] == "resolved" and resolve["anomaly"]["resolvedBy"] == "detector"
        resolved_at = datetime.fromisoformat(resolve["anomaly"]["resolvedAt"])
        assert resolved_at >= incident.start + incident.duration  # after the series recovered
        print(f"{incident.kind}: {anomaly['description']}; window +{delay} h; resolved at {resolved_at:%d %H}:00")


def _window(post: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(post["anomaly"]["windowStart"])


def _first_trigger(posts: list[dict[str, Any]], incident: InjectedAnomaly) -> dict[str, Any] | None:
    """The earliest trigger of an incident's metrics for a window from its start on."""
    triggers = [
        p for p in posts
        if p["action"] == "trigger" and p["anomaly"]["metricType"] in ALERTING_METRICS[incident.kind]
        and p["anomaly"]["dimensions"] == {} and _window(p) >= incident.start
    ]
    return min(triggers, key=_window, default=None)


def _resolve_of(posts: list[dict[str, Any]], trigger: dict[str, Any] | None) -> dict[str, Any] | None:
    if trigger is None:
        return None
    return next((p for p in posts if p["action"] == "resolve" and p["dedupKey"] == trigger["dedupKey"]), None)
