"""DrillWorkflow on the time-skipping server, with the drill's activities faked by name: the fault is
always restored, also when the run is lost, and the runbooks' leftovers (cordons) are undone."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.payloads import (
    ActivityName,
    DrainGpuRequest,
    DrillMeasurement,
    DrillPlan,
    DrillReport,
    DrillReportRequest,
    DrillRequest,
    DrillRestore,
    DrillScenario,
    DrillTarget,
    ErrorType,
    FleetSnapshot,
    InjectedFault,
    ModelRef,
    StepReport,
)
from drctl.workflows.drill import DrillWorkflow
from drctl.workflows.zone import ZoneFailbackWorkflow
from tests.workflows.fakes import EXAMPLE_POLICY

FAULT = InjectedFault(injected_at=datetime(2026, 1, 1, tzinfo=UTC), detail="stopped", stopped_pids=[101, 102])


@dataclass
class FakeDrill:
    run: str = "ok"
    """ok | error (the run reports an error) | lost (heartbeats the fault, then stops heartbeating)"""
    not_ready: bool = False
    zones_failed_over: list[str] = field(default_factory=list)
    gpus_drained: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    restored: list[InjectedFault] = field(default_factory=list)

    def activities(self) -> list[object]:
        drill = self

        @activity.defn(name=ActivityName.DRILL_PREPARE)
        async def prepare(request: DrillRequest) -> DrillTarget:
            drill.calls.append("prepare")
            if drill.not_ready:
                raise ApplicationError("not at redundancy", type=ErrorType.DRILL_NOT_READY, non_retryable=True)
            return DrillTarget(
                scenario=request.scenario,
                model="llama-2-7b",
                instance="llama-2-7b-0",
                node="gpu-node-0",
                gpu="gpu-node-0/0",
                zone="az-1",
                policy_rto_ms=10_000,
                sla_detection_ms=1000,
                sla_switch_ms=5000,
                sla_rto_ms=6000,
            )

        @activity.defn(name=ActivityName.DRILL_RUN)
        async def run(plan: DrillPlan) -> DrillMeasurement:
            drill.calls.append("run")
            if drill.run == "lost":
                activity.heartbeat({"phase": "injected", "fault": FAULT.model_dump(mode="json")})
                await asyncio.sleep(3600)  # no more heartbeats: the heartbeat timeout fires
            measurement = DrillMeasurement(
                fault=FAULT,
                recovered=drill.run == "ok",
                rto_ms=50,
                detection_ms=10,
                zones_failed_over=drill.zones_failed_over,
                gpus_drained=drill.gpus_drained,
            )
            if drill.run == "error":
                measurement.error = "RuntimeError: agent gone"
            return measurement

        @activity.defn(name=ActivityName.DRILL_RESTORE)
        async def restore(fault: InjectedFault) -> DrillRestore:
            drill.calls.append("restore")
            drill.restored.append(fault)
            return DrillRestore(detail=[f"SIGCONT to {len(fault.stopped_pids)}"])

        @activity.defn(name=ActivityName.DRILL_REPORT)
        async def report(request: DrillReportRequest) -> DrillReport:
            drill.calls.append("report")
            return DrillReport(
                drill_id=request.drill_id,
                scenario=request.target.scenario,
                target=request.target,
                measurement=request.measurement,
                restore=request.restore,
                error=request.error,
                passed=request.error is None,
            )

        @activity.defn(name=ActivityName.UNCORDON_GPU)
        async def uncordon(request: DrainGpuRequest) -> StepReport:
            drill.calls.append(f"uncordon {request.gpu}")
            return StepReport(detail="back in placement")

        @activity.defn(name=ActivityName.REQUEST_RECONCILE)
        async def reconcile(ref: ModelRef) -> StepReport:
            drill.calls.append("reconcile")
            return StepReport(detail="triggered")

        @activity.defn(name=ActivityName.OBSERVE_FLEET)
        async def observe() -> FleetSnapshot:
            drill.calls.append("observe")
            return FleetSnapshot(
                policy=EXAMPLE_POLICY.model_dump(mode="json", by_alias=True), instances=[], cordoned_gpus=[]
            )

        return [prepare, run, restore, report, uncordon, reconcile, observe]


async def run_drill(env: WorkflowEnvironment, drill: FakeDrill, scenario: DrillScenario) -> DrillReport:
    queue = f"drill-{uuid.uuid4()}"
    async with Worker(
        env.client, task_queue=queue, workflows=[DrillWorkflow, ZoneFailbackWorkflow], activities=drill.activities()
    ):
        return await env.client.execute_workflow(
            DrillWorkflow.run,
            DrillRequest(scenario=scenario),
            id=f"drill-{uuid.uuid4()}",
            task_queue=queue,
        )


async def test_gpu_drill_restores_the_fault_then_uncordons_and_reports(time_skipping_env: WorkflowEnvironment) -> None:
    drill = FakeDrill()
    report = await run_drill(time_skipping_env, drill, DrillScenario.GPU_FAILURE)
    assert drill.calls == ["prepare", "run", "restore", "uncordon gpu-node-0/0", "reconcile", "report"]
    assert report.passed and report.restore[0] == "SIGCONT to 2" and report.restore[-1] == "reconcile: triggered"


async def test_a_run_that_breaks_off_is_restored_and_reported_as_failed(time_skipping_env: WorkflowEnvironment) -> None:
    drill = FakeDrill(run="error")
    report = await run_drill(time_skipping_env, drill, DrillScenario.NODE_DOWN)
    assert drill.calls == ["prepare", "run", "restore", "reconcile", "report"]
    assert report.error == "RuntimeError: agent gone" and not report.passed


async def test_a_lost_run_is_restored_from_its_last_heartbeat(time_skipping_env: WorkflowEnvironment) -> None:
    drill = FakeDrill(run="lost")
    report = await run_drill(time_skipping_env, drill, DrillScenario.ZONE_OUTAGE)
    assert drill.restored == [FAULT]  # what the lost run had injected, from its heartbeat details
    assert "restore" in drill.calls and "observe" in drill.calls  # then the zone is failed back
    assert report.error is not None and "heartbeat" in report.error.lower()
    assert any(line.startswith("failback az-1") for line in report.restore)


async def test_a_fleet_that_is_not_ready_fails_the_drill_before_anything_is_injected(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    drill = FakeDrill(not_ready=True)
    with pytest.raises(WorkflowFailureError) as caught:
        await run_drill(time_skipping_env, drill, DrillScenario.POD_CRASH)
    assert "not at redundancy" in str(caught.value.cause.__cause__)
    assert drill.calls == ["prepare"]


async def test_what_the_faults_runbooks_left_cordoned_is_undone(time_skipping_env: WorkflowEnvironment) -> None:
    """A node-down drill on a zone's only node also fails the zone over; a GPU may have been drained."""
    drill = FakeDrill(zones_failed_over=["az-2"], gpus_drained=["gpu-node-1/0"])
    report = await run_drill(time_skipping_env, drill, DrillScenario.NODE_DOWN)
    assert drill.calls[:4] == ["prepare", "run", "restore", "uncordon gpu-node-1/0"]
    assert "observe" in drill.calls  # the failback child ran
    assert any(line.startswith("failback az-2") for line in report.restore)
