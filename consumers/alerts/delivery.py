"""POST a JSON body with retries: exponential backoff on 429, 5xx and network errors, honouring Retry-After.

Other 4xx answers are permanent (the request itself is wrong: retrying cannot help), and
so is running out of attempts; the caller dead-letters those with the returned reason.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one delivery."""

    max_attempts: int = 6
    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max_seconds)
        return min(self.backoff_seconds * 2 ** (attempt - 1), self.backoff_max_seconds)


@dataclass(frozen=True)
class DeliveryResult:
    """What happened: delivered or not, after how many attempts, the last HTTP status and why."""

    delivered: bool
    attempts: int
    status: int | None
    reason: str = ""


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); ``None`` if absent or unreadable.

    >>> retry_after_seconds("2"), retry_after_seconds(None), retry_after_seconds("soon")
    (2.0, None, None)
    >>> retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", datetime(2015, 10, 21, 7, 28, tzinfo=UTC))
    10.0
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def post_json(
    client: httpx.Client,
    url: str,
    body: dict[str, Any],
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryResult:
    """POST ``body`` to ``url`` until a 2xx, a permanent failure, or ``policy.max_attempts``."""
    status: int | None = None
    reason = ""
    for attempt in range(1, policy.max_attempts + 1):
        retry_after = None
        try:
            response = client.post(url, json=body)
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            status = None
        else:
            status = response.status_code
            if 200 <= status < 300:
                return DeliveryResult(True, attempt, status)
            reason = f"HTTP {status}: {response.text[:300]}"
            if not _retryable(status):
                return DeliveryResult(False, attempt, status, f"permanent: {reason}")
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        if attempt < policy.max_attempts:
            wait = policy.delay(attempt, retry_after)
            log.info("Delivery to %s failed (%s); retry %d in %.2fs", url, reason, attempt + 1, wait)
            sleep(wait)
    return DeliveryResult(False, policy.max_attempts, status, f"retries exhausted: {reason}")
