"""``drctl failback --plan`` and ``--json`` of the zone commands: a plan is a run of its own (it
never joins, or holds up, the zone's real failback) and says it changes nothing; ``--json`` prints
only the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from drctl.cli import runbooks
from drctl.cli.app import app
from drctl.payloads import ZoneFailbackResult, ZoneFailoverRequest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"


class FakeClient:
    """Answers ``start_workflow`` with a handle whose result is what the failback workflow returns."""

    def __init__(self) -> None:
        self.started: list[tuple[str, ZoneFailoverRequest]] = []

    async def start_workflow(self, _workflow: Any, request: ZoneFailoverRequest, *, id: str, **_: Any) -> Any:
        self.started.append((id, request))
        result = ZoneFailbackResult(zone=request.zone)
        if request.plan_only:
            result.plan = ["uncordon 2 GPU(s) of az-1: gpu-node-0/0, gpu-node-0/1", "request reconciliation (...)"]
        else:
            result.uncordoned_gpus, result.reconcile = ["gpu-node-0/0", "gpu-node-0/1"], "triggered"

        class Handle:
            async def result(self) -> ZoneFailbackResult:
                return result

        return Handle()


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    fake = FakeClient()

    async def connect(*_: Any) -> FakeClient:
        return fake

    monkeypatch.setattr(runbooks, "connect", connect)
    return fake


def test_failback_plan_runs_apart_from_the_real_failback_and_lists_its_steps(client: FakeClient) -> None:
    result = CliRunner().invoke(app, ["failback", "az-1", "--plan", "--policy", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    ((workflow_id, request),) = client.started
    assert request.plan_only and workflow_id.startswith("plan-zone-failback-az-1-")
    assert "plan of the failback of zone az-1 (nothing will be changed):" in result.output
    assert "1. uncordon 2 GPU(s) of az-1" in result.output


def test_failback_json_prints_only_the_result(client: FakeClient) -> None:
    result = CliRunner().invoke(app, ["failback", "az-1", "--json", "--policy", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    ((workflow_id, request),) = client.started
    assert not request.plan_only and workflow_id == "zone-failback-az-1"
    printed = json.loads(result.output)
    assert printed["uncordoned_gpus"] == ["gpu-node-0/0", "gpu-node-0/1"] and printed["reconcile"] == "triggered"


def test_failback_of_an_unknown_zone_starts_nothing(client: FakeClient) -> None:
    result = CliRunner().invoke(app, ["failback", "az-9", "--plan", "--policy", str(EXAMPLE)])
    assert result.exit_code == 2 and "unknown zone 'az-9'" in result.output
    assert client.started == []
