"""The shape every on-call channel has: a name, a URL, and a payload built from an anomaly episode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from schemas.anomaly import AlertAction, Anomaly


@dataclass(frozen=True)
class Notification:
    """One thing to tell on-call: an action on the alert of one anomaly episode."""

    anomaly: Anomaly
    action: AlertAction


class Channel(Protocol):
    """An on-call destination that accepts JSON over HTTP POST."""

    @property
    def name(self) -> str:
        """The channel's name in routes (``webhook``, ``pagerduty``, ...)."""
        ...

    @property
    def url(self) -> str:
        """Where the JSON is POSTed."""
        ...

    def payload(self, notification: Notification) -> dict[str, Any]:
        """The JSON body this channel expects for ``notification``."""
        ...
