"""Starting runbooks: one place that knows workflow IDs, conflict policies and search attributes,
shared by the CLI, the prober, the Kubernetes watcher and the alert receiver.

A failed instance is never started as a ``FailoverWorkflow`` here: it is reported to its model's
guardian (:mod:`drctl.temporal.incidents`), which runs one recovery per failure."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy

from drctl.payloads import (
    WORKFLOW_TASK_TIMEOUT,
    DrainGpuRequest,
    DrainGpuResult,
    FailoverRequest,
    FailoverResult,
    FailureReport,
    IncidentTicket,
    ZoneFailoverRequest,
    ZoneFailoverResult,
    drain_workflow_id,
    zone_failover_workflow_id,
)
from drctl.settings import DrctlSettings
from drctl.temporal.incidents import report_failure, runbook_handle, wait_started
from drctl.workflows.drain import DrainGpuWorkflow
from drctl.workflows.zone import ZoneFailoverWorkflow

P = TypeVar("P")
R = TypeVar("R")


async def report_failover(
    client: Client, settings: DrctlSettings, request: FailoverRequest, reporter: str = ""
) -> IncidentTicket:
    """Report a failed instance to its model's guardian: the one way every trigger starts (or
    joins) a recovery. The ticket names the runbook and says whether this report joined it."""
    return await report_failure(client, settings.task_queue, FailureReport(request=request, reporter=reporter))


async def start_failover(
    client: Client, settings: DrctlSettings, request: FailoverRequest, reporter: str = "", wait_s: float = 10.0
) -> WorkflowHandle[Any, FailoverResult]:
    """Report the failure, then return the handle of the runbook that handles it, once that runbook
    exists (it may wait for an earlier incident of the model, or for the budget: then after
    ``wait_s`` the handle is returned anyway, and following it may find nothing yet)."""
    ticket = await report_failover(client, settings, request, reporter)
    return await start_failover_handle(client, settings.task_queue, ticket, wait_s)


async def start_failover_handle(
    client: Client, task_queue: str, ticket: IncidentTicket, wait_s: float = 10.0
) -> WorkflowHandle[Any, FailoverResult]:
    """The handle of the ticket's runbook run, once the guardian has started it (or after ``wait_s``,
    a handle on the workflow id, whose run may not exist yet)."""
    incident = await wait_started(client, task_queue, ticket, wait_s)
    if incident is None:
        return runbook_handle(client, ticket)
    return client.get_workflow_handle(incident.workflow_id, run_id=incident.run_id, result_type=FailoverResult)


async def start_gpu_drain(
    client: Client, settings: DrctlSettings, request: DrainGpuRequest
) -> WorkflowHandle[Any, DrainGpuResult]:
    """Start (or join) the drain of one GPU: one drain per GPU at a time."""
    return await _start_or_join(client, settings, DrainGpuWorkflow.run, request, drain_workflow_id(request.gpu))


async def start_zone_failover(
    client: Client, settings: DrctlSettings, request: ZoneFailoverRequest
) -> WorkflowHandle[Any, ZoneFailoverResult]:
    """Start (or join) the failover of a zone: one per zone at a time."""
    return await _start_or_join(
        client, settings, ZoneFailoverWorkflow.run, request, zone_failover_workflow_id(request.zone)
    )


async def _start_or_join(
    client: Client,
    settings: DrctlSettings,
    run: Callable[[Any, P], Awaitable[R]],
    request: P,
    workflow_id: str,
) -> WorkflowHandle[Any, R]:
    """Start the workflow whose run method is ``run`` under ``workflow_id``, or join the run already
    going under it."""
    return await client.start_workflow(
        run,
        request,
        id=workflow_id,
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        task_timeout=WORKFLOW_TASK_TIMEOUT,
    )
