"""Alertmanager-compatible webhook payload (``version: "4"``), as Alertmanager's webhook receiver sends it.

Anything that consumes Alertmanager webhooks (incident tools, chat bridges) can take
Tidemark's anomalies directly. One notification carries one alert (one series).
Labels identify the series (``alertname``, ``metric``, ``period``, ``detector``,
``severity`` and one label per dimension, sanitised to Prometheus label names);
the ``fingerprint`` is a 16-hex-digit hash of those identifying labels, stable for the
series, as Alertmanager's is for a label set.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from consumers.alerts.channel import Notification
from schemas.anomaly import AlertAction, Anomaly

ALERTNAME = "TidemarkAnomaly"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "no end yet"
_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


def rfc3339(value: datetime) -> str:
    """UTC time in RFC 3339 with millisecond precision and ``Z``."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def label_name(text: str) -> str:
    """A valid Prometheus label name (``[a-zA-Z_][a-zA-Z0-9_]*``) from a dimension name.

    >>> label_name("utm-source"), label_name("1st")
    ('utm_source', '_1st')
    """
    name = _LABEL_NAME.sub("_", text)
    return name if name and not name[0].isdigit() else f"_{name}"


def series_labels(anomaly: Anomaly) -> dict[str, str]:
    """The labels that identify the series of an anomaly."""
    labels = {
        "alertname": ALERTNAME,
        "metric": anomaly.metric_type,
        "period": anomaly.period,
        "detector": anomaly.detector,
    }
    for key, value in sorted(anomaly.dimensions.items()):
        labels.setdefault(label_name(key), value)
    return labels


def fingerprint(labels: dict[str, str]) -> str:
    """16 hex digits identifying a label set."""
    text = "\xff".join(f"{k}\xfe{v}" for k, v in sorted(labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AlertmanagerChannel:
    """POSTs Alertmanager webhook payloads (version 4) to ``url``."""

    url: str
    external_url: str = "http://127.0.0.1:8000"
    receiver: str = "tidemark"
    name: str = "alertmanager"

    def payload(self, notification: Notification) -> dict[str, Any]:
        """One alert group holding this series' alert, firing or resolved."""
        anomaly = notification.anomaly
        resolved = notification.action == AlertAction.resolve
        status = "resolved" if resolved else "firing"
        identity = series_labels(anomaly)
        labels = {**identity, "severity": anomaly.severity.value}
        annotations = {
            "summary": f"{anomaly.metric_type} anomaly ({anomaly.severity.value})",
            "description": anomaly.description,
            "expected": f"{anomaly.expected:.6g}",
            "actual": f"{anomaly.actual:.6g}",
            "deviation": f"{anomaly.deviation:.6g}",
            "score": f"{anomaly.score:.3f}",
            "anomaly_id": str(anomaly.id),
        }
        ends_at = rfc3339(anomaly.resolved_at or anomaly.updated_at) if resolved else ZERO_TIME
        query = quote(f"metric={anomaly.metric_type}&period={anomaly.period}&{anomaly.dimensions_key}", safe="=&")
        group_labels = {"alertname": ALERTNAME, "metric": anomaly.metric_type}
        group_key = "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}"
        return {
            "version": "4",
            "groupKey": group_key,
            "truncatedAlerts": 0,
            "status": status,
            "receiver": self.receiver,
            "groupLabels": group_labels,
            "commonLabels": labels,
            "commonAnnotations": annotations,
            "externalURL": self.external_url,
            "alerts": [
                {
                    "status": status,
                    "labels": labels,
                    "annotations": annotations,
                    "startsAt": rfc3339(anomaly.detected_at),
                    "endsAt": ends_at,
                    "generatorURL": f"{self.external_url}/v1/anomalies/{anomaly.id}?{query}",
                    "fingerprint": fingerprint(identity),
                }
            ],
        }
