"""FailoverWorkflow: the seed's failover sequence (seed §4.3) as a durable runbook.

confirm → eject → pick standby (hot, warm, cold) → promote → load → register → verify → record.

Every step is an activity called by name, so the same workflow runs against the local platform,
Kubernetes, or fakes in tests. When the failed instance is the last one serving its model, the
eject waits until the replacement has been verified (``FailoverResult.eject_deferred``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError, FailureError
from temporalio.exceptions import TimeoutError as TemporalTimeoutError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ValidationError

    from drctl.payloads import (
        ActivityName,
        AlertResolved,
        EjectRequest,
        ErrorType,
        FailoverOutcome,
        FailoverRequest,
        FailoverResult,
        FailureReport,
        FleetSnapshot,
        IncidentTickets,
        Instance,
        InstanceChange,
        InstanceList,
        InstanceRef,
        ModelRef,
        ProbeResult,
        ReconcileActionKind,
        RegisterRequest,
        ReportBatch,
        Role,
        RunbookIds,
        RunbookOutcomes,
        SearchAttr,
        StepReport,
        StepTiming,
        SwitchRecord,
        Trigger,
        unknown_instance_message,
    )
    from drctl.policies.reconcile import plan_emergency
    from drctl.policies.schema import DRPolicy
    from drctl.policies.standby import FailoverPlan, must_defer_eject, plan_failover, standby_candidates

R = TypeVar("R", bound=BaseModel)

MODEL_KEY = SearchAttributeKey.for_keyword(SearchAttr.MODEL)
INSTANCE_KEY = SearchAttributeKey.for_keyword(SearchAttr.INSTANCE)
TRIGGER_KEY = SearchAttributeKey.for_keyword(SearchAttr.TRIGGER)
OUTCOME_KEY = SearchAttributeKey.for_keyword(SearchAttr.OUTCOME)
TIER_KEY = SearchAttributeKey.for_keyword(SearchAttr.TIER)
RTO_KEY = SearchAttributeKey.for_int(SearchAttr.RTO_MS)

FINAL_ERRORS = [
    ErrorType.UNKNOWN_INSTANCE,
    ErrorType.UNKNOWN_MODEL,
    ErrorType.MODEL_LOAD_FAILED,
    ErrorType.NOT_A_STANDBY,
    ErrorType.INSTANCE_FAILED,
    ErrorType.CHECKPOINT_CORRUPT,
    ErrorType.STALE_EPOCH,
]

QUICK = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=2),
    maximum_attempts=3,
    non_retryable_error_types=FINAL_ERRORS,
)
"""Steps against the platform are short; three tries, then the workflow decides (next standby)."""

ONE_TRY = RetryPolicy(maximum_attempts=1)
DECISION_INPUT_PERSISTED = "failover-listing-as-activity"
"""Patch id: runs started before the listing became a regular activity replay without it."""
GONE_INSTANCE_SETTLES = "failover-gone-instance-settles"
"""Patch: a detector's report of an instance that no longer exists when its runbook lists the
fleet ends ``already-ejected`` (reconciliation replaced it while the report waited: the standbys
of a failed zone, seen in a zone outage of 100 instances) instead of failing ``UnknownInstance``,
which made every zone outage a row of failed runbooks. A manual start still fails on a wrong id."""
STANDBY_EJECTED_REPLENISHES = "failover-standby-ejected-replenishes"
"""Patch: a runbook that ejects a failed standby asks reconciliation to replace it (``replenish``),
as a promotion does. Before, nothing did until the schedule's next pass: in a zone outage the
zone failover's own request for reconciliation could run while the prober's standby runbooks were
still in flight (their models skipped as busy), and redundancy came back up to 30 s later (at 100
instances, 7.5 s or 26.7 s by that race). Runs from before end without asking."""
PREFERS_ACTIVE_ZONES = "failover-prefers-active-zones"
"""Patch: an ordinary failover (no ``prefer_zone``) in an active-passive policy tries, within a
tier, the standbys in the active zones (``InstanceList.serving_zones``) first, so the standby it
promotes serves where the zone checks watch (:func:`standby_candidates`). Runs from before order
their standbys as they did, whatever their listing says."""
DIRECT_START_CHECKS_INPUT = "failover-direct-start-checks-input"
"""Patch: a run started directly (the Temporal UI or CLI, no epoch) lists the model before it
reports to the guardian: an unknown model, or a manual report of an instance the model does not
have, fails the run at once with the platform's message, as ``drctl failover`` refuses it. Before,
an unknown model's guardian failed and this run followed it for up to an hour, and an unknown
instance's runbook failed while this run ended ``joined``, the error left in its reason."""
ZONE_FAILOVER_REPLENISHES = "failover-zone-failover-replenishes-once"
"""Patch: a runbook the zone failover reported (``Trigger.ZONE_FAILOVER``) does not trigger the
reconcile schedule itself: the zone failover asks for reconciliation once, after the last of its
runbooks, and no pass makes the zone's models new standbys before then (the budget keeps them
busy). Each trigger is a signal and a workflow task of the schedule's own workflow in the
Temporal server: 250 of them in a zone of 1,000 instances, for nothing. Runs from before trigger
it as they did."""
MUTATING = frozenset(
    {
        ActivityName.EJECT_INSTANCE,
        ActivityName.PROMOTE_STANDBY,
        ActivityName.LOAD_MODEL,
        ActivityName.REGISTER_INSTANCE,
        ActivityName.VERIFY_SERVING,
        ActivityName.REQUEST_RECONCILE,
        ActivityName.CREATE_INSTANCE,
        ActivityName.DELETE_INSTANCE,
        ActivityName.RESTORE_CHECKPOINT,
    }
)
"""Steps a plan (``plan_only``) lists instead of running."""
JOINED_LISTED = 20
"""Reports that joined a run listed in its result (``joined_total`` counts them all)."""
HOT_CHECK_TIMEOUT = timedelta(seconds=3)
"""How long a hot standby may take to show it is loaded (it is, unless it is down)."""

STEP_TIMEOUTS = {
    ActivityName.OBSERVE_FLEET: timedelta(seconds=30),
    ActivityName.DELETE_INSTANCE: timedelta(seconds=30),
    ActivityName.CREATE_INSTANCE: timedelta(minutes=10),
    ActivityName.REQUEST_RECONCILE: timedelta(seconds=10),
    ActivityName.PROBE_INSTANCE: timedelta(seconds=10),
    ActivityName.LIST_INSTANCES: timedelta(seconds=10),
    ActivityName.EJECT_INSTANCE: timedelta(seconds=20),
    ActivityName.PROMOTE_STANDBY: timedelta(seconds=60),
    ActivityName.LOAD_MODEL: timedelta(minutes=10),
    ActivityName.RESTORE_CHECKPOINT: timedelta(minutes=10),
    ActivityName.REGISTER_INSTANCE: timedelta(seconds=20),
    ActivityName.VERIFY_SERVING: timedelta(seconds=45),
    ActivityName.REPORT_FAILURE: timedelta(seconds=30),
    ActivityName.AWAIT_RUNBOOKS: timedelta(hours=1),
}
HEARTBEAT_TIMEOUTS = {
    ActivityName.LOAD_MODEL: timedelta(seconds=3),
    ActivityName.VERIFY_SERVING: timedelta(seconds=3),
    ActivityName.LIST_INSTANCES: timedelta(seconds=1),
    ActivityName.PROBE_INSTANCE: timedelta(seconds=1),
    ActivityName.CREATE_INSTANCE: timedelta(seconds=5),
    ActivityName.AWAIT_RUNBOOKS: timedelta(seconds=10),
}
"""Both heartbeat every ~50 ms: a worker that dies mid-step is noticed within seconds, and the step
is retried on another (or the restarted) worker."""


STEP_ERRORS = (ActivityError, ApplicationError, TemporalTimeoutError)
"""How a step fails once its retries are spent: regular activities raise ``ActivityError``; local
activities surface the activity's own ``ApplicationError`` or a timeout."""


def why_failed(err: FailureError) -> str:
    cause = err.cause if isinstance(err, ActivityError) and err.cause else err
    if isinstance(cause, TemporalTimeoutError) and cause.type is not None:
        return f"{cause.type.name.lower().replace('_', '-')} timeout"  # rather than just "Timeout"
    return str(cause)


def error_type(err: FailureError) -> str | None:
    """The ``ApplicationError`` type behind a failed step (regular or local activity), if any."""
    cause = err.cause if isinstance(err, ActivityError) else err
    return cause.type if isinstance(cause, ApplicationError) else None


def _utc(moment: datetime) -> datetime:
    """``moment`` comparable with any other: one without a zone is taken as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _ms(delta: timedelta) -> float:
    return round(delta.total_seconds() * 1000, 1)


def rto_ms(failed_at: datetime | None, started: datetime, verified: datetime) -> float:
    """From the failure to the replacement verified. A failure cannot start after its recovery did:
    one reported later (an alert's startsAt in the future, a clock ahead) or not at all counts from
    the recovery's start, not as an RTO of 0."""
    start = _utc(started)
    failure_start = min(_utc(failed_at), start) if failed_at else start
    return max(0.0, _ms(_utc(verified) - failure_start))


def switch_record_rto_ms(request: FailoverRequest, switched: SwitchRecord) -> float:
    """A batched switch's RTO: :func:`rto_ms` from the batch's claim of the model's epoch."""
    return rto_ms(request.failed_at, switched.started_at, switched.verified_at)


def switch_record_attributes(request: FailoverRequest, switched: SwitchRecord) -> list[SearchAttributeUpdate[Any]]:
    """The search attributes of a batched switch's record, set with its start: what an ordinary
    runbook upserts as it goes (model, instance, trigger, outcome, tier, RTO)."""
    return [
        MODEL_KEY.value_set(request.model),
        INSTANCE_KEY.value_set(request.instance),
        TRIGGER_KEY.value_set(request.trigger.value),
        OUTCOME_KEY.value_set(FailoverOutcome.RECOVERED.value),
        TIER_KEY.value_set(switched.tier.value),
        RTO_KEY.value_set(int(switch_record_rto_ms(request, switched))),
    ]


@workflow.defn(name="FailoverWorkflow", failure_exception_types=[ValidationError])
class FailoverWorkflow:
    """One failover per failed instance (workflow ID ``failover-{model}-{instance}``), run by the
    model's guardian (:mod:`drctl.workflows.guardian`) with a fencing epoch.

    Started directly without an epoch (the Temporal UI, ``temporal workflow start``), it reports the
    failure to the guardian and follows the runbook the guardian runs for it, ending ``joined``:
    one failure still gets one recovery. With ``plan_only`` it runs the same decisions and lists
    the steps it would take, changing nothing.

    Input that does not validate (say, JSON typed into the UI without ``instance``) fails the run at
    once with pydantic's message, instead of retrying the workflow task forever.
    """

    def __init__(self) -> None:
        self._result: FailoverResult | None = None
        self._local_activities = True
        self._alert_resolved: AlertResolved | None = None
        self._verified_at: datetime | None = None
        self._joined: list[str] = []
        self._joined_total = 0
        self._epoch: int | None = None
        self._plan_only = False

    @workflow.signal(name="joined")
    def joined(self, reporter: str) -> None:
        """Another report of this failure (an alert, the CLI, a zone check) joined this run."""
        self._joined_total += 1
        if len(self._joined) < JOINED_LISTED:
            self._joined.append(reporter[:200])
        if self._result is not None:
            self._result.joined, self._result.joined_total = list(self._joined), self._joined_total

    @workflow.signal(name="alert_resolved")
    def alert_resolved(self, resolved: AlertResolved) -> None:
        """The alert behind this run resolved. Recorded; the confirm probe still decides."""
        self._alert_resolved = resolved
        if self._result is not None:
            self._result.alert_resolved = resolved

    @workflow.query(name="progress")
    def progress(self) -> FailoverResult | None:
        """The steps done so far; ``drctl failover`` polls this to show progress."""
        return self._result

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        try:
            return await self._run(request)
        except STEP_ERRORS as err:
            # The run fails, but its outcome is still searchable.
            if self._result is not None:
                self._result.outcome = FailoverOutcome.FAILED
                self._result.reason = why_failed(err)
            workflow.upsert_search_attributes([OUTCOME_KEY.value_set(FailoverOutcome.FAILED.value)])
            raise

    async def _run(self, request: FailoverRequest) -> FailoverResult:
        self._local_activities = request.local_activities
        self._epoch = request.epoch
        self._plan_only = request.plan_only
        if request.joined or request.joined_total:  # joined before the start (the guardian says)
            self._joined = [*(reporter[:200] for reporter in request.joined), *self._joined][:JOINED_LISTED]
            self._joined_total += max(request.joined_total, len(request.joined))
        started = workflow.now()
        result = FailoverResult(
            model=request.model,
            instance=request.instance,
            outcome=FailoverOutcome.RUNNING,
            reason=request.reason,
            started_at=started,
            alert_resolved=self._alert_resolved,
            epoch=request.epoch,
            joined=list(self._joined),
            joined_total=self._joined_total,
        )
        self._result = result
        if request.switched is not None and not request.plan_only:
            return self._record_switch(request, request.switched)
        workflow.upsert_search_attributes(
            [
                MODEL_KEY.value_set(request.model),
                INSTANCE_KEY.value_set(request.instance),
                TRIGGER_KEY.value_set(request.trigger.value),
                OUTCOME_KEY.value_set(FailoverOutcome.RUNNING.value),
            ]
        )
        if request.epoch is None and not request.plan_only:
            return await self._hand_to_guardian(request)
        ref = InstanceRef(model=request.model, instance=request.instance)

        if request.confirmed and not self._reported_before_it_existed(request):
            now = workflow.now()
            self._record(
                "confirm", now, now, None, True, f"skipped: failure established by the caller ({request.trigger})"
            )
            probe = ProbeResult(instance=request.instance, healthy=False, detail="confirmed by caller", duration_ms=0)
        else:
            # With the listing from the start, nothing else would record a decision input before
            # the first change: the probe goes as a regular activity then (see ``_confirm_recorded``).
            probe = await self._step(
                "confirm", ActivityName.PROBE_INSTANCE, ref, ProbeResult, long=self._confirm_recorded(request)
            )
        if probe.healthy:
            return self._finish(FailoverOutcome.FALSE_ALARM, f"instance is healthy: {probe.detail}")

        listing = await self._list(request)
        if not any(i.id == request.instance for i in listing.instances):
            if request.trigger != Trigger.MANUAL and self._gone_settles():
                # A detector's report that waited (for the budget, behind the model's earlier
                # incident) while reconciliation replaced the instance: nothing is left to do.
                return self._finish(
                    FailoverOutcome.ALREADY_EJECTED,
                    f"{request.instance} no longer exists: removed since it was reported (reconciliation replaced it)",
                )
            raise ApplicationError(
                f"instance {request.instance} is not an instance of {request.model}",
                type=ErrorType.UNKNOWN_INSTANCE,
                non_retryable=True,
            )
        eject = EjectRequest(model=request.model, instance=request.instance, reason=request.reason, epoch=request.epoch)
        plan = plan_failover(listing.instances, request.instance)
        if plan == FailoverPlan.NOTHING:
            return self._finish(FailoverOutcome.ALREADY_EJECTED, "already failed and ejected by an earlier failover")
        if plan == FailoverPlan.EJECT_ONLY:
            await self._step("eject", ActivityName.EJECT_INSTANCE, eject, StepReport)
            if not self._plan_only and self._standby_ejected_replenishes():
                await self._replenish(request)
            return self._finish(FailoverOutcome.STANDBY_EJECTED, "a standby failed: ejected, nothing to promote")
        result.eject_deferred = must_defer_eject(listing.instances, request.instance)
        if not result.eject_deferred:
            await self._step("eject", ActivityName.EJECT_INSTANCE, eject, StepReport)

        candidates = standby_candidates(
            listing.instances, request.instance, request.prefer_zone, self._active_zones(request, listing)
        )
        self._record("pick", workflow.now(), workflow.now(), None, True, self._describe(candidates))
        promoted = await self._promote_first_that_works(candidates)
        if promoted is None:
            promoted = await self._emergency_instance(request)
        if promoted is None:
            # Nothing replaced it: leave a last serving instance registered (its health check
            # keeps traffic off it while it is down) and report.
            return self._finish(FailoverOutcome.NO_STANDBY, "no standby could be promoted")
        if result.eject_deferred:
            await self._step("eject", ActivityName.EJECT_INSTANCE, eject, StepReport)
        if self._plan_only:
            return self._finish(FailoverOutcome.PLANNED, f"would promote {promoted.id} ({promoted.role})")

        verified_at = self._verified_at or workflow.now()
        result.promoted = promoted.id
        result.tier = None if result.emergency else promoted.role
        result.switch_ms = _ms(verified_at - started)
        result.rto_ms = rto_ms(request.failed_at, started, verified_at)
        workflow.upsert_search_attributes(
            [
                TIER_KEY.value_set("emergency" if result.emergency else promoted.role.value),
                RTO_KEY.value_set(int(result.rto_ms)),
            ]
        )
        await self._replenish(request)
        how = "an emergency instance" if result.emergency else str(promoted.role)
        return self._finish(FailoverOutcome.RECOVERED, f"{promoted.id} ({how}) serves {request.model}")

    def _record_switch(self, request: FailoverRequest, switched: SwitchRecord) -> FailoverResult:
        """A zone failover's batch switched the model already (``drctl.activities.zone_switch``):
        this run is its record, with the batch's steps and timings, and changes nothing. Its search
        attributes came with its start (:func:`switch_record_attributes`): it upserts none, so
        the record is one workflow task. Its times are the switch's own: it started when the batch
        claimed the model's epoch and ended with its last step, whenever the record itself ran."""
        assert self._result is not None
        result = self._result
        start = _utc(switched.started_at)
        ends = [_utc(s.started_at) + timedelta(milliseconds=s.duration_ms) for s in switched.steps]
        result.started_at = switched.started_at
        result.finished_at = max([_utc(switched.verified_at), *ends])
        result.epoch = switched.epoch
        result.steps = list(switched.steps)
        result.handled_by = switched.handled_by
        result.promoted = switched.standby
        result.tier = switched.tier
        result.switch_ms = _ms(switched.verified_at - switched.started_at)
        result.rto_ms = switch_record_rto_ms(request, switched)
        activity_total = sum(s.activity_ms or 0.0 for s in result.steps)
        result.orchestration_ms = round(max(0.0, _ms(result.finished_at - start) - activity_total), 1)
        result.outcome = FailoverOutcome.RECOVERED
        result.reason = (
            f"{switched.standby} ({switched.tier}) serves {request.model}: switched in the batch of "
            f"{switched.handled_by}, with the rest of its zone"
        )
        return result

    def _reported_before_it_existed(self, request: FailoverRequest) -> bool:
        """Whether the instance of the claimed listing was made after the failure reported: the
        report was of an earlier instance of the same id (reconciliation reuses the id of the
        model's last instance when it replaces it), which waited (for the budget, behind a zone
        failover) while it was replaced. Such a report is probed like one not confirmed: the
        healthy replacement ends it ``false-alarm`` rather than being ejected. Before, in the
        1,000-instance zone outage, the prober's reports of the zone's standbys ejected dozens of
        their healthy replacements. Data-driven: a listing without creation times (recorded before
        they were kept) never says so."""
        claimed = self._claimed_listing(request)
        if claimed is None or request.failed_at is None:
            return False
        made = next((i.created_at for i in claimed.instances if i.id == request.instance), None)
        if made is None or _utc(made) <= _utc(request.failed_at):
            return False
        workflow.logger.info(
            "%s was made at %s, after the failure reported (%s): probing it first",
            request.instance,
            made.isoformat(),
            request.failed_at.isoformat(),
        )
        return True

    def _gone_settles(self) -> bool:
        return workflow.patched(GONE_INSTANCE_SETTLES)

    def _direct_start_checks_input(self) -> bool:
        return workflow.patched(DIRECT_START_CHECKS_INPUT)

    def _zone_failover_replenishes_once(self) -> bool:
        return workflow.patched(ZONE_FAILOVER_REPLENISHES)

    def _standby_ejected_replenishes(self) -> bool:
        return workflow.patched(STANDBY_EJECTED_REPLENISHES)

    def _active_zones(self, request: FailoverRequest, listing: InstanceList) -> list[str]:
        """The zones whose standbys go first within a tier: the listing's ``serving_zones`` (an
        active-passive policy's active zones) in an ordinary failover. None in a zone failover,
        whose ``prefer_zone`` (the standby zone) orders it as before, and none when the policy has
        no zone roles: the patch is asked (and its marker recorded) only where it can matter."""
        if request.prefer_zone is not None or not listing.serving_zones:
            return []
        return listing.serving_zones if self._prefers_active_zones() else []

    def _prefers_active_zones(self) -> bool:
        return workflow.patched(PREFERS_ACTIVE_ZONES)

    def _confirm_recorded(self, request: FailoverRequest) -> bool:
        """Whether the confirm probe must be a regular activity: when the listing came with the
        run's start (``_claimed_listing``) and the steps are local activities. Local activities are
        recorded only when their workflow task completes, and without the listing step nothing
        ends the first task before the changes begin: a task run again (its completion refused for
        a ``joined`` signal, or its worker dead) would probe again an instance the first attempt
        had already ejected and replaced, and could end ``false-alarm`` with the promotion in no
        audit. A report that established the failure (``confirmed``: the prober, a zone failover, a
        drain) has no probe, and runs every step in one workflow task."""
        return self._local_activities and not self._plan_only and self._claimed_listing(request) is not None

    @staticmethod
    def _claimed_listing(request: FailoverRequest) -> InstanceList | None:
        """The listing the guardian claimed with the epoch, if this run has one for its model."""
        claimed = request.listing
        if claimed is not None and request.epoch is not None and claimed.model == request.model:
            return claimed
        return None

    async def _list(self, request: FailoverRequest) -> InstanceList:
        """The listing the guardian claimed with the epoch (``request.listing``, recorded in this
        run's start), or the runbook's own ``list`` step when there is none (a run from before, a
        listing that failed at the claim, a run started directly with an epoch)."""
        claimed = self._claimed_listing(request)
        if claimed is not None:
            now = workflow.now()
            self._record("list", now, now, claimed.duration_ms, True, "listed with the epoch claim")
            return claimed
        return await self._list_step(request.model)

    async def _list_step(self, model: str) -> InstanceList:
        """The listing every later decision is made from, recorded in the history before anything
        changes: a regular activity (its result is an event), not a local one.

        Local activities are recorded only when their workflow task completes. A task whose
        completion is refused (a ``joined`` signal arrived meanwhile: ``UnhandledCommand``) or whose
        worker dies is run again from the last recorded event, and its local activities with it.
        Had the listing been one of them, a second run would list a fleet the first had already
        changed: it ended ``already-ejected`` and the promotion that recovered the model was in no
        audit (found by the nemesis), or, had the worker died between promote and the deferred
        eject, it would have promoted a second standby. With the listing recorded, a run again
        replays the same listing, picks the same standby, and every step is idempotent. (A 1 ms
        timer as the boundary cost about 1 s on the dev server; a regular activity ~20 ms.)"""
        ref = ModelRef(model=model)
        if self._local_activities and not self._plan_only and workflow.patched(DECISION_INPUT_PERSISTED):
            return await self._step("list", ActivityName.LIST_INSTANCES, ref, InstanceList, long=True)
        return await self._step("list", ActivityName.LIST_INSTANCES, ref, InstanceList)

    async def _promote_first_that_works(self, candidates: list[Instance]) -> Instance | None:
        for candidate in candidates:
            ref = InstanceRef(model=candidate.model, instance=candidate.id, epoch=self._epoch)
            try:
                await self._step("promote", ActivityName.PROMOTE_STANDBY, ref, StepReport, candidate.id)
                # Loading a warm or cold standby can take minutes and must heartbeat so a dead worker
                # is noticed: a regular activity. A hot standby is loaded already: a quick check.
                await self._load(ref, long=candidate.role != Role.HOT)
                await self._step(
                    "register",
                    ActivityName.REGISTER_INSTANCE,
                    RegisterRequest(model=candidate.model, instance=candidate.id, priority=0, epoch=self._epoch),
                    StepReport,
                    candidate.id,
                )
                await self._step("verify", ActivityName.VERIFY_SERVING, ref, StepReport, candidate.id)
                self._verified_at = workflow.now()
                return candidate
            except STEP_ERRORS as err:
                if error_type(err) == ErrorType.STALE_EPOCH:
                    raise  # a newer runbook of the model acts now: this one must change nothing more
                workflow.logger.warning("standby %s could not take over: %s", candidate.id, why_failed(err))
                # A standby that cannot take over is broken too: take it out so no one tries it again.
                await self._try_eject_broken(candidate, why_failed(err))
        return None

    async def _load(self, ref: InstanceRef, long: bool) -> None:
        """Wait until the instance has loaded its model. A checkpoint that fails its checksum is
        restored from the good copy and loaded once more (seed §5.2: model corruption → reload).

        A hot standby is loaded already, so its check is one short try: a hot standby that does not
        answer within ``HOT_CHECK_TIMEOUT`` is down too (its node failed with the serving one) and
        the next standby is tried, instead of waiting out a model load's timeout on it."""
        try:
            if long:
                await self._step("load", ActivityName.LOAD_MODEL, ref, StepReport, ref.instance, long=True)
            else:
                await self._step(
                    "load",
                    ActivityName.LOAD_MODEL,
                    ref,
                    StepReport,
                    ref.instance,
                    step_timeout=HOT_CHECK_TIMEOUT,
                    retry=ONE_TRY,
                )
        except STEP_ERRORS as err:
            if error_type(err) != ErrorType.CHECKPOINT_CORRUPT:
                raise
            await self._step("restore-checkpoint", ActivityName.RESTORE_CHECKPOINT, ref, StepReport, ref.instance)
            await self._step("load", ActivityName.LOAD_MODEL, ref, StepReport, ref.instance, long=True)

    async def _emergency_instance(self, request: FailoverRequest) -> Instance | None:
        """Hot, warm and cold are exhausted: place a new serving instance on the pool (a critical
        model may preempt lower-priority instances), start it, and verify it."""
        assert self._result is not None
        try:
            snapshot = await self._step("observe", ActivityName.OBSERVE_FLEET, None, FleetSnapshot)
        except STEP_ERRORS:
            return None
        plan = plan_emergency(
            DRPolicy.model_validate(snapshot.policy),
            snapshot.instances,
            request.model,
            request.instance,
            snapshot.cordoned_gpus,
            snapshot.highest_indexes,  # {} in a snapshot from before the field: as it was
            snapshot.hung_gpus,  # [] likewise
        )
        self._record(
            "place",
            workflow.now(),
            workflow.now(),
            None,
            bool(plan.actions),
            "; ".join(plan.unplaceable)
            or (plan.actions[-1].reason + f" → {plan.actions[-1].gpu}" if plan.actions else ""),
        )
        if not plan.actions:
            return None
        try:
            for action in plan.actions:
                if action.kind == ReconcileActionKind.DELETE:
                    await self._step(
                        "preempt",
                        ActivityName.DELETE_INSTANCE,
                        InstanceChange(action=action.model_copy(update={"epoch": snapshot.epochs.get(action.model)})),
                        StepReport,
                        action.instance,
                    )
                    self._result.preempted.append(action.instance)
            create = plan.actions[-1].model_copy(update={"epoch": self._epoch})
            await self._step(
                "emergency",
                ActivityName.CREATE_INSTANCE,
                InstanceChange(action=create),
                StepReport,
                create.instance,
                long=True,
            )
            ref = InstanceRef(model=create.model, instance=create.instance)
            await self._step("verify", ActivityName.VERIFY_SERVING, ref, StepReport, create.instance)
        except STEP_ERRORS:
            return None
        self._verified_at = workflow.now()
        self._result.emergency = True
        return Instance(
            id=create.instance,
            model=create.model,
            role=Role.SERVING,
            gpu=create.gpu,
            node=create.node,
            zone=create.zone,
        )

    async def _replenish(self, request: FailoverRequest) -> None:
        """A standby was used up: ask reconciliation to restore the policy's counts now. Failing to
        ask does not fail the failover (the schedule runs anyway). A zone failover's runbook leaves
        it to the zone failover, which asks once at its end (:data:`ZONE_FAILOVER_REPLENISHES`)."""
        if request.trigger == Trigger.ZONE_FAILOVER and self._zone_failover_replenishes_once():
            now = workflow.now()
            self._record("replenish", now, now, None, True, "left to the zone failover: it asks once, at its end")
            return
        try:
            await self._step("replenish", ActivityName.REQUEST_RECONCILE, ModelRef(model=request.model), StepReport)
        except STEP_ERRORS:
            workflow.logger.warning("could not trigger reconciliation after the failover of %s", request.model)

    async def _try_eject_broken(self, candidate: Instance, why: str) -> None:
        request = EjectRequest(
            model=candidate.model, instance=candidate.id, reason=f"promotion failed: {why}", epoch=self._epoch
        )
        try:
            await self._step("eject-standby", ActivityName.EJECT_INSTANCE, request, StepReport, candidate.id)
        except STEP_ERRORS:
            workflow.logger.warning("could not eject broken standby %s", candidate.id)

    async def _step(
        self,
        step: str,
        activity: str,
        arg: BaseModel | None,
        result_type: type[R],
        subject: str | None = None,
        long: bool = False,
        step_timeout: timedelta | None = None,
        retry: RetryPolicy = QUICK,
    ) -> R:
        start = workflow.now()
        if self._plan_only and activity in MUTATING:
            line = f"{step} {subject or getattr(arg, 'instance', '')}".strip()
            assert self._result is not None
            self._result.plan.append(line)
            self._record(step, start, start, None, True, "planned, not run")
            return result_type()
        try:
            args = [] if arg is None else [arg]
            if self._local_activities and not long:
                out = await workflow.execute_local_activity(
                    activity,
                    args=args,
                    result_type=result_type,
                    start_to_close_timeout=step_timeout or STEP_TIMEOUTS[activity],
                    retry_policy=retry,
                )
            else:
                out = await workflow.execute_activity(
                    activity,
                    args=args,
                    result_type=result_type,
                    start_to_close_timeout=step_timeout or STEP_TIMEOUTS[activity],
                    heartbeat_timeout=HEARTBEAT_TIMEOUTS.get(activity),
                    retry_policy=retry,
                )
        except STEP_ERRORS as err:
            self._record(step, start, workflow.now(), None, False, f"{subject or ''} {why_failed(err)}".strip())
            raise
        own = getattr(out, "duration_ms", None)
        detail = getattr(out, "detail", "")
        self._record(step, start, workflow.now(), own, True, f"{subject}: {detail}" if subject else detail)
        return cast(R, out)

    def _record(self, step: str, start: datetime, end: datetime, own: float | None, ok: bool, detail: str) -> None:
        assert self._result is not None
        self._result.steps.append(
            StepTiming(
                step=step,
                started_at=start,
                duration_ms=_ms(end - start),
                activity_ms=own,
                ok=ok,
                detail=detail,
            )
        )

    @staticmethod
    def _describe(candidates: list[Instance]) -> str:
        if not candidates:
            return "no standby"
        return "candidates: " + ", ".join(f"{c.id} ({c.role})" for c in candidates)

    def _finish(self, outcome: FailoverOutcome, reason: str) -> FailoverResult:
        assert self._result is not None
        result = self._result
        if self._plan_only and outcome != FailoverOutcome.PLANNED:
            # A plan is never a recovery in the audit, whatever it found (say, a healthy instance).
            outcome, reason = FailoverOutcome.PLANNED, f"would end {outcome.value}: {reason}"
        result.outcome = outcome
        result.reason = reason
        result.finished_at = workflow.now()
        activity_total = sum(s.activity_ms or 0.0 for s in result.steps)
        result.orchestration_ms = round(max(0.0, _ms(result.finished_at - result.started_at) - activity_total), 1)
        workflow.upsert_search_attributes([OUTCOME_KEY.value_set(outcome.value)])
        return result

    async def _hand_to_guardian(self, request: FailoverRequest) -> FailoverResult:
        """Started directly: report to the model's guardian, follow the runbook it runs, end ``joined``."""
        assert self._result is not None
        own = workflow.info().workflow_id
        if self._direct_start_checks_input():
            # An unknown model fails the step itself (UnknownModel, not retried).
            listing = await self._step("list", ActivityName.LIST_INSTANCES, ModelRef(model=request.model), InstanceList)
            known = [i.id for i in listing.instances]
            if request.trigger == Trigger.MANUAL and request.instance not in known:
                # A detector's late report of a replaced instance still goes on (it settles, see
                # GONE_INSTANCE_SETTLES); an operator's wrong id is refused, as the CLI refuses it.
                raise ApplicationError(
                    unknown_instance_message(request.model, request.instance, known),
                    type=ErrorType.UNKNOWN_INSTANCE,
                    non_retryable=True,
                )
        tickets = await self._step(
            "report",
            ActivityName.REPORT_FAILURE,
            ReportBatch(reports=[FailureReport(request=request, reporter=f"workflow {own}")]),
            IncidentTickets,
        )
        ticket = tickets.tickets[0]
        self._result.handled_by = ticket.workflow_id
        outcomes = await self._step(
            "follow",
            ActivityName.AWAIT_RUNBOOKS,
            RunbookIds(tickets=[ticket]),
            RunbookOutcomes,
            ticket.workflow_id,
            long=True,
        )
        end = outcomes.outcomes[0] if outcomes.outcomes else None
        how = "joined the incident already open" if ticket.joined else "opened the incident"
        detail = f"{end.outcome}: {end.detail}" if end else "no outcome"
        return self._finish(
            FailoverOutcome.JOINED,
            f"handed to guardian-{request.model}: {how}; {ticket.workflow_id} ended {detail}"[:500],
        )
