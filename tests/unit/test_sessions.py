"""Sessions split exactly at the inactivity gap and the maximum length; first touch; deterministic ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from streams.events import StreamEvent
from streams.sessions import SessionTracker, first_touch, session_id_for
from tests.metric_reference import demo_dataset, event, ms, reference_sessions

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
GAP = timedelta(minutes=30)


def _tracker(max_length: timedelta = timedelta(hours=24)) -> SessionTracker:
    return SessionTracker(gap_ms=int(GAP.total_seconds() * 1000), max_length_ms=int(max_length.total_seconds() * 1000))


def _se(name: str, ts: datetime, **kw: object) -> StreamEvent:
    return StreamEvent.from_model(event(name, ts, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("idle", "same_session"),
    [
        (timedelta(minutes=29, seconds=59), True),
        (timedelta(minutes=30), False),
        (timedelta(minutes=30, seconds=1), False),
    ],
)
def test_split_at_the_inactivity_gap(idle: timedelta, same_session: bool) -> None:
    """The gap is inclusive: 30:00 of inactivity or more starts a new session; 29:59 does not."""
    tracker = _tracker()
    first = tracker.add(_se("page_view", T0))
    second = tracker.add(_se("page_view", T0 + idle))
    assert first is not None and second is not None
    assert (first.session_id == second.session_id) is same_session
    if not same_session:
        assert tracker.take_dirty()[0].closed  # the earlier session was closed by the new one


def test_split_at_the_maximum_length() -> None:
    tracker = _tracker(max_length=timedelta(hours=1))
    ids = [tracker.add(_se("page_view", T0 + timedelta(minutes=m))).session_id for m in range(0, 61, 20)]  # type: ignore[union-attr]
    assert ids[0] == ids[1] == ids[2] != ids[3]  # 60:00 after the start is the maximum length


def test_fields_first_touch_and_deterministic_id() -> None:
    tracker = _tracker()
    ctx = {"device": {"type": "mobile"}, "browser": {"name": "Firefox"}, "os": {"name": "Android"},
           "location": {"country": "KE"}, "page": {"referrer": "https://news.example"},
           "campaign": {"source": "newsletter", "medium": "email", "name": "spring"}}
    tracker.add(_se("page_view", T0, context=ctx))
    tracker.add(_se("signup", T0 + timedelta(minutes=5), user_id="u-1",
                    context={"campaign": {"source": "other"}, "location": {"country": "DE"}}))
    s = tracker.add(_se("page_view", T0 + timedelta(minutes=7)))
    assert s is not None
    assert (s.device, s.browser, s.os, s.country, s.referrer) == ("mobile", "Firefox", "Android", "KE",
                                                                  "https://news.example")
    assert (s.utm_source, s.utm_medium, s.utm_campaign) == ("newsletter", "email", "spring")
    assert (s.events, s.page_views, s.duration_ms, s.user_id) == (3, 2, 7 * 60_000, "u-1")
    assert s.session_id == session_id_for("dev-1", ms(T0))
    assert s.version == 6


def test_browser_from_user_agent_when_not_given() -> None:
    ua = (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36"
    )
    touch = first_touch({"userAgent": ua})
    assert (touch["browser"], touch["os"]) == ("Chrome", "Windows")


def test_out_of_order_inside_extends_earlier_than_start_is_late() -> None:
    tracker = _tracker()
    a = tracker.add(_se("page_view", T0 + timedelta(minutes=10)))
    b = tracker.add(_se("page_view", T0 + timedelta(minutes=20)))
    inside = tracker.add(_se("page_view", T0 + timedelta(minutes=15)))
    before = tracker.add(_se("page_view", T0 + timedelta(minutes=5)))
    assert a is not None and b is not None and inside is not None
    assert a.session_id == b.session_id == inside.session_id
    assert (inside.events, inside.started_at, inside.last_seen_at) == (3, ms(T0) + 600_000, ms(T0) + 1_200_000)
    assert before is None and tracker.late_events == 1


def test_expiry_closes_idle_sessions_after_gap_plus_grace() -> None:
    tracker = SessionTracker(gap_ms=30 * 60_000, max_length_ms=24 * 3_600_000, grace_ms=60_000)
    tracker.add(_se("page_view", T0))
    tracker.take_dirty()
    assert tracker.expire(ms(T0) + 31 * 60_000 - 1) == 0
    assert tracker.expire(ms(T0) + 31 * 60_000) == 1
    (closed,) = tracker.take_dirty()
    assert closed.closed and closed.version == 3 and tracker.open == {}


def test_tracker_equals_reference_sessionisation_on_demo_data() -> None:
    events = demo_dataset(sessions_per_day=30, seed=9)
    tracker = _tracker()
    final: dict[str, tuple[int, int, int, int]] = {}
    for model in events:
        s = tracker.add(StreamEvent.from_model(model))
        assert s is not None
        final[s.session_id] = (s.started_at, s.last_seen_at, s.events, s.page_views)
    expected = {
        session_id_for(r.device_id, r.started_at): (r.started_at, r.last_seen_at, r.events, r.page_views)
        for r in reference_sessions(events, 30 * 60_000, 24 * 3_600_000)
    }
    assert final == expected
    assert len(expected) > 100
