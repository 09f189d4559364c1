"""Widget results kept for the widget's refresh interval, and a warmer that keeps dashboards ready.

Why: a dashboard opens eight or more widgets at once, and the heavy ones (a retention rate
over millions of events) take a second or more on the embedded engine. BI tools answer this
the same way: a widget's result is reused until it is older than the widget's
``refresh_seconds`` (Metabase's cache TTL, PostHog's insight refresh interval), a request may
ask for a fresh computation (``refresh=true``), and a background warmer recomputes the
results people look at before they expire, so opening a dashboard does not wait on
ClickHouse.

What a cached result is keyed by: the widget (its id and the hash of its type and data
source, so an edited widget never serves its old result), the resolved time window (relative
ranges are whole local days, so "last 30 days" keeps its key all day), timezone, granularity,
dimension filters and week start. Every response says when it was computed
(``computed_at``) and whether it came from the cache.

The warmer recomputes, every ``interval`` seconds, the default view (the dashboard's own
filters) of the pre-built dashboards and of every dashboard whose default view was requested
within the last hour, for each widget whose cached result is older than 80 % of its refresh
interval. Errors are logged and never stop it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from api.dashboards.models import DashboardFilters, WidgetData

log = logging.getLogger(__name__)

#: Results kept at most (least recently used ones go first).
MAX_ENTRIES = 2000
#: A dashboard's default view stays warm this long after it was last requested.
VIEW_KEEP_SECONDS = 3600.0
#: The warmer recomputes a result once it is this share of its refresh interval old.
REFRESH_AHEAD = 0.8


def widget_key(widget: Any, filters: DashboardFilters, week_start: int, start: datetime, end: datetime) -> str:
    """The cache key of ``widget`` under resolved ``filters`` and window ``[start, end)``."""
    recipe = {
        "widget": widget.id,
        "definition": [widget.widget_type, widget.data_source],
        "window": [start.astimezone(UTC).isoformat(), end.astimezone(UTC).isoformat()],
        "timezone": filters.timezone,
        "granularity": str(filters.granularity),
        "filters": [f.model_dump(mode="json") for f in filters.filters],
        "week_start": week_start,
    }
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class CachedResult:
    """One widget result and when it was computed (monotonic seconds for ages, wall time for clients)."""

    data: WidgetData
    computed_at: float


class WidgetCache:
    """Thread-safe LRU of widget results; an entry is served while younger than the asked-for age."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: OrderedDict[str, CachedResult] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(self, key: str, max_age: float) -> WidgetData | None:
        """The cached result if it is younger than ``max_age`` seconds (marked as cached), else None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or time.monotonic() - entry.computed_at >= max_age:
                return None
            self._entries.move_to_end(key)
            return entry.data.model_copy(update={"cached": True})

    def put(self, key: str, data: WidgetData) -> None:
        """Store a freshly computed result."""
        with self._lock:
            self._entries[key] = CachedResult(data, time.monotonic())
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class DashboardWarmer:
    """Recomputes the default views of pre-built and recently viewed dashboards before they expire.

    ``warm_dashboard(dashboard_id, max_age_share)`` does the work for one dashboard (the API
    passes a function that loads it and resolves its widgets into the cache);
    ``prebuilt_ids()`` lists the pre-built dashboards.
    """

    def __init__(
        self,
        warm_dashboard: Callable[[int, float], int],
        prebuilt_ids: Callable[[], list[int]],
        interval: float,
    ) -> None:
        self._warm_dashboard = warm_dashboard
        self._prebuilt_ids = prebuilt_ids
        self.interval = interval
        self._viewed: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cycles = 0

    def viewed(self, dashboard_id: int) -> None:
        """Note that a dashboard's default view was requested (keeps it warm for a while)."""
        with self._lock:
            self._viewed[dashboard_id] = time.monotonic()

    def dashboards(self) -> list[int]:
        """The dashboards to keep warm now: pre-built ones and those viewed recently."""
        now = time.monotonic()
        with self._lock:
            for dashboard_id, seen in list(self._viewed.items()):
                if now - seen > VIEW_KEEP_SECONDS:
                    del self._viewed[dashboard_id]
            recent = list(self._viewed)
        return sorted(set(self._prebuilt_ids()) | set(recent))

    def warm_once(self, max_age_share: float = REFRESH_AHEAD) -> int:
        """One pass over the dashboards to keep warm; return the widgets recomputed."""
        computed = 0
        for dashboard_id in self.dashboards():
            if self._stop.is_set():
                break
            try:
                computed += self._warm_dashboard(dashboard_id, max_age_share)
            except Exception:  # a broken dashboard must not stop the others
                log.exception("warming dashboard %s failed", dashboard_id)
        self.cycles += 1
        return computed

    def start(self) -> None:
        """Warm every ``interval`` seconds on a daemon thread (the first pass after one interval)."""
        self._thread = threading.Thread(target=self._run, name="dashboard-warmer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the widget being computed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.warm_once()
