"""docker-compose.yml: the self-hosted Temporal stack and drctl's services (parsed only: no Docker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = ("postgresql", "temporal", "temporal-ui", "worker", "alert-receiver")
DRCTL = ("worker", "alert-receiver")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    with COMPOSE.open(encoding="utf-8") as f:
        compose = yaml.safe_load(f)
    assert isinstance(compose, dict)
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def env(service: dict[str, Any]) -> dict[str, str]:
    """Compose allows a mapping or a list of NAME=value."""
    raw = service.get("environment", {})
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {k: str(v) for k, v in raw.items()}


def depends_on(service: dict[str, Any]) -> set[str]:
    raw = service.get("depends_on", [])
    return set(raw if isinstance(raw, list) else raw.keys())


def test_all_services_are_there(services: dict[str, Any]) -> None:
    assert set(SERVICES) <= services.keys()


@pytest.mark.parametrize("name", DRCTL)
def test_drctl_services_point_at_the_temporal_service(services: dict[str, Any], name: str) -> None:
    service = services[name]
    address = env(service)["DRCTL_TEMPORAL_ADDRESS"]
    host, _, port = address.rpartition(":")
    assert host == "temporal" and port == "7233"
    assert env(service)["DRCTL_TEMPORAL_NAMESPACE"] == "default"
    assert service["build"] in (".", {"context": "."})
    module = {"worker": "drctl.workers.runbook_worker", "alert-receiver": "drctl.detectors.alert_receiver"}[name]
    assert service["command"][:3] == ["python", "-m", module]


def test_drctl_services_start_after_temporal(services: dict[str, Any]) -> None:
    for name in DRCTL:
        chain = set()
        todo = list(depends_on(services[name]))
        while todo:
            dep = todo.pop()
            if dep not in chain:
                chain.add(dep)
                todo.extend(depends_on(services[dep]))
        assert "temporal" in chain, name


def test_temporal_uses_postgresql(services: dict[str, Any]) -> None:
    temporal = services["temporal"]
    assert temporal["image"].startswith("temporalio/auto-setup")
    assert "postgresql" in depends_on(temporal)
    assert env(temporal)["DB"] == "postgres12"
    assert env(temporal)["POSTGRES_SEEDS"] == "postgresql"
    assert env(temporal)["POSTGRES_USER"] == env(services["postgresql"])["POSTGRES_USER"]
    assert env(temporal)["POSTGRES_PWD"] == env(services["postgresql"])["POSTGRES_PASSWORD"]


def test_temporal_ui(services: dict[str, Any]) -> None:
    ui = services["temporal-ui"]
    assert ui["image"].startswith("temporalio/ui")
    assert env(ui)["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert "8080:8080" in ui["ports"]


def test_alert_receiver_listens_on_all_interfaces_with_a_tokens_file(services: dict[str, Any]) -> None:
    receiver = services["alert-receiver"]
    assert "0.0.0.0" in receiver["command"]
    assert "9095:9095" in receiver["ports"]
    tokens = env(receiver)["DRCTL_ALERT_TOKENS_FILE"]
    assert any(v.split(":")[1] == tokens and v.endswith(":ro") for v in receiver["volumes"])
    assert "DRCTL_ALERT_TOKENS" not in env(receiver)
