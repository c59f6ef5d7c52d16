"""ZoneFailoverWorkflow: active-passive zone failover (seed §4.1 ``az_failover``).

Every GPU of the failed zone is cordoned (nothing is placed there again until failback), and the
zone failover takes one zone-level lease from the budget. Under it, the zone's plain recoveries (a
serving instance whose runbook would promote a hot standby out of the zone, its model busy with
nothing else) are switched in one batch (:func:`_switch_in_batch`, ``drctl.activities.zone_switch``),
each recorded as its model's ``FailoverWorkflow``; every other serving instance in the zone is
reported to its model's guardian (the failure already confirmed), which runs its
``FailoverWorkflow`` — or joins the one the prober started. Critical models go first, at most
``maxParallelFailovers`` at a time. When the policy says ``requireApproval``, nothing moves until
an operator approves through the ``approve`` Update.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from drctl.payloads import (
        ActivityName,
        CordonGpusRequest,
        DrainGpuRequest,
        FailoverOutcome,
        FailoverRequest,
        FailureReport,
        FleetSnapshot,
        IncidentTicket,
        IncidentTickets,
        Instance,
        InstanceRef,
        LeaseAnswer,
        LeaseGrant,
        LeaseKind,
        LeaseRelease,
        LeaseRequest,
        ModelRef,
        ReportBatch,
        Role,
        RunbookIds,
        RunbookOutcome,
        RunbookOutcomes,
        StepReport,
        Trigger,
        ZoneApproval,
        ZoneFailbackResult,
        ZoneFailoverRequest,
        ZoneFailoverResult,
        ZoneSwitchBatch,
        ZoneSwitchClaim,
        ZoneSwitchOutcomes,
        ZoneSwitchPlan,
    )
    from drctl.policies.placement import gpu_inventory
    from drctl.policies.schema import DRPolicy
    from drctl.policies.standby import hot_switch, standby_candidates
    from drctl.workflows.reports import REPORT_RETRY, recover_through_guardians

RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=300), maximum_attempts=5)
STEP_TIMEOUT = timedelta(seconds=30)
BATCHED = "zone-failover-batched"
"""Patch: the zone's GPUs are cordoned side by side, and its serving instances are reported to
their guardians in one activity and followed in one more, the budget starting their runbooks
``maxParallelFailovers`` at a time. Before, each GPU was cordoned in turn and each instance took
a report and a follow-up activity of its own, gated in the workflow: two activities and about four
workflow tasks per instance, which at hundreds of instances kept the recovery waiting on the
orchestration. Runs started before it go on one instance at a time."""
ONE_LEASE = "zone-failover-one-lease"
"""Patch: the zone failover takes one zone-level lease from the budget for the whole zone
(``maxParallelFailovers`` slots), reports its serving instances under it and follows each runbook
to its end in one activity, at most that many at a time; the guardians start those runbooks
without asking the budget. Before (``BATCHED``), each instance's guardian asked the budget, was
granted by a signal and handed the lease back: about five of a recovery's ten workflow tasks, which
at 1,000 instances kept the machine busy with orchestration rather than with recoveries. Runs
started before it go on as batched (or one at a time)."""
SWITCH_IN_BATCH = "zone-failover-switches-hot-in-batch"
"""Patch: under its lease, the zone failover switches the zone's plain recoveries (a serving
instance whose runbook would promote a hot standby out of the zone, its model busy with nothing
else) itself, in one activity that decides and claims their epochs and one that switches them side
by side (``drctl.activities.zone_switch``), each switch recorded as its model's
``FailoverWorkflow``; only the rest go to the guardians. Before (``ONE_LEASE``), every serving
instance took a report, an epoch claim and a runbook of its own: at 500 recoveries the zone waited
on the orchestration (~180 ms of CPU each). Runs started before it report every instance."""
CORDON_AT_ONCE = "zone-failover-cordons-at-once"
"""Patch: the zone's GPUs are cordoned in one activity (``cordon_gpus``) that heartbeats: a try
that goes silent for ``CORDON_HEARTBEAT`` is tried again. Before (``BATCHED``), one activity per
GPU side by side, each within ``STEP_TIMEOUT`` and silent: at 1,000 instances one of the 32 was
once not done for its whole 30 s, and the switch, which waits for the cordons, waited with it.
Runs started before it cordon side by side."""
CORDON_HEARTBEAT = timedelta(seconds=5)
CORDON_TIMEOUT = timedelta(minutes=2)
"""A zone's cordons are a write each (a file, a ConfigMap update): a zone of hundreds of GPUs on a
slow API server still fits, heartbeating."""
REPORT_TIMEOUT = timedelta(minutes=10)
"""Reporting a whole zone (hundreds of Update-with-starts on a loaded machine), heartbeating."""


async def observe_fleet() -> tuple[FleetSnapshot, DRPolicy]:
    """The fleet now, and the policy it was observed under."""
    snapshot: FleetSnapshot = await workflow.execute_activity(
        ActivityName.OBSERVE_FLEET,
        result_type=FleetSnapshot,
        start_to_close_timeout=STEP_TIMEOUT,
        heartbeat_timeout=timedelta(seconds=5),  # a dead worker: retried in seconds, not 30 s
        retry_policy=RETRY,
    )
    return snapshot, DRPolicy.model_validate(snapshot.policy)


async def request_reconcile(policy: DRPolicy) -> str:
    """Trigger the reconcile schedule now (it reconciles every model), so standbys move at once."""
    report: StepReport = await workflow.execute_activity(
        ActivityName.REQUEST_RECONCILE,
        ModelRef(model=policy.models[0].name),
        result_type=StepReport,
        start_to_close_timeout=STEP_TIMEOUT,
        retry_policy=RETRY,
    )
    return report.detail


@workflow.defn(name="ZoneFailoverWorkflow", failure_exception_types=[ValidationError])
class ZoneFailoverWorkflow:
    def __init__(self) -> None:
        self._result: ZoneFailoverResult | None = None
        self._approval: ZoneApproval | None = None
        self._lease_granted = False

    @workflow.query(name="progress")
    def progress(self) -> ZoneFailoverResult | None:
        return self._result

    @workflow.update(name="approve")
    def approve(self, approval: ZoneApproval) -> str:
        """An operator lets the zone failover go ahead (``drctl approve`` or the UI)."""
        self._approval = approval
        return f"approved by {approval.approver}"

    def _plan(
        self, request: ZoneFailoverRequest, snapshot: FleetSnapshot, policy: DRPolicy, serving: list[Instance]
    ) -> ZoneFailoverResult:
        """The same observation and order as a real run; nothing cordoned, reported or moved."""
        assert self._result is not None
        self._result.plan = _plan_lines(request, snapshot, policy, serving)
        return self._result

    @workflow.signal(name="lease_granted")
    def lease_granted(self, grant: LeaseGrant) -> None:
        """The budget grants the zone's lease it could not grant at once (another zone fails over)."""
        self._lease_granted = True

    def _one_lease(self) -> bool:
        return workflow.patched(ONE_LEASE)

    def _batched(self) -> bool:
        return workflow.patched(BATCHED)

    def _switches_in_batch(self) -> bool:
        return workflow.patched(SWITCH_IN_BATCH)

    def _cordons_at_once(self) -> bool:
        return workflow.patched(CORDON_AT_ONCE)

    async def _cordon_zone(self, request: ZoneFailoverRequest, policy: DRPolicy, result: ZoneFailoverResult) -> None:
        """Every GPU of the zone cordoned: in one activity (``CORDON_AT_ONCE``), or side by side."""
        gpus = [slot.id for slot in gpu_inventory(policy.gpu_pool) if slot.zone == request.zone]
        reason = f"zone {request.zone} failed over: {request.reason}"[:500]
        if self._cordons_at_once():
            await workflow.execute_activity(
                ActivityName.CORDON_GPUS,
                CordonGpusRequest(gpus=gpus, reason=reason),
                result_type=StepReport,
                start_to_close_timeout=CORDON_TIMEOUT,
                heartbeat_timeout=CORDON_HEARTBEAT,
                retry_policy=RETRY,
            )
        else:
            await _cordon_side_by_side(gpus, reason)
        result.cordoned_gpus.extend(gpus)

    @workflow.run
    async def run(self, request: ZoneFailoverRequest) -> ZoneFailoverResult:
        result = self._result = ZoneFailoverResult(zone=request.zone)
        snapshot, policy = await observe_fleet()
        rank = {m.name: m.priority.rank for m in policy.models}
        serving = sorted(
            (i for i in snapshot.instances if i.zone == request.zone and i.role == Role.SERVING),
            key=lambda i: (-rank.get(i.model, 0), i.model, i.id),
        )
        result.pending = [i.id for i in serving]
        if request.plan_only:
            return self._plan(request, snapshot, policy, serving)
        if policy.az_failover.require_approval and not request.approved:
            await workflow.wait_condition(lambda: self._approval is not None)
        result.approved_by = (
            self._approval.approver if self._approval else ("pre-approved" if request.approved else None)
        )
        if self._one_lease():
            await self._cordon_zone(request, policy, result)
            await self._move_under_one_lease(request, policy, serving, result)
            result.reconcile = await request_reconcile(policy)
            return result
        if self._batched():
            await self._cordon_zone(request, policy, result)
            await _move_as_one_batch(request, policy, serving, result)
            result.reconcile = await request_reconcile(policy)
            return result
        for slot in gpu_inventory(policy.gpu_pool):
            if slot.zone == request.zone:
                await workflow.execute_activity(
                    ActivityName.CORDON_GPU,
                    DrainGpuRequest(gpu=slot.id, reason=f"zone {request.zone} failed over: {request.reason}"[:500]),
                    result_type=StepReport,
                    start_to_close_timeout=STEP_TIMEOUT,
                    retry_policy=RETRY,
                )
                result.cordoned_gpus.append(slot.id)
        gate = asyncio.Semaphore(policy.az_failover.max_parallel_failovers)

        reason = f"zone {request.zone} failover: {request.reason}"

        async def move(model: str, instance: str) -> None:
            await recover_through_guardians(
                gate,
                model,
                instance,
                Trigger.ALERT,
                reason,
                result.moved,
                result.failed,
                prefer_zone=policy.az_failover.standby_zone,
                zone_level=True,
            )
            result.pending.remove(instance)

        # Started in priority order; the semaphore bounds how many run at once.
        await asyncio.gather(*(move(i.model, i.id) for i in serving))
        # Standbys on the cordoned GPUs move now, not at the next scheduled reconcile.
        result.reconcile = await request_reconcile(policy)
        return result

    async def _move_under_one_lease(
        self, request: ZoneFailoverRequest, policy: DRPolicy, serving: list[Instance], result: ZoneFailoverResult
    ) -> None:
        """Take the zone's one lease, then switch the plain recoveries in one batch
        (``SWITCH_IN_BATCH``), report every other serving instance under the lease and follow each
        runbook to its end, critical models first, at most the lease's slots at a time; hand the
        lease back at the end, whatever happened. The zone's standbys are left to reconciliation
        (requested at the end: it moves those on the cordoned GPUs in one pass) and to the
        prober's reports, which the budget holds until this lease is handed back (patch
        ``budget-zone-failover-first``; before it they ran beside the lease)."""
        if not serving:
            return
        lease = await self._take_zone_lease(request, policy, serving)
        rest = serving
        try:
            if self._switches_in_batch():
                rest = await _switch_in_batch(request, policy, serving, lease, result)
            if rest:
                reports = _reports(request, policy, rest, lease=lease.incident)
                outcomes = await _followed_to_the_end(
                    ActivityName.REPORT_AND_AWAIT, ReportBatch(reports=reports, at_once=lease.slots)
                )
        except ActivityError as exc:
            result.failed.extend(f"{i.id}: {exc}" for i in rest)
            result.pending = []
            return
        finally:
            # An Update (through an activity), not a signal: once it returns, the budget no longer
            # holds the lease, and the reconciliation asked for next finds the zone's models free.
            await workflow.execute_activity(
                ActivityName.HAND_BACK_LEASE,
                LeaseRelease(incident=lease.incident),
                result_type=StepReport,
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=REPORT_RETRY,
            )
        if rest:
            _record_outcomes(rest, outcomes.outcomes, result)

    async def _take_zone_lease(
        self, request: ZoneFailoverRequest, policy: DRPolicy, instances: list[Instance]
    ) -> LeaseRequest:
        """One zone-level lease for the whole zone, ``maxParallelFailovers`` slots (no more than the
        zone has serving instances); waits for the budget's grant when it cannot be granted at once."""
        lease = LeaseRequest(
            holder=workflow.info().workflow_id,
            incident=workflow.info().workflow_id,
            model="",
            zone=request.zone,
            kind=LeaseKind.ZONE,
            slots=min(policy.az_failover.max_parallel_failovers, len(instances)),
            covers=sorted({i.model for i in instances}),
        )
        answer: LeaseAnswer = await workflow.execute_activity(
            ActivityName.REQUEST_LEASE,
            lease,
            result_type=LeaseAnswer,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=REPORT_RETRY,
        )
        if not answer.granted:
            await workflow.wait_condition(lambda: self._lease_granted)
        return lease


def standby_zone_for(request: ZoneFailoverRequest, policy: DRPolicy) -> str | None:
    """The zone whose standbys the runbooks try first: the policy's standby zone, unless that is
    the zone failing over (the zone checks watch it too: serving moves there after an active
    zone's failover). Then none: the runbooks try the standbys in the active zones first."""
    standby = policy.az_failover.standby_zone
    return None if standby == request.zone else standby


async def _switch_in_batch(
    request: ZoneFailoverRequest,
    policy: DRPolicy,
    serving: list[Instance],
    lease: LeaseRequest,
    result: ZoneFailoverResult,
) -> list[Instance]:
    """Switch the zone's plain recoveries to their hot standbys in one batch (``SWITCH_IN_BATCH``):
    the plan (which switch, under which epochs) recorded first, then the switches, at most the
    policy's ``maxParallelSwitches`` at a time (a switch loads nothing: the lease's slots, which
    bound the runbooks that load, held 1,000 instances' switch to four at a time by default).
    Returns the serving instances left to their guardians: those the plan left, and those whose
    switch did not happen (a standby that did not answer, taken out; a newer runbook of the
    model). A plan that cannot be made leaves them all to the guardians."""
    reason = f"zone {request.zone} failover: {request.reason}"[:500]
    try:
        plan: ZoneSwitchPlan = await workflow.execute_activity(
            ActivityName.PLAN_ZONE_SWITCH,
            ZoneSwitchClaim(
                zone=request.zone,
                instances=[InstanceRef(model=i.model, instance=i.id) for i in serving],
                prefer_zone=standby_zone_for(request, policy),
                lease=lease.incident,
            ),
            result_type=ZoneSwitchPlan,
            start_to_close_timeout=REPORT_TIMEOUT,
            heartbeat_timeout=timedelta(seconds=10),
            retry_policy=RETRY,
        )
    except ActivityError as exc:
        workflow.logger.warning("zone %s: no batch (%s): every instance through its guardian", request.zone, exc)
        return serving
    if not plan.switches:
        return serving
    result.switching = [s.instance for s in plan.switches]  # progress: what the batch is doing
    outcomes: ZoneSwitchOutcomes = await workflow.execute_activity(
        ActivityName.SWITCH_ZONE_TO_HOT,
        ZoneSwitchBatch(
            switches=plan.switches,
            reason=reason,
            handled_by=workflow.info().workflow_id,
            at_once=policy.az_failover.max_parallel_switches,
        ),
        result_type=ZoneSwitchOutcomes,
        start_to_close_timeout=REPORT_TIMEOUT,
        heartbeat_timeout=timedelta(seconds=10),
        retry_policy=REPORT_RETRY,
    )
    result.switching = []
    switched = {d.instance: d for d in outcomes.done if d.switched}
    for instance in serving:
        done = switched.get(instance.id)
        if done is not None:
            result.moved.append(f"{instance.id} → {done.standby} ({FailoverOutcome.RECOVERED.value})")
            result.pending.remove(instance.id)
    return [i for i in serving if i.id not in switched]


def _reports(
    request: ZoneFailoverRequest,
    policy: DRPolicy,
    instances: list[Instance],
    lease: str | None = None,
) -> list[FailureReport]:
    """The zone failover's report of each of ``instances`` (their failure is the zone's: confirmed)."""
    reason = f"zone {request.zone} failover: {request.reason}"[:500]
    reporter = workflow.info().workflow_id
    return [
        FailureReport(
            request=FailoverRequest(
                model=i.model,
                instance=i.id,
                trigger=Trigger.ZONE_FAILOVER,
                confirmed=True,
                reason=reason,
                prefer_zone=standby_zone_for(request, policy),
            ),
            reporter=reporter,
            zone_level=True,
            lease=lease,
        )
        for i in instances
    ]


async def _followed_to_the_end(activity: str, arg: ReportBatch | RunbookIds) -> RunbookOutcomes:
    """The runbooks' ends, from an activity that follows them (heartbeating) until each has ended."""
    outcomes: RunbookOutcomes = await workflow.execute_activity(
        activity,
        arg,
        result_type=RunbookOutcomes,
        start_to_close_timeout=timedelta(hours=1),
        heartbeat_timeout=timedelta(seconds=10),
        retry_policy=REPORT_RETRY,
    )
    return outcomes


def _record_outcomes(serving: list[Instance], outcomes: list[RunbookOutcome], result: ZoneFailoverResult) -> None:
    for instance, end in zip(serving, outcomes, strict=True):
        line = f"{instance.id} → {end.promoted or '-'} ({end.outcome})"
        (result.moved if end.outcome == FailoverOutcome.RECOVERED.value else result.failed).append(line)
    result.pending = []


async def _cordon_side_by_side(gpus: list[str], reason: str) -> None:
    """Cordon ``gpus``, one activity each, side by side (each is idempotent): before ``CORDON_AT_ONCE``."""
    await asyncio.gather(
        *(
            workflow.execute_activity(
                ActivityName.CORDON_GPU,
                DrainGpuRequest(gpu=gpu, reason=reason),
                result_type=StepReport,
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=RETRY,
            )
            for gpu in gpus
        )
    )


async def _move_as_one_batch(
    request: ZoneFailoverRequest, policy: DRPolicy, serving: list[Instance], result: ZoneFailoverResult
) -> None:
    """Report every serving instance of the zone to its guardian in one activity per priority
    (critical models first), then follow all the runbooks in one more. The guardians' zone-level leases are what bounds
    the runbooks running at once: the budget starts them ``maxParallelFailovers`` at a time."""
    if not serving:
        return
    reports = _reports(request, policy, serving)
    rank = {m.name: m.priority.rank for m in policy.models}
    tickets: list[IncidentTicket] = []
    try:
        # One batch per priority, critical first: a batch's reports go out side by side, so only a
        # batch that has returned (its guardians have asked the budget) is surely ahead of the next.
        for _, batch in itertools.groupby(reports, key=lambda r: rank.get(r.request.model, 0)):
            reported: IncidentTickets = await workflow.execute_activity(
                ActivityName.REPORT_FAILURE,
                ReportBatch(reports=list(batch)),
                result_type=IncidentTickets,
                start_to_close_timeout=REPORT_TIMEOUT,
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=REPORT_RETRY,
            )
            tickets.extend(reported.tickets)
        outcomes = await _followed_to_the_end(
            ActivityName.AWAIT_RUNBOOKS,
            RunbookIds(tickets=tickets, at_once=policy.az_failover.max_parallel_failovers),
        )
    except ActivityError as exc:
        result.failed.extend(f"{i.id}: {exc}" for i in serving)
        result.pending = []
        return
    _record_outcomes(serving, outcomes.outcomes, result)


def _plan_lines(
    request: ZoneFailoverRequest, snapshot: FleetSnapshot, policy: DRPolicy, serving: list[Instance]
) -> list[str]:
    lines: list[str] = []
    if policy.az_failover.require_approval and not request.approved:
        lines.append("wait for an operator's approval (drctl approve / the Update 'approve')")
    gpus = [s.id for s in gpu_inventory(policy.gpu_pool) if s.zone == request.zone]
    lines.append(f"cordon {len(gpus)} GPU(s) of {request.zone}: {', '.join(gpus) or '-'}")
    for instance in serving:
        model = [i for i in snapshot.instances if i.model == instance.model]
        candidates = standby_candidates(model, instance.id, standby_zone_for(request, policy))
        hot = hot_switch(model, instance.id, request.zone, standby_zone_for(request, policy))
        if hot is not None:
            lines.append(f"switch {instance.id} to {hot.id} (hot, {hot.zone}) in the zone's batch")
            continue
        pick = next((c for c in candidates if c.zone != request.zone), candidates[0] if candidates else None)
        target = f"{pick.id} ({pick.role}, {pick.zone or '-'})" if pick else "no standby: an emergency instance"
        lines.append(f"report {instance.id} to guardian-{instance.model}: promote {target}")
    if serving:
        slots = min(policy.az_failover.max_parallel_failovers, len(serving))
        lines.append(f"budget: one zone-level lease for {len(serving)} runbook(s), {slots} at a time")
    lines.append("request reconciliation (standbys leave the cordoned zone)")
    return lines


@workflow.defn(name="ZoneFailbackWorkflow", failure_exception_types=[ValidationError])
class ZoneFailbackWorkflow:
    """Failback, only when asked (``drctl failback ZONE``): the zone's GPUs return to placement and
    reconciliation places standbys there again. Serving stays where the failover put it; moving it
    back would be another failover, which an operator starts deliberately if wanted."""

    @workflow.run
    async def run(self, request: ZoneFailoverRequest) -> ZoneFailbackResult:
        result = ZoneFailbackResult(zone=request.zone)
        snapshot, policy = await observe_fleet()
        cordoned = [
            slot.id
            for slot in gpu_inventory(policy.gpu_pool)
            if slot.zone == request.zone and slot.id in snapshot.cordoned_gpus
        ]
        if request.plan_only:
            result.plan = [
                f"uncordon {len(cordoned)} GPU(s) of {request.zone}: {', '.join(cordoned) or '- (none is cordoned)'}",
                "request reconciliation (standbys may be placed there again; serving stays where it is)",
            ]
            return result
        for gpu in cordoned:
            await workflow.execute_activity(
                ActivityName.UNCORDON_GPU,
                DrainGpuRequest(gpu=gpu, reason=f"zone {request.zone} failback"),
                result_type=StepReport,
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=RETRY,
            )
            result.uncordoned_gpus.append(gpu)
        result.reconcile = await request_reconcile(policy)
        return result
