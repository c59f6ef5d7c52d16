"""BudgetWorkflow: the fleet's blast-radius budget, one durable workflow (ID ``drctl-budget``).

Every model's guardian asks it for a lease before it starts a recovery: the Update ``acquire``,
sent with update-with-start (the first request brings it up), answers at once whether the lease is
granted. It grants in order of arrival as far as the budget allows — per-zone recoveries at once,
runbooks started per minute — and a guardian whose request had to wait is told later with the
signal ``lease_granted``. The guardian hands the lease back when its runbook ends (signal
``release``). Requests past the budget wait; none is dropped. When more than ``tripAfterWaiting``
wait at once, the breaker trips (manual mode): nothing more starts until a person sends the
``reset`` Update (``drctl budget reset``, or the Temporal UI).

The decisions are pure (:mod:`drctl.policies.budget`); this workflow keeps the state durable and
delivers grants. Its history is bounded with continue-as-new.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from drctl.payloads import (
        ActivityName,
        BudgetReset,
        BudgetState,
        LeaseGrant,
        LeaseKind,
        LeaseRelease,
        LeaseRequest,
        StepReport,
    )
    from drctl.policies.budget import FAILED_OVER_COVERS_FOR, BudgetLimits, decide, recent_starts

LEASE_TTL = timedelta(minutes=30)
"""A lease not handed back within this long is taken back (its guardian was terminated by hand)."""
MAX_HISTORY = 5_000
"""Continue as new past this many history events, carrying the state."""
ZONE_COVERS_ZONE = "budget-zone-covers-zone"
"""Patch: while a zone fails over, the budget counts every recovery in that zone as zone-level
(``decide(zone_covers_zone=True)``): the prober's reports of the zone's standbys no longer trip the
breaker and wait for a person. Budgets started before it decide as they did until they continue as
new."""
GRANTS_SIDE_BY_SIDE = "budget-grants-side-by-side"
"""Patch: the ``lease_granted`` signals of one decision go out side by side, in one workflow task.
Before, each was awaited in turn, and every signal's acknowledgement took a workflow task of its own:
in a zone failover of 300 instances the budget handed out about five leases a second however many
runbooks were allowed at once, and each of the ``maxParallelFailovers`` slots stood idle for
seconds between two runbooks. Budgets started before it signal in turn until they continue as new."""
ZONE_FAILOVER_FIRST = "budget-zone-failover-first"
"""Patch: while a zone failover's lease runs, the single recoveries of its zone that have not
started wait until it is handed back (``decide(zone_failover_first=True)``), so the prober's
reports of the zone's standbys do not compete with its serving instances for the machine. Budgets
started before it decide as they did until they continue as new."""


FAILED_OVER_ZONE_COVERS = "budget-failed-over-zone-covers"
"""Patch: for ``FAILED_OVER_COVERS_FOR`` after a zone failover hands its lease back, a recovery in
its zone still counts as zone-level (``decide(failed_over=...)``). Before, the zone's stragglers (the
prober's reports of its standbys) fell back to the per-zone cap once the lease was handed back, and
enough of them waiting at once tripped the breaker: redundancy then waited for a person. Budgets
started before it decide as they did until they continue as new."""


GONE_INSTANCE_WAITS = "budget-gone-instance-waits"
"""Patch: while a zone failover's lease runs, a single recovery of an instance the platform no
longer has waits for it too (``decide(gone_waits=True)``). Budgets started before it grant such a
recovery at once until they continue as new."""


@workflow.defn(name="BudgetWorkflow", failure_exception_types=[ValidationError])
class BudgetWorkflow:
    @workflow.init
    def __init__(self, state: BudgetState) -> None:
        self._state = state
        self._changed = True
        self._regrant: list[str] = []
        """Incidents already running whose guardian asked again: grant them once more."""
        self._answered: set[str] = set()
        """Incidents whose ``acquire`` Update is being answered (no grant signal needed)."""
        self._to_signal: list[tuple[str, str]] = []
        self._trips: list[str] = []
        self._wake_at: datetime | None = None
        self._alarms: set[datetime] = set()
        self._alarm_tasks: set[asyncio.Task[None]] = set()

    @workflow.signal(name="acquire")
    def acquire(self, request: LeaseRequest) -> None:
        """A guardian asks for room for one incident's runbook (again, after a restart: idempotent)."""
        state = self._state
        state.max_per_minute = request.max_per_minute
        state.max_per_zone = request.max_per_zone
        state.trip_after_waiting = request.trip_after_waiting
        state.max_parallel_zone = request.max_parallel_zone
        if any(r.incident == request.incident for r in state.running):
            self._regrant.append(request.incident)
        else:
            waiting = next((w for w in state.waiting if w.incident == request.incident), None)
            if waiting is None:
                state.waiting.append(request.model_copy(update={"requested_at": workflow.now()}))
            elif request.kind == LeaseKind.ZONE:
                waiting.kind = LeaseKind.ZONE  # a zone failover took over a waiting recovery
        self._changed = True

    @workflow.signal(name="release")
    def release(self, release: LeaseRelease) -> None:
        state = self._state
        for lease in state.running:
            if lease.incident == release.incident and lease.kind == LeaseKind.ZONE and lease.covers and lease.zone:
                state.failed_over[lease.zone] = workflow.now()  # a zone failover's lease: it has ended
        state.running = [r for r in state.running if r.incident != release.incident]
        state.waiting = [w for w in state.waiting if w.incident != release.incident]
        state.why_waiting.pop(release.incident, None)
        self._changed = True

    @workflow.update(name="hand_back")
    def hand_back(self, release: LeaseRelease) -> str:
        """Like the ``release`` signal, answered once the lease is out of the state: a zone failover
        hands its lease back this way before it asks for reconciliation, which must not find the
        zone's models still busy (a signal not yet processed left them so, and reconciliation
        skipped them until its next scheduled pass)."""
        self.release(release)
        return f"{release.incident} handed back"

    @workflow.update(name="reset")
    def reset(self, reset: BudgetReset) -> str:
        """A person closes the breaker: waiting recoveries may start again, within the budget."""
        state = self._state
        was = state.tripped
        state.tripped, state.tripped_at = None, None
        line = f"{workflow.now().isoformat(timespec='seconds')} reset by {reset.actor}" + (
            f": {reset.comment}" if reset.comment else ""
        )
        state.resets = [*state.resets[-19:], line]
        self._changed = True
        return f"budget reset by {reset.actor}" + (f" (was tripped: {was})" if was else " (was not tripped)")

    @reset.validator
    def _validate_reset(self, reset: BudgetReset) -> None:
        if not reset.actor.strip():
            raise ApplicationError("reset needs the name of the person resetting the budget")

    @workflow.query(name="state")
    def view(self) -> BudgetState:
        return self._state

    @workflow.update(name="acquire")
    def acquire_now(self, request: LeaseRequest) -> bool:
        """Like the ``acquire`` signal, but answers at once whether the lease is granted, so a
        guardian that fits the budget goes on without waiting for the ``lease_granted`` signal."""
        self.acquire(request)
        self._answered.add(request.incident)
        self._decide()
        return any(r.incident == request.incident for r in self._state.running)

    def _zone_covers_zone(self) -> bool:
        return workflow.patched(ZONE_COVERS_ZONE)

    def _zone_failover_first(self) -> bool:
        return workflow.patched(ZONE_FAILOVER_FIRST)

    def _failed_over(self, now: datetime) -> list[str]:
        """The zones whose failover ended within ``FAILED_OVER_COVERS_FOR`` (older ones forgotten)."""
        s = self._state
        s.failed_over = {zone: at for zone, at in s.failed_over.items() if now - at < FAILED_OVER_COVERS_FOR}
        if not s.failed_over or not workflow.patched(FAILED_OVER_ZONE_COVERS):
            return []
        return sorted(s.failed_over)

    def _gone_waits(self) -> bool:
        return workflow.patched(GONE_INSTANCE_WAITS)

    def _grants_side_by_side(self) -> bool:
        return workflow.patched(GRANTS_SIDE_BY_SIDE)

    def _decide(self) -> None:
        """Grant what fits now (pure decision), trip the breaker if it must; signals go out from the loop."""
        now = workflow.now()
        self._expire_leases()
        s = self._state
        s.starts = recent_starts(s.starts, now)
        decision = decide(
            s.running,
            s.waiting,
            s.starts,
            now,
            BudgetLimits(s.max_per_minute, s.max_per_zone, s.trip_after_waiting, s.max_parallel_zone),
            tripped=s.tripped is not None,
            zone_covers_zone=self._zone_covers_zone(),
            zone_failover_first=self._zone_failover_first(),
            failed_over=self._failed_over(now),
            gone_waits=self._gone_waits(),
        )
        for request in decision.grant:
            s.waiting.remove(request)
            granted: dict[str, object] = {"granted_at": now}
            if request.incident in decision.covered:
                granted["kind"] = LeaseKind.ZONE  # its zone fails over: a zone-level lease from now on
            s.running.append(request.model_copy(update=granted))
            s.starts.append(now)
            s.granted_total += 1
            if request.incident not in self._answered:
                self._to_signal.append((request.holder, request.incident))
        for incident in self._regrant:
            holder = next((r.holder for r in s.running if r.incident == incident), None)
            if holder is not None:
                self._to_signal.append((holder, incident))
        self._regrant = []
        self._answered.clear()
        s.why_waiting = decision.why_waiting or {}
        s.most_waiting = max(s.most_waiting, len(s.waiting))
        zones = Counter(r.zone for r in s.running if r.zone is not None and r.kind == LeaseKind.INSTANCE)
        s.most_running_per_zone = max([s.most_running_per_zone, *zones.values()])
        if decision.trip and s.tripped is None:
            s.tripped, s.tripped_at = decision.trip, now
            workflow.logger.error("budget tripped: %s", decision.trip)
            self._trips.append(decision.trip)
        self._wake_at = decision.wake_at

    @workflow.run
    async def run(self, state: BudgetState) -> None:
        alerts: set[asyncio.Task[None]] = set()
        while True:
            self._changed = False
            self._decide()
            s = self._state
            if self._to_signal and self._grants_side_by_side():
                batch, self._to_signal = self._to_signal, []
                await asyncio.gather(*(self._grant(holder, incident) for holder, incident in batch))
            while self._to_signal:
                holder, incident = self._to_signal.pop(0)
                await self._grant(holder, incident)
            for reason in self._trips:
                task = asyncio.create_task(self._alert(reason))
                alerts.add(task)
                task.add_done_callback(alerts.discard)
            self._trips = []
            if workflow.info().get_current_history_length() > MAX_HISTORY and not self._changed and not alerts:
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._state)
            if self._wake_at is not None:
                self._alarm(self._wake_at)
            if s.running:
                self._alarm(min(r.granted_at or workflow.now() for r in s.running) + LEASE_TTL)
            await workflow.wait_condition(lambda: self._changed or bool(self._to_signal))

    def _alarm(self, at: datetime) -> None:
        """Wake the loop at ``at``. A timer that is never cancelled: cancelling one in the workflow
        task that also completes an Update made replay fail (TMPRL1100, found by
        bench/worker_kill_bench.py); an alarm no longer needed just wakes the loop once for nothing."""
        if any(pending <= at for pending in self._alarms):
            return
        self._alarms.add(at)

        async def ring() -> None:
            await workflow.sleep(max(timedelta(milliseconds=100), at - workflow.now()))
            self._alarms.discard(at)
            self._changed = True

        task = asyncio.create_task(ring())
        self._alarm_tasks.add(task)
        task.add_done_callback(self._alarm_tasks.discard)

    def _expire_leases(self) -> None:
        now = workflow.now()
        kept = [r for r in self._state.running if r.granted_at is None or now - r.granted_at < LEASE_TTL]
        for lost in set(r.incident for r in self._state.running) - set(r.incident for r in kept):
            workflow.logger.warning("lease of %s not handed back within %s: taken back", lost, LEASE_TTL)
        self._state.running = kept

    async def _grant(self, holder: str, incident: str) -> None:
        try:
            await workflow.get_external_workflow_handle(holder).signal(
                "lease_granted", LeaseGrant(incident=incident, granted_at=workflow.now())
            )
        except Exception as err:  # the guardian is gone (terminated by hand): its lease is void
            workflow.logger.warning("could not grant %s to %s: %s", incident, holder, err)
            self._state.running = [r for r in self._state.running if r.incident != incident]

    async def _alert(self, reason: str) -> None:
        """Tell people (Alertmanager, when configured); best effort, the state shows it anyway."""
        try:
            await workflow.execute_activity(
                ActivityName.BUDGET_ALERT,
                reason,
                result_type=StepReport,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except Exception as err:
            workflow.logger.warning("could not raise the budget alert: %s", err)
