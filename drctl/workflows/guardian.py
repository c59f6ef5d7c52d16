"""ModelGuardianWorkflow: the one serialization point of a model's recoveries (ID ``guardian-{model}``).

Every trigger — the prober, Alertmanager, the Kubernetes watcher, the CLI, the Temporal UI, a zone
failover, a GPU drain — reports a failed instance with the Update ``report`` (sent with
update-with-start, so the first report brings the guardian up). The guardian keeps one incident per
failed instance:

- a report of an instance with an open incident (or one just recovered) *joins* it: the answer
  names the runbook that handles it, and the runbook lists the report as joined;
- a new failure opens an incident; incidents of one model run one after the other, so two runbooks
  never pick the same standby;
- before an incident's runbook starts, the fleet's budget (``BudgetWorkflow``) grants a lease, and
  the platform hands out a new fencing **epoch** for the model; the runbook (a child
  ``FailoverWorkflow``) carries it in every promote, register and eject, and the platform refuses
  an older one, so a late or retried step of an earlier runbook changes nothing;
- a report under a zone failover's lease (``FailureReport.lease``) asks the budget nothing: the zone
  failover holds one lease for its whole zone and bounds how many of its reports run at once. The
  lease covers the model's incidents queued ahead too (one slot, one after another), and the answer
  to such a report waits until its runbook has a run.

The guardian's history stays bounded with continue-as-new (when no incident is open).

Traces: each report is the root of its own trace (the alert receiver's request, the prober's
decision, the CLI), and the runbook it opens belongs to it. The report's Update carries its trace
context; the tracing interceptor (``drctl.telemetry.tracing.UpdatesInSendersTrace``) makes it current
in the ``report`` handler, which keeps it with the incident; the incident's recovery (the budget's
lease, the epoch, the child ``FailoverWorkflow`` and all it does) runs under it
(:data:`RUNBOOK_IN_REPORT_TRACE`). Before, the child started under the context of the guardian's own
start, so every runbook of a guardian landed in the trace of the report that had started the guardian.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, ChildWorkflowError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    # Passed through: the tracing interceptor (outside the sandbox) and this code must share one
    # OpenTelemetry context (a module imported afresh in the sandbox would have its own).
    import opentelemetry.context
    from pydantic import ValidationError
    from temporalio.contrib.opentelemetry._context import attached_context

    from drctl.payloads import (
        WORKFLOW_TASK_TIMEOUT,
        ActivityName,
        EpochGrant,
        FailoverOutcome,
        FailoverResult,
        FailureReport,
        GuardianState,
        Incident,
        IncidentState,
        IncidentTicket,
        InstanceAlertResolved,
        LeaseAnswer,
        LeaseGrant,
        LeaseKind,
        LeaseRelease,
        LeaseRequest,
        ModelRef,
        budget_workflow_id,
        failover_workflow_id,
    )
    from drctl.workflows.failover import FailoverWorkflow

RUNBOOK_IN_REPORT_TRACE = "guardian-runbook-in-report-trace"
"""Patch: an incident's recovery runs under the trace context of the report that opened it, so its
runbook is in that report's trace. Guardians started before it recover under the context of their
own start, as they did (the first report's trace), until they continue as new."""
JOINED_IN_START = "guardian-joined-in-start"
"""Patch: the reports that joined an incident before its runbook started go into the runbook's
start (``FailoverRequest.joined``) instead of a ``joined`` signal each right after the start. Such
a signal landed while the runbook's one workflow task (every step as a local activity) was
completing, the server refused the completion, and the task ran again: 31 of 261 runbooks in a
zone outage of 1,000 instances. Guardians started before it signal them, as they did, until they
continue as new."""
RECENT_KEPT = 50
"""Closed incidents remembered, so a late report of a recovered failure joins instead of restarting."""
JOINED_KEPT = 20
MAX_HISTORY = 2_000
LEASE_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=5))
"""Asking the budget and claiming the epoch retry until they succeed: a recovery is delayed by an
unreachable platform or Temporal, never dropped."""
RUNBOOK_GONE = "ExternalWorkflowExecutionNotFound"
"""The failure type of a signal to a workflow that has already closed."""
SETTLED = (FailoverOutcome.RECOVERED, FailoverOutcome.ALREADY_EJECTED, FailoverOutcome.STANDBY_EJECTED)
"""Outcomes after which the instance is out for good: a later report of it has nothing to add."""


@workflow.defn(name="ModelGuardianWorkflow", failure_exception_types=[ValidationError])
class ModelGuardianWorkflow:
    @workflow.init
    def __init__(self, state: GuardianState) -> None:
        self._state = state
        self._granted: set[str] = set()
        self._upgraded = 0
        self._running: dict[str, Any] = {}
        """Instance → the child handle of its running runbook."""
        self._report_traces: dict[str, opentelemetry.context.Context] = {}
        """Instance → the trace context of the report that opened its incident (not state: only trace
        headers depend on it, and a replay rebuilds it from the reports' Updates)."""

    # -- reports --------------------------------------------------------------------------------

    @workflow.update(name="report")
    async def report(self, report: FailureReport) -> IncidentTicket:
        """One report of a failed instance: open an incident, or join the one that handles it."""
        state = self._state
        state.reports += 1
        request = report.request
        reporter = report.reporter or str(request.trigger)
        open_ = next((i for i in state.queue if i.instance == request.instance), None)
        if open_ is not None:
            self._join(open_, reporter)
            if report.zone_level and not open_.zone_level:
                open_.zone_level = True  # a zone failover takes over a recovery waiting for the budget
                if open_.request.prefer_zone is None and request.prefer_zone is not None:
                    open_.request = open_.request.model_copy(update={"prefer_zone": request.prefer_zone})
                self._upgraded += 1
            if report.lease is not None:
                self._run_under(report.lease, open_)
            handle = self._running.get(open_.instance)
            if handle is not None:
                await self._tell_runbook(handle, "joined", reporter)
            if report.lease is not None:
                await self._until_started(open_)
            return self._ticket(open_, joined=True)
        settled = next(
            (i for i in reversed(state.recent) if i.instance == request.instance and i.outcome in SETTLED), None
        )
        if settled is not None:
            self._join(settled, reporter)
            return self._ticket(settled, joined=True)
        incident = Incident(
            instance=request.instance,
            workflow_id=failover_workflow_id(request.model, request.instance),
            request=request,
            reporter=reporter,
            zone_level=report.zone_level,
            opened_at=workflow.now(),
        )
        state.queue.append(incident)
        self._report_traces[incident.instance] = opentelemetry.context.get_current()
        if report.lease is not None:
            self._run_under(report.lease, incident)
            await self._until_started(incident)
        return self._ticket(incident, joined=False)

    @staticmethod
    async def _until_started(incident: Incident) -> None:
        """Answer a report under a zone failover's lease once its runbook has a run (or the incident
        closed without one): the answer then names the run, and the reporter awaits its result at
        once instead of asking this guardian again and again until it has started. Nothing waits
        for the budget under a lease, so this is the time the runbooks ahead of it take."""
        await workflow.wait_condition(lambda: incident.run_id is not None or incident.state == IncidentState.DONE)

    def _run_under(self, lease: str, incident: Incident) -> None:
        """A zone failover's lease covers ``incident`` and every incident queued before it (they run
        one after another in the one slot the zone failover holds for this model): none of them
        waits for the budget any more. Without the incidents ahead, a report waiting behind an
        incident of the same zone that waits for the zone failover's own lease would never run."""
        for queued in self._state.queue[: self._state.queue.index(incident) + 1]:
            if queued.lease is None and queued.state == IncidentState.QUEUED:
                queued.lease = lease
                queued.zone_level = True
                queued.waiting_for = ""
        self._upgraded += 1

    @report.validator
    def _validate_report(self, report: FailureReport) -> None:
        if report.request.model != self._state.model:
            raise ApplicationError(
                f"this guardian recovers {self._state.model}, not {report.request.model}", non_retryable=True
            )
        if report.request.plan_only:
            raise ApplicationError("a plan changes nothing: start FailoverWorkflow with plan_only directly")

    @workflow.signal(name="lease_granted")
    def lease_granted(self, grant: LeaseGrant) -> None:
        if not any(i.workflow_id == grant.incident for i in self._state.queue):
            return  # late: its incident has closed (it ran under a zone failover's lease; handed back)
        self._granted.add(grant.incident)

    @workflow.signal(name="alert_resolved")
    async def alert_resolved(self, resolved: InstanceAlertResolved) -> None:
        """The alert about an instance resolved: tell its running runbook (its own probe decides)."""
        handle = self._running.get(resolved.instance)
        if handle is not None:
            await self._tell_runbook(handle, "alert_resolved", resolved.resolved)

    @workflow.query(name="incidents")
    def incidents(self) -> GuardianState:
        return self._state

    # -- the loop -------------------------------------------------------------------------------

    @workflow.run
    async def run(self, state: GuardianState) -> None:
        while True:
            await workflow.wait_condition(lambda: bool(self._state.queue) or self._should_continue_as_new())
            if not self._state.queue:
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not self._state.queue:
                    workflow.continue_as_new(self._state)
                continue
            incident = self._state.queue[0]
            await self._recover(incident)
            self._state.queue.remove(incident)
            self._granted.discard(incident.workflow_id)  # a grant that came while it closed
            self._state.recent = [*self._state.recent, incident][-RECENT_KEPT:]

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        return info.get_current_history_length() > MAX_HISTORY or info.is_continue_as_new_suggested()

    async def _recover(self, incident: Incident) -> None:
        with self._in_report_trace(incident):
            await self._recover_incident(incident)

    @contextmanager
    def _in_report_trace(self, incident: Incident) -> Iterator[None]:
        """The incident's recovery under the trace context of the report that opened it: the spans
        and trace headers of what it starts (the local activities, the child runbook) follow it."""
        context = self._report_traces.pop(incident.instance, None)
        if not workflow.patched(RUNBOOK_IN_REPORT_TRACE):
            context = None  # started before the patch: under the guardian's start, as it was
        with attached_context(context):
            yield

    async def _recover_incident(self, incident: Incident) -> None:
        await self._wait_for_budget(incident)
        try:
            grant: EpochGrant = await workflow.execute_local_activity(
                ActivityName.CLAIM_EPOCH,
                ModelRef(model=self._state.model),
                result_type=EpochGrant,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=LEASE_RETRY,
            )
            incident.epoch = grant.epoch
            incident.state = IncidentState.RUNNING
            incident.waiting_for = ""
            # The listing claimed with the epoch goes into the runbook's start: it lists nothing itself.
            runbook_request = incident.request.model_copy(update={"epoch": grant.epoch, "listing": grant.listing})
            result = await self._run_runbook(incident, runbook_request)
            incident.outcome = result.outcome if result is not None else FailoverOutcome.FAILED
        finally:
            self._running.pop(incident.instance, None)
            incident.state = IncidentState.DONE
            incident.closed_at = workflow.now()
            if incident.lease is None or incident.asked_budget:
                await workflow.get_external_workflow_handle(budget_workflow_id(workflow.info().task_queue)).signal(
                    "release", LeaseRelease(incident=incident.workflow_id)
                )

    async def _wait_for_budget(self, incident: Incident) -> None:
        sent_kind: LeaseKind | None = None
        while incident.workflow_id not in self._granted:
            if incident.lease is not None:
                return  # a zone failover's lease covers it (a request sent already is handed back at the end)
            kind = LeaseKind.ZONE if incident.zone_level else LeaseKind.INSTANCE
            if kind != sent_kind:
                answer: LeaseAnswer = await workflow.execute_local_activity(
                    ActivityName.REQUEST_LEASE,
                    LeaseRequest(
                        holder=workflow.info().workflow_id,
                        incident=incident.workflow_id,
                        model=self._state.model,
                        instance=incident.instance,
                        kind=kind,
                    ),
                    result_type=LeaseAnswer,
                    start_to_close_timeout=timedelta(seconds=10),
                    retry_policy=LEASE_RETRY,
                )
                incident.asked_budget = True
                if answer.granted:
                    self._granted.add(incident.workflow_id)
                    break
                incident.waiting_for = answer.detail
                sent_kind = kind
            upgraded = self._upgraded
            await workflow.wait_condition(
                lambda: incident.workflow_id in self._granted or self._upgraded != upgraded  # noqa: B023
            )
        self._granted.discard(incident.workflow_id)

    def _joined_in_start(self) -> bool:
        return workflow.patched(JOINED_IN_START)

    async def _run_runbook(self, incident: Incident, request: Any) -> FailoverResult | None:
        told: list[str] = []
        if self._joined_in_start():
            told = list(incident.joined)
            request = request.model_copy(update={"joined": told, "joined_total": incident.joined_total})

        def start() -> Any:
            return workflow.start_child_workflow(
                FailoverWorkflow.run,
                request,
                id=incident.workflow_id,
                task_timeout=WORKFLOW_TASK_TIMEOUT,
                parent_close_policy=ParentClosePolicy.ABANDON,
            )

        try:
            handle = await start()
        except WorkflowAlreadyStartedError:
            # That id is taken by a run started directly (not through a guardian): use the epoch.
            incident.workflow_id = f"{incident.workflow_id}-e{request.epoch}"
            handle = await start()
        incident.run_id = handle.first_execution_run_id
        # Those that joined since the start's input was made; from now on the report handler
        # signals new ones itself.
        joined_before = list(incident.joined)[len(told) :]
        self._running[incident.instance] = handle
        for reporter in joined_before:
            await self._tell_runbook(handle, "joined", reporter)
        try:
            result: FailoverResult = await handle
        except ChildWorkflowError as err:
            workflow.logger.warning("runbook %s failed: %s", incident.workflow_id, err)
            return None
        return result

    @staticmethod
    async def _tell_runbook(handle: Any, signal: str, arg: Any) -> None:
        """Signal a running runbook. It may have ended before the signal lands (its end not yet seen
        here): then there is nothing left to tell it, and that must not fail the guardian (found by
        the nemesis: a fast runbook ended between two ``joined`` signals, the guardian failed with
        its incident still queued, and the model had no guardian until the next report)."""
        try:
            await handle.signal(signal, arg)
        except ApplicationError as err:
            if err.type != RUNBOOK_GONE:
                raise
            workflow.logger.info("runbook %s ended before its %s signal", handle.id, signal)

    @staticmethod
    def _join(incident: Incident, reporter: str) -> None:
        incident.joined_total += 1
        if len(incident.joined) < JOINED_KEPT:
            incident.joined.append(reporter)

    @staticmethod
    def _ticket(incident: Incident, joined: bool) -> IncidentTicket:
        return IncidentTicket(
            model=incident.request.model,
            instance=incident.instance,
            workflow_id=incident.workflow_id,
            joined=joined,
            state=incident.state,
            outcome=incident.outcome,
            opened_at=incident.opened_at,
            detail=incident.waiting_for,
            run_id=incident.run_id,
        )
