"""``tidemark demo`` end to end: through the SDK into Kafka, and through the collector into ClickHouse."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.server import TidemarkServer, wait_until
from tests.integration.test_tracker_kafka import read_topic
from tidemark.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DONE = re.compile(r"Demo done in [\d.]+s: sent (\d+), accepted (\d+), rejected (\d+), failed (\d+)")


def run_demo(settings: Settings, *args: str) -> tuple[int, str]:
    """Run ``tidemark demo`` as its own process; return the number of events it reports as accepted."""
    env = {
        **os.environ,
        "TIDEMARK_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TIDEMARK_TOPIC_PREFIX": settings.topic_prefix,
        "TIDEMARK_STATE_DIR": str(settings.state_dir),
    }
    result = subprocess.run(
        [sys.executable, "-m", "tidemark", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[2],
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = DONE.search(output)
    assert match, output
    sent, accepted, rejected, failed = map(int, match.groups())
    assert sent == accepted and rejected == failed == 0, output
    return sent, output


def test_demo_via_kafka_backfills_then_runs_live(kafka_settings: Settings) -> None:
    sent, output = run_demo(
        kafka_settings, "--seed", "5", "--flat", "--backfill-days", "0.1", "--backfill-rate", "0.5",
        "--rate", "3", "--duration", "3",
    )  # fmt: skip
    assert "backfill=0.1 days" in output
    assert sent > 1000  # about 0.5/s over 2.4 h of history, plus the live seconds
    records = read_topic(kafka_settings, "events.raw")
    assert len(records) == sent
    assert len({event.id for _, event in records}) == sent
    assert {event.source for _, event in records} == {"demo"}
    for key, event in records:
        assert key == event.distinct_id.encode()


def test_demo_via_http_lands_every_event_in_clickhouse(tidemark_server: TidemarkServer) -> None:
    settings = Settings(
        kafka_bootstrap=tidemark_server.env["TIDEMARK_KAFKA_BOOTSTRAP"],
        topic_prefix=tidemark_server.env["TIDEMARK_TOPIC_PREFIX"],
        state_dir=tidemark_server.data_dir / "demo",
    )
    sent, _ = run_demo(
        settings, "--via", "http", "--url", tidemark_server.url, "--write-key", "demo-write-key",
        "--seed", "8", "--flat", "--backfill-days", "0.2", "--backfill-rate", "0.3", "--duration", "2",
        "--rate", "2", "--batch-size", "50",
    )  # fmt: skip
    assert sent > 1000

    def landed() -> bool:
        rows = tidemark_server.sql("SELECT count(), uniqExact(event_id) FROM events FINAL")
        return rows[0] == [sent, sent]

    wait_until(landed, 120, f"{sent} demo events in ClickHouse")
    by_source = tidemark_server.sql("SELECT source, count() FROM events FINAL GROUP BY source")
    assert by_source == [["collector", sent]]
    # The collector kept the demo's context shape and the hot columns were filled from it.
    filled = tidemark_server.sql(
        "SELECT countIf(country != ''), countIf(device_type != ''), countIf(event_name = 'fund_project'),"
        " countIf(event_name = 'fund_project' AND amount > 0 AND currency = 'USD') FROM events FINAL"
    )[0]
    assert filled[0] > 0.9 * sent and filled[1] > 0.9 * sent
    assert filled[2] == filled[3]
