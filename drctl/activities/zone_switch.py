"""A zone failover's batch: the failed zone's plain recoveries (serving → its hot standby out of the
zone) decided in one activity and switched in one more, each recorded as its model's runbook.

Why: through the guardians, each recovery of a zone costs a report, an epoch claim, a child
runbook and its end, about ten workflow tasks; here the zone makes one decision for all of them
and records it before anything changes. (Measured at 1,000 instances on a 2-core machine, the
switch took as long either way: there the instances' answers to the hot check and verify bound it,
not the orchestration; docs/benchmarks.md, "Eleventh session".) The steps are the runbook's
own (:class:`FailoverActivities`, the same platform calls in the same order, the same fencing
epochs), run side by side; what the guardians would have serialized is settled before: a model
with any other recovery under way (its lease in the budget) is left to its guardian, and every
switch is fenced by an epoch claimed after that check. Everything that is not the plain case (a
standby to load, a hot standby that does not answer, a stale epoch) goes to the guardians as
before, under the zone failover's lease.

The record of each switch is a ``FailoverWorkflow`` (``FailoverRequest.switched``): the audit,
exports, metrics and drills read it as they read any runbook.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from drctl.activities.failover import FailoverActivities, with_heartbeats, without_progress_heartbeats
from drctl.activities.incidents import in_order_at_most
from drctl.activities.listing import ModelListing
from drctl.payloads import (
    ActivityName,
    EjectRequest,
    ErrorType,
    FailoverRequest,
    InstanceRef,
    RegisterRequest,
    StepReport,
    StepTiming,
    SwitchRecord,
    Trigger,
    ZoneSwitch,
    ZoneSwitchBatch,
    ZoneSwitchClaim,
    ZoneSwitchDone,
    ZoneSwitchOutcomes,
    ZoneSwitchPlan,
)
from drctl.platforms.base import Platform
from drctl.policies.standby import hot_switch, must_defer_eject
from drctl.temporal.incidents import budget_state, busy_except, start_switch_record

CLAIMS_AT_ONCE = 32
"""Epoch claims and listings in flight at once while planning (each a platform read and write)."""
HOT_CHECK_S = 3.0
"""How long a hot standby may take to show it is loaded (the runbook's ``HOT_CHECK_TIMEOUT``)."""
HEARTBEAT_S = 1.0
RECORDS_AT_ONCE = 16
"""Record starts in flight at once (each a workflow start on the server, its one workflow task
run here as it comes back with the start)."""


def _elapsed_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


class ZoneSwitchActivities:
    """Bind the batch's two activities to one platform; register ``.all()`` on a worker."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._listing = ModelListing(platform)
        self._steps = FailoverActivities(platform)

    def all(self) -> list[Callable[..., Any]]:
        return [self.plan_zone_switch, self.switch_zone_to_hot]

    @activity.defn(name=ActivityName.PLAN_ZONE_SWITCH)
    async def plan_zone_switch(self, claim: ZoneSwitchClaim) -> ZoneSwitchPlan:
        """Which of the zone's failed serving instances switch in the batch: for each model not
        busy with another recovery and with one failed instance, a new fencing epoch, the model
        listed right after it, and the runbook's own choice of standby (:func:`hot_switch`). The
        plan is what the workflow records before anything changes; a retry claims anew (it only
        claimed before)."""
        start = time.monotonic()
        busy = busy_except(await budget_state(activity.client(), activity.info().task_queue), claim.lease)
        plan = ZoneSwitchPlan()
        per_model: dict[str, list[InstanceRef]] = {}
        for ref in claim.instances:
            per_model.setdefault(ref.model, []).append(ref)
        batchable: list[InstanceRef] = []
        for model, refs in per_model.items():
            if model in busy:
                plan.left.update({r.instance: f"a recovery of {model} is under way ({busy[model]})" for r in refs})
            elif len(refs) > 1:
                plan.left.update(
                    {r.instance: f"{len(refs)} instances of {model} failed: one after another" for r in refs}
                )
            else:
                batchable.append(refs[0])

        async def decide(ref: InstanceRef) -> ZoneSwitch | str:
            try:
                epoch = await self.platform.claim_epoch(ref.model)
                listing = await self._listing(ref.model)
            except Exception as err:  # any platform failure: the guardian's runbook retries it
                return f"could not claim an epoch and list {ref.model}: {err}"[:300]
            standby = hot_switch(listing.instances, ref.instance, claim.zone, claim.prefer_zone)
            if standby is None:
                return "not a plain switch to a hot standby out of the zone: the model's runbook decides"
            return ZoneSwitch(
                model=ref.model,
                instance=ref.instance,
                standby=standby.id,
                epoch=epoch,
                defer_eject=must_defer_eject(listing.instances, ref.instance),
                started_at=datetime.now(UTC),
            )

        decided = await with_heartbeats(
            in_order_at_most(CLAIMS_AT_ONCE, [decide(ref) for ref in batchable]), every_s=HEARTBEAT_S
        )
        for ref, decision in zip(batchable, decided, strict=True):
            if isinstance(decision, str):
                plan.left[ref.instance] = decision
            else:
                plan.switches.append(decision)
        plan.duration_ms = _elapsed_ms(start)
        activity.logger.info(
            "zone %s: %d switch(es) to hot standbys in the batch, %d left to their guardians",
            claim.zone,
            len(plan.switches),
            len(plan.left),
        )
        return plan

    @activity.defn(name=ActivityName.SWITCH_ZONE_TO_HOT)
    async def switch_zone_to_hot(self, batch: ZoneSwitchBatch) -> ZoneSwitchOutcomes:
        """Each switch as the runbook runs it (eject when another instance serves; promote, hot
        check, register, verify; eject a last serving instance once its replacement serves), at
        most ``batch.at_once`` at a time, in the plan's order (critical models first); then its
        record. Idempotent under the plan's epochs: a retry finds each step done and goes on."""
        start = time.monotonic()
        client = activity.client()
        queue = activity.info().task_queue

        async def one(switch: ZoneSwitch) -> tuple[ZoneSwitchDone, FailoverRequest | None]:
            done, steps, verified_at = await self._switch(switch, batch.reason)
            if verified_at is None:
                return done, None
            return done, FailoverRequest(
                model=switch.model,
                instance=switch.instance,
                reason=batch.reason[:500],
                trigger=Trigger.ZONE_FAILOVER,
                confirmed=True,
                epoch=switch.epoch,
                switched=SwitchRecord(
                    standby=switch.standby,
                    epoch=switch.epoch,
                    steps=steps,
                    started_at=switch.started_at,
                    verified_at=verified_at,
                    handled_by=batch.handled_by,
                ),
            )

        async def recorded(done: ZoneSwitchDone, record: FailoverRequest) -> None:
            done.record = await start_switch_record(client, queue, record)

        with without_progress_heartbeats():  # the batch heartbeats for its switches
            switched = await with_heartbeats(
                in_order_at_most(max(1, batch.at_once), [one(s) for s in batch.switches]), every_s=HEARTBEAT_S
            )
        # The records once every switch is done: they are the audit, not the recovery, and started
        # beside the switches (eagerly, each after its own) they made the switch slower (92 of
        # 250 records' workflow tasks timed out on the busy worker at 1,000 instances).
        records = [recorded(done, record) for done, record in switched if record is not None]
        await with_heartbeats(in_order_at_most(RECORDS_AT_ONCE, records), every_s=HEARTBEAT_S)
        return ZoneSwitchOutcomes(done=[done for done, _ in switched], duration_ms=_elapsed_ms(start))

    async def _switch(
        self, switch: ZoneSwitch, reason: str
    ) -> tuple[ZoneSwitchDone, list[StepTiming], datetime | None]:
        """One switch: what came of it, its steps, and when the standby was verified (None: it
        was not switched here)."""
        steps: list[StepTiming] = []

        async def step(name: str, subject: str, call: Awaitable[StepReport]) -> None:
            started, clock = datetime.now(UTC), time.monotonic()
            try:
                report = await call
            except BaseException as err:
                steps.append(_timing(name, started, clock, None, False, f"{subject} {err}"[:300]))
                raise
            steps.append(_timing(name, started, clock, report.duration_ms, True, f"{subject}: {report.detail}"))

        model, failed, standby, epoch = switch.model, switch.instance, switch.standby, switch.epoch
        now = datetime.now(UTC)
        steps.append(
            StepTiming(
                step="pick",
                started_at=now,
                duration_ms=0.0,
                detail=f"hot standby {standby}, epoch {epoch}: switched with the rest of the zone",
            )
        )
        eject = EjectRequest(model=model, instance=failed, reason=reason[:500], epoch=epoch)
        ref = InstanceRef(model=model, instance=standby, epoch=epoch)
        try:
            if not switch.defer_eject:
                await step("eject", failed, self._steps.eject_instance(eject))
            await step("promote", standby, self._steps.promote_standby(ref))
            await step("load", standby, asyncio.wait_for(self._steps.load_model(ref), HOT_CHECK_S))
            register = RegisterRequest(model=model, instance=standby, priority=0, epoch=epoch)
            await step("register", standby, self._steps.register_instance(register))
            await step("verify", standby, self._steps.verify_serving(ref))
            verified_at = datetime.now(UTC)
            if switch.defer_eject:
                await step("eject", failed, self._steps.eject_instance(eject))
        except ApplicationError as err:
            if err.type == ErrorType.STALE_EPOCH:  # a newer runbook of the model acts: change nothing more
                stale = ZoneSwitchDone(
                    model=model, instance=failed, standby=standby, switched=False, stale=True, detail=str(err)[:300]
                )
                return stale, steps, None
            return await self._broken(switch, str(err)), steps, None
        except Exception as err:  # a hot check past its time, the platform unreachable: as the runbook
            return await self._broken(switch, f"{type(err).__name__}: {err}"), steps, None
        done = ZoneSwitchDone(model=model, instance=failed, standby=standby, switched=True, detail="switched")
        return done, steps, verified_at

    async def _broken(self, switch: ZoneSwitch, why: str) -> ZoneSwitchDone:
        """A hot standby that cannot take over is broken: out, as the runbook takes it out, so that
        the model's runbook (the guardian's, next) does not try it again."""
        request = EjectRequest(
            model=switch.model, instance=switch.standby, reason=f"promotion failed: {why}"[:500], epoch=switch.epoch
        )
        try:
            await self._steps.eject_instance(request)
        except Exception as err:  # the runbook that follows decides with what it lists
            activity.logger.warning("could not eject broken standby %s: %s", switch.standby, err)
        return ZoneSwitchDone(
            model=switch.model, instance=switch.instance, standby=switch.standby, switched=False, detail=why[:300]
        )


def _timing(step: str, started: datetime, clock: float, own: float | None, ok: bool, detail: str) -> StepTiming:
    return StepTiming(
        step=step, started_at=started, duration_ms=_elapsed_ms(clock), activity_ms=own, ok=ok, detail=detail
    )
