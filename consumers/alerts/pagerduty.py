"""PagerDuty Events API v2: ``trigger`` and ``resolve`` events with a stable ``dedup_key``.

The ``dedup_key`` comes from metric, period, dimensions and detector
(:attr:`schemas.anomaly.Anomaly.dedup_key`), so every event about one series lands on the
same PagerDuty alert: an update is a further ``trigger`` on the open alert (a log entry,
not a new page), and ``resolve`` closes it. Summaries are cut to PagerDuty's 1024
characters. Tidemark severities map to PagerDuty's: low -> info, medium -> warning,
high -> error, critical -> critical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consumers.alerts.channel import Notification
from schemas.anomaly import AlertAction, Severity

SUMMARY_MAX = 1024
SEVERITY = {Severity.low: "info", Severity.medium: "warning", Severity.high: "error", Severity.critical: "critical"}


def _iso(anomaly_time: Any) -> str:
    return anomaly_time.isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class PagerDutyChannel:
    """POSTs Events API v2 events to ``url`` with the service's ``routing_key``."""

    routing_key: str
    url: str = "https://events.pagerduty.com/v2/enqueue"
    external_url: str = "http://127.0.0.1:8000"
    name: str = "pagerduty"

    def payload(self, notification: Notification) -> dict[str, Any]:
        """A ``trigger`` (for trigger and update) or ``resolve`` event."""
        anomaly = notification.anomaly
        if notification.action == AlertAction.resolve:
            return {"routing_key": self.routing_key, "event_action": "resolve", "dedup_key": anomaly.dedup_key}
        summary = f"[{anomaly.severity.value}] {anomaly.description or anomaly.metric_type}"
        return {
            "routing_key": self.routing_key,
            "event_action": "trigger",
            "dedup_key": anomaly.dedup_key,
            "payload": {
                "summary": summary[:SUMMARY_MAX],
                "source": f"tidemark/{anomaly.metric_type}/{anomaly.period}/{anomaly.dimensions_key or 'total'}",
                "severity": SEVERITY[anomaly.severity],
                "timestamp": _iso(anomaly.detected_at),
                "component": anomaly.metric_type,
                "group": anomaly.period,
                "class": f"anomaly/{anomaly.detector}",
                "custom_details": {
                    "anomaly_id": str(anomaly.id),
                    "dimensions": dict(anomaly.dimensions),
                    "expected": anomaly.expected,
                    "actual": anomaly.actual,
                    "deviation": anomaly.deviation,
                    "score": anomaly.score,
                    "window_start": _iso(anomaly.window_start),
                    "action": notification.action.value,
                },
            },
            "client": "Tidemark",
            "client_url": f"{self.external_url}/v1/anomalies/{anomaly.id}",
        }
