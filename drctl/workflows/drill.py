"""DrillWorkflow: a DR drill on the running fleet (seed §5), durable like every runbook.

prepare (choose the target; refuse unless the model is at its policy's redundancy) → run (load
through the load balancer, inject the fault, measure until the runbooks recovered it and the
redundancy is back) → restore (always, even when the run failed half-way) → report (JSON,
Markdown, PNG timeline, verdicts against the policy's RTO and the seed's SLA).

The fault's own runbooks (failover, GPU drain, zone failover, reconcile) are started by drctl's
detectors exactly as in a real failure; the drill only injects and watches. After restoring the
fault it also undoes what those runbooks left for an operator: a GPU cordoned by the drain is
uncordoned, a zone that was failed over is failed back, so the next drill starts from a full fleet.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.exceptions import TimeoutError as TemporalTimeoutError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

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
        InjectedFault,
        ModelRef,
        StepReport,
        ZoneFailbackResult,
        ZoneFailoverRequest,
        zone_failback_workflow_id,
    )
    from drctl.workflows.failover import STEP_ERRORS, why_failed
    from drctl.workflows.zone import ZoneFailbackWorkflow

ONCE = RetryPolicy(maximum_attempts=1)
RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=10,
    non_retryable_error_types=[ErrorType.DRILL_NOT_READY],
)


@workflow.defn(name="DrillWorkflow", failure_exception_types=[ValidationError])
class DrillWorkflow:
    def __init__(self) -> None:
        self._phase = "starting"

    @workflow.query(name="phase")
    def phase(self) -> str:
        return self._phase

    @workflow.run
    async def run(self, request: DrillRequest) -> DrillReport:
        self._phase = "preparing"
        target: DrillTarget = await workflow.execute_activity(
            ActivityName.DRILL_PREPARE,
            request,
            result_type=DrillTarget,
            start_to_close_timeout=timedelta(seconds=request.ready_wait_s + 30),
            heartbeat_timeout=timedelta(seconds=10),
            retry_policy=RETRY,
        )
        measurement: DrillMeasurement | None = None
        error: str | None = None
        restored: list[str] = []
        self._phase = f"{target.scenario} on {target.instance}: injecting and measuring"
        try:
            measurement = await workflow.execute_activity(
                ActivityName.DRILL_RUN,
                DrillPlan(request=request, target=target),
                result_type=DrillMeasurement,
                start_to_close_timeout=timedelta(seconds=request.timeout_s + request.baseline_s + request.tail_s + 120),
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=ONCE,
            )
            error = measurement.error
        except STEP_ERRORS as err:
            error = why_failed(err)
            fault = _fault_from_heartbeat(err)
            if fault is not None:
                error = f"the drill run was lost ({error}); restoring what its last heartbeat said it injected"
                measurement = DrillMeasurement(fault=fault, recovered=False, error=error)
        finally:
            self._phase = "restoring the fault"
            restored = await self._restore(target, measurement, error)
        self._phase = "writing the report"
        report: DrillReport = await workflow.execute_activity(
            ActivityName.DRILL_REPORT,
            DrillReportRequest(
                request=request,
                target=target,
                measurement=measurement,
                restore=restored,
                error=error,
                drill_id=f"{workflow.info().workflow_id}-{workflow.now():%Y%m%dT%H%M%S}",
            ),
            result_type=DrillReport,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RETRY,
        )
        self._phase = "done"
        return report

    async def _restore(self, target: DrillTarget, measurement: DrillMeasurement | None, error: str | None) -> list[str]:
        lines: list[str] = []
        if measurement is not None:
            restore: DrillRestore = await workflow.execute_activity(
                ActivityName.DRILL_RESTORE,
                measurement.fault,
                result_type=DrillRestore,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=RETRY,
            )
            lines += restore.detail
        elif error is not None:
            # The activity itself was lost (a worker died mid-run, a timeout): what it injected is
            # not known here. Say so, loudly, in the report.
            lines.append(f"the run failed ({error}); check the fleet: drctl status")
        # What the fault's runbooks did that waits for an operator: drained GPUs stay cordoned and
        # failed-over zones stay out of placement. The fault is gone, so undo it (a node-down drill
        # on a zone's only node fails the zone over too).
        gpus = set(measurement.gpus_drained) if measurement else set()
        zones = set(measurement.zones_failed_over) if measurement else set()
        if target.scenario == DrillScenario.GPU_FAILURE and target.gpu:
            gpus.add(target.gpu)
        if target.scenario == DrillScenario.ZONE_OUTAGE and target.zone:
            zones.add(target.zone)
        for gpu in sorted(gpus):
            report: StepReport = await workflow.execute_activity(
                ActivityName.UNCORDON_GPU,
                DrainGpuRequest(gpu=gpu, reason="drill over"),
                result_type=StepReport,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RETRY,
            )
            lines.append(f"uncordon {gpu}: {report.detail}")
        for zone in sorted(zones):
            failback: ZoneFailbackResult = await workflow.execute_child_workflow(
                ZoneFailbackWorkflow.run,
                ZoneFailoverRequest(zone=zone, reason="drill over"),
                id=f"{zone_failback_workflow_id(zone)}-{workflow.info().workflow_id}",
            )
            lines.append(f"failback {zone}: {len(failback.uncordoned_gpus)} GPU(s) uncordoned")
        reconcile: StepReport = await workflow.execute_activity(
            ActivityName.REQUEST_RECONCILE,
            ModelRef(model=target.model),
            result_type=StepReport,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RETRY,
        )
        lines.append(f"reconcile: {reconcile.detail}")
        return lines


def _fault_from_heartbeat(err: BaseException) -> InjectedFault | None:
    """The fault the lost run had injected, from its last heartbeat (a heartbeat timeout carries it)."""
    cause = err.cause if isinstance(err, ActivityError) else err
    if not isinstance(cause, TemporalTimeoutError) or not cause.last_heartbeat_details:
        return None
    details = cause.last_heartbeat_details[0]
    if not isinstance(details, dict) or "fault" not in details:
        return None
    return InjectedFault.model_validate(details["fault"])
