"""The workflows as they were before each of their ``workflow.patched`` changes, to record runs
that started before a patch (``record.py``): a worker still holds such runs when the patched code is
deployed, and the replay test checks that the patched code still replays them (``patched`` is then
false, and the old branch must issue the same commands as the old code did).

Each class is registered under the real workflow's name and differs from it only by the patch.
"""

from __future__ import annotations

from datetime import datetime

from temporalio import workflow

from drctl.payloads import (
    ActivityName,
    BudgetState,
    FailoverRequest,
    FailoverResult,
    GuardianState,
    Incident,
    InstanceList,
    ModelRef,
    ReconcileRequest,
    ReconcileResult,
    ZoneFailoverRequest,
    ZoneFailoverResult,
)
from drctl.workflows.budget import (
    FAILED_OVER_ZONE_COVERS,
    GONE_INSTANCE_WAITS,
    GRANTS_SIDE_BY_SIDE,
    ZONE_COVERS_ZONE,
    ZONE_FAILOVER_FIRST,
    BudgetWorkflow,
)
from drctl.workflows.failover import (
    DECISION_INPUT_PERSISTED,
    DIRECT_START_CHECKS_INPUT,
    GONE_INSTANCE_SETTLES,
    PREFERS_ACTIVE_ZONES,
    STANDBY_EJECTED_REPLENISHES,
    ZONE_FAILOVER_REPLENISHES,
    FailoverWorkflow,
)
from drctl.workflows.guardian import JOINED_IN_START, RUNBOOK_IN_REPORT_TRACE, ModelGuardianWorkflow
from drctl.workflows.reconcile import (
    ONE_PASS_AT_A_TIME,
    PLAN_IN_ACTIVITY,
    ReconcilePassWorkflow,
    ReconcileStandbysWorkflow,
    observe_and_plan,
    reconcile_pass,
)
from drctl.workflows.zone import BATCHED, CORDON_AT_ONCE, ONE_LEASE, SWITCH_IN_BATCH, ZoneFailoverWorkflow


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class FailoverBeforeListingAsActivity(FailoverWorkflow):
    """Before ``failover-listing-as-activity`` (0b8a930): the listing was a step like the others,
    a local activity when the run uses local activities."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    async def _list_step(self, model: str) -> InstanceList:
        return await self._step("list", ActivityName.LIST_INSTANCES, ModelRef(model=model), InstanceList)


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class FailoverBeforeGoneInstanceSettles(FailoverWorkflow):
    """Before ``failover-gone-instance-settles``: a reported instance missing from the listing
    failed the run ``UnknownInstance``, whoever reported it."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    def _gone_settles(self) -> bool:
        return False


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class FailoverBeforeDirectStartChecksInput(FailoverWorkflow):
    """Before ``failover-direct-start-checks-input``: a run started directly reported to the
    guardian at once, without listing the model first."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    def _direct_start_checks_input(self) -> bool:
        return False


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class FailoverBeforeStandbyReplenishes(FailoverWorkflow):
    """Before ``failover-standby-ejected-replenishes``: a failed standby was ejected, and nothing
    asked reconciliation to replace it."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    def _standby_ejected_replenishes(self) -> bool:
        return False


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class FailoverBeforeZoneFailoverReplenishesOnce(FailoverWorkflow):
    """Before ``failover-zone-failover-replenishes-once``: a runbook the zone failover reported
    triggered the reconcile schedule itself, as every recovery does."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    def _zone_failover_replenishes_once(self) -> bool:
        return False


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class FailoverBeforeActiveZones(FailoverWorkflow):
    """Before ``failover-prefers-active-zones``: within a tier, an ordinary failover ordered its
    standbys by node and zone distance only, whatever zones the policy keeps serving in."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    def _prefers_active_zones(self) -> bool:
        return False


@workflow.defn(name="ReconcileStandbysWorkflow", sandboxed=False)
class ReconcileBeforeOnePassAtATime(ReconcileStandbysWorkflow):
    """Before ``reconcile-one-pass-at-a-time`` (f99c0c4): the run made its pass itself, no child."""

    @workflow.run
    async def run(self, request: ReconcileRequest) -> ReconcileResult:
        return await reconcile_pass(request, self._show)


@workflow.defn(name="ReconcilePassWorkflow", sandboxed=False)
class ReconcilePassBeforePlanInActivity(ReconcilePassWorkflow):
    """Before ``reconcile-plan-in-activity``: the pass observed the whole fleet (one activity) and
    planned in the workflow."""

    @workflow.run
    async def run(self, request: ReconcileRequest) -> ReconcileResult:
        return await reconcile_pass(request, self._show, observe_and_plan)


@workflow.defn(name="ModelGuardianWorkflow", sandboxed=False)
class GuardianBeforeReportTrace(ModelGuardianWorkflow):
    """Before ``guardian-runbook-in-report-trace``: an incident's recovery (and its runbook) ran under
    the trace context of the guardian's start, whichever report opened it."""

    @workflow.run
    async def run(self, state: GuardianState) -> None:
        await super().run(state)

    async def _recover(self, incident: Incident) -> None:
        await self._recover_incident(incident)


@workflow.defn(name="ModelGuardianWorkflow", sandboxed=False)
class GuardianBeforeJoinedInStart(ModelGuardianWorkflow):
    """Before ``guardian-joined-in-start``: the reports that joined an incident before its runbook
    started were signalled to the runbook (``joined``) right after its start."""

    @workflow.run
    async def run(self, state: GuardianState) -> None:
        await super().run(state)

    def _joined_in_start(self) -> bool:
        return False


@workflow.defn(name="ZoneFailoverWorkflow", sandboxed=False)
class ZoneFailoverBeforeBatched(ZoneFailoverWorkflow):
    """Before ``zone-failover-batched``: GPUs cordoned in turn, each serving instance reported and
    followed on its own, at most ``maxParallelFailovers`` at a time in the workflow."""

    @workflow.run
    async def run(self, request: ZoneFailoverRequest) -> ZoneFailoverResult:
        return await super().run(request)

    def _one_lease(self) -> bool:
        return False

    def _batched(self) -> bool:
        return False


@workflow.defn(name="ZoneFailoverWorkflow", sandboxed=False)
class ZoneFailoverBeforeOneLease(ZoneFailoverWorkflow):
    """Before ``zone-failover-one-lease``: each serving instance's guardian asked the budget for a
    zone-level lease of its own; the zone's reports went out in one activity per priority and the
    runbooks were followed in one more."""

    @workflow.run
    async def run(self, request: ZoneFailoverRequest) -> ZoneFailoverResult:
        return await super().run(request)

    def _one_lease(self) -> bool:
        return False


@workflow.defn(name="ZoneFailoverWorkflow", sandboxed=False)
class ZoneFailoverBeforeSwitchInBatch(ZoneFailoverWorkflow):
    """Before ``zone-failover-switches-hot-in-batch``: under the zone's one lease, every serving
    instance was reported to its guardian and followed to the end of its runbook."""

    @workflow.run
    async def run(self, request: ZoneFailoverRequest) -> ZoneFailoverResult:
        return await super().run(request)

    def _switches_in_batch(self) -> bool:
        return False


@workflow.defn(name="ZoneFailoverWorkflow", sandboxed=False)
class ZoneFailoverBeforeCordonAtOnce(ZoneFailoverWorkflow):
    """Before ``zone-failover-cordons-at-once``: one ``cordon_gpu`` activity per GPU of the zone,
    side by side."""

    @workflow.run
    async def run(self, request: ZoneFailoverRequest) -> ZoneFailoverResult:
        return await super().run(request)

    def _cordons_at_once(self) -> bool:
        return False


@workflow.defn(name="BudgetWorkflow", sandboxed=False)
class BudgetBeforeZoneCoversZone(BudgetWorkflow):
    """Before ``budget-zone-covers-zone``: only a zone-level request was zone-level."""

    @workflow.run
    async def run(self, state: BudgetState) -> None:
        await super().run(state)

    def _zone_covers_zone(self) -> bool:
        return False


@workflow.defn(name="BudgetWorkflow", sandboxed=False)
class BudgetBeforeGrantsSideBySide(BudgetWorkflow):
    """Before ``budget-grants-side-by-side``: each ``lease_granted`` signal awaited in turn."""

    @workflow.run
    async def run(self, state: BudgetState) -> None:
        await super().run(state)

    def _grants_side_by_side(self) -> bool:
        return False


@workflow.defn(name="BudgetWorkflow", sandboxed=False)
class BudgetBeforeZoneFailoverFirst(BudgetWorkflow):
    """Before ``budget-zone-failover-first``: a zone's single recoveries ran beside its failover's lease."""

    @workflow.run
    async def run(self, state: BudgetState) -> None:
        await super().run(state)

    def _zone_failover_first(self) -> bool:
        return False


@workflow.defn(name="BudgetWorkflow", sandboxed=False)
class BudgetBeforeFailedOverZoneCovers(BudgetWorkflow):
    """Before ``budget-failed-over-zone-covers``: once a zone failover handed its lease back, a
    recovery in its zone was instance-level again."""

    @workflow.run
    async def run(self, state: BudgetState) -> None:
        await super().run(state)

    def _failed_over(self, now: datetime) -> list[str]:
        return []


@workflow.defn(name="BudgetWorkflow", sandboxed=False)
class BudgetBeforeGoneInstanceWaits(BudgetWorkflow):
    """Before ``budget-gone-instance-waits``: a recovery of an instance gone from the platform was
    granted at once, beside a zone failover's lease."""

    @workflow.run
    async def run(self, state: BudgetState) -> None:
        await super().run(state)

    def _gone_waits(self) -> bool:
        return False


BEFORE_PATCHES: dict[str, type] = {
    DECISION_INPUT_PERSISTED: FailoverBeforeListingAsActivity,
    ONE_PASS_AT_A_TIME: ReconcileBeforeOnePassAtATime,
    PLAN_IN_ACTIVITY: ReconcilePassBeforePlanInActivity,
    RUNBOOK_IN_REPORT_TRACE: GuardianBeforeReportTrace,
    JOINED_IN_START: GuardianBeforeJoinedInStart,
    BATCHED: ZoneFailoverBeforeBatched,
    ONE_LEASE: ZoneFailoverBeforeOneLease,
    SWITCH_IN_BATCH: ZoneFailoverBeforeSwitchInBatch,
    CORDON_AT_ONCE: ZoneFailoverBeforeCordonAtOnce,
    GONE_INSTANCE_SETTLES: FailoverBeforeGoneInstanceSettles,
    DIRECT_START_CHECKS_INPUT: FailoverBeforeDirectStartChecksInput,
    PREFERS_ACTIVE_ZONES: FailoverBeforeActiveZones,
    STANDBY_EJECTED_REPLENISHES: FailoverBeforeStandbyReplenishes,
    ZONE_FAILOVER_REPLENISHES: FailoverBeforeZoneFailoverReplenishesOnce,
    ZONE_COVERS_ZONE: BudgetBeforeZoneCoversZone,
    GRANTS_SIDE_BY_SIDE: BudgetBeforeGrantsSideBySide,
    ZONE_FAILOVER_FIRST: BudgetBeforeZoneFailoverFirst,
    FAILED_OVER_ZONE_COVERS: BudgetBeforeFailedOverZoneCovers,
    GONE_INSTANCE_WAITS: BudgetBeforeGoneInstanceWaits,
}
"""Each ``workflow.patched`` id in drctl/workflows → the workflow as it was before that patch."""
