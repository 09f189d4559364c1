"""Analyses as pure functions over ClickHouse: funnels, retention, lifecycle, cohorts, experiments.

Each analysis is ``(client, definition, time range, filters, settings) -> Result model``;
its SQL comes from :class:`api.analyses.query.SQLBuilder` (server-side parameters only).
HTTP handlers validate input, call one function and return its model.
"""
