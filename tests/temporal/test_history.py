"""Reading a run back from its history (drctl.temporal.history), on histories the time-skipping
server records for FailoverWorkflow with fake activities."""

from __future__ import annotations

import uuid

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.payloads import FailoverRequest, Role
from drctl.temporal.converter import drctl_data_converter
from drctl.temporal.history import UnknownRun, read_run
from drctl.workflows.failover import FailoverWorkflow
from tests.workflows.fakes import FakeFleet


def drctl_client(env: WorkflowEnvironment) -> Client:
    return Client(**{**env.client.config(), "data_converter": drctl_data_converter})


async def run_failover(env: WorkflowEnvironment, fleet: FakeFleet, local_activities: bool) -> str:
    client = drctl_client(env)
    queue = f"test-{uuid.uuid4()}"
    workflow_id = f"failover-llama-2-7b-0-{uuid.uuid4().hex[:6]}"
    async with Worker(client, task_queue=queue, workflows=[FailoverWorkflow], activities=fleet.activities()):
        await client.execute_workflow(
            FailoverWorkflow.run,
            FailoverRequest(
                model="llama-2-7b", instance="llama-2-7b-0", reason="test", local_activities=local_activities, epoch=1
            ),
            id=workflow_id,
            task_queue=queue,
        )
    return workflow_id


@pytest.mark.parametrize("local_activities", [True, False], ids=["local-activities", "regular-activities"])
async def test_activities_with_their_failures_in_plain_words(
    time_skipping_env: WorkflowEnvironment, local_activities: bool
) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.WARM))
    fleet.broken.add("llama-2-7b-1")
    workflow_id = await run_failover(time_skipping_env, fleet, local_activities)

    run = await read_run(drctl_client(time_skipping_env), workflow_id)

    assert run.workflow_type == "FailoverWorkflow"
    assert run.status == "completed"
    assert run.input["model"] == "llama-2-7b"
    assert run.result["outcome"] == "recovered"
    assert run.started_at is not None and run.duration_ms is not None
    names = [a.activity for a in run.activities]
    assert names[:3] == ["probe_instance", "list_instances", "promote_standby"]
    failed = [a for a in run.activities if a.ok is False]
    assert [a.activity for a in failed] == ["promote_standby"]
    assert failed[0].failure is not None and "Activity task failed" not in failed[0].failure
    assert all(
        a.local == (local_activities and a.activity not in {"list_instances", "load_model"}) for a in run.activities
    )
    assert all(a.attempts >= 1 and (a.duration_ms or 0) >= 0 for a in run.activities)


async def test_unknown_workflow(time_skipping_env: WorkflowEnvironment) -> None:
    with pytest.raises(UnknownRun, match="no workflow 'nope-"):
        await read_run(drctl_client(time_skipping_env), f"nope-{uuid.uuid4().hex}")


def test_a_workflow_task_that_failed_and_ran_again_is_in_the_story() -> None:
    """A signal that lands while a task completes fails that task (UNHANDLED_COMMAND) and the next
    task runs its local activities again: the audit must say so, not show one clean attempt."""
    from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
    from temporalio.api.failure.v1 import Failure
    from temporalio.api.history.v1 import HistoryEvent

    from drctl.cli.audit_story import build_story
    from drctl.cli.render import audit_story_lines
    from drctl.temporal.history import run_from_events

    started = HistoryEvent(event_id=1, event_type=EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
    started.workflow_execution_started_event_attributes.workflow_type.name = "FailoverWorkflow"
    failed = HistoryEvent(event_id=5, event_type=EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    failed.workflow_task_failed_event_attributes.cause = (
        WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND
    )
    failed.workflow_task_failed_event_attributes.failure.CopyFrom(Failure(message="UnhandledCommand"))
    run = run_from_events("failover-x", "r1", [started, failed])
    assert run.task_failures == [
        "a signal or update came while the task was completing; the task ran again with it: UnhandledCommand"
    ]
    story = build_story(run)
    assert story.trigger is None  # no input: no trigger to report ("manual" was shown before)
    shown = "\n".join(str(line) for line in audit_story_lines(story))
    assert "workflow task failed" in shown and "ran again in the next task" in shown
