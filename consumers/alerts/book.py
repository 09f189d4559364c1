"""Open alerts, one per series: what on-call already knows, so a repeat does not page again.

The book decides the :class:`~schemas.anomaly.AlertAction` of each anomaly message:

- ``open`` for a series without an open alert -> ``trigger``;
- ``open`` for a series with an open alert -> ``update`` if the severity rose, else nothing
  (a duplicate, a replay or no news: no alert storm);
- ``resolved`` for a series with an open alert -> ``resolve``, else nothing;
- ``acknowledged`` -> nothing (someone is on it).

It also keeps notifications deferred by quiet hours. Its state is a small JSON file,
written atomically before the Kafka offset is committed, so a restart neither re-pages
open alerts nor forgets deferred ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from schemas.anomaly import AlertAction, Anomaly, AnomalyStatus, Severity


@dataclass
class OpenAlert:
    """The open alert of one series: its episode, severity and the channels that were told."""

    anomaly_id: str
    severity: str
    channels: list[str] = field(default_factory=list)


class OpenAlertBook:
    """Open alerts by dedup key, and deferred notifications, optionally persisted to ``path``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.open: dict[str, OpenAlert] = {}
        self.deferred: list[dict[str, Any]] = []
        if path is not None and path.exists():
            state = json.loads(path.read_text(encoding="utf-8"))
            self.open = {key: OpenAlert(**value) for key, value in state["open"].items()}
            self.deferred = list(state["deferred"])

    def decide(self, anomaly: Anomaly) -> AlertAction | None:
        """What to tell on-call about this anomaly message (``None``: nothing new)."""
        current = self.open.get(anomaly.dedup_key)
        if anomaly.status == AnomalyStatus.resolved:
            return AlertAction.resolve if current is not None else None
        if anomaly.status == AnomalyStatus.acknowledged:
            return None
        if current is None:
            return AlertAction.trigger
        if anomaly.severity.rank > Severity(current.severity).rank:
            return AlertAction.update
        return None

    def record(self, anomaly: Anomaly, action: AlertAction, channels: list[str]) -> None:
        """Remember what was told (or, for a resolve, forget the alert and any deferred news of it)."""
        key = anomaly.dedup_key
        if action == AlertAction.resolve:
            self.open.pop(key, None)
            self.deferred = [d for d in self.deferred if d["dedupKey"] != key]
            return
        current = self.open.get(key)
        told = sorted(set(channels) | set(current.channels if current else []))
        self.open[key] = OpenAlert(str(anomaly.id), anomaly.severity.value, told)

    def channels_told(self, anomaly: Anomaly) -> list[str]:
        """Channels that heard about this series' open alert (they are the ones to resolve)."""
        current = self.open.get(anomaly.dedup_key)
        return list(current.channels) if current else []

    def defer(self, anomaly: Anomaly, action: AlertAction) -> None:
        """Keep a notification until quiet hours end (the latest one per series wins)."""
        self.deferred = [d for d in self.deferred if d["dedupKey"] != anomaly.dedup_key]
        self.deferred.append(
            {"dedupKey": anomaly.dedup_key, "action": action.value, "anomaly": anomaly.model_dump(mode="json")}
        )

    def take_deferred(self) -> list[tuple[Anomaly, AlertAction]]:
        """Remove and return the deferred notifications, oldest first."""
        taken = [(Anomaly.model_validate(d["anomaly"]), AlertAction(d["action"])) for d in self.deferred]
        self.deferred = []
        return taken

    def save(self) -> None:
        """Write the state atomically (no-op without a path)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        state = {"open": {k: asdict(v) for k, v in self.open.items()}, "deferred": self.deferred}
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, self.path)
