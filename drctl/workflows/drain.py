"""DrainGpuWorkflow: a GPU is failing (the node agent saw a drain-class Xid, uncorrectable ECC
errors, ...). Keep it out of placement, move its serving instances away through the failover
runbook (reported to each model's guardian, the failure already confirmed), remove its standbys, and let
reconciliation recreate them on healthy GPUs.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from drctl.payloads import (
        ActivityName,
        DrainGpuRequest,
        DrainGpuResult,
        FleetSnapshot,
        InstanceChange,
        ModelRef,
        ReconcileAction,
        ReconcileActionKind,
        Role,
        StepReport,
        Trigger,
    )
    from drctl.workflows.failover import STEP_ERRORS, why_failed
    from drctl.workflows.reports import recover_through_guardians

RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=300), maximum_attempts=5)
MAX_PARALLEL_FAILOVERS = 4
STEP_TIMEOUT = timedelta(seconds=30)


@workflow.defn(name="DrainGpuWorkflow", failure_exception_types=[ValidationError])
class DrainGpuWorkflow:
    @workflow.run
    async def run(self, request: DrainGpuRequest) -> DrainGpuResult:
        result = DrainGpuResult(gpu=request.gpu)
        await workflow.execute_activity(
            ActivityName.CORDON_GPU,
            request,
            result_type=StepReport,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        snapshot = await workflow.execute_activity(
            ActivityName.OBSERVE_FLEET,
            result_type=FleetSnapshot,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        on_gpu = [i for i in snapshot.instances if i.gpu == request.gpu and i.role != Role.FAILED]
        gate = asyncio.Semaphore(MAX_PARALLEL_FAILOVERS)

        for standby in (i for i in on_gpu if i.role.is_standby):  # removed before any promotion
            action = ReconcileAction(
                kind=ReconcileActionKind.DELETE,
                model=standby.model,
                instance=standby.id,
                tier=standby.role,
                gpu=standby.gpu,
                reason=f"GPU {request.gpu} drained",
                epoch=snapshot.epochs.get(standby.model),
            )
            try:
                await workflow.execute_activity(
                    ActivityName.DELETE_INSTANCE,
                    InstanceChange(action=action),
                    result_type=StepReport,
                    start_to_close_timeout=STEP_TIMEOUT,
                    retry_policy=RETRY,
                )
                result.deleted.append(standby.id)
            except STEP_ERRORS as err:
                result.failed.append(f"{standby.id}: {why_failed(err)}")
        # Standbys first, so no failover promotes one that sits on the failing GPU.
        serving = [i for i in on_gpu if i.role in (Role.SERVING, Role.PROMOTING)]
        reason = f"GPU {request.gpu} drained: {request.reason}"
        await asyncio.gather(
            *(
                recover_through_guardians(
                    gate, i.model, i.id, Trigger.GPU_HEALTH, reason, result.failovers, result.failed
                )
                for i in serving
            )
        )
        for model in sorted({i.model for i in on_gpu}):
            try:
                await workflow.execute_local_activity(
                    ActivityName.REQUEST_RECONCILE,
                    ModelRef(model=model),
                    result_type=StepReport,
                    start_to_close_timeout=STEP_TIMEOUT,
                    retry_policy=RETRY,
                )
            except STEP_ERRORS:
                workflow.logger.warning("could not trigger reconciliation for %s", model)
        return result
