"""What reconciliation observes, and in which order: the epochs, then the models busy with a
recovery, then the instances (``ReconcileActivities._observe``; the nemesis found the other order
unsafe, see its docstring)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from drctl.activities import reconcile
from drctl.activities.reconcile import ReconcileActivities
from drctl.payloads import (
    BudgetState,
    CordonGpusRequest,
    FleetSnapshot,
    Instance,
    LeaseKind,
    LeaseRequest,
    ReconcilePlan,
    ReconcileRequest,
    Role,
    StepReport,
    ZoneNames,
)
from drctl.platforms.base import Platform
from drctl.temporal.incidents import zones_failing_over
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

    async def budget_state(client: Client, task_queue: str) -> BudgetState:
        calls.append("busy")
        platform.standby_role = Role.FAILED  # the runbook ejected it and ended meanwhile
        return BudgetState(running=[zone_lease("az-2")])

    async def zone_failovers_running(client: Client, task_queue: str, now: datetime) -> set[str]:
        return {"az-3"}  # started, its lease not asked for yet

    monkeypatch.setattr(reconcile, "budget_state", budget_state)
    monkeypatch.setattr(reconcile, "zone_failovers_running", zone_failovers_running)
    activities = ReconcileActivities(cast(Platform, platform))
    env = ActivityEnvironment(client=cast(Client, object()))
    snapshot: FleetSnapshot = await env.run(activities.observe_fleet)
    assert calls == ["epochs", "busy", "instances"]
    # The snapshot shows what the runbook did, not the standby it was ejecting.
    assert [i.role for i in snapshot.instances] == [Role.FAILED]
    assert snapshot.busy_models == {"llama-2-7b": "zone-az-2"} and snapshot.zones_failing_over == ["az-2", "az-3"]
    assert snapshot.hung_gpus == []  # a platform that cannot tell (no ``hung_gpus``): none


class HungNodePlatform(RecordingPlatform):
    async def hung_gpus(self) -> list[str]:
        return ["gpu-node-0/0", "gpu-node-0/1"]


async def test_the_snapshot_has_the_gpus_of_the_nodes_the_platform_sees_hung(monkeypatch: pytest.MonkeyPatch) -> None:
    async def nothing_busy(client: Client, task_queue: str) -> BudgetState:
        return BudgetState()

    async def no_zone_failover(client: Client, task_queue: str, now: datetime) -> set[str]:
        return set()

    monkeypatch.setattr(reconcile, "budget_state", nothing_busy)
    monkeypatch.setattr(reconcile, "zone_failovers_running", no_zone_failover)
    activities = ReconcileActivities(cast(Platform, HungNodePlatform([])))
    snapshot: FleetSnapshot = await ActivityEnvironment(client=cast(Client, object())).run(activities.observe_fleet)
    assert snapshot.hung_gpus == ["gpu-node-0/0", "gpu-node-0/1"] and snapshot.cordoned_gpus == []


def zone_lease(zone: str, granted_s_ago: float = 1.0) -> LeaseRequest:
    return LeaseRequest(
        holder=f"zone-{zone}",
        incident=f"zone-{zone}",
        model="",
        zone=zone,
        kind=LeaseKind.ZONE,
        covers=["llama-2-7b"],
        granted_at=datetime.now(UTC) - timedelta(seconds=granted_s_ago),
    )


def test_a_zone_failover_goes_first_while_its_lease_runs_unless_it_looks_stuck() -> None:
    now = datetime.now(UTC)
    waiting = zone_lease("az-3")
    state = BudgetState(running=[zone_lease("az-1"), zone_lease("az-2", granted_s_ago=3600)], waiting=[waiting])
    assert zones_failing_over(state, now) == ["az-1"]
    assert zones_failing_over(None, now) == []


async def test_a_pass_waits_for_the_zone_failover_then_for_the_recoveries_it_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    single = LeaseRequest(holder="guardian-m", incident="failover-m-m-1", model="m", zone="az-1")
    answers = iter(
        [
            BudgetState(running=[zone_lease("az-1")], waiting=[single]),
            BudgetState(running=[single]),  # the lease handed back: the report it held runs
            BudgetState(running=[LeaseRequest(holder="g", incident="f", model="n", zone="az-2")]),
        ]
    )
    asked: list[int] = []

    async def budget_state(client: Client, task_queue: str) -> BudgetState:
        asked.append(1)
        return next(answers)

    started = iter([{"az-1"}, set(), set()])  # the workflow ends as it hands its lease back

    async def zone_failovers_running(client: Client, task_queue: str, now: datetime) -> set[str]:
        return next(started)

    monkeypatch.setattr(reconcile, "budget_state", budget_state)
    monkeypatch.setattr(reconcile, "zone_failovers_running", zone_failovers_running)
    monkeypatch.setattr(reconcile, "ZONE_FAILOVER_POLL_S", 0.0)
    env = ActivityEnvironment(client=cast(Client, object()))
    report: StepReport = await env.run(reconcile.await_zone_failovers, ZoneNames(zones=["az-1"]))
    assert len(asked) == 3 and report.detail.startswith("zone failover of az-1 ended, then ")


async def test_a_waiting_pass_plans_again_when_the_zone_is_cordoned_after_its_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planned after the zone failover's workflow started but before its cordon: the wait ends
    when the cordon appears (the pass then plans again and deletes the zone's standbys), not when
    the zone failover has ended."""
    asked: list[int] = []

    async def budget_state(client: Client, task_queue: str) -> BudgetState:
        asked.append(1)
        return BudgetState(running=[zone_lease("az-1")])

    async def zone_failovers_running(client: Client, task_queue: str, now: datetime) -> set[str]:
        return {"az-1"}

    cordons = iter([["gpu-node-9/0"], ["gpu-node-9/0"], ["gpu-node-0/0", "gpu-node-0/1", "gpu-node-9/0"]])

    async def cordoned_now() -> list[str]:
        return next(cordons)

    monkeypatch.setattr(reconcile, "budget_state", budget_state)
    monkeypatch.setattr(reconcile, "zone_failovers_running", zone_failovers_running)
    monkeypatch.setattr(reconcile, "ZONE_FAILOVER_POLL_S", 0.0)
    env = ActivityEnvironment(client=cast(Client, object()))
    names = ZoneNames(zones=["az-1"], cordoned=["gpu-node-9/0"])
    report: StepReport = await env.run(reconcile.await_zone_failovers, names, cordoned_now)
    assert report.detail == "2 GPU(s) cordoned or returned since the plan: planning again"
    assert len(asked) == 2  # two rounds of the zone failover running, then the cordon landed
    # A pass from before (no cordons recorded) waits for the zone failover only, as it did.
    still = ZoneNames(zones=["az-1"])
    assert still.cordoned is None


async def test_planning_heartbeats_however_long_it_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan is CPU in a thread: at 2,000 instances on a loaded machine it took longer than the
    activity's heartbeat timeout, and without heartbeats meanwhile every try of it timed out."""

    def slow_plan(snapshot: FleetSnapshot, models: list[str] | None) -> ReconcilePlan:
        time.sleep(0.7)
        return ReconcilePlan()

    async def budget_state(client: Client, task_queue: str) -> BudgetState | None:
        return None

    async def zone_failovers_running(client: Client, task_queue: str, now: datetime) -> set[str]:
        return set()

    monkeypatch.setattr(reconcile, "plan_pass", slow_plan)
    monkeypatch.setattr(reconcile, "budget_state", budget_state)
    monkeypatch.setattr(reconcile, "zone_failovers_running", zone_failovers_running)
    activities = ReconcileActivities(cast(Platform, RecordingPlatform([])))
    env = ActivityEnvironment(client=cast(Client, object()))
    beats: list[object] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    plan: ReconcilePlan = await env.run(activities.plan_reconcile, ReconcileRequest())
    assert plan == ReconcilePlan() and len(beats) >= 2


class CordoningPlatform:
    """Cordons as the local platform does: idempotent, one GPU at a time."""

    def __init__(self) -> None:
        self.cordoned: dict[str, str] = {"gpu-node-0/1": "drained"}
        self.asked: list[str] = []

    async def cordon_gpu(self, gpu: str, reason: str) -> str:
        self.asked.append(gpu)
        if gpu in self.cordoned:
            return f"{gpu} already cordoned"
        self.cordoned[gpu] = reason
        return f"{gpu} cordoned"


async def test_a_zone_is_cordoned_gpu_by_gpu_in_one_activity() -> None:
    platform = CordoningPlatform()
    activities = ReconcileActivities(cast(Platform, platform))
    gpus = ["gpu-node-0/0", "gpu-node-0/1", "gpu-node-2/0"]
    report: StepReport = await ActivityEnvironment().run(
        activities.cordon_gpus, CordonGpusRequest(gpus=gpus, reason="zone az-1 failed over")
    )
    assert platform.asked == gpus and report.detail.startswith("3 GPU(s) cordoned")
    assert platform.cordoned == {
        "gpu-node-0/0": "zone az-1 failed over",
        "gpu-node-0/1": "drained",  # already cordoned: kept as it was
        "gpu-node-2/0": "zone az-1 failed over",
    }
    with pytest.raises(ValidationError):
        CordonGpusRequest(gpus=["not a gpu"])
