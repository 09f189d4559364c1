"""Channel payloads checked field by field against the published formats; routing, quiet hours, open alerts.

Field lists and enums below are written from the published documentation:
- PagerDuty Events API v2, "Send an Alert Event" (developer.pagerduty.com, events-API-v2/02-Trigger-Events):
  routing_key (required), event_action (trigger | acknowledge | resolve, required), dedup_key (<= 255 chars),
  payload.summary (required, <= 1024 chars), payload.source (required), payload.severity
  (critical | error | warning | info, required), payload.timestamp, payload.component, payload.group,
  payload.class, payload.custom_details (object), images, links, client, client_url.
- Alertmanager webhook_config payload (prometheus.io/docs/alerting/latest/configuration/#webhook_config):
  version "4", groupKey, truncatedAlerts, status (firing | resolved), receiver, groupLabels, commonLabels,
  commonAnnotations, externalURL, alerts[] with status, labels, annotations, startsAt, endsAt (RFC 3339),
  generatorURL, fingerprint.
"""

from __future__ import annotations

import doctest
import importlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from consumers.alerts.alertmanager import AlertmanagerChannel
from consumers.alerts.book import OpenAlertBook
from consumers.alerts.channel import Notification
from consumers.alerts.delivery import RetryPolicy, retry_after_seconds
from consumers.alerts.pagerduty import PagerDutyChannel
from consumers.alerts.routing import QuietHours, Router
from consumers.alerts.slack import SlackChannel
from consumers.alerts.webhook import WebhookChannel
from schemas.anomaly import AlertAction, Anomaly, AnomalyStatus, Severity

PD_TOP_LEVEL = {"routing_key", "event_action", "dedup_key", "payload", "images", "links", "client", "client_url"}
PD_PAYLOAD = {"summary", "source", "severity", "timestamp", "component", "group", "class", "custom_details"}
PD_ACTIONS = {"trigger", "acknowledge", "resolve"}
PD_SEVERITIES = {"critical", "error", "warning", "info"}
AM_TOP_LEVEL = {
    "version",
    "groupKey",
    "truncatedAlerts",
    "status",
    "receiver",
    "groupLabels",
    "commonLabels",
    "commonAnnotations",
    "externalURL",
    "alerts",
}
AM_ALERT = {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DETECTED = datetime(2024, 5, 6, 14, 0, tzinfo=UTC)


def anomaly(severity: Severity = Severity.high, **changes: object) -> Anomaly:
    base = Anomaly(
        metric_type="gmv",
        period="hour",
        dimensions={"country": "DE", "utm-source": "newsletter"},
        detected_at=DETECTED,
        window_start=DETECTED - timedelta(hours=1),
        severity=severity,
        expected=1200.0,
        actual=150.0,
        deviation=-1050.0,
        score=8.2,
        detector="seasonal_likelihood",
        description="gmv (country=DE, utm-source=newsletter, hour) is 150 vs 1,200 expected (-87.5%), score 8.2",
    )
    return base.model_copy(update=changes)


def check_pagerduty_trigger(body: dict[str, object]) -> None:
    assert set(body) <= PD_TOP_LEVEL
    assert {"routing_key", "event_action", "payload"} <= set(body)
    assert body["event_action"] in PD_ACTIONS
    assert isinstance(body["dedup_key"], str) and 0 < len(body["dedup_key"]) <= 255
    payload = body["payload"]
    assert isinstance(payload, dict)
    assert set(payload) <= PD_PAYLOAD
    assert {"summary", "source", "severity"} <= set(payload)
    assert isinstance(payload["summary"], str) and 0 < len(payload["summary"]) <= 1024
    assert isinstance(payload["source"], str) and payload["source"]
    assert payload["severity"] in PD_SEVERITIES
    assert datetime.fromisoformat(payload["timestamp"]).tzinfo is not None
    assert isinstance(payload["custom_details"], dict)


def test_pagerduty_trigger_follows_events_api_v2() -> None:
    channel = PagerDutyChannel(routing_key="R" * 32)
    body = channel.payload(Notification(anomaly(), AlertAction.trigger))
    check_pagerduty_trigger(body)
    assert body["routing_key"] == "R" * 32
    assert body["event_action"] == "trigger"
    assert body["payload"]["severity"] == "error"  # type: ignore[index]
    assert body["payload"]["component"] == "gmv"  # type: ignore[index]
    assert body["payload"]["custom_details"]["expected"] == 1200.0  # type: ignore[index]


def test_pagerduty_severity_mapping_and_long_summaries() -> None:
    channel = PagerDutyChannel(routing_key="k")
    mapped = {
        s: channel.payload(Notification(anomaly(s), AlertAction.trigger))["payload"]["severity"]  # type: ignore[index]
        for s in Severity
    }
    assert mapped == {
        Severity.low: "info",
        Severity.medium: "warning",
        Severity.high: "error",
        Severity.critical: "critical",
    }
    long = channel.payload(Notification(anomaly(description="x" * 5000), AlertAction.trigger))
    check_pagerduty_trigger(long)
    assert len(long["payload"]["summary"]) == 1024  # type: ignore[index]


def test_pagerduty_resolve_and_stable_dedup_key() -> None:
    channel = PagerDutyChannel(routing_key="k")
    first = anomaly()
    later_episode = anomaly(severity=Severity.low, actual=1.0)  # another episode, same series and detector
    assert first.id != later_episode.id
    assert first.dedup_key == later_episode.dedup_key
    assert first.dedup_key != anomaly(dimensions={"country": "FR"}).dedup_key
    assert first.dedup_key != anomaly(detector="forecast_holt_winters").dedup_key
    assert first.dedup_key != anomaly(metric_type="signups").dedup_key
    resolved = channel.payload(Notification(first.model_copy(update={"status": AnomalyStatus.resolved}), "resolve"))  # type: ignore[arg-type]
    assert resolved == {"routing_key": "k", "event_action": "resolve", "dedup_key": first.dedup_key}


def test_alertmanager_payload_follows_webhook_version_4() -> None:
    channel = AlertmanagerChannel(url="http://127.0.0.1:1/hook", external_url="http://tidemark.example")
    body = channel.payload(Notification(anomaly(), AlertAction.trigger))
    assert set(body) == AM_TOP_LEVEL
    assert body["version"] == "4"
    assert body["status"] == "firing"
    assert isinstance(body["groupKey"], str) and body["groupKey"]
    assert body["truncatedAlerts"] == 0
    assert body["externalURL"] == "http://tidemark.example"
    for mapping in ("groupLabels", "commonLabels", "commonAnnotations"):
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in body[mapping].items())
    (alert,) = body["alerts"]
    assert set(alert) == AM_ALERT
    assert alert["status"] == "firing"
    assert all(LABEL_NAME.match(name) for name in alert["labels"])
    assert all(isinstance(v, str) for v in [*alert["labels"].values(), *alert["annotations"].values()])
    assert alert["labels"]["alertname"] == "TidemarkAnomaly"
    assert alert["labels"]["utm_source"] == "newsletter"
    assert alert["labels"]["severity"] == "high"
    assert RFC3339.match(alert["startsAt"]) and alert["startsAt"].startswith("2024-05-06T14:00:00")
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["generatorURL"].startswith("http://tidemark.example/")
    assert re.fullmatch(r"[0-9a-f]{16}", alert["fingerprint"])


def test_alertmanager_resolved_keeps_the_fingerprint_and_sets_ends_at() -> None:
    channel = AlertmanagerChannel(url="http://127.0.0.1:1/hook")
    firing = channel.payload(Notification(anomaly(), AlertAction.trigger))
    ended = DETECTED + timedelta(hours=3)
    resolved_anomaly = anomaly(status=AnomalyStatus.resolved, resolved_at=ended, severity=Severity.critical)
    resolved = channel.payload(Notification(resolved_anomaly, AlertAction.resolve))
    assert resolved["status"] == "resolved" and resolved["alerts"][0]["status"] == "resolved"
    assert RFC3339.match(resolved["alerts"][0]["endsAt"]) and resolved["alerts"][0]["endsAt"].startswith(
        "2024-05-06T17:00:00"
    )
    # Severity is not part of the identity: an escalated series keeps its fingerprint.
    assert resolved["alerts"][0]["fingerprint"] == firing["alerts"][0]["fingerprint"]


def test_slack_and_webhook_bodies() -> None:
    slack = SlackChannel("http://127.0.0.1:1/slack").payload(Notification(anomaly(), AlertAction.trigger))
    assert isinstance(slack["text"], str) and "gmv" in slack["text"]
    assert [b["type"] for b in slack["blocks"]] == ["header", "section", "context"]
    assert slack["blocks"][0]["text"]["type"] == "plain_text" and len(slack["blocks"][0]["text"]["text"]) <= 150
    sent = anomaly()
    hook = WebhookChannel("http://127.0.0.1:1/hook").payload(Notification(sent, AlertAction.update))
    assert hook["action"] == "update"
    assert hook["anomaly"]["metricType"] == "gmv" and hook["anomaly"]["severity"] == "high"
    assert Anomaly.model_validate(hook["anomaly"]) == sent
    assert hook["dedupKey"] == sent.dedup_key


def test_book_keeps_one_open_alert_per_series(tmp_path: Path) -> None:
    book = OpenAlertBook(tmp_path / "open.json")
    first = anomaly(Severity.medium)
    assert book.decide(first) == AlertAction.trigger
    book.record(first, AlertAction.trigger, ["webhook"])
    assert book.decide(first) is None  # a replay: no second page
    assert book.decide(anomaly(Severity.low)) is None  # another episode while open: no storm
    assert book.decide(anomaly(Severity.critical)) == AlertAction.update
    book.record(anomaly(Severity.critical), AlertAction.update, ["pagerduty"])
    assert book.channels_told(first) == ["pagerduty", "webhook"]
    book.save()
    restored = OpenAlertBook(tmp_path / "open.json")
    resolved = first.model_copy(update={"status": AnomalyStatus.resolved})
    assert restored.decide(resolved) == AlertAction.resolve
    restored.record(resolved, AlertAction.resolve, [])
    assert restored.decide(resolved) is None  # nothing open any more
    assert restored.decide(first.model_copy(update={"status": AnomalyStatus.acknowledged})) is None


def test_quiet_hours_hold_back_non_critical_only() -> None:
    router = Router({"low": ["webhook"]}, QuietHours.parse("22:00-07:00", "America/New_York"))
    night = datetime(2024, 1, 15, 4, 0, tzinfo=UTC)  # 23:00 in New York
    day = datetime(2024, 1, 15, 15, 0, tzinfo=UTC)  # 10:00
    assert router.is_quiet(Severity.high, night)
    assert not router.is_quiet(Severity.critical, night)
    assert not router.is_quiet(Severity.high, day)
    same_day = QuietHours.parse("12:00-13:30")
    assert same_day.contains(datetime(2024, 1, 1, 13, 29, tzinfo=UTC))
    assert not same_day.contains(datetime(2024, 1, 1, 13, 30, tzinfo=UTC))
    with pytest.raises(ValueError, match="quiet hours"):
        QuietHours.parse("late")
    with pytest.raises(ValueError, match="quiet mode"):
        Router({}, None, "ignore")


def test_retry_policy_backs_off_exponentially_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_seconds=0.5, backoff_max_seconds=3.0)
    assert [policy.delay(a, None) for a in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    assert policy.delay(1, 2.5) == 2.5
    assert policy.delay(1, 100.0) == 3.0
    assert retry_after_seconds("0") == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", datetime(2015, 10, 21, 7, 29, tzinfo=UTC)) == 0.0


@pytest.mark.parametrize(
    "name", ["consumers.alerts.delivery", "consumers.alerts.routing", "consumers.alerts.alertmanager"]
)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_alerts_command_is_registered() -> None:
    from tidemark.cli import build_parser

    args = build_parser().parse_args(["alerts", "--metrics-port", "9102"])
    assert args.command == "alerts" and args.metrics_port == 9102 and callable(args.func)
