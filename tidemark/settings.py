"""All of Tidemark's settings, in one place.

Every field can be set by an environment variable with the ``TIDEMARK_`` prefix,
e.g. ``TIDEMARK_KAFKA_BOOTSTRAP=127.0.0.1:9092`` or
``TIDEMARK_CLICKHOUSE_URL=http://default:@clickhouse:8123``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STATE_DIR = Path(".tidemark")


class Settings(BaseSettings):
    """Process-wide configuration, read from ``TIDEMARK_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TIDEMARK_", extra="ignore")

    # Kafka
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    topic_prefix: str = Field("", description="Prefix for every topic name (isolates tenants and tests).")
    schema_registry_url: str | None = Field(
        None, description="Confluent Schema Registry URL; unset means Avro single-object encoding."
    )
    consumer_group_prefix: str = Field("tidemark", description="Prefix of every consumer group id.")

    # ClickHouse
    clickhouse_url: str = Field(
        "chdb://.tidemark/chdb",
        description="chdb://<path> for the embedded engine, or http(s)://user:password@host:8123 for a server.",
    )
    clickhouse_database: str = Field("tidemark", description="ClickHouse database holding Tidemark's tables.")

    # Metadata database (dashboards, funnels, experiments, api keys, ...)
    metadata_url: str = Field("sqlite:///.tidemark/metadata.db", description="SQLAlchemy URL.")

    # API
    api_host: str = Field("127.0.0.1", description="Address the API binds to.")
    api_port: int = Field(8000, description="Port the API listens on.")
    write_keys: list[str] = Field(
        default_factory=lambda: ["demo-write-key"],
        description="Write keys accepted by the collector (Segment-style). Empty list disables the check.",
    )
    max_event_bytes: int = Field(32 * 1024, description="Largest accepted single event, in bytes.")
    max_batch_bytes: int = Field(500 * 1024, description="Largest accepted batch request, in bytes.")
    max_future_skew_seconds: int = Field(24 * 3600, description="How far in the future an event may be.")
    max_past_age_days: int = Field(365, description="How far in the past an event may be.")
    sql_max_execution_seconds: int = Field(30, description="Time limit of an analyst's read-only query.")
    sql_max_result_rows: int = Field(100_000, description="Row limit of an analyst's read-only query.")
    dashboard_warm_seconds: float = Field(
        60.0, description="How often pre-built and recently viewed dashboards are recomputed ahead (0 = never)."
    )
    admin_api_key: str | None = Field(
        None,
        description="Bootstrap admin API key registered at start (local runs: dev-admin-key). "
        "Unset: a random admin key is created and logged once when no admin key exists.",
    )
    api_token: str | None = Field(
        None, description="Service token /v1/sql accepts besides analyst API keys (unset: keys only)."
    )
    api_key: str | None = Field(None, description="API key the command-line clients send (tidemark sql).")
    publish_timeout_seconds: float = Field(
        15.0, description="How long the collector waits for Kafka to acknowledge events before answering 503."
    )

    # Sinks
    sink_batch_max_rows: int = Field(50_000, description="Flush a sink batch at this many rows ...")
    sink_batch_max_seconds: float = Field(1.0, description="... or after this many seconds.")
    sink_retry_backoff_max_seconds: float = Field(
        30.0, description="Longest wait between retries of a sink batch ClickHouse refused."
    )
    sink_session_timeout_ms: int = Field(
        45_000, description="Kafka session timeout of the sinks' consumers (how soon a dead sink's partitions move)."
    )

    # Analytics
    report_timezone: str = Field("UTC", description="IANA timezone for day/week/month boundaries.")
    week_start: int = Field(1, description="First day of the week, ISO numbering (1 = Monday, 7 = Sunday).")
    session_inactivity_minutes: int = Field(30, description="A session closes after this much inactivity.")
    session_max_length_minutes: int = Field(24 * 60, description="A session closes at this length.")

    # Stream processing (streams/)
    stream_grace_seconds: float = Field(300.0, description="How late (event time) an event may be for its window.")
    stream_flush_seconds: float = Field(1.0, description="Publish sessions and metric updates this often ...")
    stream_flush_events: int = Field(20_000, description="... or after this many events per partition.")
    stream_commit_seconds: float = Field(1.0, description="How often the stream worker commits offsets.")
    stream_republish_max_seconds: float = Field(
        30.0, description="Longest wait before a changed open window is re-published (minute windows: 5 s, hour: 10 s)."
    )
    stream_app_id: str = Field("tidemark-streams", description="Faust app id (names its internal topics).")
    stream_web_port: int = Field(6066, description="Port of the stream worker's web endpoint (0 = none).")
    metrics_file: Path | None = Field(None, description="JSON/YAML file of extra metric definitions.")

    # Anomaly detection (streams/anomaly/) and alert delivery (consumers/alerts/)
    anomaly_detector: str = Field("seasonal_likelihood", description="Detector of every series (registry name).")
    anomaly_detector_params: dict[str, Any] = Field(
        default_factory=lambda: {
            "inner_params": {
                "slot_window": 24, "min_slot_obs": 3, "min_scale_obs": 8, "min_scale": 0.5, "judge_constant": False
            }
        },
        description="Its parameters (JSON).",
    )
    anomaly_periods: list[str] = Field(
        default_factory=lambda: ["hour", "day"], description="Periods whose series are watched (JSON list)."
    )
    anomaly_dimensions: list[str] = Field(
        default_factory=list,
        description="Dimension breakdowns watched besides each metric's total (JSON list, e.g. [\"country\"]).",
    )
    anomaly_severity_thresholds: dict[str, float] = Field(
        default_factory=lambda: {"low": 4.0, "medium": 5.5, "high": 7.0, "critical": 9.0},
        description="Minimum detector score per severity; 'low' is the firing threshold.",
    )
    anomaly_recovery_periods: int = Field(5, description="Normal periods in a row before an alert resolves.")
    anomaly_resolve_ratio: float = Field(0.5, description="'Normal' means a score below this share of 'low'.")
    alert_webhook_url: str | None = Field(None, description="Generic JSON webhook of on-call.")
    alert_alertmanager_url: str | None = Field(None, description="Alertmanager-compatible webhook receiver.")
    alert_pagerduty_url: str = Field("https://events.pagerduty.com/v2/enqueue", description="PagerDuty Events v2.")
    alert_pagerduty_routing_key: str | None = Field(None, description="PagerDuty integration (routing) key.")
    alert_slack_webhook_url: str | None = Field(None, description="Slack incoming webhook URL.")
    alert_routes: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "low": ["webhook"],
            "medium": ["webhook", "alertmanager", "slack"],
            "high": ["webhook", "alertmanager", "slack"],
            "critical": ["webhook", "alertmanager", "slack", "pagerduty"],
        },
        description="Channels per severity; channels without a URL/key are skipped.",
    )
    alert_max_attempts: int = Field(6, description="Delivery attempts per notification before dead-lettering.")
    alert_backoff_seconds: float = Field(0.5, description="First retry delay; doubles each attempt.")
    alert_backoff_max_seconds: float = Field(60.0, description="Longest retry delay (Retry-After is capped too).")
    alert_timeout_seconds: float = Field(10.0, description="HTTP timeout of one delivery attempt.")
    alert_quiet_hours: str | None = Field(None, description="Local 'HH:MM-HH:MM' when non-critical alerts wait.")
    alert_quiet_timezone: str = Field("UTC", description="IANA timezone of the quiet hours.")
    alert_quiet_mode: str = Field("defer", description="defer (send when quiet hours end) or suppress.")
    alert_external_url: str = Field("http://127.0.0.1:8000", description="Link to Tidemark in alert payloads.")

    # Processes
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Where local state (chDB, SQLite, logs) lives.")
    log_level: str = Field("INFO", description="Python logging level.")

    def topic(self, name: str) -> str:
        """The full name of a logical topic, with the configured prefix."""
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        """The full id of a consumer group."""
        return f"{self.consumer_group_prefix}.{name}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
