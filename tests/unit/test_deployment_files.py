"""The Docker deployment file is valid and only runs commands Tidemark has."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tidemark.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_tidemark_service_runs_an_existing_command() -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    services = {name: svc for name, svc in _compose()["services"].items() if svc.get("image") == "tidemark:latest"}
    assert {"api", "worker", "alerts", "demo"} <= set(services)
    for name, service in services.items():
        assert service["command"][0] in commands, f"service {name} runs an unknown command"


def _has_compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def test_compose_file_validates_with_docker_compose() -> None:
    if shutil.which("docker-compose"):
        argv = ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"]
    elif _has_compose_plugin():
        argv = ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"]
    else:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
