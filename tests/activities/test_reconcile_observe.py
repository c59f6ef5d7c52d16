"""What reconciliation observes, and in which order: the epochs, then the models busy with a
recovery, then the instances (``ReconcileActivities._observe``; the nemesis found the other order
unsafe, see its docstring)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from drctl.activities import reconcile
from drctl.activities.reconcile import ReconcileActivities
from drctl.payloads import FleetSnapshot, Instance, Role
from drctl.platforms.base import Platform
from tests.workflows.fakes import EXAMPLE_POLICY


class RecordingPlatform:
    """The platform calls ``observe_fleet`` makes, in order, over a fleet a runbook changes as
    soon as the budget has been asked (as a runbook ending at that moment would)."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.standby_role = Role.HOT

    async def epochs(self) -> dict[str, int]:
        self.calls.append("epochs")
        return {"llama-2-7b": 4}

    async def current_policy(self) -> Any:
        return EXAMPLE_POLICY

    async def all_instances(self) -> list[Instance]:
        self.calls.append("instances")
        return [Instance(id="llama-2-7b-9", model="llama-2-7b", role=self.standby_role)]

    async def cordoned_gpus(self) -> list[str]:
        return []


async def test_epochs_then_busy_models_then_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    platform = RecordingPlatform(calls)

    async def busy_models(client: Client, task_queue: str) -> dict[str, str]:
        calls.append("busy")
        platform.standby_role = Role.FAILED  # the runbook ejected it and ended meanwhile
        return {}

    monkeypatch.setattr(reconcile, "busy_models", busy_models)
    activities = ReconcileActivities(cast(Platform, platform))
    env = ActivityEnvironment(client=cast(Client, object()))
    snapshot: FleetSnapshot = await env.run(activities.observe_fleet)
    assert calls == ["epochs", "busy", "instances"]
    # The snapshot shows what the runbook did, not the standby it was ejecting.
    assert [i.role for i in snapshot.instances] == [Role.FAILED]
