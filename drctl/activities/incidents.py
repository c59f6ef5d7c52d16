"""Activities of the guardians and the budget: fencing epochs, reports, leases, following runbooks.

They talk to Temporal through the worker's own client (``activity.client()``) and to the platform
through the one :class:`Platform` interface.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from drctl.activities.failover import with_heartbeats
from drctl.activities.listing import ModelListing
from drctl.payloads import (
    ActivityName,
    EpochGrant,
    ErrorType,
    FailureReport,
    IncidentTicket,
    IncidentTickets,
    InstanceList,
    LeaseAnswer,
    LeaseRelease,
    LeaseRequest,
    ModelRef,
    ReportBatch,
    RunbookIds,
    RunbookOutcome,
    RunbookOutcomes,
    StepReport,
)
from drctl.platforms.base import Platform
from drctl.policies.budget import BudgetLimits
from drctl.telemetry.tracing import span
from drctl.temporal.incidents import hand_back_lease, report_failure, request_lease, runbook_result, wait_running

T = TypeVar("T")

HEARTBEAT_S = 1.0
REPORTS_AT_ONCE = 16
"""Reports of one batch in flight at once (each an Update-with-start on its model's guardian)."""
LIMITS_TTL_S = 5.0


async def in_order_at_most(limit: int, calls: Sequence[Awaitable[T]]) -> list[T]:
    """Await ``calls`` side by side, at most ``limit`` at a time, started in their order; their
    results in that order."""
    gate = asyncio.Semaphore(limit)

    async def in_turn(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    return list(await asyncio.gather(*(in_turn(call) for call in calls)))


async def _followed(client: Client, queue: str, ticket: IncidentTicket) -> RunbookOutcome:
    """The end of the runbook that handles ``ticket``'s incident, once it has ended. A ticket that
    names its run is followed at once; otherwise its guardian is asked until the run has started."""
    try:
        run = ticket if ticket.run_id is not None else await wait_running(client, queue, ticket)
    except ApplicationError as err:
        if err.type != ErrorType.GUARDIAN_CLOSED:
            raise
        # One model's guardian gone: that ticket's end, not the whole batch's (a zone failover's).
        return RunbookOutcome(workflow_id=ticket.workflow_id, outcome="failed", detail=err.message[:300])
    workflow_id = run.workflow_id
    try:
        result = await runbook_result(client, run)
    except (WorkflowFailureError, RPCError) as err:
        return RunbookOutcome(workflow_id=workflow_id, outcome="failed", detail=str(err)[:300])
    return RunbookOutcome(
        workflow_id=workflow_id, outcome=result.outcome.value, promoted=result.promoted, detail=result.reason
    )


def _elapsed_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


class IncidentActivities:
    def __init__(self, platform: Platform, alertmanager_url: str | None = None) -> None:
        self.platform = platform
        self._listing = ModelListing(platform)
        self.alertmanager_url = alertmanager_url or os.environ.get("DRCTL_ALERTMANAGER_URL")
        self._limits_cache: tuple[float, BudgetLimits, dict[str, int]] | None = None

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.claim_epoch,
            self.report_failure,
            self.request_lease,
            self.await_runbooks,
            self.report_and_await,
            self.hand_back_lease,
            self.budget_alert,
        ]

    @activity.defn(name=ActivityName.CLAIM_EPOCH)
    async def claim_epoch(self, ref: ModelRef) -> EpochGrant:
        """A new fencing epoch for the model, from the platform (the one authority that hands them
        out), and the model's instances listed right after it: the decision input of the runbook
        the guardian starts with this epoch. A listing that fails is left out (the runbook lists
        itself, and retries that step as it always did); the epoch is what must not fail."""
        start = time.monotonic()
        with span("platform.claim_epoch", model=ref.model) as current:
            epoch = await self.platform.claim_epoch(ref.model)
            current.set_attribute("drctl.epoch", epoch)
            try:
                listing: InstanceList | None = await self._listing(ref.model)
            except Exception as err:  # any platform failure: the runbook lists itself
                activity.logger.warning("epoch %d of %s claimed, listing failed: %s", epoch, ref.model, err)
                listing = None
        return EpochGrant(
            model=ref.model, epoch=epoch, detail=f"epoch {epoch}", duration_ms=_elapsed_ms(start), listing=listing
        )

    @activity.defn(name=ActivityName.REPORT_FAILURE)
    async def report_failure(self, batch: ReportBatch) -> IncidentTickets:
        """Report each failure to its model's guardian (a runbook's way to reach the one serialization point)."""
        queue = activity.info().task_queue
        client = activity.client()
        # Each report goes to another guardian: sent side by side, started in the batch's order (a
        # zone failover lists critical models first), at most REPORTS_AT_ONCE in flight.
        reports = [report_failure(client, queue, report) for report in batch.reports]
        tickets = await with_heartbeats(in_order_at_most(REPORTS_AT_ONCE, reports), every_s=HEARTBEAT_S)
        return IncidentTickets(tickets=tickets)

    async def _limits(self) -> tuple[BudgetLimits, dict[str, int]]:
        """The policy's budget and each model's priority rank, re-read at most every few seconds
        (not on every recovery's path)."""
        now = time.monotonic()
        if self._limits_cache is None or now - self._limits_cache[0] > LIMITS_TTL_S:
            policy = await self.platform.current_policy()
            ranks = {m.name: m.priority.rank for m in policy.models}
            self._limits_cache = (now, BudgetLimits.of(policy), ranks)
        return self._limits_cache[1], self._limits_cache[2]

    @activity.defn(name=ActivityName.REQUEST_LEASE)
    async def request_lease(self, request: LeaseRequest) -> LeaseAnswer:
        """Ask the budget for room, with the instance's zone and the policy's limits filled in."""
        start = time.monotonic()
        limits, ranks = await self._limits()
        zone = request.zone
        if request.instance is not None:
            try:
                zone = (await self.platform.get_instance(request.model, request.instance)).zone
            except ApplicationError:
                zone = None  # unknown to the platform now: the runbook will say so; no zone cap
        filled = request.model_copy(
            update={
                "zone": zone,
                "requested_at": datetime.now(UTC),
                "max_per_minute": limits.max_per_minute,
                "max_per_zone": limits.max_per_zone,
                "trip_after_waiting": limits.trip_after_waiting,
                "max_parallel_zone": limits.max_parallel_zone,
                # A zone failover's lease goes as early as its most critical model.
                "rank": max((ranks.get(m, 0) for m in [request.model, *request.covers]), default=0),
            }
        )
        granted = await request_lease(activity.client(), activity.info().task_queue, filled)
        detail = "granted" if granted else f"waiting for the budget (zone {zone or '-'})"
        return LeaseAnswer(granted=granted, detail=detail, duration_ms=_elapsed_ms(start))

    @activity.defn(name=ActivityName.AWAIT_RUNBOOKS)
    async def await_runbooks(self, ids: RunbookIds) -> RunbookOutcomes:
        """Wait until each incident has closed, heartbeating; idempotent (a retry waits again)."""
        client = activity.client()
        queue = activity.info().task_queue
        followed = in_order_at_most(
            ids.at_once or max(1, len(ids.tickets)), [_followed(client, queue, t) for t in ids.tickets]
        )
        return RunbookOutcomes(outcomes=await with_heartbeats(followed, every_s=HEARTBEAT_S))

    @activity.defn(name=ActivityName.REPORT_AND_AWAIT)
    async def report_and_await(self, batch: ReportBatch) -> RunbookOutcomes:
        """Report each failure and follow its runbook to the end, at most ``batch.at_once`` reported
        and not yet ended at a time, started in the batch's order (a zone failover lists critical
        models first). What a zone failover runs under its one zone-level lease: this bound, not
        the budget, is what keeps ``maxParallelFailovers`` runbooks running at once. Idempotent: a
        retry reports again, and a report of a recovered failure joins its closed incident."""
        client = activity.client()
        queue = activity.info().task_queue

        async def one(report: FailureReport) -> RunbookOutcome:
            return await _followed(client, queue, await report_failure(client, queue, report))

        at_once = batch.at_once or max(1, len(batch.reports))
        followed = in_order_at_most(at_once, [one(r) for r in batch.reports])
        return RunbookOutcomes(outcomes=await with_heartbeats(followed, every_s=HEARTBEAT_S))

    @activity.defn(name=ActivityName.HAND_BACK_LEASE)
    async def hand_back_lease(self, release: LeaseRelease) -> StepReport:
        """Hand a lease back, returning once the budget no longer holds it (an Update, not a signal)."""
        start = time.monotonic()
        detail = await hand_back_lease(activity.client(), activity.info().task_queue, release)
        return StepReport(detail=detail, duration_ms=_elapsed_ms(start))

    @activity.defn(name=ActivityName.BUDGET_ALERT)
    async def budget_alert(self, reason: str) -> StepReport:
        """The budget tripped: one ``DrctlBudgetTripped`` alert in Alertmanager, when one is configured."""
        if not self.alertmanager_url:
            return StepReport(detail="no Alertmanager configured (DRCTL_ALERTMANAGER_URL): not alerted")
        alert = {
            "labels": {"alertname": "DrctlBudgetTripped", "severity": "critical"},
            "annotations": {
                "summary": f"drctl stopped starting recoveries: {reason}",
                "description": "Recoveries wait for a person: check the fleet, then `drctl budget reset`.",
            },
            "startsAt": datetime.now(UTC).isoformat(),
        }
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.post(f"{self.alertmanager_url.rstrip('/')}/api/v2/alerts", json=[alert])
            response.raise_for_status()
        return StepReport(detail="DrctlBudgetTripped raised")
