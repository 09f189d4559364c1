"""Stage two of the metric windows: partial batches merged per lane, checkpointed and restored."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from schemas.codec import event_codec
from schemas.streams import MetricSnapshot, metric_partial_codec, metric_snapshot_codec
from streams.agents.events import EventsAgent
from streams.agents.metrics import MetricsAgent, decode_partial_batch
from streams.aggregators import SessionPartial, compile_catalogue, encode_state
from streams.catalogue import get_catalogue
from streams.merging import SnapshotMerger
from streams.periods import Period
from tidemark.demo import TrafficConfig, generate_events
from tidemark.settings import Settings

START = datetime(2026, 3, 2, tzinfo=UTC)
LANES = 4
PARTITIONS = 3


@pytest.fixture(scope="module")
def batches() -> list[tuple[int, bytes]]:
    """(lane, message) of every batch stage one sends for three hours of demo traffic, in order."""
    events = list(generate_events(TrafficConfig(start=START, end=START + timedelta(hours=3),
                                                sessions_per_day=1500.0, seed=3, seasonality=0.0)))
    sent: list[tuple[int, bytes]] = []
    stage = EventsAgent(Settings(), compile_catalogue(get_catalogue()), publish_session=lambda _k, _v: None,
                        publish_partials=lambda _k, value, lane: sent.append((lane, value)),
                        save_checkpoint=lambda _p, _b: None, load_checkpoint=lambda _p: None,
                        commit=lambda _p, _o: None, partial_lanes=LANES)
    codec = event_codec()
    offsets = [0] * PARTITIONS
    for i, event in enumerate(events, 1):
        partition = zlib.crc32(event.distinct_id.encode()) % PARTITIONS
        offsets[partition] += 1
        stage.on_message(partition, offsets[partition], codec.encode(event.to_avro()))
        if i % 150 == 0:
            stage.flush_all()
    stage.flush_all()
    return sent


def _merging(into: dict[tuple[object, ...], tuple[float, bool]]) -> MetricsAgent:
    codec = metric_snapshot_codec()

    def publish(_key: bytes, value: bytes, _lane: int) -> None:
        snapshot = MetricSnapshot.from_avro(codec.decode(value))
        into[snapshot.key] = (snapshot.value, snapshot.final or into.get(snapshot.key, (0.0, False))[1])

    return MetricsAgent(compile_catalogue(get_catalogue()), publish, source_partitions=PARTITIONS)


def _feed(agent: MetricsAgent, batches: list[tuple[int, bytes]], offsets: list[int]) -> list[bool]:
    applied = [agent.on_batch(lane, decode_partial_batch(value), offset)
               for (lane, value), offset in zip(batches, offsets, strict=True)]
    agent.publish_changed()
    return applied


def test_a_lane_restored_from_its_checkpoint_continues_as_if_it_never_stopped(batches) -> None:
    lane_offsets: dict[int, int] = {}
    offsets = []
    for lane, _value in batches:  # each lane is a partition of metrics.partials: offsets count per lane
        offsets.append(lane_offsets.get(lane, -1) + 1)
        lane_offsets[lane] = offsets[-1]
    uninterrupted: dict[tuple[object, ...], tuple[float, bool]] = {}
    _feed(_merging(uninterrupted), batches, offsets)
    assert sum(final for _value, final in uninterrupted.values()) > 100

    half = len(batches) // 2
    restarted: dict[tuple[object, ...], tuple[float, bool]] = {}
    first = _merging(restarted)
    _feed(first, batches[:half], offsets[:half])
    blobs = {lane: first.checkpoint(lane) for lane in range(LANES)}
    first_after = _feed(first, batches[half:half + 40], offsets[half:half + 40])  # then it dies, uncommitted
    assert all(first_after)

    second = _merging(restarted)
    for lane, blob in blobs.items():
        second.restore(lane, blob)
    # Kafka redelivers from the last committed offset, before the checkpoint: those are skipped.
    replayed = _feed(second, batches[half - 30:], offsets[half - 30:])
    assert not any(replayed[:30]) and all(replayed[30:])
    assert restarted == uninterrupted


def test_a_window_finalised_is_dropped_and_a_replayed_partial_of_it_ignored() -> None:
    aggregators = compile_catalogue(get_catalogue(), ["signups", "sessions"])
    merger = SnapshotMerger(aggregators, source_partitions=1, grace=timedelta(0))
    signups = ("signups", "", "", Period.hour, 0)
    sessions = ("sessions", "", "", Period.hour, 0)
    count = aggregators["signups"].new()
    count.add(1)
    assert merger.put(signups, 3_600_000, 0, count)
    assert merger.put(sessions, 3_600_000, 0, SessionPartial(2, 0.0))
    merger.note_watermark(0, 3_600_000)
    assert {(v.metric, v.value) for v in merger.finalize()} == {("signups", 1.0), ("sessions", 2.0)}
    assert signups not in merger.parts  # complete for good
    assert not merger.put(signups, 3_600_000, 0, count) and merger.late_partials == 1
    # A session that started in the hour is still open at its end: its window takes corrections.
    assert merger.put(sessions, 3_600_000, 0, SessionPartial(3, 0.0))
    assert merger.value(sessions).value == 3.0


def test_checkpoints_keep_the_partials_as_they_came() -> None:
    aggregators = compile_catalogue(get_catalogue(), ["active_users"])
    merger = SnapshotMerger(aggregators, source_partitions=2)
    window = ("active_users", "", "", Period.hour, 0)
    first = aggregators["active_users"].new()
    for person in ("ada", "bob"):
        first.add(person)
    text = orjson.dumps(encode_state(first))
    merger.put(window, 3_600_000, 0, first, text)
    second = aggregators["active_users"].new()
    second.add("bob")
    merger.put(window, 3_600_000, 1, second)  # no text: encoded when checkpointed
    merger.note_watermark(0, 10)
    restored = SnapshotMerger(aggregators, source_partitions=2)
    restored.restore_document(orjson.loads(orjson.dumps(merger.to_document())))
    assert restored.value(window) == merger.value(window)
    assert restored.value(window).value == 2.0
    assert restored.partition_watermarks == {0: 10}


def test_partials_of_the_earlier_one_per_message_format_are_read_as_batches() -> None:
    codec = metric_partial_codec()
    partial = codec.encode({"metric": "signups", "period": "hour", "periodStart": 0, "periodEnd": 3_600_000,
                            "dimension": "", "dimensionValue": "", "partition": 2, "watermark": 5,
                            "state": '["c", 4]'})
    batch = decode_partial_batch(partial)
    assert batch["partition"] == 2 and batch["watermark"] == batch["announced"] == 5
    assert [(p["metric"], p["state"]) for p in batch["partials"]] == [("signups", b'["c", 4]')]
    watermark = codec.encode({"metric": "", "period": "minute", "periodStart": 0, "periodEnd": 0, "dimension": "",
                              "dimensionValue": "", "partition": 1, "watermark": 99, "state": "null"})
    assert decode_partial_batch(watermark) == {"partition": 1, "watermark": 99, "announced": 99, "partials": []}


def test_provisional_values_wait_for_their_period_and_survive_a_restore_unpublished() -> None:
    aggregators = compile_catalogue(get_catalogue(), ["signups"])
    sent: list[tuple[float, bool]] = []
    codec = metric_snapshot_codec()

    def publish(_key: bytes, value: bytes, _lane: int) -> None:
        snapshot = MetricSnapshot.from_avro(codec.decode(value))
        sent.append((snapshot.value, snapshot.final))

    def agent() -> MetricsAgent:
        return MetricsAgent(aggregators, publish, source_partitions=1, publish_every={Period.hour: 10.0})

    def batch(count: int, announced: int = 0) -> dict[str, object]:
        state = orjson.dumps(["c", count])
        entry = {"metric": "signups", "period": "hour", "periodStart": 0, "periodEnd": 3_600_000,
                 "dimension": "", "dimensionValue": "", "state": state}
        return {"partition": 0, "watermark": 0, "announced": announced, "partials": [entry]}

    first = agent()
    first.on_batch(0, batch(1), offset=0)
    assert first.publish_changed(now=100.0) == 1 and sent == [(1.0, False)]
    first.on_batch(0, batch(2), offset=1)
    assert first.publish_changed(now=105.0) == 0  # an hour window goes out at most every 10 s
    blob = first.checkpoint(0)

    second = agent()
    second.restore(0, blob)
    assert second.publish_changed() == 1 and sent[-1] == (2.0, False)
    second.on_batch(0, batch(3, announced=3_600_000 + 300_000), offset=2)  # complete: final at once
    assert sent[-1] == (3.0, True) and second.publish_changed(now=200.0) == 0

