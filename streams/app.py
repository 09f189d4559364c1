"""The Faust app: the stream worker's topics, tables and agents.

Processing guarantee, and why
-----------------------------
Faust's ``exactly_once`` mode rides on Kafka transactions; in faust-streaming it has
known bugs (stalls and lost commits around rebalances) and by default wants three
brokers for the transaction log. We run ``at_least_once`` and make redelivery harmless
instead, where it is cheap to do so:

- every output is a full value under a key, never a delta: a session version
  (``sessions``: ReplacingMergeTree(version) keyed by session id), a partition's partial
  of a window (``metrics.partials``, partitioned by series: the merger keeps the latest
  per source partition) and a
  snapshot (``metrics``: ReplacingMergeTree(computed_at) keyed by metric, period, period
  start and dimensions). Re-publishing one replaces it with the same value;
- the only state that adds up (counts, sums, distinct sets, sessions) is checkpointed
  together with the offset it reflects, in one message, and offsets are committed only
  up to the checkpoint (:mod:`streams.agents.events`). A restarted partition skips what
  its checkpoint already holds, so nothing is counted twice.

Two stages, three consumer groups: ``events.raw`` is read by a librdkafka consumer in a
thread of its own (group ``<prefix><stream_app_id>``; see :mod:`streams.agents.events`
for why not a Faust agent), run as a service of this Faust app; the Faust agent of metric
merging consumes the far smaller ``metrics.partials`` topic in the group of
:func:`agents_app_id`; anomaly detection reads ``metrics`` with a librdkafka consumer of its
own, also a service of this app (:class:`~streams.agents.anomalies.AnomalyConsumer`).

Scaling: the unit of parallelism is a partition of ``events.raw`` (keyed by device, so a
device's sessions stay on one worker). Start more workers with the same settings and the
``events.raw`` group spreads partitions (and with them their checkpoints) over them.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import faust
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.codec import SchemaError
from schemas.streams import metric_partial_codec
from streams.agents.anomalies import register_anomaly_agent
from streams.agents.events import MAX_CHECKPOINT_BYTES, EventsConsumer, checkpoint_topic
from streams.agents.metrics import MetricsAgent, snapshot_partition
from streams.agents.threaded import run_as_service
from streams.aggregators import compile_catalogue
from streams.catalogue import get_catalogue
from tidemark.settings import Settings
from tidemark.topics import DAY_MS, EVENTS_RAW, METRICS, TopicSpec, ensure_topics

log = logging.getLogger(__name__)

PARTIALS_TOPIC = "metrics.partials"
PARTIALS_PARTITIONS = 6


def faust_brokers(bootstrap: str) -> list[str]:
    """Faust's broker URLs (``kafka://host:port``) for a Kafka bootstrap list."""
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def agents_app_id(settings: Settings) -> str:
    """The Faust app id (and consumer group) of the agents downstream of ``events.raw``."""
    return f"{settings.topic_prefix}{settings.stream_app_id}-agents"


def replication_factor(settings: Settings) -> int:
    """1 on a cluster smaller than three brokers (the local single broker), else 3."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    return 1 if len(admin.list_topics(timeout=30).brokers) < 3 else 3


def ensure_stream_topics(settings: Settings) -> None:
    """Create the worker's internal topics before Faust subscribes.

    Faust creates them itself too, but a topic it creates while joining the group may be
    missing from the first metadata it reads, and it then stays unassigned until the
    next rebalance.
    """
    agents_id = agents_app_id(settings).removeprefix(settings.topic_prefix)
    compacted = "compact"
    ensure_topics(
        settings,
        (
            TopicSpec(PARTIALS_TOPIC, PARTIALS_PARTITIONS, retention_ms=DAY_MS),
            TopicSpec(f"{agents_id}-merged-windows-changelog", PARTIALS_PARTITIONS, -1, compacted),
        ),
    )
    # A partition's checkpoint is one message (that is what makes it atomic), and a busy
    # partition's open windows can weigh megabytes: this topic takes messages that large.
    name = checkpoint_topic(settings)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    if name not in admin.list_topics(timeout=30).topics:
        topic = NewTopic(
            name,
            num_partitions=EVENTS_RAW.partitions,
            replication_factor=replication_factor(settings),
            config={"cleanup.policy": compacted, "max.message.bytes": str(MAX_CHECKPOINT_BYTES)},
        )
        for future in admin.create_topics([topic], operation_timeout=30).values():
            try:
                future.result()
            except Exception as exc:  # created concurrently by another worker: fine
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise


def partition_count(settings: Settings, spec: TopicSpec) -> int:
    """How many partitions a topic has on the broker (its spec's count if it does not exist yet).

    Deployments may have grown a topic past its spec; the metrics stage must know the real
    number of ``events.raw`` partitions to tell when every one of them has closed a window.
    """
    name = settings.topic(spec.name)
    topic = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(name, timeout=30).topics.get(name)
    if topic is None or topic.error is not None or not topic.partitions:
        return spec.partitions
    return len(topic.partitions)


def create_app(settings: Settings) -> faust.App:
    """The Faust app of the stream worker: the events consumer (a service), the agents, the flush timer, the tables."""
    app_id = agents_app_id(settings)
    datadir = settings.state_dir / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=faust_brokers(settings.kafka_bootstrap),
        processing_guarantee="at_least_once",
        topic_replication_factor=replication_factor(settings),
        topic_partitions=EVENTS_RAW.partitions,
        store="memory://",
        datadir=str(datadir),
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.stream_commit_seconds,
        web_enabled=settings.stream_web_port > 0,
        web_port=settings.stream_web_port or 6066,
        web_bind="127.0.0.1",
        table_cleanup_interval=3600.0,
        # The merging agent acknowledges on its flush timer, which no longer runs while the
        # worker stops: waiting for "in-flight" messages would hold the stop until it is killed.
        # What was not acknowledged is merged again by the next owner (replacing, so harmless).
        stream_wait_empty=False,
        producer_acks=-1,
        # The merged-windows table writes every partial's state (sets of thousands of ids) to its changelog.
        producer_compression_type="lz4",
        producer_max_request_size=MAX_CHECKPOINT_BYTES,
        consumer_max_fetch_size=MAX_CHECKPOINT_BYTES,
    )
    catalogue = get_catalogue(settings.metrics_file)
    aggregators = compile_catalogue(catalogue)

    partials = app.topic(
        settings.topic(PARTIALS_TOPIC), key_type=bytes, value_type=bytes, key_serializer="raw",
        value_serializer="raw", partitions=PARTIALS_PARTITIONS, internal=True,
    )
    merged = app.Table("merged-windows", partitions=PARTIALS_PARTITIONS, key_type=str, value_type=bytes)

    def ack(message: Any) -> None:
        message.ack(app.consumer)

    # Outputs go through librdkafka (Faust's own producer path manages a few thousand
    # messages a second); each agent flushes it before acknowledging what it consumed.
    producer = Producer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "linger.ms": 20,
        "queue.buffering.max.messages": 1_000_000,
    })

    def publisher(topic_name: str) -> Any:
        def publish(key: bytes, value: bytes, partition: int = -1) -> None:
            while True:
                try:
                    producer.produce(topic_name, key=key, value=value, partition=partition)  # -1: by key
                    return
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.05)

        return publish

    def outputs_durable() -> None:
        if producer.flush(60) != 0:
            raise RuntimeError("outputs were not delivered within 60 s; not acknowledging")

    events = EventsConsumer(settings, aggregators, settings.topic(PARTIALS_TOPIC), partial_lanes=PARTIALS_PARTITIONS)

    run_as_service(app, events, "events consumer")

    publish_metric = publisher(settings.topic(METRICS.name))
    metrics_partitions = partition_count(settings, METRICS)

    def publish_snapshot(key: bytes, value: bytes, lane: int) -> None:
        publish_metric(key, value, snapshot_partition(lane, metrics_partitions))

    metrics_agent = MetricsAgent(
        aggregators,
        publish_snapshot=publish_snapshot,
        store=merged,
        source_partitions=partition_count(settings, EVENTS_RAW),
        grace=timedelta(seconds=settings.stream_grace_seconds),
    )
    partial_codec = metric_partial_codec()

    @app.agent(partials, name="metrics")
    async def merge_partials(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            message = event.message
            metrics_agent.unacked.append(message)
            try:
                record = partial_codec.decode(message.value)
            except SchemaError as exc:
                log.warning("Skipping undecodable partial: %s", exc)
                continue
            metrics_agent.on_partial(message.key.decode(), record, lane=message.partition)

    @app.timer(settings.stream_flush_seconds)
    async def flush() -> None:
        # Snapshots are durable before the partials they came from are acknowledged.
        if metrics_agent.unacked:
            metrics_agent.publish_changed()
            outputs_durable()
            for message in metrics_agent.unacked:
                ack(message)
            metrics_agent.unacked.clear()

    # Anomaly detection: metric snapshots -> anomalies, in a consumer thread with its own checkpoint.
    anomaly_agent = register_anomaly_agent(
        app, settings, catalogue, publisher, outputs_durable, MAX_CHECKPOINT_BYTES, lanes=PARTIALS_PARTITIONS
    )

    app.tidemark_events_consumer = events  # type: ignore[attr-defined]
    app.tidemark_anomaly_agent = anomaly_agent  # type: ignore[attr-defined]
    app.tidemark_metrics_agent = metrics_agent  # type: ignore[attr-defined]
    return app
