"""The bookkeeping of a pending batch: which offsets it covers, what gets committed, its dedup token."""

from __future__ import annotations

from sinks.batch import PendingBatch
from sinks.runner import SINKS


def test_offsets_to_commit_are_one_past_the_last_offset_per_partition() -> None:
    batch = PendingBatch()
    for partition, offset in [(3, 10), (0, 5), (3, 11), (3, 12), (0, 6)]:
        batch.track("events.raw", partition, offset)
    assert batch.messages == 5
    assert [(tp.topic, tp.partition, tp.offset) for tp in batch.offsets_to_commit()] == [
        ("events.raw", 0, 7),
        ("events.raw", 3, 13),
    ]


def test_token_names_every_range_and_is_independent_of_arrival_order() -> None:
    one, other = PendingBatch(), PendingBatch()
    for partition, offset in [(1, 100), (0, 7), (1, 101)]:
        one.track("p.events.raw", partition, offset)
    for partition, offset in [(0, 7), (1, 100), (1, 101)]:
        other.track("p.events.raw", partition, offset)
    assert one.dedup_token() == other.dedup_token() == "p.events.raw:0:7-7,p.events.raw:1:100-101"


def test_different_boundaries_make_a_different_token() -> None:
    whole, part = PendingBatch(), PendingBatch()
    for offset in range(10):
        whole.track("events.raw", 0, offset)
    for offset in range(8):
        part.track("events.raw", 0, offset)
    assert whole.dedup_token() != part.dedup_token()


def test_every_sink_is_registered_under_its_spec_name() -> None:
    assert set(SINKS) == {"raw", "rejected", "sessions", "snapshots", "anomalies"}
