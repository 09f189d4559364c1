"""Anomaly alerts to on-call: routing by severity, one module per channel, delivery with retries.

``consumer.AlertConsumer`` reads ``anomalies``, keeps one open alert per series
(``book.OpenAlertBook``), routes each notification by severity (``routing``) to the
channels (``webhook``, ``alertmanager``, ``pagerduty``, ``slack``), delivers it with
retries and backoff (``delivery``), and records every outcome on ``alerts`` -- or on
``alerts.dlq`` with the reason when it failed for good.
"""
