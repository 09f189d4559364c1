"""``python -m tidemark sink`` as a child process with an embedded engine of its own.

The pytest process owns another chDB engine, so it never opens the child's data path:
it watches the child through its Prometheus endpoint and reads the child's data, once
the child has exited, in a short-lived ``python -c`` of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.server import free_port
from tidemark.settings import Settings


class SinkProcess:
    """One ``tidemark sink`` child: started, killed or stopped by its pid."""

    def __init__(self, settings: Settings, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.chdb_url = f"chdb://{data_dir / 'chdb'}"
        self.log_path = data_dir / "sink.log"
        self.metrics_port = 0
        self.env = {
            **os.environ,
            "TIDEMARK_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "TIDEMARK_TOPIC_PREFIX": settings.topic_prefix,
            "TIDEMARK_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
            "TIDEMARK_CLICKHOUSE_URL": self.chdb_url,
            "TIDEMARK_STATE_DIR": str(data_dir),
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the child (returns at once; poll :meth:`metric` to see it working)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidemark", "sink", "--only", "raw", "--metrics-port", str(self.metrics_port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self.proc is not None and self.proc.poll() is None

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The current value of one sample on the child's metrics endpoint (None if not there yet)."""
        if not self.alive():
            raise AssertionError(f"the sink exited with {self.proc and self.proc.returncode}:\n{self.log_tail()}")
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    return float(sample.value)
        return None

    def kill(self) -> None:
        """SIGKILL: a crash, no flush, no commit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful) and the exit code; SIGKILL only if it hangs past ``timeout``."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the child's log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def query(self, *statements: str) -> list[Any]:
        """Run SQL on the child's data path in a fresh short-lived process (the child must have exited).

        Every statement runs in order; the rows of each SELECT come back as JSON-friendly lists.
        """
        assert not self.alive(), "the sink still owns its engine"
        script = textwrap.dedent(
            """
            import json, sys
            from sinks.clickhouse import connect
            client = connect(sys.argv[1], sys.argv[2])
            out = []
            for statement in json.loads(sys.argv[3]):
                if statement.lstrip().upper().startswith("SELECT"):
                    out.append([list(map(str, row)) for row in client.query(statement).result_rows])
                else:
                    client.command(statement)
                    out.append(None)
            print(json.dumps(out))
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script, self.chdb_url, "tidemark", json.dumps(list(statements))],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        rows: list[Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return rows
