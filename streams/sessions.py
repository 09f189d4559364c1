"""Rolling user sessions (the seed's UserSession), computed per device on event time.

Rules (the ClickHouse sessionisation in :mod:`streams.sql` applies the same ones):

- Sessions are keyed by device: the anonymous id, else the user id (``events.raw`` is
  keyed the same way, so all of a device's events reach one partition and one worker).
- An event ``gap`` or more after the session's last event starts a new session: with a
  30-minute gap, 29:59 of inactivity continues the session, 30:00 and 30:01 split it.
- An event ``max_length`` or more after the session's first event starts a new session.
- Device, browser, OS, country, referrer and UTM fields are the first touch: the
  session's first event's. ``user_id`` is the first user id seen in the session (or the
  device's stitched user).
- The session id is deterministic, ``md5(device_id + "|" + started_at_ms)`` in hex, so a
  replay (or the SQL) produces the same id.

Out of order: an event later than the session's last event extends it; an event between
its first and last event counts inside it. An event earlier than the open session's
first event would move the session start and so its id: it is counted as a late event
for sessions (metrics still count it) and left to the batch recompute.

>>> tracker = SessionTracker(gap_ms=30 * 60_000, max_length_ms=24 * 3_600_000)
>>> from streams.events import StreamEvent
>>> e = lambda ts: StreamEvent("id", "page_view", "page_view", "", "dev1", ts, {}, {})
>>> a = tracker.add(e(0)); b = tracker.add(e(30 * 60_000 - 1000)); c = tracker.add(e(60 * 60_000 - 1000))
>>> (a.session_id == b.session_id, b.session_id == c.session_id)
(True, False)
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from streams.events import StreamEvent, as_text

log = logging.getLogger(__name__)


def session_id_for(device_id: str, started_at_ms: int) -> str:
    """The deterministic id of the session of ``device_id`` that started at ``started_at_ms``."""
    return hashlib.md5(f"{device_id}|{started_at_ms}".encode(), usedforsecurity=False).hexdigest()


@lru_cache(maxsize=4096)
def _browser_from_user_agent(user_agent: str) -> tuple[str, str]:
    from ua_parser import parse

    parsed = parse(user_agent)
    browser = parsed.user_agent.family if parsed.user_agent else ""
    os_name = parsed.os.family if parsed.os else ""
    return browser, os_name


# Session attribute -> (context key, key inside it): the first-touch fields read off an event's context.
_TOUCH: tuple[tuple[str, str, str], ...] = (
    ("device", "device", "type"),
    ("browser", "browser", "name"),
    ("os", "os", "name"),
    ("country", "location", "country"),
    ("utm_source", "campaign", "source"),
    ("utm_medium", "campaign", "medium"),
    ("utm_campaign", "campaign", "name"),
)


def first_touch(context: Mapping[str, Any]) -> dict[str, str]:
    """The session attributes read from an event's context (Segment's context layout).

    >>> first_touch({"location": {"country": "KE"}, "referrer": {"url": "https://a.example"}})["referrer"]
    'https://a.example'
    """
    if not isinstance(context, Mapping):
        context = {}
    touch = {name: _inner_text(context, outer, inner) for name, outer, inner in _TOUCH}
    browser, os_name = touch["browser"], touch["os"]
    user_agent = as_text(context.get("userAgent"))
    if user_agent and not (browser and os_name):
        parsed_browser, parsed_os = _browser_from_user_agent(user_agent)
        touch["browser"] = browser or parsed_browser
        touch["os"] = os_name or parsed_os
    touch["referrer"] = (
        _inner_text(context, "page", "referrer") or _inner_text(context, "referrer", "url")
        or as_text(context.get("referrer"))
    )
    return touch


def _inner_text(context: Mapping[str, Any], outer: str, inner: str) -> str:
    # context[outer][inner] as text ('' when missing, not text, or not inside a mapping).
    node = context.get(outer)
    if node is None or not (type(node) is dict or isinstance(node, Mapping)):
        return ""
    value = node.get(inner)
    return value if isinstance(value, str) else ""


@dataclass(slots=True)
class SessionWindow:
    """One session of one device: what the ``sessions`` topic and table carry."""

    session_id: str
    device_id: str
    user_id: str
    started_at: int
    last_seen_at: int
    page_views: int
    events: int
    device: str
    browser: str
    os: str
    country: str
    referrer: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    closed: bool = False

    @property
    def duration_ms(self) -> int:
        """Time from the first to the last event."""
        return self.last_seen_at - self.started_at

    @property
    def version(self) -> int:
        """Grows with every update of the session (ReplacingMergeTree keeps the highest)."""
        return self.events * 2 + int(self.closed)

    def dimension(self, name: str) -> str:
        """A session dimension's value (first touch)."""
        value: str = getattr(self, name)
        return value

    @classmethod
    def start(cls, event: StreamEvent, user_id: str) -> SessionWindow:
        """A new session opened by ``event``."""
        touch = first_touch(event.context)
        device_id, ts = event.device_id, event.ts
        return cls(
            session_id_for(device_id, ts), device_id, user_id, ts, ts, 1 if event.event_type == "page_view" else 0,
            1, touch["device"], touch["browser"], touch["os"], touch["country"], touch["referrer"],
            touch["utm_source"], touch["utm_medium"], touch["utm_campaign"],
        )


# Every field of a session, in declaration order (what the positional constructor takes).
SESSION_WINDOW_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SessionWindow))
#: Every field of a session, in declaration order: ``SessionWindow(*session_values(s))`` copies it.
session_values: Callable[[SessionWindow], tuple[Any, ...]] = operator.attrgetter(*SESSION_WINDOW_FIELDS)


class SessionTracker:
    """The open sessions of the devices of one partition.

    ``add`` applies one event and returns the session it landed in (None when it was
    late for sessions); ``expire`` closes the sessions idle for ``gap + grace`` by the
    partition's watermark; ``take_dirty`` hands over the sessions changed since the
    last call, which is what gets published.
    """

    def __init__(self, gap_ms: int, max_length_ms: int, grace_ms: int = 0) -> None:
        if gap_ms <= 0 or max_length_ms <= 0:
            raise ValueError("gap and max length must be positive")
        self.gap_ms = gap_ms
        self.max_length_ms = max_length_ms
        self.grace_ms = grace_ms
        self.open: dict[str, SessionWindow] = {}
        self.dirty: dict[str, SessionWindow] = {}
        self.late_events = 0
        # Heaps over the open sessions, so a flush need not look at every one of them: (time a session
        # may expire at the earliest, device, session id) and (start, device, session id). An entry
        # whose session is gone is dropped when it comes up; one that comes up early is pushed again.
        self._expiry: list[tuple[int, str, str]] = []
        self._starts: list[tuple[int, str, str]] = []

    def restore(self, open_sessions: list[SessionWindow], dirty_sessions: list[SessionWindow]) -> None:
        """Resume with these open and changed sessions (an open one also changed is one object in both)."""
        self.open = {s.device_id: s for s in open_sessions}
        by_id = {s.session_id: s for s in open_sessions}
        # An open session that is also dirty must be one object, so later events update both views.
        self.dirty = {s.session_id: by_id.get(s.session_id, s) for s in dirty_sessions}
        self._index()

    def add(self, event: StreamEvent, user_id: str = "") -> SessionWindow | None:
        """Apply ``event``; ``user_id`` is the device's stitched user when the event has none."""
        device = event.anonymous_id or event.user_id  # event.device_id, without a property call per event
        ts = event.ts
        session = self.open.get(device)
        if session is not None:
            if ts < session.started_at:
                self.late_events += 1
                return None
            if ts > session.last_seen_at and (
                ts - session.last_seen_at >= self.gap_ms or ts - session.started_at >= self.max_length_ms
            ):
                session.closed = True
                self.dirty[session.session_id] = session
                session = None
            else:
                session.events += 1
                if event.event_type == "page_view":
                    session.page_views += 1
                if ts > session.last_seen_at:
                    session.last_seen_at = ts
                if not session.user_id and (event.user_id or user_id):
                    session.user_id = event.user_id or user_id
        if session is None:
            session = SessionWindow.start(event, event.user_id or user_id)
            self.open[device] = session
            heapq.heappush(self._expiry, (self._expires_at(session), device, session.session_id))
            heapq.heappush(self._starts, (ts, device, session.session_id))
        self.dirty[session.session_id] = session
        return session

    def _expires_at(self, session: SessionWindow) -> int:
        # The watermark at which the session closes unless another event extends it.
        return min(session.last_seen_at + self.gap_ms, session.started_at + self.max_length_ms) + self.grace_ms

    def _index(self) -> None:
        # Build the heaps from ``open`` (a restore).
        self._expiry = [(self._expires_at(s), device, s.session_id) for device, s in self.open.items()]
        self._starts = [(s.started_at, device, s.session_id) for device, s in self.open.items()]
        heapq.heapify(self._expiry)
        heapq.heapify(self._starts)

    def expire(self, watermark_ms: int) -> int:
        """Close sessions whose inactivity (plus grace) or length has run out by ``watermark_ms``."""
        if len(self._starts) > 2 * len(self.open) + 1000:  # mostly sessions gone since: rebuild
            self._index()
        heap, open_sessions, expired = self._expiry, self.open, 0
        while heap and heap[0][0] <= watermark_ms:
            _at, device, session_id = heapq.heappop(heap)
            session = open_sessions.get(device)
            if session is None or session.session_id != session_id:
                continue  # closed or replaced since
            expires_at = self._expires_at(session)
            if expires_at > watermark_ms:  # extended by later events
                heapq.heappush(heap, (expires_at, device, session_id))
                continue
            del open_sessions[device]
            session.closed = True
            self.dirty[session_id] = session
            expired += 1
        return expired

    def oldest_open_start(self) -> int | None:
        """Start of the oldest open session (session-metric windows wait for it)."""
        heap, open_sessions = self._starts, self.open
        while heap:
            started_at, device, session_id = heap[0]
            session = open_sessions.get(device)
            if session is not None and session.session_id == session_id:
                return started_at
            heapq.heappop(heap)
        return None

    def take_dirty(self) -> list[SessionWindow]:
        """The sessions changed since the last call.

        The open ones are handed over as they are, not copied: later events keep changing
        them, so a caller reads (or encodes) them before the next :meth:`add`, or wants
        their latest version anyway (a session's newest version replaces the earlier ones
        downstream). Copying every changed session at every flush cost more than folding
        it into the session metrics.
        """
        out = list(self.dirty.values())
        self.dirty.clear()
        return out

    def rename_user(self, device_id: str, user_id: str) -> None:
        """Identity stitching: the device's open session belongs to ``user_id``."""
        session = self.open.get(device_id)
        if session is not None and not session.user_id:
            session.user_id = user_id
            self.dirty[session.session_id] = session
