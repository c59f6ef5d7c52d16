"""A runbook started with input that does not validate (the Temporal UI's JSON, ``temporal workflow
start``) fails at once with one line naming the field and the value: no pydantic wall of text, no
stack trace of the SDK's decoding internals (drctl.temporal.converter)."""

from __future__ import annotations

import uuid

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from drctl.temporal.converter import drctl_data_converter
from drctl.workflows.drain import DrainGpuWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.reconcile import ReconcileStandbysWorkflow
from drctl.workflows.zone import ZoneFailoverWorkflow

WORKFLOWS = [FailoverWorkflow, ZoneFailoverWorkflow, DrainGpuWorkflow, ReconcileStandbysWorkflow]


def drctl_client(env: WorkflowEnvironment) -> Client:
    """The test server's client with the data converter drctl's own clients and workers use."""
    return Client(**{**env.client.config(), "data_converter": drctl_data_converter})


@pytest.mark.parametrize(
    ("workflow", "raw", "expected"),
    [
        (
            "FailoverWorkflow",
            {"model": "NOPE!", "instance": "llama-2-7b-0"},
            "invalid FailoverRequest: model 'NOPE!': string should match pattern",
        ),
        ("FailoverWorkflow", {"model": "llama-2-7b"}, "invalid FailoverRequest: instance: missing"),
        (
            "FailoverWorkflow",
            {"model": "llama-2-7b", "instance": "llama-2-7b-0", "trigger": "pager"},
            "invalid FailoverRequest: trigger 'pager': input should be 'manual'",
        ),
        ("ZoneFailoverWorkflow", {"zone": "zone a"}, "invalid ZoneFailoverRequest: zone 'zone a': string should match"),
        ("DrainGpuWorkflow", {"gpu": "node-a"}, "invalid DrainGpuRequest: gpu 'node-a': string should match"),
        ("ReconcileStandbysWorkflow", {"models": "all"}, "invalid ReconcileRequest: models 'all': input should be"),
    ],
)
async def test_bad_input_fails_with_one_line_naming_field_and_value(
    time_skipping_env: WorkflowEnvironment, workflow: str, raw: dict[str, object], expected: str
) -> None:
    client = drctl_client(time_skipping_env)
    queue = f"test-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, workflows=WORKFLOWS, activities=[]):
        handle = await client.start_workflow(workflow, raw, id=f"bad-{uuid.uuid4().hex[:8]}", task_queue=queue)
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.message.startswith(expected), cause.message
    assert "\n" not in cause.message
    assert cause.type == "ValidationError"
    # The failure as recorded in the history: one line, no stack trace, no cause below it.
    events = [e async for e in handle.fetch_history_events()]
    [failed] = [e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED]
    failure = failed.workflow_execution_failed_event_attributes.failure
    assert failure.message == cause.message
    assert failure.stack_trace == ""
    assert not failure.HasField("cause")
    # It failed at the first workflow task, which did not fail (no retry loop), and it replays.
    assert not [e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    replayer = Replayer(workflows=WORKFLOWS, data_converter=drctl_data_converter)
    await replayer.replay_workflow(await handle.fetch_history())
