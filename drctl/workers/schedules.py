"""The Temporal Schedule that runs standby reconciliation at the policy's interval."""

from __future__ import annotations

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from drctl.payloads import RECONCILE_SCHEDULE_ID, RECONCILE_WORKFLOW_ID, ReconcileRequest
from drctl.policies.schema import DRPolicy


def reconcile_schedule(policy: DRPolicy, task_queue: str) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            "ReconcileStandbysWorkflow",
            ReconcileRequest(),
            id=RECONCILE_WORKFLOW_ID,
            task_queue=task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=policy.reconcile.interval)]),
        # A run still going when the next is due: skip the next (a trigger after a failover buffers one).
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        state=ScheduleState(
            paused=not policy.reconcile.enabled,
            note="drctl: bring standbys back to the DR policy's counts",
        ),
    )


async def ensure_reconcile_schedule(client: Client, policy: DRPolicy, task_queue: str) -> str:
    """Create the schedule, or update it to the policy's interval; returns what it did."""
    schedule = reconcile_schedule(policy, task_queue)
    try:
        await client.create_schedule(RECONCILE_SCHEDULE_ID, schedule)
        return "created"
    except ScheduleAlreadyRunningError:

        def _replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(RECONCILE_SCHEDULE_ID).update(_replace)
        return "updated"
