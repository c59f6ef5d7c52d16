"""ReconcileStandbysWorkflow: bring every model back to its serving/hot/warm/cold counts.

Observe and plan (one activity; the plan is pure: ``drctl.policies.reconcile.plan_pass``) → act. Runs
from a Temporal Schedule, right after a failover (the failover triggers the schedule), or by hand
(``drctl reconcile [--dry-run]``). Idempotent: when the fleet matches the policy the plan is empty,
so a second run changes nothing.

**One pass at a time.** The schedule's overlap policy does not keep two runs apart (a triggered
run and a due one started 120 ms apart in the nemesis, and ``drctl reconcile`` has an ID of its
own): two passes planned on the same fleet, each deleted the other's loading standbys as leftovers
and both chose the same new instance IDs. So a run that changes the fleet makes its changes in a
child, ``ReconcilePassWorkflow``, under one fixed ID (:func:`reconcile_pass_workflow_id`): when a
pass is already going, the run waits for it to end, then runs its own pass on the fleet that one
left. No request is dropped (a request made during a pass gets a pass that observed after it), and
Temporal's ID uniqueness, not a lock that a killed worker could leave held, keeps passes apart. A
dry run changes nothing and plans at once.

It also repairs placement drift (standbys on the node or zone of their model's serving instance,
or stacked beside a serving instance): a misplaced standby is moved by creating its replacement
where placement puts it and deleting it only once the replacement exists (``plan.moves``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from drctl.payloads import (
        PASS_WAITED,
        ActivityName,
        ChangeBatch,
        ChangeOutcomes,
        ErrorType,
        FleetSnapshot,
        InstanceChange,
        InstanceRef,
        ReconcileAction,
        ReconcileActionKind,
        ReconcilePacing,
        ReconcilePlan,
        ReconcileRequest,
        ReconcileResult,
        StepReport,
        ZoneNames,
        reconcile_pass_workflow_id,
    )
    from drctl.policies.reconcile import plan_pass
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
"""Creates at once of a plan made before it carried its pacing (``ReconcilePlan.pacing``, from the
policy's ``reconcile.maxParallelChanges`` and ``maxLoadsPerNode``); such a plan's deletes ran one by
one. A plan is recorded in the pass's history, so a pass replays at the pace it was planned with."""


ONE_PASS_AT_A_TIME = "reconcile-one-pass-at-a-time"
"""Patch: runs started before passes were serialized replay their pass in line."""
PLAN_IN_ACTIVITY = "reconcile-plan-in-activity"
"""Patch: a pass plans in its activity and records the plan, not the whole fleet and policy (at
1,000 models the snapshot is megabytes, in every pass's history). Runs started before observe,
then plan in the workflow."""
OBSERVE_HEARTBEAT = timedelta(seconds=5)
"""Heartbeat timeout of the activities that observe the whole fleet (they heartbeat as they go)."""
PASS_WAIT_HEARTBEAT = timedelta(seconds=5)


@workflow.defn(name="ReconcileStandbysWorkflow", failure_exception_types=[ValidationError])
class ReconcileStandbysWorkflow:
    """A request for reconciliation: from the schedule, a failover's replenish step or the CLI."""

    def __init__(self) -> None:
        self._result: ReconcileResult | None = None

    @workflow.query(name="progress")
    def progress(self) -> ReconcileResult | None:
        return self._result

    @workflow.run
    async def run(self, request: ReconcileRequest) -> ReconcileResult:
        if request.dry_run or not workflow.patched(ONE_PASS_AT_A_TIME):
            return await reconcile_pass(request, self._show)
        pass_id = reconcile_pass_workflow_id(workflow.info().task_queue)
        while True:
            try:
                handle = await workflow.start_child_workflow(
                    ReconcilePassWorkflow.run,
                    request,
                    id=pass_id,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                    # A pass whose request was terminated stops too; the next pass cleans up after it.
                    parent_close_policy=ParentClosePolicy.TERMINATE,
                )
            except WorkflowAlreadyStartedError:
                # Another request's pass is going: wait for it, then plan on the fleet it leaves.
                await workflow.execute_activity(
                    ActivityName.AWAIT_RECONCILE_PASS,
                    pass_id,
                    result_type=StepReport,
                    start_to_close_timeout=timedelta(hours=1),
                    heartbeat_timeout=PASS_WAIT_HEARTBEAT,
                    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=5)),
                )
                continue
            self._result = await handle
            return self._result

    def _show(self, result: ReconcileResult) -> None:
        self._result = result


@workflow.defn(name="ReconcilePassWorkflow", failure_exception_types=[ValidationError])
class ReconcilePassWorkflow:
    """The one pass that changes the fleet (ID :func:`reconcile_pass_workflow_id`, see the module)."""

    def __init__(self) -> None:
        self._result: ReconcileResult | None = None

    @workflow.query(name="progress")
    def progress(self) -> ReconcileResult | None:
        return self._result

    @workflow.run
    async def run(self, request: ReconcileRequest) -> ReconcileResult:
        return await reconcile_pass(request, self._show)

    def _show(self, result: ReconcileResult) -> None:
        self._result = result


async def observe_and_plan(request: ReconcileRequest) -> ReconcilePlan:
    """The pass's plan as runs before ``reconcile-plan-in-activity`` made it: the whole fleet and
    policy into the history, the plan made in the workflow."""
    snapshot = await workflow.execute_activity(
        ActivityName.OBSERVE_FLEET,
        result_type=FleetSnapshot,
        start_to_close_timeout=timedelta(seconds=30),
        retry_policy=RETRY,
    )
    # Paced as such a run was (one delete at a time, four creates, no wait for a zone failover).
    return plan_pass(snapshot, request.models).model_copy(update={"pacing": None, "after_zone_failover": []})


async def plan_of_pass(request: ReconcileRequest) -> ReconcilePlan:
    """The pass's plan, made by one activity (only the plan is recorded), or as an older run made it."""
    if not workflow.patched(PLAN_IN_ACTIVITY):
        return await observe_and_plan(request)
    plan: ReconcilePlan = await workflow.execute_activity(
        ActivityName.PLAN_RECONCILE,
        request,
        result_type=ReconcilePlan,
        start_to_close_timeout=timedelta(seconds=60),
        # A worker killed while planning: retried after this, not after the 60 s (the nemesis found
        # a kill in that moment holding the fleet short of its standbys for a minute).
        heartbeat_timeout=OBSERVE_HEARTBEAT,
        retry_policy=RETRY,
    )
    return plan


async def reconcile_pass(
    request: ReconcileRequest,
    show: Callable[[ReconcileResult], None],
    planner: Callable[[ReconcileRequest], Awaitable[ReconcilePlan]] = plan_of_pass,
) -> ReconcileResult:
    """Observe, plan and (unless a dry run) act. ``show`` gets the result as soon as the plan is made
    (and it fills in as actions run), for the ``progress`` query."""
    plan = await planner(request)
    result = ReconcileResult(plan=plan, dry_run=request.dry_run)
    show(result)
    if request.dry_run:
        return result
    await _act(plan, result)
    while plan.after_zone_failover:
        # Its new standbys were left for after a zone failover (zone_failover_first): one pass
        # waits for it, rather than pass after pass planning beside it, then plans again.
        waited: StepReport = await workflow.execute_activity(
            ActivityName.AWAIT_ZONE_FAILOVERS,
            ZoneNames(zones=plan.after_zone_failover, cordoned=plan.cordoned),
            result_type=StepReport,
            start_to_close_timeout=timedelta(hours=1),
            heartbeat_timeout=PASS_WAIT_HEARTBEAT,
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=5)),
        )
        result.applied.append(f"{PASS_WAITED}{waited.detail} after {waited.duration_ms / 1000:.1f}s; planned again")
        result.waits += 1
        plan = result.plan = await planner(request)
        await _act(plan, result)
    return result


async def _act(plan: ReconcilePlan, result: ReconcileResult) -> None:
    """Apply ``plan``'s actions; what each did goes to ``result``."""
    if not plan.actions:
        return
    # A move (a misplaced standby) is a create and a delete; the delete waits for the create.
    moved_out = set(plan.moves.values())
    move_deletes = {
        a.instance: a for a in plan.actions if a.kind == ReconcileActionKind.DELETE and a.instance in moved_out
    }
    deletes = [a for a in plan.actions if a.kind == ReconcileActionKind.DELETE and a.instance not in moved_out]
    others = [a for a in plan.actions if a.kind != ReconcileActionKind.DELETE and a.instance not in plan.moves]
    if plan.pacing is None:
        await _one_delete_at_a_time(deletes, others, result)
    else:
        await _in_batches(deletes, others, plan.pacing, result)
    # Then the moves, one by one and in order (each was planned on the pool the ones before it
    # leave): the replacement is created first, and only once it exists is the misplaced
    # standby deleted, so the model never has fewer standbys than before.
    for action in plan.actions:
        if action.kind != ReconcileActionKind.CREATE or action.instance not in plan.moves:
            continue
        old = move_deletes.get(plan.moves[action.instance])
        if await _apply(action, result) and old is not None:
            await _apply(old, result)
        elif old is not None:
            result.failed.append(f"kept {old.instance}: its replacement {action.instance} was not created")


async def _one_delete_at_a_time(
    deletes: list[ReconcileAction], others: list[ReconcileAction], result: ReconcileResult
) -> None:
    """A plan made before it carried its pacing: deletes one by one, then creates four at a time."""
    for action in deletes:
        await _apply(action, result)
    gate = asyncio.Semaphore(MAX_PARALLEL_CREATES)

    async def bounded(action: ReconcileAction) -> None:
        async with gate:
            await _apply(action, result)

    await asyncio.gather(*(bounded(a) for a in others))


async def _in_batches(
    deletes: list[ReconcileAction], others: list[ReconcileAction], pacing: ReconcilePacing, result: ReconcileResult
) -> None:
    """The deletes first (they free the capacity the creates were planned into), then the creates
    and re-tiers, in batches of ``parallel_changes`` applied side by side by one activity each
    (``apply_changes``), one batch after another; a batch loads at most ``loads_per_node`` at once
    on one node. A batch takes its changes across the nodes in turn, so that one holds work for
    every node. Each change is one instance's, idempotent and fenced by its model's epoch, so their
    order among themselves does not matter."""
    for batch in _batches(deletes, pacing.parallel_changes):
        await _apply_batch(batch, pacing, result)
    for batch in _batches(_across_nodes(others), pacing.parallel_changes):
        await _apply_batch(batch, pacing, result)


def _batches(actions: list[ReconcileAction], size: int) -> list[list[ReconcileAction]]:
    return [actions[i : i + size] for i in range(0, len(actions), size)]


def _across_nodes(actions: list[ReconcileAction]) -> list[ReconcileAction]:
    """``actions`` taken one node at a time in turn (each node's in plan order)."""
    by_node: dict[str | None, list[ReconcileAction]] = {}
    for action in actions:
        by_node.setdefault(action.node, []).append(action)
    queues = list(by_node.values())
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


async def _apply_batch(batch: list[ReconcileAction], pacing: ReconcilePacing, result: ReconcileResult) -> None:
    """One ``apply_changes`` activity; each change's outcome goes to ``result``. A change whose
    checkpoint failed its checksum is restored and made again on its own (:func:`_apply`)."""
    try:
        done: ChangeOutcomes = await workflow.execute_activity(
            ActivityName.APPLY_CHANGES,
            ChangeBatch(actions=batch, loads_per_node=pacing.loads_per_node),
            result_type=ChangeOutcomes,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(seconds=5),
            retry_policy=RETRY,
        )
    except STEP_ERRORS as err:
        result.failed.extend(f"{_label(action)}: {why_failed(err)}" for action in batch)
        return
    for action, outcome in zip(batch, done.outcomes, strict=True):
        if outcome.error is None:
            result.applied.append(f"{_label(action)}: {outcome.detail}")
        elif outcome.error_type == ErrorType.CHECKPOINT_CORRUPT:
            await _apply(action, result, corrupt=True)  # restores the checkpoint, then makes the change
        else:
            result.failed.append(f"{_label(action)}: {outcome.error}")


def _label(action: ReconcileAction) -> str:
    return f"{action.kind} {action.instance} ({action.tier})"


async def _apply(action: ReconcileAction, result: ReconcileResult, corrupt: bool = False) -> bool:
    """One change as an activity of its own; ``corrupt``: its checkpoint already failed its
    checksum (in a batch), so it is restored first."""
    label = _label(action)
    try:
        if corrupt:
            report = await _restored_then_changed(action, result)
        else:
            try:
                report = await _change(action)
            except STEP_ERRORS as err:
                if error_type(err) != ErrorType.CHECKPOINT_CORRUPT:
                    raise
                report = await _restored_then_changed(action, result)
    except STEP_ERRORS as err:
        result.failed.append(f"{label}: {why_failed(err)}")
        return False
    result.applied.append(f"{label}: {report.detail}")
    return True


async def _restored_then_changed(action: ReconcileAction, result: ReconcileResult) -> StepReport:
    """The checkpoint failed its checksum: restore the good copy, then try once more."""
    restored = await workflow.execute_activity(
        ActivityName.RESTORE_CHECKPOINT,
        InstanceRef(model=action.model, instance=action.instance),
        result_type=StepReport,
        start_to_close_timeout=timedelta(minutes=10),
        retry_policy=RETRY,
    )
    result.applied.append(f"restore {action.instance}: {restored.detail}")
    return await _change(action)


async def _change(action: ReconcileAction) -> StepReport:
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
