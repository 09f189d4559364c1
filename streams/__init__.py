"""The Faust app and its agents: rolling sessions, windowed metrics, anomaly detection.

``streams/`` talks only to Kafka.
"""
