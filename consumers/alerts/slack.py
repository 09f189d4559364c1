"""Slack incoming webhook: a ``text`` fallback and Block Kit ``blocks`` (header, details, context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consumers.alerts.channel import Notification
from schemas.anomaly import AlertAction, Severity

HEADER_MAX = 150  # Slack's limit for a header block's plain text
EMOJI = {
    Severity.low: ":large_blue_circle:",
    Severity.medium: ":large_yellow_circle:",
    Severity.high: ":large_orange_circle:",
    Severity.critical: ":red_circle:",
}


@dataclass(frozen=True)
class SlackChannel:
    """POSTs a message to a Slack incoming webhook ``url``."""

    url: str
    name: str = "slack"

    def payload(self, notification: Notification) -> dict[str, Any]:
        """The message: resolved ones say so, others show severity, expected and actual."""
        anomaly = notification.anomaly
        if notification.action == AlertAction.resolve:
            title = f":white_check_mark: Resolved: {anomaly.metric_type} is back to normal"
        else:
            verb = "Escalated" if notification.action == AlertAction.update else "Anomaly"
            title = f"{EMOJI[anomaly.severity]} {verb} ({anomaly.severity.value}): {anomaly.metric_type}"
        dims = ", ".join(f"{k}={v}" for k, v in sorted(anomaly.dimensions.items())) or "total"
        details = (
            f"*{anomaly.description}*\n"
            f"Expected `{anomaly.expected:.6g}`, actual `{anomaly.actual:.6g}` "
            f"(deviation `{anomaly.deviation:+.6g}`, score `{anomaly.score:.2f}`)"
        )
        return {
            "text": f"{title}: {anomaly.description}",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": title[:HEADER_MAX], "emoji": True}},
                {"type": "section", "text": {"type": "mrkdwn", "text": details}},
                {
                    "type": "context",
                    "elements": [
                        {"type": "mrkdwn", "text": f"{anomaly.period} · {dims} · detector {anomaly.detector}"}
                    ],
                },
            ],
        }
