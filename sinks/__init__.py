"""Kafka → ClickHouse batch writers, and the ClickHouse DDL they write into.

``sinks/`` is the only writer to ClickHouse (the API only reads).
"""
