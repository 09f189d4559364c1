"""The alert delivery consumer: ``anomalies`` -> on-call channels, outcomes -> ``alerts`` / ``alerts.dlq``.

For each anomaly message, in order:

1. the :class:`~consumers.alerts.book.OpenAlertBook` decides trigger / update / resolve / nothing;
2. the :class:`~consumers.alerts.routing.Router` picks the channels for its severity
   (a resolve goes to the channels that heard the trigger), or defers/suppresses it in
   quiet hours;
3. each channel's payload is POSTed with retries (:func:`~consumers.alerts.delivery.post_json`);
4. every outcome is produced to ``alerts`` (delivered, deferred, suppressed) or to
   ``alerts.dlq`` (failed for good, with the reason), and the producer is flushed;
5. the book is saved, and only then is the message's offset committed.

A crash between 3 and 5 re-delivers that message after restart: notifications are
at-least-once, and receivers de-duplicate on the stable ``dedupKey`` / fingerprint.
Undecodable messages are dead-lettered with the reason and skipped, never stop the loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from confluent_kafka import Consumer, KafkaError, Message, Producer
from prometheus_client import Counter

from consumers.alerts.alertmanager import AlertmanagerChannel
from consumers.alerts.book import OpenAlertBook
from consumers.alerts.channel import Channel, Notification
from consumers.alerts.delivery import RetryPolicy, post_json
from consumers.alerts.pagerduty import PagerDutyChannel
from consumers.alerts.routing import QuietHours, Router
from consumers.alerts.slack import SlackChannel
from consumers.alerts.webhook import WebhookChannel
from schemas.anomaly import AlertAction, AlertDelivery, Anomaly, DeliveryOutcome, alert_delivery_codec, anomaly_codec
from schemas.codec import SchemaError
from tidemark.settings import Settings
from tidemark.topics import ALERTS, ALERTS_DLQ, ANOMALIES

log = logging.getLogger(__name__)

GROUP = "alerts"

DELIVERIES = Counter(
    "tidemark_alert_deliveries", "Alert notifications by channel and outcome.", ["channel", "action", "outcome"]
)
ANOMALIES_HANDLED = Counter("tidemark_alert_anomalies_handled", "Anomaly messages handled and committed.")


def channels_from_settings(settings: Settings) -> dict[str, Channel]:
    """Every channel that has its URL (and, for PagerDuty, its routing key) configured."""
    channels: dict[str, Channel] = {}
    if settings.alert_webhook_url:
        channels["webhook"] = WebhookChannel(settings.alert_webhook_url)
    if settings.alert_alertmanager_url:
        channels["alertmanager"] = AlertmanagerChannel(
            settings.alert_alertmanager_url, external_url=settings.alert_external_url
        )
    if settings.alert_pagerduty_routing_key:
        channels["pagerduty"] = PagerDutyChannel(
            settings.alert_pagerduty_routing_key, settings.alert_pagerduty_url, settings.alert_external_url
        )
    if settings.alert_slack_webhook_url:
        channels["slack"] = SlackChannel(settings.alert_slack_webhook_url)
    return channels


def router_from_settings(settings: Settings) -> Router:
    """Routes and quiet hours from settings."""
    quiet = (
        QuietHours.parse(settings.alert_quiet_hours, settings.alert_quiet_timezone)
        if settings.alert_quiet_hours
        else None
    )
    return Router(settings.alert_routes, quiet, settings.alert_quiet_mode)


class AlertDispatcher:
    """Decides, routes and delivers notifications; knows nothing of Kafka (testable alone)."""

    def __init__(
        self,
        channels: dict[str, Channel],
        router: Router,
        book: OpenAlertBook,
        policy: RetryPolicy,
        client: httpx.Client,
        record: Callable[[AlertDelivery], None],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.channels = channels
        self.router = router
        self.book = book
        self.policy = policy
        self.client = client
        self.record = record
        self.sleep = sleep

    def handle(self, anomaly: Anomaly, now: datetime) -> AlertAction | None:
        """Act on one anomaly message; return what was decided."""
        action = self.book.decide(anomaly)
        if action is None:
            return None
        if action == AlertAction.resolve:
            self._deliver(anomaly, action, self.book.channels_told(anomaly))
            self.book.record(anomaly, action, [])
            return action
        if self.router.is_quiet(anomaly.severity, now):
            outcome = DeliveryOutcome.deferred if self.router.quiet_mode == "defer" else DeliveryOutcome.suppressed
            if outcome == DeliveryOutcome.deferred:
                self.book.defer(anomaly, action)
            self.book.record(anomaly, action, [])
            self.record(self._delivery(anomaly, action, "*", outcome, reason="quiet hours"))
            return action
        told = self._deliver(anomaly, action, self.router.channels_for(anomaly.severity))
        self.book.record(anomaly, action, told)
        return action

    def release_deferred(self, now: datetime) -> int:
        """Send what quiet hours held back, once they are over; return how many notifications went out."""
        if not self.book.deferred or (self.router.quiet is not None and self.router.quiet.contains(now)):
            return 0
        sent = 0
        for anomaly, action in self.book.take_deferred():
            told = self._deliver(anomaly, action, self.router.channels_for(anomaly.severity))
            self.book.record(anomaly, action, told)
            sent += 1
        return sent

    def _deliver(self, anomaly: Anomaly, action: AlertAction, names: list[str]) -> list[str]:
        told = []
        notification = Notification(anomaly, action)
        for name in names:
            channel = self.channels.get(name)
            if channel is None:
                continue  # routed but not configured
            body = channel.payload(notification)
            result = post_json(self.client, channel.url, body, self.policy, self.sleep)
            outcome = DeliveryOutcome.delivered if result.delivered else DeliveryOutcome.failed
            self.record(
                self._delivery(anomaly, action, name, outcome, result.attempts, result.status, result.reason, body)
            )
            if result.delivered:
                told.append(name)
            else:
                log.warning("Alert %s to %s failed for good: %s", anomaly.dedup_key, name, result.reason)
        return told

    @staticmethod
    def _delivery(
        anomaly: Anomaly,
        action: AlertAction,
        channel: str,
        outcome: DeliveryOutcome,
        attempts: int = 0,
        status: int | None = None,
        reason: str = "",
        body: dict[str, Any] | None = None,
    ) -> AlertDelivery:
        return AlertDelivery(
            anomaly_id=anomaly.id,
            channel=channel,
            action=action,
            outcome=outcome,
            attempts=attempts,
            http_status=status,
            reason=reason,
            dedup_key=anomaly.dedup_key,
            payload=json.dumps(body, separators=(",", ":")) if body is not None else "",
        )


class AlertConsumer:
    """The ``tidemark alerts`` service: consumes ``anomalies`` and delivers alerts (see the module doc)."""

    name = "alerts"

    def __init__(self, settings: Settings, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.clock = clock
        self.book = OpenAlertBook(settings.state_dir / "alerts" / "open_alerts.json")
        self.client = httpx.Client(timeout=settings.alert_timeout_seconds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.producer: Producer | None = None  # lives while run() does
        self.dispatcher = AlertDispatcher(
            channels_from_settings(settings),
            router_from_settings(settings),
            self.book,
            RetryPolicy(
                settings.alert_max_attempts, settings.alert_backoff_seconds, settings.alert_backoff_max_seconds
            ),
            self.client,
            self._produce,
            sleep=self._interruptible_sleep,
        )
        self.handled = 0

    def _interruptible_sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _produce(self, delivery: AlertDelivery) -> None:
        DELIVERIES.labels(delivery.channel, delivery.action.value, delivery.outcome.value).inc()
        failed = delivery.outcome == DeliveryOutcome.failed
        topic = self.settings.topic(ALERTS_DLQ.name if failed else ALERTS.name)
        assert self.producer is not None, "outcomes are produced only while running"
        self.producer.produce(
            topic, key=delivery.dedup_key.encode(), value=alert_delivery_codec().encode(delivery.to_avro())
        )

    def _dead_letter_undecodable(self, message: Message, reason: str) -> None:
        self._produce(
            AlertDelivery(
                anomaly_id=uuid.UUID(int=0),
                channel="none",
                action=AlertAction.trigger,
                outcome=DeliveryOutcome.failed,
                reason=f"undecodable anomaly: {reason}",
                payload=(message.value() or b"").hex(),
            )
        )

    def _flush(self) -> None:
        assert self.producer is not None
        remaining = self.producer.flush(30.0)
        if remaining:
            raise RuntimeError(f"{remaining} alert outcome records not acknowledged by Kafka")

    def run(self) -> None:
        """Consume until :meth:`stop`."""
        self.producer = Producer({"bootstrap.servers": self.settings.kafka_bootstrap, "enable.idempotence": True})
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": self.settings.group(GROUP),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # One message may take several retries with backoff across channels: allow it
                # without the group thinking this consumer died.
                "max.poll.interval.ms": 900_000,
            }
        )
        consumer.subscribe([self.settings.topic(ANOMALIES.name)])
        log.info("Alert delivery consuming %s", self.settings.topic(ANOMALIES.name))
        try:
            while not self._stop.is_set():
                if self.dispatcher.release_deferred(self.clock()):
                    self._flush()
                    self.book.save()
                message = consumer.poll(0.5)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.error("Kafka error: %s", error)
                    continue
                try:
                    anomaly = Anomaly.from_avro(anomaly_codec().decode(message.value() or b""))
                except (SchemaError, ValueError, KeyError) as exc:
                    self._dead_letter_undecodable(message, str(exc))
                else:
                    self.dispatcher.handle(anomaly, self.clock())
                self._flush()  # outcomes durable ...
                self.book.save()  # ... open alerts durable ...
                consumer.commit(message=message, asynchronous=False)  # ... then the offset
                self.handled += 1
                ANOMALIES_HANDLED.inc()
        finally:
            consumer.close()
            self.producer.flush(10.0)
            self.producer = None  # released with its connections, not left to the garbage collector

    def start(self) -> None:
        """Run in a background thread."""
        self._thread = threading.Thread(target=self.run, name="alerts", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """Whether the consuming thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the message in hand, commit, and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.client.close()
