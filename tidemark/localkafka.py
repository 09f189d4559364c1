"""Python handle on the local Kafka broker that ``infra/kafka/kafka.sh`` starts and stops.

Used by ``tidemark run``, the test suite and the benchmarks. The broker is a real
Apache Kafka (KRaft, broker + controller in one JVM) whose jars Maven resolved from
Maven Central; this module only drives the script.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = PROJECT_ROOT / "infra" / "kafka" / "kafka.sh"


class LocalKafka:
    """One local broker whose state (data, logs, pid, ports) lives in ``state_dir``.

    >>> broker = LocalKafka(Path("/nonexistent"))
    >>> broker.bootstrap is None
    True
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.bootstrap: str | None = None

    def start(self, port: int | None = None, timeout: float = 180.0) -> str:
        """Start the broker (resolving the jars first if needed) and return its bootstrap address.

        ``port`` is used on the first start only (when free); later starts keep the ports they had.
        """
        result = subprocess.run(
            [str(KAFKA_SCRIPT), "start", str(self.state_dir), *([str(port)] if port else [])],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.bootstrap = result.stdout.strip().splitlines()[-1]
        return self.bootstrap

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after the script's stop timeout)."""
        subprocess.run([str(KAFKA_SCRIPT), "stop", str(self.state_dir)], check=True, timeout=timeout)
        self.bootstrap = None

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resolve_jars(timeout: float = 900.0) -> None:
    """Resolve the broker's jars from Maven Central into ``infra/kafka/lib`` (cached)."""
    subprocess.run([str(KAFKA_SCRIPT), "jars"], check=True, timeout=timeout)
