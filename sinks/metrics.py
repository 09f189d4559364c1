"""Prometheus metrics of the Kafka → ClickHouse sinks (prefix ``tidemark_sink_``).

Every metric carries a ``sink`` label (``raw``, ``rejected``, ...), so one process
running several sinks exposes them side by side on its ``/metrics`` endpoint.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCH_ROWS = Histogram(
    "tidemark_sink_batch_rows",
    "Rows per batch handed to ClickHouse.",
    ["sink"],
    buckets=(1, 10, 100, 500, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000),
)
INSERT_SECONDS = Histogram(
    "tidemark_sink_insert_seconds",
    "Duration of one successful ClickHouse insert.",
    ["sink"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ROWS_INSERTED = Counter(
    "tidemark_sink_rows_inserted",
    "Rows inserted into ClickHouse (a replayed batch counts again; the table collapses it).",
    ["sink"],
)
INSERT_FAILURES = Counter(
    "tidemark_sink_insert_failures",
    "Failed attempts to make a batch durable (insert or dead-letter delivery); the batch is retried.",
    ["sink"],
)
COMMITTED_MESSAGES = Counter(
    "tidemark_sink_committed_messages",
    "Kafka messages whose offsets were committed after their batch became durable.",
    ["sink"],
)
DEAD_LETTERED = Counter(
    "tidemark_sink_dead_lettered",
    "Messages the sink could not decode or accept, by reason.",
    ["sink", "reason"],
)
CONSUMER_LAG = Gauge(
    "tidemark_sink_consumer_lag",
    "Messages in a partition not yet durable in ClickHouse (high watermark − committed offset).",
    ["sink", "topic", "partition"],
)
