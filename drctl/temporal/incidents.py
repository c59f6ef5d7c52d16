"""The one way every trigger reports a failed instance: update-with-start on the model's guardian.

The prober, the alert receiver, the Kubernetes watcher, the CLI, a zone failover, a GPU drain and a
directly started ``FailoverWorkflow`` all call :func:`report_failure`. The guardian (started by the
first report) answers with an :class:`IncidentTicket`: the runbook that handles the failure, and
whether this report opened the incident or joined it. Nothing here starts ``FailoverWorkflow``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio.client import Client, WithStartWorkflowOperation, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from drctl.payloads import (
    WORKFLOW_TASK_TIMEOUT,
    BudgetState,
    ErrorType,
    FailoverRequest,
    FailoverResult,
    FailureReport,
    GuardianState,
    Incident,
    IncidentTicket,
    LeaseKind,
    LeaseRelease,
    LeaseRequest,
    SearchAttr,
    budget_workflow_id,
    failover_workflow_id,
    guardian_workflow_id,
    zone_failover_workflow_id,
)
from drctl.workflows.budget import BudgetWorkflow
from drctl.workflows.failover import FailoverWorkflow, switch_record_attributes
from drctl.workflows.guardian import ModelGuardianWorkflow

RPC_TIMEOUT = timedelta(seconds=10)


async def report_failure(client: Client, task_queue: str, report: FailureReport) -> IncidentTicket:
    """Report one failed instance to its model's guardian (starting the guardian if it is not
    running); returns once the guardian has recorded it."""
    model = report.request.model
    start: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
        ModelGuardianWorkflow.run,
        GuardianState(model=model),
        id=guardian_workflow_id(model, task_queue),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        task_timeout=WORKFLOW_TASK_TIMEOUT,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(SearchAttributeKey.for_keyword(SearchAttr.MODEL), model)]
        ),
    )
    try:
        # (temporalio types an async update handler's result as its coroutine: hence the ignore)
        ticket: IncidentTicket = await client.execute_update_with_start_workflow(
            ModelGuardianWorkflow.report,  # type: ignore[arg-type]
            report,
            start_workflow_operation=start,
            rpc_timeout=RPC_TIMEOUT,
        )
    except BaseException:
        _forget_start_error(start)
        raise
    return ticket


def _forget_start_error(start: WithStartWorkflowOperation[Any, Any]) -> None:
    """A failed update-with-start leaves its error on the start operation's handle as well, which no
    one awaits here: asyncio then logs "Future exception was never retrieved" with a traceback (the
    alert receiver's log, each time a report timed out while the worker was down). The error the
    caller gets is the update's; this one is marked seen."""
    started = getattr(start, "_workflow_handle", None)  # the SDK's future (temporalio 1.35)
    if isinstance(started, asyncio.Future) and started.done() and not started.cancelled():
        started.exception()


async def _wait_for_incident(
    client: Client,
    task_queue: str,
    ticket: IncidentTicket,
    ready: Callable[[Incident, bool], bool],
    *,
    poll_s: float,
    poll_max_s: float | None = None,
    wait_s: float | None = None,
) -> Incident | None:
    """The ticket's incident, asked of its guardian (a query) until ``ready(incident, closed)``;
    every ``poll_s``, doubling up to ``poll_max_s`` when given. None once ``wait_s`` has passed."""
    loop = asyncio.get_running_loop()
    deadline = None if wait_s is None else loop.time() + wait_s
    next_look = loop.time() + GUARDIAN_LOOK_S
    while True:
        state = await guardian_state(client, task_queue, ticket.model)
        queued, closed = (state.queue, state.recent) if state is not None else ([], [])
        for incident, is_closed in [*((i, False) for i in queued), *((i, True) for i in closed)]:
            if incident.instance == ticket.instance and incident.opened_at == ticket.opened_at:
                if ready(incident, is_closed):
                    return incident
        if deadline is not None and loop.time() > deadline:
            return None
        if loop.time() >= next_look:
            next_look = loop.time() + GUARDIAN_LOOK_S
            await _guardian_still_runs(client, task_queue, ticket)
        await asyncio.sleep(poll_s)
        if poll_max_s is not None:
            poll_s = min(poll_max_s, poll_s * 2)


GUARDIAN_LOOK_S = 10.0
"""How often a wait for an incident also asks whether its guardian still runs (a describe)."""


async def _guardian_still_runs(client: Client, task_queue: str, ticket: IncidentTicket) -> None:
    """Raise (not retried) when the ticket's guardian has closed: its query still answers (from its
    history) with the incident queued, so a wait would never end. Seen with an unknown model,
    whose guardian fails at its epoch claim, before direct starts checked their model."""
    workflow_id = guardian_workflow_id(ticket.model, task_queue)
    description = await client.get_workflow_handle(workflow_id).describe(rpc_timeout=RPC_TIMEOUT)
    status = description.status
    if status is not None and status != WorkflowExecutionStatus.RUNNING:
        raise ApplicationError(
            f"{workflow_id} is {status.name.lower()}: the incident of {ticket.instance} it held will not be "
            f"run (`drctl audit show {workflow_id}` says why)",
            type=ErrorType.GUARDIAN_CLOSED,
            non_retryable=True,
        )


async def wait_closed(client: Client, task_queue: str, ticket: IncidentTicket, poll_s: float = 0.1) -> Incident:
    """Wait until the guardian has closed the ticket's incident; returns it (with its run id and its
    final workflow id, which differs from the ticket's when that id was taken by a direct start)."""
    incident = await _wait_for_incident(client, task_queue, ticket, lambda _i, closed: closed, poll_s=poll_s)
    assert incident is not None  # no deadline
    return incident


POLL_FIRST_S = 0.05
POLL_MAX_S = 1.0


async def wait_running(client: Client, task_queue: str, ticket: IncidentTicket) -> Incident:
    """The ticket's incident once its runbook has a run, or once it closed without one: asked of the
    guardian (a query, which its worker answers) at growing intervals, 50 ms up to 1 s.

    What waits for many runbooks at once (a zone failover, a drain) then awaits each run's result
    with :func:`runbook_result`, a long poll the server answers when the run ends: polling the
    guardians every 100 ms until the end was 160 queries a second at 16 runbooks in flight, which
    the worker and the dev server had to answer beside the runbooks themselves."""
    incident = await _wait_for_incident(
        client,
        task_queue,
        ticket,
        lambda i, closed: i.run_id is not None or closed,
        poll_s=POLL_FIRST_S,
        poll_max_s=POLL_MAX_S,
    )
    assert incident is not None  # no deadline
    return incident


async def wait_started(
    client: Client, task_queue: str, ticket: IncidentTicket, wait_s: float, poll_s: float = 0.05
) -> Incident | None:
    """The ticket's incident once its runbook has a run (None if it still waits after ``wait_s``:
    behind an earlier incident of the model, or for the budget)."""
    return await _wait_for_incident(
        client, task_queue, ticket, lambda i, _closed: i.run_id is not None, poll_s=poll_s, wait_s=wait_s
    )


async def runbook_result(client: Client, incident: Incident | IncidentTicket) -> FailoverResult:
    """The result of the run that handled ``incident`` (not a later or earlier run of the same id;
    a ticket names it when the guardian answered once the run had started)."""
    handle = client.get_workflow_handle(incident.workflow_id, run_id=incident.run_id, result_type=FailoverResult)
    result: FailoverResult = await handle.result()
    return result


def runbook_handle(client: Client, ticket: IncidentTicket) -> WorkflowHandle[Any, FailoverResult]:
    """The handle of the runbook a ticket names (to follow its progress or await its result)."""
    return client.get_workflow_handle(ticket.workflow_id, result_type=FailoverResult)


async def request_lease(client: Client, task_queue: str, request: LeaseRequest) -> bool:
    """Ask the budget for a lease (update-with-start: the first request brings the budget up).
    True: granted now; False: it waits, and the guardian gets the ``lease_granted`` signal later."""
    start: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
        BudgetWorkflow.run,
        BudgetState(),
        id=budget_workflow_id(task_queue),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        task_timeout=WORKFLOW_TASK_TIMEOUT,
    )
    granted: bool = await client.execute_update_with_start_workflow(
        BudgetWorkflow.acquire_now, request, start_workflow_operation=start, rpc_timeout=RPC_TIMEOUT
    )
    return granted


async def hand_back_lease(client: Client, task_queue: str, release: LeaseRelease) -> str:
    """Hand a lease back to the budget, returning once the budget's state no longer holds it."""
    try:
        answer: str = await client.get_workflow_handle(budget_workflow_id(task_queue)).execute_update(
            BudgetWorkflow.hand_back, release, rpc_timeout=RPC_TIMEOUT
        )
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        return "no budget running: nothing to hand back"
    return answer


async def budget_state(client: Client, task_queue: str) -> BudgetState | None:
    """The budget now, or None when no recovery has asked for one yet (it is not running)."""
    try:
        state: BudgetState = await client.get_workflow_handle(budget_workflow_id(task_queue)).query(
            BudgetWorkflow.view, rpc_timeout=RPC_TIMEOUT
        )
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return state


async def busy_models(client: Client, task_queue: str) -> dict[str, str]:
    """Models with a recovery running or waiting for the budget → that recovery's runbook (or the
    zone failover whose lease covers the model: its runbooks ask the budget nothing more)."""
    return busy_in(await budget_state(client, task_queue))


async def start_switch_record(client: Client, task_queue: str, request: FailoverRequest) -> str:
    """Start the ``FailoverWorkflow`` that records a switch a zone failover's batch made
    (``request.switched``), once. Its id is the model's usual runbook id; when a run of that id
    exists already, it is this record (started by an earlier attempt: its memo says so) or another
    run (an earlier failure of an instance of the same id), and the next id is tried: with the
    epoch (``-z{epoch}``), then numbered. Returns the id the record runs under."""
    switched = request.switched
    assert switched is not None
    plain = failover_workflow_id(request.model, request.instance)
    memo = {"switched_by": switched.handled_by, "epoch": switched.epoch}
    ids = [plain, f"{plain}-z{switched.epoch}", *(f"{plain}-z{switched.epoch}-{n}" for n in range(2, RECORD_IDS))]
    for workflow_id in ids:
        try:
            await client.start_workflow(
                FailoverWorkflow.run,
                request,
                id=workflow_id,
                task_queue=task_queue,
                task_timeout=WORKFLOW_TASK_TIMEOUT,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                memo=memo,
                search_attributes=TypedSearchAttributes(
                    [SearchAttributePair(u.key, u.value) for u in switch_record_attributes(request, switched)]
                ),
                rpc_timeout=RPC_TIMEOUT,
                # Its one workflow task comes back with the start, to this worker: no dispatch
                # through the server's matching. The batch starts its records after every switch
                # (eagerly *beside* the switches, their tasks timed out on the busy worker), and
                # there it halved the Temporal server's CPU (docs/benchmarks.md, thirteenth session).
                request_eager_start=True,
            )
            return workflow_id
        except WorkflowAlreadyStartedError:
            existing = await client.get_workflow_handle(workflow_id).describe(rpc_timeout=RPC_TIMEOUT)
            if await existing.memo() == memo:
                return workflow_id  # this record, started by an earlier attempt
    raise RuntimeError(f"every id for the record of {request.instance}'s switch is taken: {', '.join(ids)}")


RECORD_IDS = 10
"""Ids a switch's record tries (see :func:`start_switch_record`) before it gives up (and the
activity is retried)."""


def busy_except(state: BudgetState | None, lease: str) -> dict[str, str]:
    """:func:`busy_in`, leaving out what the lease ``lease`` (a zone failover's own) covers."""
    if state is None:
        return {}
    others = state.model_copy(
        update={
            "running": [r for r in state.running if r.incident != lease],
            "waiting": [w for w in state.waiting if w.incident != lease],
        }
    )
    return busy_in(others)


def busy_in(state: BudgetState | None) -> dict[str, str]:
    """:func:`busy_models` of a budget's state (None: no budget yet, nothing busy)."""
    busy: dict[str, str] = {}
    for lease in [*state.waiting, *state.running] if state is not None else []:
        for model in [lease.model, *lease.covers] if lease.model else lease.covers:
            busy.setdefault(model, lease.incident)
    return busy


ZONE_FAILOVER_FIRST_FOR = timedelta(minutes=5)
"""How long reconciliation leaves new standbys for after a zone failover (see
:func:`zones_failing_over`): a zone failover that holds its lease longer is taken for stuck, and
the fleet's standbys are not held back for it."""


async def zone_failovers_running(client: Client, task_queue: str, now: datetime) -> set[str]:
    """Zones whose ``ZoneFailoverWorkflow`` runs (started within ``ZONE_FAILOVER_FIRST_FOR``): from
    its start, before its lease is granted too. It cordons the zone and asks the budget first, and
    a pass planned in that second made the zone's standbys beside its recoveries (at 2,000
    instances: 62 batches through the failover, which then did not finish in 4 minutes)."""
    query = f"WorkflowType = 'ZoneFailoverWorkflow' AND ExecutionStatus = 'Running' AND TaskQueue = '{task_queue}'"
    prefix = zone_failover_workflow_id("")
    return {
        wf.id.removeprefix(prefix)
        async for wf in client.list_workflows(query)
        if wf.id.startswith(prefix) and now - wf.start_time < ZONE_FAILOVER_FIRST_FOR
    }


def zones_recovering(state: BudgetState | None) -> set[str]:
    """Zones with a recovery the budget runs or holds (a zone failover's lease or a single one)."""
    leases = [*state.running, *state.waiting] if state is not None else []
    return {lease.zone for lease in leases if lease.zone is not None}


def zones_failing_over(state: BudgetState | None, now: datetime) -> list[str]:
    """Zones whose failover's lease is running (granted within ``ZONE_FAILOVER_FIRST_FOR``): while
    one runs, reconciliation makes no new standbys (``drctl.policies.reconcile.zone_failover_first``)."""
    running = state.running if state is not None else []
    return sorted(
        {
            lease.zone
            for lease in running
            if lease.kind == LeaseKind.ZONE
            and lease.zone is not None
            and (lease.granted_at is None or now - lease.granted_at < ZONE_FAILOVER_FIRST_FOR)
        }
    )


async def guardian_state(client: Client, task_queue: str, model: str) -> GuardianState | None:
    try:
        state: GuardianState = await client.get_workflow_handle(guardian_workflow_id(model, task_queue)).query(
            ModelGuardianWorkflow.incidents, rpc_timeout=RPC_TIMEOUT
        )
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return state
