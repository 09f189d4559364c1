"""Generic JSON webhook: the anomaly episode as Tidemark publishes it, plus what happened to it.

Body::

    {"version": "1", "action": "trigger" | "update" | "resolve", "dedupKey": "...",
     "anomaly": {"id": ..., "metricType": ..., "severity": ..., "expected": ..., ...}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consumers.alerts.channel import Notification

WEBHOOK_VERSION = "1"


@dataclass(frozen=True)
class WebhookChannel:
    """POSTs the generic Tidemark alert body to ``url``."""

    url: str
    name: str = "webhook"

    def payload(self, notification: Notification) -> dict[str, Any]:
        """The generic body (camelCase anomaly fields, as on the ``anomalies`` topic)."""
        return {
            "version": WEBHOOK_VERSION,
            "action": notification.action.value,
            "dedupKey": notification.anomaly.dedup_key,
            "anomaly": notification.anomaly.model_dump(mode="json", by_alias=True),
        }
