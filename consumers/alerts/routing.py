"""Which channels hear about which severity, and quiet hours for non-critical alerts.

Routes map a severity to channel names (``{"critical": ["pagerduty", "slack"], ...}``);
a channel that is not configured (no URL or key) is skipped.

Quiet hours (``"22:00-07:00"`` in a local timezone) hold back *non-critical* triggers and
updates: in ``defer`` mode they are kept (durably, in the alert book) and sent when the
quiet hours end -- unless the series resolved meanwhile, in which case on-call never
hears of it; in ``suppress`` mode they are only recorded as suppressed. Critical alerts
and resolves of alerts that were sent always go out at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, time
from zoneinfo import ZoneInfo

from schemas.anomaly import Severity


@dataclass(frozen=True)
class QuietHours:
    """A daily local-time interval; it may wrap past midnight.

    >>> from datetime import UTC
    >>> quiet = QuietHours.parse("22:00-07:00", "Europe/Paris")
    >>> quiet.contains(datetime(2024, 7, 1, 21, 30, tzinfo=UTC))  # 23:30 in Paris
    True
    >>> quiet.contains(datetime(2024, 7, 1, 5, 0, tzinfo=UTC))  # 07:00 in Paris: over
    False
    """

    start: time
    end: time
    timezone: str = "UTC"

    @classmethod
    def parse(cls, text: str, timezone: str = "UTC") -> QuietHours:
        """From ``"HH:MM-HH:MM"``."""
        try:
            first, second = text.split("-")
            return cls(time.fromisoformat(first.strip()), time.fromisoformat(second.strip()), timezone)
        except ValueError as exc:
            raise ValueError(f"quiet hours must look like 22:00-07:00, not {text!r}") from exc

    def contains(self, moment: datetime) -> bool:
        """Whether ``moment`` falls in the quiet hours (local time)."""
        local = moment.astimezone(ZoneInfo(self.timezone)).time()
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


@dataclass(frozen=True)
class Router:
    """Severity -> channel names, plus optional quiet hours."""

    routes: Mapping[str, list[str]]
    quiet: QuietHours | None = None
    quiet_mode: str = "defer"

    def __post_init__(self) -> None:
        if self.quiet_mode not in ("defer", "suppress"):
            raise ValueError(f"quiet mode must be defer or suppress, not {self.quiet_mode!r}")

    def channels_for(self, severity: Severity) -> list[str]:
        """Channel names routed for ``severity``."""
        return list(self.routes.get(severity.value, []))

    def is_quiet(self, severity: Severity, now: datetime) -> bool:
        """Whether a notification of ``severity`` must wait (or be suppressed) at ``now``."""
        return severity != Severity.critical and self.quiet is not None and self.quiet.contains(now)
