"""Prometheus alert rules and scrape config: well-formed, and naming metrics the code really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml (a dev dependency) is needed to read the rule files")

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "infra" / "prometheus" / "alerts.yml"
CONFIG = ROOT / "infra" / "prometheus" / "prometheus.yml"
SEVERITIES = {"info", "warning", "critical"}
DURATION = re.compile(r"^\d+[smhdwy]$")


def _exported_metric_names() -> set[str]:
    """Every metric name declared with prometheus_client in the project's code, as Prometheus sees it."""
    names: set[str] = set()
    declaration = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"(tidemark_[a-z0-9_]+)\"", re.S)
    for folder in ("api", "sinks", "streams", "consumers", "tidemark"):
        for path in (ROOT / folder).rglob("*.py"):
            for kind, name in declaration.findall(path.read_text(encoding="utf-8")):
                if kind == "Counter":
                    names.add(name if name.endswith("_total") else f"{name}_total")
                elif kind == "Histogram":
                    names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
                else:
                    names.add(name)
    return names


def test_rules_file_has_the_prometheus_rule_shape() -> None:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert set(document) == {"groups"}
    seen = set()
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert rule["alert"] not in seen, f"duplicate alert {rule['alert']}"
            seen.add(rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert rule["expr"].count("(") == rule["expr"].count(")")
            assert DURATION.match(rule["for"])
            assert rule["labels"]["severity"] in SEVERITIES
            assert {"summary", "description"} <= set(rule["annotations"])
    assert {
        "TidemarkSinkConsumerLagHigh",
        "TidemarkSinkDeadLetterRateHigh",
        "TidemarkSinkInsertFailures",
        "TidemarkStreamWorkerStalled",
    } <= seen


def test_rules_use_metrics_the_code_exports() -> None:
    exported = _exported_metric_names()
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    used = {
        name
        for group in document["groups"]
        for rule in group["rules"]
        for name in re.findall(r"\btidemark_[a-z0-9_]+", rule["expr"])
    }
    assert used, "the rules should watch Tidemark's own metrics"
    assert used <= exported, f"rules name metrics nobody exports: {sorted(used - exported)}"


def test_scrape_config_loads_and_points_at_the_rules() -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"tidemark-api", "tidemark-worker", "tidemark-alerts"} <= jobs
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            assert all(re.fullmatch(r"[a-z0-9.-]+:\d+", target) for target in static["targets"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed on this machine")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
