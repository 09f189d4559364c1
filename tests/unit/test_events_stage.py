"""The events stage's publishing: what goes out to ``sessions`` and when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.codec import event_codec
from schemas.models import AnalyticsEvent
from schemas.streams import UserSession, session_codec
from streams.agents.events import EventsAgent
from streams.aggregators import compile_catalogue
from streams.catalogue import get_catalogue
from tidemark.settings import Settings

START = datetime(2026, 3, 2, tzinfo=UTC)


def test_open_sessions_are_published_at_most_every_few_seconds_closed_ones_at_once() -> None:
    published: list[tuple[str, int, bool]] = []
    codec = session_codec()

    def publish_session(_key: bytes, value: bytes) -> None:
        session = UserSession.from_avro(codec.decode(value))
        published.append((session.id, session.events, session.closed))

    stage = EventsAgent(Settings(stream_flush_events=10_000), compile_catalogue(get_catalogue(), ["signups"]),
                        publish_session=publish_session, publish_partials=lambda _k, _v, _l: None,
                        save_checkpoint=lambda _p, _b: None, load_checkpoint=lambda _p: None,
                        commit=lambda _p, _o: None)
    stage.checkpoint_seconds = 1e9  # no checkpoint but the first and the forced one
    stage.session_publish_seconds = 1e9
    codec_events = event_codec()
    offset = 0

    def send(minutes: int) -> None:
        nonlocal offset
        offset += 1
        event = AnalyticsEvent(event_name="page_view", event_type="page_view", anonymous_id="d1",
                               timestamp=START + timedelta(minutes=minutes))
        stage.on_message(0, offset, codec_events.encode(event.to_avro()))
        stage.flush(0)

    send(0)  # the first flush checkpoints: everything goes out
    assert [(events, closed) for _id, events, closed in published] == [(1, False)]
    send(1)
    send(2)  # the open session changed twice: it waits
    assert len(published) == 1
    send(60)  # 58 minutes idle: the session closed (out at once, its latest version); a new one opened
    assert [(events, closed) for _id, events, closed in published[1:]] == [(3, True)]
    stage.flush(0, force_checkpoint=True)  # a checkpoint sends whatever waits
    assert [(events, closed) for _id, events, closed in published[2:]] == [(1, False)]
    assert published[2][0] != published[0][0]
