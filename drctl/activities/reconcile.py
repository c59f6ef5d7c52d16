"""Activities of standby reconciliation, and the failover's request for one, on the Platform."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from temporalio import activity
from temporalio.client import Client, ScheduleOverlapPolicy, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from drctl.activities.failover import heartbeat_progress, log_step, with_heartbeats
from drctl.payloads import (
    RECONCILE_SCHEDULE_ID,
    ActivityName,
    BudgetState,
    ChangeBatch,
    ChangeOutcome,
    ChangeOutcomes,
    CordonGpusRequest,
    DrainGpuRequest,
    FleetSnapshot,
    InstanceChange,
    ModelRef,
    ReconcileAction,
    ReconcileActionKind,
    ReconcilePlan,
    ReconcileRequest,
    Role,
    StepReport,
    ZoneNames,
)
from drctl.platforms.base import BatchedChanges, KeepsIndexes, Platform, SeesHungNodes
from drctl.policies.reconcile import plan_pass
from drctl.telemetry.tracing import span
from drctl.temporal.incidents import (
    budget_state,
    busy_in,
    zone_failovers_running,
    zones_failing_over,
    zones_recovering,
)


def _elapsed_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


def _change(change: InstanceChange) -> dict[str, object]:
    """A reconcile action's span attributes."""
    action = change.action
    return {
        "model": action.model,
        "instance": action.instance,
        "tier": action.tier.value,
        "epoch": action.epoch,
        "gpu": action.gpu,
    }


def _step_fields(change: InstanceChange) -> dict[str, str | int | None]:
    """A reconcile action's log line keys (:func:`~drctl.activities.failover.log_step`)."""
    action = change.action
    return {"model": action.model, "instance": action.instance, "tier": action.tier.value, "epoch": action.epoch}


async def _platform_step(
    call: str, action: Awaitable[str], span_fields: Mapping[str, object], **log_fields: str | int | None
) -> StepReport:
    """One platform call as a step: inside its span ``platform.{call}``, timed, and logged when done
    (:func:`~drctl.activities.failover.log_step`)."""
    start = time.monotonic()
    with span(f"platform.{call}", span_fields):
        detail = await action
        report = StepReport(detail=detail, duration_ms=_elapsed_ms(start))
        log_step(call, report.duration_ms, detail, **log_fields)
    return report


CHANGE_ATTEMPTS = 3
"""Tries of one change of a batch, as the pass's retry policy gives a change of its own (``RETRY``
in ``drctl.workflows.reconcile``): a transient error is tried again after 0.5 s, then 1 s."""


def loads_a_model(action: ReconcileAction) -> bool:
    """A create or re-tier of a loaded tier: it reads a checkpoint and copies it to a GPU."""
    return action.kind != ReconcileActionKind.DELETE and action.tier != Role.COLD and action.node is not None


FirstTry = Callable[[list[ReconcileAction]], Awaitable[list[str | Exception]]]
"""Makes the first try of several changes at once: each one's detail, or the exception that failed it."""


async def applied_side_by_side(
    batch: ChangeBatch,
    change: Callable[[ReconcileAction], Awaitable[StepReport]],
    together: Callable[[ReconcileAction], FirstTry | None] = lambda _: None,
) -> ChangeOutcomes:
    """Each change of ``batch`` made with ``change``, side by side, at most ``loads_per_node`` of
    those that load a model on one node at once. One change that fails does not fail the others:
    its outcome says why, after ``CHANGE_ATTEMPTS`` tries, or at once for an error the platform
    calls final (non-retryable). Every change is idempotent and fenced by its model's epoch, so a
    retry of the whole batch (its worker died) redoes nothing that was done.

    ``together`` names, for an action, what makes the first try of all the batch's actions of its
    kind at once (the platform's :class:`~drctl.platforms.base.BatchedChanges`), which then keeps
    ``loads_per_node`` itself; None: the action is made on its own. Deletes go first, then
    creates, each kind at once; a change whose first try failed is tried again on its own."""
    node_gates: dict[str, asyncio.Semaphore] = {}

    def outcome(action: ReconcileAction, result: str | BaseException) -> ChangeOutcome | None:
        """The change's outcome, or None when it is to be tried again."""
        if isinstance(result, str):
            return ChangeOutcome(instance=action.instance, detail=result)
        if isinstance(result, ApplicationError) and result.non_retryable:
            return ChangeOutcome(instance=action.instance, error=str(result), error_type=result.type)
        return None

    async def tried(action: ReconcileAction, first: int = 1) -> ChangeOutcome:
        for attempt in range(first, CHANGE_ATTEMPTS + 1):
            try:
                report = await change(action)
            except ApplicationError as exc:
                if exc.non_retryable or attempt == CHANGE_ATTEMPTS:
                    return ChangeOutcome(instance=action.instance, error=str(exc), error_type=exc.type)
            except Exception as exc:  # one change's failure is its outcome, not the batch's
                if attempt == CHANGE_ATTEMPTS:
                    return ChangeOutcome(instance=action.instance, error=f"{type(exc).__name__}: {exc}")
            else:
                return ChangeOutcome(instance=action.instance, detail=report.detail)
            await asyncio.sleep(0.5 * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last attempt returns")

    async def one(action: ReconcileAction, first: int = 1) -> ChangeOutcome:
        if not loads_a_model(action):
            return await tried(action, first)
        assert action.node is not None
        async with node_gates.setdefault(action.node, asyncio.Semaphore(batch.loads_per_node)):
            return await tried(action, first)

    outcomes: dict[int, ChangeOutcome] = {}
    retried: list[int] = []
    alone: list[int] = []
    groups: dict[ReconcileActionKind, tuple[FirstTry, list[int]]] = {}
    for n, action in enumerate(batch.actions):
        maker = together(action)
        if maker is None:
            alone.append(n)
        else:
            groups.setdefault(action.kind, (maker, []))[1].append(n)
    for kind in sorted(groups, key=lambda k: k != ReconcileActionKind.DELETE):  # deletes free GPUs first
        maker, members = groups[kind]
        results = await maker([batch.actions[n] for n in members])
        for n, result in zip(members, results, strict=True):
            done = outcome(batch.actions[n], result)
            if done is None:
                retried.append(n)
            else:
                outcomes[n] = done
    if retried:
        await asyncio.sleep(0.5)
    made = await asyncio.gather(
        *(one(batch.actions[n]) for n in alone), *(one(batch.actions[n], first=2) for n in retried)
    )
    outcomes.update(zip([*alone, *retried], made, strict=True))
    return ChangeOutcomes(outcomes=[outcomes[n] for n in range(len(batch.actions))])


class ReconcileActivities:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.observe_fleet,
            self.plan_reconcile,
            self.create_instance,
            self.retier_instance,
            self.delete_instance,
            self.apply_changes,
            self.request_reconcile,
            await_reconcile_pass,
            self.await_zone_failovers,
            self.cordon_gpu,
            self.cordon_gpus,
            self.uncordon_gpu,
        ]

    @activity.defn(name=ActivityName.AWAIT_ZONE_FAILOVERS)
    async def await_zone_failovers(self, names: ZoneNames) -> StepReport:
        """:func:`await_zone_failovers`, ending too when the platform's cordons change."""
        return await await_zone_failovers(names, self.platform.cordoned_gpus)

    @activity.defn(name=ActivityName.OBSERVE_FLEET)
    async def observe_fleet(self) -> FleetSnapshot:
        """The fleet now, heartbeating while the platform answers (the callers set a short
        heartbeat timeout: a worker that dies holding this is noticed in seconds, not at the
        start-to-close timeout)."""
        return await with_heartbeats(self._observe())

    async def _observe(self) -> FleetSnapshot:
        """The epochs first, then the models busy with a recovery, then the instances. In this
        order a runbook is either busy here (its model skipped), or it claimed its epoch after the
        epochs were read (every action on its model refused as stale), or it ended before the
        instances were read (they show what it did). Read the other way round (the nemesis, seed 3:
        a worker restart made the budget's answer take 0.5 s), the instances showed a hot standby
        a runbook was ejecting that moment, the busy models showed the runbook ended, the epoch was
        the runbook's own, and reconciliation deleted the ejected standby as misplaced."""
        epochs = await self.platform.epochs()
        client, queue = activity.client(), activity.info().task_queue
        budget = await budget_state(client, queue)
        failing_over = await _zones_failing_over(client, queue, budget)
        policy = await self.platform.current_policy()
        return FleetSnapshot(
            policy=policy.model_dump(mode="json", by_alias=True),
            instances=await self.platform.all_instances(),
            cordoned_gpus=await self.platform.cordoned_gpus(),
            hung_gpus=await self.platform.hung_gpus() if isinstance(self.platform, SeesHungNodes) else [],
            highest_indexes=await self.platform.highest_indexes() if isinstance(self.platform, KeepsIndexes) else {},
            epochs=epochs,
            busy_models=busy_in(budget),
            zones_failing_over=failing_over,
        )

    @activity.defn(name=ActivityName.PLAN_RECONCILE)
    async def plan_reconcile(self, request: ReconcileRequest) -> ReconcilePlan:
        """Observe the fleet and plan the pass (pure: ``plan_pass``); only the plan goes into the
        workflow's history, however large the fleet."""
        snapshot = await self.observe_fleet()
        with span("plan_reconcile", instances=len(snapshot.instances)):
            # In a thread: at 1,000 instances a plan is CPU for a second or more, which on the
            # event loop held every other activity and workflow task of this worker. Heartbeating
            # meanwhile: at 2,000 instances on a loaded machine a plan of every model took longer
            # than the heartbeat timeout, and every try of it timed out.
            return await with_heartbeats(asyncio.to_thread(plan_pass, snapshot, request.models))

    @activity.defn(name=ActivityName.CORDON_GPU)
    async def cordon_gpu(self, request: DrainGpuRequest) -> StepReport:
        return await _platform_step(
            "cordon_gpu", self.platform.cordon_gpu(request.gpu, request.reason), {"gpu": request.gpu}, gpu=request.gpu
        )

    @activity.defn(name=ActivityName.CORDON_GPUS)
    async def cordon_gpus(self, request: CordonGpusRequest) -> StepReport:
        """Every GPU of ``request`` cordoned, in turn, in this one activity, heartbeating (each
        cordon is idempotent: a retry finds the ones done). A zone failover cordons its zone so; as
        one activity per GPU side by side, one of a zone's 32 tasks was once not done for the
        activity's whole 30 s timeout, and the zone's switch waited for it (``zone_bench.py``,
        fourteenth session)."""

        async def every_gpu() -> str:
            for gpu in request.gpus:
                await self.platform.cordon_gpu(gpu, request.reason)
            return f"{len(request.gpus)} GPU(s) cordoned: kept out of placement"

        cordoning = with_heartbeats(every_gpu(), every_s=1.0)
        return await _platform_step("cordon_gpus", cordoning, {"gpus": len(request.gpus)})

    @activity.defn(name=ActivityName.CREATE_INSTANCE)
    async def create_instance(self, change: InstanceChange) -> StepReport:
        return await _platform_step(
            "create_instance",
            self.platform.create_instance(change.action, heartbeat_progress),
            _change(change),
            **_step_fields(change),
        )

    @activity.defn(name=ActivityName.RETIER_INSTANCE)
    async def retier_instance(self, change: InstanceChange) -> StepReport:
        return await _platform_step(
            "retier_instance",
            self.platform.retier_instance(change.action, heartbeat_progress),
            _change(change),
            **_step_fields(change),
        )

    @activity.defn(name=ActivityName.DELETE_INSTANCE)
    async def delete_instance(self, change: InstanceChange) -> StepReport:
        return await _platform_step(
            "delete_instance", self.platform.delete_instance(change.action), _change(change), **_step_fields(change)
        )

    @activity.defn(name=ActivityName.APPLY_CHANGES)
    async def apply_changes(self, batch: ChangeBatch) -> ChangeOutcomes:
        """A batch of a pass's changes side by side (:func:`applied_side_by_side`), heartbeating.

        Why a batch: after a zone failover a pass has hundreds of changes, each taking tens of
        milliseconds. As an activity each, their orchestration (schedule, poll, complete, a workflow
        task) was most of the pass's time, and took the machine from the zone's recoveries."""
        return await with_heartbeats(applied_side_by_side(batch, self._change, self._together(batch)))

    def _together(self, batch: ChangeBatch) -> Callable[[ReconcileAction], FirstTry | None]:
        """Where the platform makes many creates or deletes at once (the local platform: one write
        of its registry for all), the batch's creates and deletes go to it together."""
        platform = self.platform
        if not isinstance(platform, BatchedChanges):
            return lambda _: None

        async def creates(actions: list[ReconcileAction]) -> list[str | Exception]:
            return await self._logged(
                "create_instances",
                actions,
                platform.create_instances(actions, heartbeat_progress, batch.loads_per_node),
            )

        async def deletes(actions: list[ReconcileAction]) -> list[str | Exception]:
            return await self._logged("delete_instances", actions, platform.delete_instances(actions))

        makers: dict[ReconcileActionKind, FirstTry] = {
            ReconcileActionKind.CREATE: creates,
            ReconcileActionKind.DELETE: deletes,
        }
        return lambda action: makers.get(action.kind)

    @staticmethod
    async def _logged(
        call: str, actions: list[ReconcileAction], made: Awaitable[list[str | Exception]]
    ) -> list[str | Exception]:
        """Several changes made at once as one step: in one span ``platform.{call}``, and a log line
        for each change, as a change made on its own has (:func:`_platform_step`)."""
        start = time.monotonic()
        with span(f"platform.{call}", {"changes": len(actions)}):
            results = await made
        duration_ms = _elapsed_ms(start)
        for action, result in zip(actions, results, strict=True):
            detail = result if isinstance(result, str) else f"failed: {type(result).__name__}: {result}"
            log_step(
                call.removesuffix("s"), duration_ms, detail,
                model=action.model, instance=action.instance, tier=action.tier.value, epoch=action.epoch,
            )  # fmt: skip
        return results

    async def _change(self, action: ReconcileAction) -> StepReport:
        call = {
            ReconcileActionKind.CREATE: self.create_instance,
            ReconcileActionKind.RETIER: self.retier_instance,
            ReconcileActionKind.DELETE: self.delete_instance,
        }[action.kind]
        return await call(InstanceChange(action=action))

    @activity.defn(name=ActivityName.UNCORDON_GPU)
    async def uncordon_gpu(self, request: DrainGpuRequest) -> StepReport:
        return await _platform_step(
            "uncordon_gpu", self.platform.uncordon_gpu(request.gpu), {"gpu": request.gpu}, gpu=request.gpu
        )

    @activity.defn(name=ActivityName.REQUEST_RECONCILE)
    async def request_reconcile(self, ref: ModelRef) -> StepReport:
        """Run the reconciliation schedule now (after a failover used up a standby).

        Triggered through the schedule, so its overlap policy holds: a run already going is not
        doubled; one more is buffered to start after it.
        """
        start = time.monotonic()
        handle = activity.client().get_schedule_handle(RECONCILE_SCHEDULE_ID)
        try:
            await handle.trigger(overlap=ScheduleOverlapPolicy.BUFFER_ONE)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            return StepReport(
                detail="no reconcile schedule (drctl up creates it); not replenished", duration_ms=_elapsed_ms(start)
            )
        # The pass replenishes every model, not only the one named (a zone failover names its first):
        # "triggered for llama-2-7b's standbys" after a zone failover read as the only model seen to.
        return StepReport(
            detail="reconciliation triggered: a pass over every model's standbys", duration_ms=_elapsed_ms(start)
        )


@activity.defn(name=ActivityName.AWAIT_RECONCILE_PASS)
async def await_reconcile_pass(workflow_id: str) -> StepReport:
    """Wait until the reconciliation pass now running (if any) has closed, heartbeating; the
    reconcile run that found it going then starts its own pass. Idempotent: a retry waits again."""
    start = time.monotonic()
    client = activity.client()
    try:
        described = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return StepReport(detail="no pass running", duration_ms=_elapsed_ms(start))
    if described.status != WorkflowExecutionStatus.RUNNING:
        return StepReport(detail="the pass had ended", duration_ms=_elapsed_ms(start))
    closed = asyncio.ensure_future(client.get_workflow_handle(workflow_id, run_id=described.run_id).result())
    try:
        while not closed.done():
            activity.heartbeat()
            await asyncio.wait({closed}, timeout=1.0)
    finally:
        closed.cancel()
        with contextlib.suppress(BaseException):
            await closed  # its outcome is the other pass's business: only its end matters here
    return StepReport(detail=f"waited for pass {described.run_id} to end", duration_ms=_elapsed_ms(start))


async def _zones_failing_over(client: Client, queue: str, budget: BudgetState | None) -> list[str]:
    """Zones failing over: their failover's lease runs, or their ``ZoneFailoverWorkflow`` does (from
    its start, before it has asked the budget), each for at most ``ZONE_FAILOVER_FIRST_FOR``."""
    now = datetime.now(UTC)
    return sorted(set(zones_failing_over(budget, now)) | await zone_failovers_running(client, queue, now))


ZONE_FAILOVER_POLL_S = 0.5
ZONE_RECOVERIES_WAIT_S = 30.0
"""After a zone failover's lease is handed back, how long more to wait for the zone's recoveries
that the budget held behind it (the prober's reports of the zone's standbys): each keeps its model
busy, so a pass planned beside them leaves those models for a pass after it, one after another."""


async def await_zone_failovers(
    names: ZoneNames, cordoned_now: Callable[[], Awaitable[Iterable[str]]] | None = None
) -> StepReport:
    """Wait until none of ``names.zones`` is failing over (its failover's lease handed back to the
    budget, or held past ``ZONE_FAILOVER_FIRST_FOR``), then until the zone's recoveries held behind
    that lease have ended (at most ``ZONE_RECOVERIES_WAIT_S`` more); asking the budget every half
    second and heartbeating. Idempotent: a retry asks again.

    With ``names.cordoned`` and ``cordoned_now`` (the platform's cordons), it also ends as soon as
    the cordoned GPUs differ from those the pass planned with: a pass that planned after a zone
    failover's workflow started but before it cordoned the zone saw the zone's standbys on usable
    GPUs, planned nothing for them and, waiting, kept every other pass from replacing them during
    the outage; the prober then reported all of them at its end, one runbook each, and redundancy
    came back at 86 s instead of ~36 s (bench/zone_bench.py, 1,000 instances). Planning again on the
    cordon deletes them then, as a pass planned after the cordon does."""
    start = time.monotonic()
    lease_back_at: float | None = None
    client, queue = activity.client(), activity.info().task_queue
    zones = set(names.zones)
    planned_with = set(names.cordoned) if names.cordoned is not None else None
    while True:
        if planned_with is not None and cordoned_now is not None:
            changed = set(await cordoned_now()) ^ planned_with
            if changed:
                return StepReport(
                    detail=f"{len(changed)} GPU(s) cordoned or returned since the plan: planning again",
                    duration_ms=_elapsed_ms(start),
                )
        budget = await budget_state(client, queue)
        if zones & set(await _zones_failing_over(client, queue, budget)):
            activity.heartbeat("zone failover running")
        else:
            lease_back_at = lease_back_at or time.monotonic()
            held = zones & zones_recovering(budget)
            if not held or time.monotonic() - lease_back_at > ZONE_RECOVERIES_WAIT_S:
                also = f", then {time.monotonic() - lease_back_at:.1f}s for its recoveries"
                return StepReport(
                    detail=f"zone failover of {', '.join(names.zones)} ended{also}", duration_ms=_elapsed_ms(start)
                )
            activity.heartbeat("the zone's recoveries running")
        await asyncio.sleep(ZONE_FAILOVER_POLL_S)
