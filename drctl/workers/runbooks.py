"""Starting runbooks: one place that knows workflow IDs, conflict policies and search attributes,
shared by the CLI, the prober and the alert receiver."""

from __future__ import annotations

from typing import Any, TypeVar

from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)

from drctl.payloads import (
    DrainGpuRequest,
    DrainGpuResult,
    FailoverRequest,
    FailoverResult,
    SearchAttr,
    ZoneFailoverRequest,
    ZoneFailoverResult,
    drain_workflow_id,
    failover_workflow_id,
    zone_failover_workflow_id,
)
from drctl.settings import DrctlSettings

R = TypeVar("R")


async def start_failover(
    client: Client, settings: DrctlSettings, request: FailoverRequest
) -> WorkflowHandle[Any, FailoverResult]:
    """Start (or join) the failover of one instance; the ID makes duplicate starts join."""
    return await _start_or_join(
        client,
        settings,
        "FailoverWorkflow",
        request,
        failover_workflow_id(request.model, request.instance),
        FailoverResult,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(SearchAttributeKey.for_keyword(SearchAttr.MODEL), request.model),
                SearchAttributePair(SearchAttributeKey.for_keyword(SearchAttr.INSTANCE), request.instance),
                SearchAttributePair(SearchAttributeKey.for_keyword(SearchAttr.TRIGGER), request.trigger.value),
            ]
        ),
    )


async def start_gpu_drain(
    client: Client, settings: DrctlSettings, request: DrainGpuRequest
) -> WorkflowHandle[Any, DrainGpuResult]:
    """Start (or join) the drain of one GPU: one drain per GPU at a time."""
    return await _start_or_join(
        client, settings, "DrainGpuWorkflow", request, drain_workflow_id(request.gpu), DrainGpuResult
    )


async def start_zone_failover(
    client: Client, settings: DrctlSettings, request: ZoneFailoverRequest
) -> WorkflowHandle[Any, ZoneFailoverResult]:
    """Start (or join) the failover of a zone: one per zone at a time."""
    return await _start_or_join(
        client, settings, "ZoneFailoverWorkflow", request, zone_failover_workflow_id(request.zone), ZoneFailoverResult
    )


async def _start_or_join(
    client: Client,
    settings: DrctlSettings,
    workflow: str,
    request: Any,
    workflow_id: str,
    result_type: type[R],
    search_attributes: TypedSearchAttributes | None = None,
) -> WorkflowHandle[Any, R]:
    """Start ``workflow`` under ``workflow_id``, or join the run already going under it."""
    return await client.start_workflow(
        workflow,
        request,
        id=workflow_id,
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        result_type=result_type,
        search_attributes=search_attributes,
    )
