"""Shared pieces of every analysis: reporting settings, time ranges and property filters.

Definitions and results specific to one analysis live next to it (``FunnelDefinition`` and
``FunnelResult`` in :mod:`api.analyses.funnels`, and so on); this module holds what they share.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.analyses.query import ANY_EVENT, PropertyFilter, TimeRange

__all__ = ["ANY_EVENT", "AnalysisSettings", "PropertyFilter", "TimeRange"]


class AnalysisSettings(BaseModel):
    """How periods are cut: the reporting timezone and the first day of the week.

    ``week_start`` uses ISO numbering like :class:`tidemark.settings.Settings` (1 = Monday,
    7 = Sunday); only Monday and Sunday are supported because ClickHouse's
    ``toStartOfWeek`` modes offer exactly those two.
    """

    model_config = ConfigDict(frozen=True)

    timezone: str = "UTC"
    week_start: int = Field(default=1, description="1 = Monday, 7 = Sunday.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value

    @field_validator("week_start")
    @classmethod
    def _monday_or_sunday(cls, value: int) -> int:
        if value not in (1, 7):
            raise ValueError("week_start must be 1 (Monday) or 7 (Sunday)")
        return value

    @property
    def week_mode(self) -> int:
        """The ``toStartOfWeek`` mode: 1 starts weeks on Monday, 0 on Sunday."""
        return 1 if self.week_start == 1 else 0

    @classmethod
    def from_settings(cls, settings: object) -> AnalysisSettings:
        """Build from :class:`tidemark.settings.Settings` (``report_timezone``, ``week_start``)."""
        return cls(timezone=getattr(settings, "report_timezone", "UTC"), week_start=getattr(settings, "week_start", 1))
