"""``tidemark run``: the whole pipeline on one machine, with demo traffic (what ``make run`` starts).

Starts, in order: the local Kafka broker (``infra/kafka/kafka.sh``), the API + sinks
process that owns the embedded ClickHouse engine (``tidemark serve``), the stream
worker (``tidemark worker``), alert delivery (``tidemark alerts``) and the demo traffic
generator (``tidemark demo``). Prints where to look, then waits; Ctrl-C stops every
process it started, by pid, in reverse order.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tidemark.localkafka import LocalKafka
from tidemark.settings import get_settings
from tidemark.topics import ensure_topics

LOCAL_ADMIN_KEY = "dev-admin-key"  # a local run's bootstrap admin key; production sets its own


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``run`` command."""
    parser = subparsers.add_parser("run", help="run Kafka, the API + sinks, the stream worker and demo traffic")
    parser.add_argument("--rate", type=float, default=30.0, help="demo events per second (0 = no demo traffic)")
    parser.add_argument("--backfill-days", type=int, default=3, help="days of demo history to send first")
    parser.add_argument("--seed", type=int, default=7, help="seed of the demo traffic")
    parser.set_defaults(func=run)


class ProcessGroup:
    """Child processes started in order and stopped in reverse, each by its pid."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` with its output in ``<log_dir>/<name>.log``."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it until it exits
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append((name, proc))
        print(f"  started {name:<8} pid {proc.pid:<7} log {log.name}")
        return proc

    def check(self) -> str | None:
        """The name of a child that has exited, if any."""
        for name, proc in self.children:
            if proc.poll() is not None:
                return name
        return None

    def stop_all(self, timeout: float = 45.0) -> None:
        """SIGTERM each child (newest first), wait, then SIGKILL what is left (the Faust worker is slow to stop)."""
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            print(f"  stopped {name} (exit {proc.returncode})")


def _preferred_port(bootstrap: str) -> int | None:
    """The configured broker port, when it is a free loopback port (so the SDK's default address works)."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if host not in {"127.0.0.1", "localhost"} or not port.isdigit():
        return None
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", int(port)))
        except OSError:
            return None
    return int(port)


def _command_available(name: str) -> bool:
    return importlib.util.find_spec(f"tidemark.commands.{name}") is not None


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API process exited with {proc.returncode} during start-up")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the API did not become ready at {url} within {timeout:.0f}s")


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # `kill <pid>` stops everything in order, exactly like Ctrl-C


def run(args: argparse.Namespace) -> int:
    """Start everything, print the URLs and a query to try, and wait for Ctrl-C (or SIGTERM)."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    settings = get_settings()
    state = settings.state_dir.resolve()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    print("Tidemark — starting the local pipeline")
    broker = LocalKafka(state / "kafka")
    bootstrap = broker.start(port=_preferred_port(settings.kafka_bootstrap))
    print(f"  Kafka    {bootstrap} (data in {state / 'kafka'})")
    env = {**os.environ, "TIDEMARK_KAFKA_BOOTSTRAP": bootstrap, "TIDEMARK_STATE_DIR": str(state)}
    env.setdefault("TIDEMARK_ADMIN_API_KEY", LOCAL_ADMIN_KEY)
    ensure_topics(settings.model_copy(update={"kafka_bootstrap": bootstrap}))
    group = ProcessGroup(state / "logs")
    python = [sys.executable, "-m", "tidemark"]
    api = f"http://{settings.api_host}:{settings.api_port}"
    try:
        serve = group.spawn("serve", [*python, "serve"], env)
        _wait_ready(f"{api}/readyz", serve)
        if _command_available("worker"):
            group.spawn("worker", [*python, "worker"], env)
        if _command_available("alerts"):
            group.spawn("alerts", [*python, "alerts"], env)
        if args.rate > 0 and _command_available("demo"):
            group.spawn(
                "demo",
                [*python, "demo", "--rate", str(args.rate), "--seed", str(args.seed),
                 "--backfill-days", str(args.backfill_days)],
                env,
            )
        key = settings.write_keys[0] if settings.write_keys else "any-key"
        print(
            f"""
Tidemark is running.
  API docs      {api}/docs
  Metrics       {api}/metrics
  Send an event:
    curl -u {key}: -H 'content-type: application/json' {api}/v1/track \\
      -d '{{"userId": "ada", "event": "fund_project", "properties": {{"amount": 25, "currency": "USD"}}}}'
  Dashboards (API key {env["TIDEMARK_ADMIN_API_KEY"]}):
    curl -H 'Authorization: Bearer {env["TIDEMARK_ADMIN_API_KEY"]}' {api}/v1/dashboards
  Query it (analysts' read-only SQL):
    TIDEMARK_API_KEY={env["TIDEMARK_ADMIN_API_KEY"]} .venv/bin/tidemark sql \\
      "SELECT event_name, count() FROM events FINAL GROUP BY event_name ORDER BY 2 DESC"
  Press Ctrl-C (or kill {os.getpid()}) to stop everything.
"""
        )
        while (exited := group.check()) is None:
            time.sleep(1.0)
        print(f"{exited} exited; stopping the rest (see its log in {state / 'logs'})")
        return 1
    except KeyboardInterrupt:
        print("\nStopping ...")
        return 0
    finally:
        group.stop_all()
        broker.stop()
        print("  stopped Kafka")
