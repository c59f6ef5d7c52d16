"""A run started with no input at all (the Temporal UI's Start Workflow form with an empty Input box,
``temporal workflow start`` without ``--input``) fails at once with one line, for every workflow the
worker registers: before, the SDK called the workflow with no argument, the ``TypeError`` failed the
workflow task, and the SDK retried that task for ever (drctl.temporal.converter)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHistory
from temporalio.common import RawValue
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from drctl.settings import DrctlSettings
from drctl.temporal.client import connect
from drctl.temporal.converter import (
    MISSING_INPUT,
    MissingWorkflowInput,
    drctl_data_converter,
    missing_input,
    missing_input_plugin,
)
from drctl.temporal.refs import workflow_type
from drctl.workers.runbook_worker import WORKFLOWS

JSON_NULL = RawValue(Payload(metadata={"encoding": b"json/plain"}, data=b"null"))
"""What ``temporal workflow start --input null`` sends (the Python SDK would send None as binary/null)."""
PROMPT_S = 10.0
"""A failing first workflow task is retried after about 10 s by the server; a run that fails at
once ends well within that."""


async def drctl_client(env: WorkflowEnvironment) -> Client:
    """A client as every drctl part makes it (``connect``), on the test server."""
    return await connect(DrctlSettings(temporal_address=env.client.service_client.config.target_host))


async def start_and_fail(
    client: Client, queue: str, name: str, *args: object
) -> tuple[ApplicationError, list[HistoryEvent], WorkflowHistory]:
    """Start workflow ``name`` with ``args`` (none: no input at all); its failure, events and history."""
    handle = await client.start_workflow(name, args=args, id=f"no-input-{uuid.uuid4().hex[:8]}", task_queue=queue)
    began = time.monotonic()
    with pytest.raises(WorkflowFailureError) as caught:
        await asyncio.wait_for(handle.result(), timeout=PROMPT_S)
    assert time.monotonic() - began < PROMPT_S
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError)
    history = await handle.fetch_history()
    return cause, list(history.events), history


@pytest.mark.parametrize("workflow", [workflow_type(cls) for cls in WORKFLOWS])
async def test_a_run_started_with_no_input_fails_at_once_with_one_line(
    time_skipping_env: WorkflowEnvironment, workflow: str
) -> None:
    client = await drctl_client(time_skipping_env)
    queue = f"no-input-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=WORKFLOWS, activities=[]):
        cause, events, history = await start_and_fail(client, queue, workflow)
    assert cause.type == MISSING_INPUT and cause.non_retryable
    assert cause.message.startswith(f"{workflow} was started with no input: it takes '"), cause.message
    assert "JSON object" in cause.message and "\n" not in cause.message
    # It failed at its first workflow task, which did not fail (no retry loop), with no stack trace.
    assert not [e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    [failed] = [e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED]
    failure = failed.workflow_execution_failed_event_attributes.failure
    assert failure.message == cause.message and failure.stack_trace == ""
    # A worker replaying the closed run (a query, say) replays it as it ran.
    replayer = Replayer(workflows=WORKFLOWS, data_converter=drctl_data_converter, plugins=[missing_input_plugin])
    await replayer.replay_workflow(history)


async def test_null_input_fails_naming_the_input(time_skipping_env: WorkflowEnvironment) -> None:
    """``--input null`` (one ``json/plain`` payload, as the Temporal CLI and UI send it) is the
    converter's path: a one-line validation failure."""
    client = await drctl_client(time_skipping_env)
    queue = f"no-input-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=WORKFLOWS, activities=[]):
        cause, events, _ = await start_and_fail(client, queue, "FailoverWorkflow", JSON_NULL)
    assert cause.type == "ValidationError" and cause.message.startswith("invalid FailoverRequest: input None")
    assert not [e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]


async def test_without_the_plugin_the_sdk_retries_the_task(time_skipping_env: WorkflowEnvironment) -> None:
    """What the plugin changes: a worker without it fails the first workflow task and keeps the run
    open (the SDK retries that task), so the test above would time out without the fix."""
    client = await drctl_client(time_skipping_env)
    plain = Client(**{**client.config(), "plugins": []})
    queue = f"no-input-{uuid.uuid4().hex[:8]}"
    async with Worker(plain, task_queue=queue, workflows=WORKFLOWS, activities=[]):
        handle = await plain.start_workflow("FailoverWorkflow", id=f"no-input-{uuid.uuid4().hex[:8]}", task_queue=queue)
        for _ in range(100):
            events = [e async for e in handle.fetch_history_events()]
            if any(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED for e in events):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the first workflow task did not fail")
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        assert not [e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED]
        await handle.terminate("test over")


def test_only_the_sdks_own_call_with_missing_arguments_matches() -> None:
    """A ``TypeError`` from a workflow's own code (here: a call with an argument missing, outside the
    SDK) must not fail the run: it stays a workflow-task failure a fixed worker can retry."""

    def takes(request: object) -> object:
        return request

    try:
        takes()  # type: ignore[call-arg]
    except TypeError as err:
        assert "missing 1 required positional argument" in str(err)
        assert missing_input(err) is None and not isinstance(err, MissingWorkflowInput)
    assert not isinstance(TypeError("x"), MissingWorkflowInput)
    assert not isinstance(ValueError("run() missing 1 required positional argument: 'request'"), MissingWorkflowInput)
