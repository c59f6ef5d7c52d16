"""The budget hands out what one decision grants in one workflow task (patch
``budget-grants-side-by-side``): each ``lease_granted`` signal awaited in turn took a workflow task
of its own, which in a zone failover of hundreds of instances capped the leases at a few a second.
Time-skipping server; the holders are small workflows that wait for their grant."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.payloads import BudgetReset, BudgetState, LeaseGrant, LeaseRequest, budget_workflow_id
from drctl.temporal.converter import drctl_data_converter
from drctl.workflows.budget import BudgetWorkflow
from tests.histories.before_patches import BudgetBeforeGrantsSideBySide

HOLDERS = 4


@workflow.defn(name="LeaseHolder", sandboxed=False)
class LeaseHolder:
    def __init__(self) -> None:
        self._grant: LeaseGrant | None = None

    @workflow.signal(name="lease_granted")
    def lease_granted(self, grant: LeaseGrant) -> None:
        self._grant = grant

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self._grant is not None)
        assert self._grant is not None
        return self._grant.incident


async def grant_tasks(env: WorkflowEnvironment, budget: type) -> list[int]:
    """Trip the budget, let four holders wait, reset it: the workflow task of each grant signal."""
    client = Client(**{**env.client.config(), "data_converter": drctl_data_converter})
    queue = f"grants-{uuid.uuid4().hex[:8]}"
    # Real time: skipping ahead would expire the budget's leases (and the holders' tasks) meanwhile.
    with env.auto_time_skipping_disabled():
        return await _grant_tasks(client, queue, budget)


async def _grant_tasks(client: Client, queue: str, budget: type) -> list[int]:
    async with Worker(client, task_queue=queue, workflows=[budget, LeaseHolder]):
        holders = [
            await client.start_workflow(LeaseHolder.run, id=f"holder-{i}-{queue}", task_queue=queue)
            for i in range(HOLDERS)
        ]
        handle = await client.start_workflow(
            BudgetWorkflow.run,
            BudgetState(tripped="tripped by the test"),
            id=budget_workflow_id(queue),
            task_queue=queue,
        )
        for i, holder in enumerate(holders):
            request = LeaseRequest(holder=holder.id, incident=f"incident-{i}", model=f"m{i}", zone=f"az-{i}")
            await handle.signal("acquire", request)
        await handle.execute_update("reset", BudgetReset(actor="test"), result_type=str)
        granted = await asyncio.wait_for(asyncio.gather(*(h.result() for h in holders)), timeout=30)
        assert sorted(granted) == [f"incident-{i}" for i in range(HOLDERS)]
        history = await handle.fetch_history()
    return [
        e.signal_external_workflow_execution_initiated_event_attributes.workflow_task_completed_event_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED
    ]


async def test_the_grants_of_one_decision_go_out_in_one_workflow_task(time_skipping_env: WorkflowEnvironment) -> None:
    tasks = await grant_tasks(time_skipping_env, BudgetWorkflow)
    assert len(tasks) == HOLDERS and len(set(tasks)) == 1, tasks


@pytest.mark.parametrize("budget", [BudgetBeforeGrantsSideBySide])
async def test_before_the_patch_each_grant_took_a_workflow_task(
    time_skipping_env: WorkflowEnvironment, budget: type
) -> None:
    tasks = await grant_tasks(time_skipping_env, budget)
    assert len(tasks) == HOLDERS and len(set(tasks)) == HOLDERS, tasks
