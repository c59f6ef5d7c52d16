"""ReconcileStandbysWorkflow: bring every model back to its serving/hot/warm/cold counts.

Observe (one activity) → plan (pure, in the workflow: ``drctl.policies.reconcile``) → act. Runs
from a Temporal Schedule (overlapping runs skipped), right after a failover (the failover
triggers the schedule), or by hand (``drctl reconcile [--dry-run]``). Idempotent: when the fleet
matches the policy the plan is empty, so a second run changes nothing.

It also repairs placement drift (standbys on the node or zone of their model's serving instance,
or stacked beside a serving instance): a misplaced standby is moved by creating its replacement
where placement puts it and deleting it only once the replacement exists (``plan.moves``).
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
        ErrorType,
        FleetSnapshot,
        Instance,
        InstanceChange,
        InstanceRef,
        ReconcileAction,
        ReconcileActionKind,
        ReconcilePlan,
        ReconcileRequest,
        ReconcileResult,
        Role,
        StepReport,
    )
    from drctl.policies.reconcile import delete_action, plan_reconcile
    from drctl.policies.schema import DRPolicy
    from drctl.workflows.failover import STEP_ERRORS, error_type, why_failed

RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=3,
    non_retryable_error_types=[
        ErrorType.UNKNOWN_MODEL,
        ErrorType.UNKNOWN_INSTANCE,
        ErrorType.MODEL_LOAD_FAILED,
        ErrorType.NOT_A_STANDBY,
        ErrorType.CHECKPOINT_CORRUPT,
    ],
)
ACTIVITY_FOR = {
    ReconcileActionKind.CREATE: ActivityName.CREATE_INSTANCE,
    ReconcileActionKind.RETIER: ActivityName.RETIER_INSTANCE,
    ReconcileActionKind.DELETE: ActivityName.DELETE_INSTANCE,
}
MAX_PARALLEL_CREATES = 4
"""Instances start and load in parallel, a few at a time (each loads a checkpoint)."""


def without_leftovers(
    snapshot: FleetSnapshot, models: list[str] | None
) -> tuple[list[Instance], list[ReconcileAction]]:
    """Instances left ``promoting`` by a create or a promotion that no longer runs (its activity was
    refused as stale, or its worker died and the runbook moved on), in a model with no recovery in
    flight (the budget says so): they are deleted, and planned around as gone. The planner alone
    would skip such a model for ever, taking the leftover for a failover still running."""
    kept: list[Instance] = []
    cleanup: list[ReconcileAction] = []
    for instance in snapshot.instances:
        leftover = instance.role == Role.PROMOTING and instance.model not in snapshot.busy_models
        if leftover and (models is None or instance.model in models):
            cleanup.append(delete_action(instance, "left promoting by a create or promotion that no longer runs"))
            kept.append(instance.model_copy(update={"role": Role.FAILED}))
        else:
            kept.append(instance)
    return kept, cleanup


def fenced(plan: ReconcilePlan, snapshot: FleetSnapshot) -> ReconcilePlan:
    """Leave the models with a recovery in flight alone (the budget says which), and stamp every
    other action with its model's epoch as observed: if a failover claims a newer epoch before the
    action runs, the platform refuses it, and the next pass plans again from the new fleet."""
    busy = snapshot.busy_models
    actions = [
        action.model_copy(update={"epoch": snapshot.epochs.get(action.model, 0)})
        for action in plan.actions
        if action.model not in busy
    ]
    skipped = [f"{model}: {runbook} in flight" for model, runbook in sorted(busy.items())]
    return plan.model_copy(update={"actions": actions, "skipped_models": [*plan.skipped_models, *skipped]})


@workflow.defn(name="ReconcileStandbysWorkflow", failure_exception_types=[ValidationError])
class ReconcileStandbysWorkflow:
    def __init__(self) -> None:
        self._result: ReconcileResult | None = None

    @workflow.query(name="progress")
    def progress(self) -> ReconcileResult | None:
        return self._result

    @workflow.run
    async def run(self, request: ReconcileRequest) -> ReconcileResult:
        snapshot = await workflow.execute_activity(
            ActivityName.OBSERVE_FLEET,
            result_type=FleetSnapshot,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RETRY,
        )
        policy = DRPolicy.model_validate(snapshot.policy)
        instances, cleanup = without_leftovers(snapshot, request.models)
        plan = plan_reconcile(policy, instances, request.models, snapshot.cordoned_gpus)
        plan = fenced(plan.model_copy(update={"actions": [*cleanup, *plan.actions]}), snapshot)
        result = self._result = ReconcileResult(plan=plan, dry_run=request.dry_run)
        if request.dry_run or not plan.actions:
            return result
        # A move (a misplaced standby) is a create and a delete; the delete waits for the create.
        moved_out = set(plan.moves.values())
        move_deletes = {
            a.instance: a for a in plan.actions if a.kind == ReconcileActionKind.DELETE and a.instance in moved_out
        }
        # Deletes first and one by one (they free capacity the creates were planned into).
        for action in plan.actions:
            if action.kind == ReconcileActionKind.DELETE and action.instance not in moved_out:
                await self._apply(action, result)
        gate = asyncio.Semaphore(MAX_PARALLEL_CREATES)

        async def bounded(action: ReconcileAction) -> None:
            async with gate:
                await self._apply(action, result)

        await asyncio.gather(
            *(bounded(a) for a in plan.actions if a.kind != ReconcileActionKind.DELETE and a.instance not in plan.moves)
        )
        # Then the moves, one by one and in order (each was planned on the pool the ones before it
        # leave): the replacement is created first, and only once it exists is the misplaced
        # standby deleted, so the model never has fewer standbys than before.
        for action in plan.actions:
            if action.kind != ReconcileActionKind.CREATE or action.instance not in plan.moves:
                continue
            old = move_deletes.get(plan.moves[action.instance])
            if await self._apply(action, result) and old is not None:
                await self._apply(old, result)
            elif old is not None:
                result.failed.append(f"kept {old.instance}: its replacement {action.instance} was not created")
        return result

    async def _apply(self, action: ReconcileAction, result: ReconcileResult) -> bool:
        label = f"{action.kind} {action.instance} ({action.tier})"
        try:
            try:
                report = await self._change(action)
            except STEP_ERRORS as err:
                if error_type(err) != ErrorType.CHECKPOINT_CORRUPT:
                    raise
                # The checkpoint failed its checksum: restore the good copy, then try once more.
                restored = await workflow.execute_activity(
                    ActivityName.RESTORE_CHECKPOINT,
                    InstanceRef(model=action.model, instance=action.instance),
                    result_type=StepReport,
                    start_to_close_timeout=timedelta(minutes=10),
                    retry_policy=RETRY,
                )
                result.applied.append(f"restore {action.instance}: {restored.detail}")
                report = await self._change(action)
        except STEP_ERRORS as err:
            result.failed.append(f"{label}: {why_failed(err)}")
            return False
        result.applied.append(f"{label}: {report.detail}")
        return True

    async def _change(self, action: ReconcileAction) -> StepReport:
        long = action.kind != ReconcileActionKind.DELETE
        report: StepReport = await workflow.execute_activity(
            ACTIVITY_FOR[action.kind],
            InstanceChange(action=action),
            result_type=StepReport,
            start_to_close_timeout=timedelta(minutes=10) if long else timedelta(seconds=30),
            heartbeat_timeout=timedelta(seconds=5) if long else None,
            retry_policy=RETRY,
        )
        return report
