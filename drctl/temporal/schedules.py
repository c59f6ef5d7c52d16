"""Temporal Schedules: standby reconciliation at the policy's interval, and DR drills."""

from __future__ import annotations

from datetime import timedelta

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
from temporalio.service import RPCError, RPCStatusCode

from drctl.payloads import (
    RECONCILE_SCHEDULE_ID,
    RECONCILE_WORKFLOW_ID,
    DrillRequest,
    ReconcileRequest,
    drill_workflow_id,
)
from drctl.policies.schema import DRPolicy
from drctl.workflows.drill import DrillWorkflow
from drctl.workflows.reconcile import ReconcileStandbysWorkflow


def reconcile_schedule(policy: DRPolicy, task_queue: str) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            ReconcileStandbysWorkflow.run,
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
    """Create the schedule, or update it to the policy's interval; returns what it did (``drctl up``:
    the local stack owns its schedule and re-applies the policy at every start)."""
    return await create_or_update(client, RECONCILE_SCHEDULE_ID, reconcile_schedule(policy, task_queue))


async def create_reconcile_schedule_if_missing(client: Client, policy: DRPolicy, task_queue: str) -> str:
    """Create the schedule unless one with its id exists, which is then left exactly as it is (an
    operator's pause, interval or note stays). What a worker does at start on every platform: on a
    cluster nothing else creates it, and two replicas starting at once create it once (the second
    gets "already running"). Returns what it did."""
    try:
        await client.create_schedule(RECONCILE_SCHEDULE_ID, reconcile_schedule(policy, task_queue))
    except ScheduleAlreadyRunningError:
        return "exists, left as it is"
    return "created"


async def create_or_update(client: Client, schedule_id: str, schedule: Schedule) -> str:
    """Create the schedule, or replace an existing one with the same id; returns which it did."""
    try:
        await client.create_schedule(schedule_id, schedule)
        return "created"
    except ScheduleAlreadyRunningError:

        def _replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id).update(_replace)
        return "updated"


def drill_schedule_id(scenario: str, model: str | None) -> str:
    return f"drctl-drill-{scenario}-{model or 'default'}"


async def ensure_drill_schedule(
    client: Client, request: DrillRequest, every: timedelta, task_queue: str
) -> tuple[str, str]:
    """A Temporal Schedule that runs the drill every ``every`` (overlaps skipped); returns (id, what it did)."""
    schedule_id = drill_schedule_id(request.scenario, request.model)
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            DrillWorkflow.run,
            request,
            id=drill_workflow_id(request.scenario, request.model),
            task_queue=task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        state=ScheduleState(note=f"drctl: DR drill {request.scenario} every {every}"),
    )
    return schedule_id, await create_or_update(client, schedule_id, schedule)


async def delete_drill_schedule(client: Client, scenario: str, model: str | None) -> tuple[str, bool]:
    """Delete the drill's schedule; returns (its id, whether there was one). A drill it started and
    that is running goes on to its end (it restores its fault and writes its report)."""
    schedule_id = drill_schedule_id(scenario, model)
    try:
        await client.get_schedule_handle(schedule_id).delete()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return schedule_id, False
    return schedule_id, True
