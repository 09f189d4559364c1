"""``tidemark run`` (what ``make run`` starts) stops everything it started when it is sent SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import free_port, wait_until
from tidemark.localkafka import LocalKafka

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) no longer runs.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_sigterm_stops_every_process_and_the_broker(tmp_path: Path) -> None:
    api_port = free_port()
    env = {
        **os.environ,
        "TIDEMARK_STATE_DIR": str(tmp_path / "state"),
        "TIDEMARK_API_HOST": "127.0.0.1",
        "TIDEMARK_API_PORT": str(api_port),
        "TIDEMARK_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "TIDEMARK_STREAM_WEB_PORT": "0",
    }
    out = tmp_path / "run.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidemark", "run", "--rate", "0"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until(
            lambda: "Tidemark is running." in out.read_text() or proc.poll() is not None, 240, "tidemark run to start"
        )
        assert proc.poll() is None, out.read_text()
        assert httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=10).status_code == 200
        children = [int(pid) for pid in re.findall(r"started \w+ +pid (\d+)", out.read_text())]
        broker = int((tmp_path / "state" / "kafka" / "pid").read_text().strip())
        assert len(children) >= 2 and all(_alive(pid) for pid in [*children, broker])

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=150) == 0, out.read_text()
        assert "stopped Kafka" in out.read_text()
        assert not [pid for pid in children if _alive(pid)]
        assert not _alive(broker)
    finally:
        # Whatever a failed run left behind is stopped here (children by pid, the broker by its script).
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in re.findall(r"started \w+ +pid (\d+)", out.read_text()):
            if _alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)
        LocalKafka(tmp_path / "state" / "kafka").stop()
