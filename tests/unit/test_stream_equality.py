"""Stage one at any flush cadence, throttled or not, restored from a checkpoint mid-run, equals the reference.

Demo traffic goes through several partition processors; their partials are merged as stage two
merges them; every window's final value must be the plain-Python reference's
(:mod:`tests.metric_reference`, which shares nothing with the stream code but the catalogue), and
the sessions the reference's sessionisation. How often partitions flush, whether long periods are
published less often (``publish_every``, as the worker does), and a crash after a checkpoint
(restore, then Kafka redelivering events already applied) must change nothing.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest

from schemas.models import AnalyticsEvent
from streams.agents.events import PUBLISH_EVERY
from streams.aggregators import decode_state, encode_state
from streams.catalogue import CATALOGUE, Aggregation, Catalogue, MetricDefinition
from streams.events import StreamEvent
from streams.periods import Period
from streams.sessions import session_id_for
from tests.metric_reference import demo_dataset, reference_sessions, reference_snapshots
from tests.stream_harness import LocalPipeline

STREAMED = [d.name for d in CATALOGUE.streaming()]
DISTINCT = {d.name for d in CATALOGUE.streaming() if d.aggregation is Aggregation.distinct}
# Metrics whose value involves a distinct count (an HLL estimate past the exact limit).
ESTIMATED = DISTINCT | {d.name for d in CATALOGUE.streaming() if {d.numerator, d.denominator} & DISTINCT}
GRACE_MS = 5 * 60_000
FORMAT_1_CHECKPOINT = Path(__file__).parent.parent / "fixtures" / "stream_checkpoint_format_1.json.gz"


@cache
def dense_dataset() -> tuple[AnalyticsEvent, ...]:
    """Busy traffic over midnight into April: minute windows close all the time, hours, a day and a month end."""
    from tidemark.demo.traffic import TrafficConfig, generate_events

    start = datetime(2026, 3, 31, 23, 35, tzinfo=UTC)
    config = TrafficConfig(start=start, end=start + timedelta(minutes=40), sessions_per_day=40_000, seed=23)
    return tuple(generate_events(config))


@cache
def sparse_dataset() -> tuple[AnalyticsEvent, ...]:
    """Six days over Europe/Berlin's 23-hour day, a week and a month boundary, with loan and project events."""
    return tuple(demo_dataset())


@cache
def expected(dataset: str, tz: str) -> dict:
    events = list(dense_dataset() if dataset == "dense" else sparse_dataset())
    return reference_snapshots(events, CATALOGUE, tz=tz, names=STREAMED, stitch_grace_ms=GRACE_MS)


def drive(
    events: tuple[AnalyticsEvent, ...],
    *,
    tz: str,
    partitions: int,
    flush_every: int,
    throttled: bool = False,
    restore_at: float | None = None,
    replay: int = 0,
    exact_limit: int | None = None,
) -> LocalPipeline:
    """Feed ``events`` in order, flushing every partition every ``flush_every`` events.

    ``throttled``: long periods are re-published at most as often as the worker does, one
    second passing per flush. ``restore_at``: after that share of the events every partition
    is flushed and checkpointed, 200 more events are applied and published, then the
    processors are replaced by ones restored from the checkpoints and the events are
    delivered again from ``replay`` events before the checkpoint.
    """
    pipeline = LocalPipeline(tz=tz, partitions=partitions, **({"exact_limit": exact_limit} if exact_limit else {}))
    clock = [0.0]

    def throttle() -> None:
        for processor in pipeline.processors:
            processor.metrics.publish_every = dict(PUBLISH_EVERY) if throttled else {}

    def flush() -> None:
        clock[0] += 1.0
        pipeline.flush(clock[0] if throttled else None)

    log = pipeline.log(events)

    def feed(entries: list) -> None:
        for n, (p, offset, event) in enumerate(entries, 1):
            pipeline.processors[p].process(event, offset)
            if n % flush_every == 0:
                flush()

    throttle()
    if restore_at is None:
        feed(log)
    else:
        cut = int(len(log) * restore_at)
        feed(log[:cut])
        flush()
        blobs = [processor.checkpoint() for processor in pipeline.processors]
        feed(log[cut : cut + 200])  # published, then the worker dies before its next checkpoint
        for p, blob in enumerate(blobs):
            pipeline.processors[p] = pipeline.new_processor(p)
            pipeline.processors[p].restore(blob)
        throttle()
        feed(log[max(0, cut - replay) :])
    pipeline.flush()  # the last flush publishes every changed window, throttled or not
    return pipeline


def _diff(expected: dict, actual: dict, distinct_tolerance: float = 0.0, estimated: set[str] = ESTIMATED) -> list:
    def close(key: tuple) -> bool:
        tolerance = distinct_tolerance if key[0] in estimated else 0.0
        return math.isclose(expected[key], actual[key], rel_tol=max(tolerance, 1e-9), abs_tol=1e-9)

    return sorted(
        (k, expected.get(k), actual.get(k))
        for k in set(expected) | set(actual)
        if k not in expected or k not in actual or not close(k)
    )


def _assert_sessions_match_reference(pipeline: LocalPipeline, events: tuple[AnalyticsEvent, ...]) -> None:
    reference = {
        session_id_for(s.device_id, s.started_at): (s.events, s.page_views, s.last_seen_at - s.started_at)
        for s in reference_sessions(events, 30 * 60_000, 24 * 3_600_000)
    }
    streamed = {k: (s.events, s.page_views, s.duration_ms) for k, s in pipeline.sessions.items()}
    assert streamed == reference


@pytest.mark.parametrize(
    ("tz", "partitions", "flush_every", "throttled", "restore_at", "replay"),
    [
        ("UTC", 3, 97, False, None, 0),
        ("Asia/Kolkata", 2, 1500, True, None, 0),  # hours start at :30 UTC
        ("UTC", 4, 700, True, 0.6, 500),
        ("UTC", 1, 40, False, 0.3, 40),
    ],
)
def test_dense_traffic_equals_reference(
    tz: str, partitions: int, flush_every: int, throttled: bool, restore_at: float | None, replay: int
) -> None:
    events = dense_dataset()
    pipeline = drive(events, tz=tz, partitions=partitions, flush_every=flush_every, throttled=throttled,
                     restore_at=restore_at, replay=replay)
    assert _diff(expected("dense", tz), pipeline.snapshots) == []
    assert all(not p.late_events for p in pipeline.processors)
    _assert_sessions_match_reference(pipeline, events)
    # The data exercises what the test claims: thousands of events, most streamed metrics, minutes closing.
    assert len(events) > 2000
    assert len({k[0] for k in pipeline.snapshots}) >= 25
    assert len({k[2] for k in pipeline.snapshots if k[1] == "minute"}) >= 40


@pytest.mark.parametrize(("partitions", "flush_every", "restore_at"), [(2, 250, 0.5), (3, 60, None)])
def test_sparse_traffic_over_dst_week_and_month_equals_reference(
    partitions: int, flush_every: int, restore_at: float | None
) -> None:
    events = sparse_dataset()
    pipeline = drive(events, tz="Europe/Berlin", partitions=partitions, flush_every=flush_every,
                     restore_at=restore_at, replay=100)
    assert _diff(expected("sparse", "Europe/Berlin"), pipeline.snapshots) == []
    produced = {(k[0], k[1]) for k in pipeline.snapshots}
    assert all((name, p.value) in produced for name in STREAMED for p in CATALOGUE[name].periods)
    _assert_sessions_match_reference(pipeline, events)


def test_distinct_counts_past_the_exact_limit_stay_within_one_percent() -> None:
    """With a small exact limit most distinct windows turn into HLL sketches, merged across partitions and periods.

    Counted over device and user ids: a sketch keeps the person resolved when the event
    arrived (identity stitching renames only exact sets), which the reference does not model.
    """
    catalogue = Catalogue([
        MetricDefinition("devices", "Devices seen.", "devices", Aggregation.distinct, distinct="anonymous_id",
                         dimensions=("country", "device", "utm_source")),
        MetricDefinition("users_seen", "Signed-in users seen.", "people", Aggregation.distinct, distinct="user_id",
                         dimensions=("country",)),
        MetricDefinition("views", "Pages viewed.", "count", Aggregation.count, events=("page_view",),
                         dimensions=("country", "device", "utm_source")),
        MetricDefinition("views_per_device", "Pages per device.", "ratio", Aggregation.ratio, numerator="views",
                         denominator="devices", dimensions=("country",)),
    ])
    events = dense_dataset()
    pipeline = LocalPipeline(catalogue, tz="UTC", partitions=3, exact_limit=40)
    pipeline.feed(events, flush_every=500)
    reference = reference_snapshots(list(events), catalogue, tz="UTC", stitch_grace_ms=GRACE_MS)
    assert _diff(reference, pipeline.snapshots, distinct_tolerance=0.01, estimated=set(catalogue) - {"views"}) == []
    sketched = [w for p in pipeline.processors for w in p.metrics.windows.values()
                if hasattr(w, "counter") and w.counter.keys is None]
    assert len(sketched) > 10


def test_a_format_1_checkpoint_still_restores_and_continues_exactly() -> None:
    """Checkpoints written before windows were shared (format 1) restore into the shared windows.

    The fixture was written by the format-1 code: two partitions that applied the first
    ``cut`` of its events (flushing every 50), their checkpoints, and what stage two had
    merged from them by then.
    """
    fixture = json.loads(gzip.decompress(FORMAT_1_CHECKPOINT.read_bytes()))
    events = tuple(AnalyticsEvent.model_validate(e) for e in fixture["events"])
    pipeline = LocalPipeline(tz=fixture["tz"], partitions=len(fixture["checkpoints"]))
    log = pipeline.log(events)
    for p, blob in enumerate(fixture["checkpoints"]):
        pipeline.processors[p].restore(base64.b64decode(blob))
        assert pipeline.processors[p].applied_offset == max(o for q, o, _ in log[: fixture["cut"]] if q == p)
    for metric, dim, value, period, start, end, partition, state in fixture["parts"]:
        pipeline.merger.put((metric, dim, value, Period(period), start), end, partition, decode_state(state))
    pipeline.snapshots = {tuple(k): v for k, v in fixture["snapshots"]}
    pipeline.sessions = {}
    skipped = 0
    for n, (p, offset, event) in enumerate(log[fixture["cut"] - 30 :], 1):  # redelivered from before the checkpoint
        skipped += not pipeline.processors[p].process(event, offset)
        if n % 50 == 0:
            pipeline.flush()
    pipeline.flush()
    reference = reference_snapshots(list(events), CATALOGUE, tz=fixture["tz"], names=STREAMED,
                                    stitch_grace_ms=GRACE_MS)
    assert _diff(reference, pipeline.snapshots) == []
    assert skipped == 30, "the events redelivered from before the checkpoint are the ones it already holds"


def test_a_published_partial_is_a_snapshot() -> None:
    """A partial's state is handed over without a copy only when its window closes: later events never change it."""
    events = dense_dataset()
    pipeline = LocalPipeline(tz="UTC", partitions=1)
    processor = pipeline.processors[0]
    processor.metrics.publish_every = dict(PUBLISH_EVERY)
    published = []
    for n, model in enumerate(events, 1):
        processor.process(StreamEvent.from_model(model))
        if n % 300 == 0:
            partials = processor.flush(now=float(n)).partials
            published += [(p, p.state.value(), json.dumps(encode_state(p.state))) for p in partials]
    assert {p.metric for p, _, _ in published} >= {"arpu", "dau", "active_users", "session_duration"}
    assert [(value, encoded) for _, value, encoded in published] == [
        (p.state.value(), json.dumps(encode_state(p.state))) for p, _, _ in published
    ]
