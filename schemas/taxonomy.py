"""The starting event taxonomy: which ``event_type`` a well-known ``event_name`` has.

Unknown event names are accepted (the taxonomy is extensible without code changes):
their type is whatever the producer says, or ``action`` when it says nothing.
"""

from __future__ import annotations

from schemas.models import EventType

EVENT_TYPES: dict[str, EventType] = {
    "page_view": EventType.page_view,
    "screen": EventType.page_view,
    "signup": EventType.conversion,
    "login": EventType.action,
    "identify": EventType.action,
    "alias": EventType.action,
    "group": EventType.action,
    "join_community": EventType.action,
    "project_created": EventType.action,
    "fund_project": EventType.conversion,
    "project_funded": EventType.conversion,
    "project_expired": EventType.action,
    "watch_ad": EventType.action,
    "create_loan": EventType.action,
    "loan_disbursed": EventType.conversion,
    "loan_repaid": EventType.action,
    "referral_sent": EventType.action,
    "referral_accepted": EventType.action,
    "experiment_exposure": EventType.action,
    "error": EventType.error,
}


def event_type_for(event_name: str, declared: str | None = None) -> EventType:
    """The type of an event: the declared one if valid, else the taxonomy's, else ``action``."""
    if declared:
        try:
            return EventType(declared)
        except ValueError:
            pass
    return EVENT_TYPES.get(event_name, EventType.action)
