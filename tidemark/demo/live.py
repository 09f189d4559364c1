"""Live demo traffic: the same simulation, started in the past or now, released in real time.

:func:`live_config` builds a :class:`TrafficConfig` that starts ``backfill`` before now
and never ends; :func:`paced` releases each event when the wall clock reaches its
timestamp, so a backfill streams out as fast as the consumer takes it and the rest
arrives at the configured rate with timestamps of about now.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from tidemark.demo.traffic import TrafficConfig

T = TypeVar("T")


def live_config(
    events_per_second: float,
    seed: int,
    backfill: timedelta = timedelta(0),
    now: datetime | None = None,
    backfill_rate: float | None = None,
    **kwargs: Any,
) -> TrafficConfig:
    """An endless config averaging ``events_per_second`` (over a week), starting ``backfill`` ago.

    ``backfill_rate`` (events per second, default: the live rate) sets the volume of the history
    before ``now``; a lighter history loads quickly and still fills charts and cohorts.
    """
    moment = now or datetime.now(UTC)
    scale = 1.0 if backfill_rate is None else backfill_rate / events_per_second
    return TrafficConfig.for_rate(
        events_per_second,
        start=moment - backfill,
        end=None,
        seed=seed,
        history_until=moment,
        history_scale=scale,
        **kwargs,
    )


def paced(
    items: Iterable[T],
    due_at: Callable[[T], float],
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    heartbeat: float = 1.0,
) -> Iterator[T | None]:
    """Yield each item once ``clock()`` reaches ``due_at(item)`` (Unix seconds).

    While waiting it yields ``None`` every ``heartbeat`` seconds, so the consumer can flush
    batches and log progress during quiet hours.
    """
    for item in items:
        due = due_at(item)
        while (delay := due - clock()) > 0:
            sleep(min(delay, heartbeat))
            if due - clock() > 0:
                yield None
        yield item
