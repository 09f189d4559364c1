"""The events stage's publishing: what goes out to ``sessions`` and when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from schemas.codec import event_codec
from schemas.models import AnalyticsEvent
from schemas.streams import UserSession, metric_partial_batch_codec, session_codec
from streams.agents.events import EventsAgent
from streams.aggregators import compile_catalogue, encode_state
from streams.catalogue import get_catalogue
from streams.events import StreamEvent
from streams.periods import PeriodCalendar
from streams.processor import PartitionProcessor
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


def stage_publishing_partials(
    limit: int | None, settings: Settings | None = None
) -> tuple[EventsAgent, list[dict[str, Any]]]:
    """A stage whose partial messages are decoded into ``sent`` (lane added to each record)."""
    codec = metric_partial_batch_codec()
    sent: list[dict[str, Any]] = []

    def publish_partials(_key: bytes, value: bytes, lane: int) -> None:
        sent.append({**codec.decode(value), "lane": lane, "size": len(value)})

    stage = EventsAgent(settings or Settings(stream_flush_events=100_000), compile_catalogue(get_catalogue()),
                        publish_session=lambda _k, _v: None, publish_partials=publish_partials,
                        save_checkpoint=lambda _p, _b: None, load_checkpoint=lambda _p: None,
                        commit=lambda _p, _o: None, partial_lanes=2)
    if limit is not None:
        stage.partial_batch_bytes = limit
    return stage, sent


def test_a_large_flush_is_split_into_messages_under_the_limit_and_only_the_last_announces() -> None:
    codec_events = event_codec()
    values = [
        codec_events.encode(
            AnalyticsEvent(event_name="page_view", event_type="page_view", anonymous_id=f"d{i % 400}",
                           timestamp=START + timedelta(minutes=i % 90, seconds=i % 60),
                           context={"country": f"C{i % 150}", "referrer": f"https://r{i % 70}.example/"}).to_avro()
        )
        for i in range(3000)
    ]
    runs = {}
    for limit in (None, 8 * 1024):
        stage, sent = stage_publishing_partials(limit)
        for offset, value in enumerate(values):
            stage.on_message(0, offset, value)
        stage.flush(0, force_checkpoint=True)
        runs[limit] = sent
    whole, split = runs[None], runs[8 * 1024]
    assert len(whole) == 2, "one message per lane without a limit in reach"
    assert len(split) > 2 * len(whole)
    for lane in (0, 1):
        messages = [m for m in split if m["lane"] == lane]
        assert all(m["size"] <= 8 * 1024 for m in messages)
        (one,) = [m for m in whole if m["lane"] == lane]
        assert [e for m in messages for e in m["partials"]] == one["partials"]
        assert messages[-1]["announced"] == one["announced"] > messages[-1]["watermark"]
        assert all(m["announced"] == m["watermark"] for m in messages[:-1])


def test_partitions_due_share_the_waits_and_checkpoint_only_after_their_outputs_are_durable() -> None:
    steps: list[tuple[str, int | None]] = []
    stage = EventsAgent(Settings(stream_flush_events=10_000), compile_catalogue(get_catalogue(), ["signups"]),
                        publish_session=lambda _k, _v: steps.append(("session", None)),
                        publish_partials=lambda _k, _v, _lane: None,
                        save_checkpoint=lambda partition, _blob: steps.append(("checkpoint", partition)),
                        load_checkpoint=lambda _p: None,
                        commit=lambda partition, offset: steps.append(("commit", partition)),
                        outputs_durable=lambda: steps.append(("durable", None)))
    codec_events = event_codec()
    for partition in (0, 1, 2):
        event = AnalyticsEvent(event_name="page_view", event_type="page_view", anonymous_id=f"d{partition}",
                               timestamp=START)
        stage.on_message(partition, 7, codec_events.encode(event.to_avro()))
    assert stage.unacknowledged() == [0, 1, 2]
    stage.flush_all()  # the first flush of each partition is due
    assert steps == [("session", None)] * 3 + [("durable", None), ("checkpoint", 0), ("checkpoint", 1),
                                               ("checkpoint", 2), ("durable", None), ("commit", 0), ("commit", 1),
                                               ("commit", 2)]
    assert stage.unacknowledged() == []
    steps.clear()
    stage.flush_all()  # nothing new, nothing due
    assert steps == []


def test_published_partials_are_each_windows_state_at_its_flush() -> None:
    # The stage hands its open windows to the encoder uncopied and encodes a state shared by
    # several metrics once: what it sends must still be every window's value at the flush,
    # although later events change the windows. Reference: a processor publishing copies,
    # each encoded on its own, fed the same events and flushed at the same points.
    codec_events = event_codec()
    # Every change goes out at every flush (no period waits), as it does from the reference.
    stage, sent = stage_publishing_partials(None, Settings(stream_flush_events=100_000, stream_republish_max_seconds=0))
    reference = PartitionProcessor(0, stage.aggregators, PeriodCalendar("UTC"), grace=stage.grace,
                                   session_gap=stage.gap, session_max_length=stage.max_length)
    names = ("page_view", "signup", "fund_project", "watch_ad")
    expected: list[tuple[Any, ...]] = []
    for offset in range(1200):
        event = AnalyticsEvent(
            event_name=names[offset % 4], event_type="page_view" if offset % 4 == 0 else "action",
            anonymous_id=f"d{offset % 97}", user_id=f"u{offset % 89}" if offset % 3 else None,
            timestamp=START + timedelta(seconds=offset * 7),
            properties={"amount": 5.0 + offset % 11, "revenue": 0.25, "fee": 0.5},
            context={"country": ("KE", "UG", "NG")[offset % 3]},
        )
        value = codec_events.encode(event.to_avro())
        stage.on_message(0, offset, value)
        reference.process(StreamEvent.decode(value), offset)
        if offset % 50 == 49:
            stage.flush(0)
            expected.extend(
                (p.metric, p.period.value, p.period_start, p.dimension, p.dimension_value,
                 canonical(orjson.dumps(encode_state(p.state))))
                for p in reference.flush().partials
            )
    published = [(e["metric"], e["period"], e["periodStart"], e["dimension"], e["dimensionValue"],
                  canonical(e["state"])) for message in sent for e in message["partials"]]
    assert len(published) > 1000
    assert sorted(published) == sorted(expected)


def canonical(text: bytes) -> bytes:
    """An encoded state with its distinct keys sorted (a set's order is its own)."""
    def sort_keys(data: Any) -> Any:
        if isinstance(data, list) and data and data[0] == "d":
            return ["d", data[1], sorted(data[2])]
        if isinstance(data, list) and data and data[0] == "r":
            return ["r", sort_keys(data[1]), sort_keys(data[2])]
        return data

    return orjson.dumps(sort_keys(orjson.loads(text)))
