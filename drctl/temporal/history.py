"""One run's history, read back for the audit: what it was given, each activity with its attempts,
duration and failure in plain words, the signals it got, and how it ended.

:func:`read_run` fetches (a description and the history events); :func:`run_from_events` is the pure
walk over the events, so it is tested from a recorded history. Payloads are read as JSON (drctl's are,
through ``temporalio.contrib.pydantic``) without their types: a run whose input did not validate is
still shown as it was given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.enums.v1 import EventType, TimeoutType, WorkflowTaskFailedCause
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

LOCAL_ACTIVITY_MARKER = "core_local_activity"
WRAPPERS = {"activity task failed", "activity error", "local activity error", "child workflow execution error"}
"""Messages of failures that only wrap the one that says what happened."""


class UnknownRun(LookupError):
    """No workflow with that id (or run id) in the namespace."""


class ActivityRun(BaseModel):
    """One activity as the history records it, over all its attempts."""

    activity: str
    local: bool = False
    attempts: int = 1
    scheduled_at: datetime | None = None
    duration_ms: float | None = None
    """From scheduled to closed, retries and their backoff included."""
    ok: bool | None = None
    """None while it runs."""
    failure: str | None = None
    """Why it failed in the end (or, when it succeeded after retries, why the last retry was needed)."""


class SignalSeen(BaseModel):
    name: str
    at: datetime
    value: Any = None


class RunHistory(BaseModel):
    workflow_id: str
    run_id: str
    workflow_type: str
    status: str
    """running, completed, failed, timed_out, terminated, canceled, continued_as_new."""
    started_at: datetime | None = None
    closed_at: datetime | None = None
    parent_workflow_id: str | None = None
    input: Any = None
    result: Any = None
    failure: str | None = None
    activities: list[ActivityRun] = Field(default_factory=list)
    signals: list[SignalSeen] = Field(default_factory=list)
    task_failures: list[str] = Field(default_factory=list)
    """Each workflow task that failed, in plain words: the local activities it had run are run again
    by the next one (their first run's time and effects are not in the history)."""

    @property
    def duration_ms(self) -> float | None:
        if self.started_at is None or self.closed_at is None:
            return None
        return _ms(self.closed_at - self.started_at)


def _ms(delta: Any) -> float:
    return round(float(delta.total_seconds()) * 1000, 1)


def payload_value(payload: Payload) -> Any:
    """A payload as JSON, untyped; its raw text when it is not JSON; None when it is binary."""
    if payload.metadata.get("encoding") == b"binary/null":
        return None
    try:
        return json.loads(payload.data)
    except ValueError:
        try:
            return payload.data.decode()
        except UnicodeDecodeError:
            return None


def first_value(payloads: Payloads) -> Any:
    return payload_value(payloads.payloads[0]) if payloads.payloads else None


def plain_failure(failure: Failure) -> str:
    """A failure and its causes in plain words, on one line: the wrappers (``Activity task failed``)
    are left out, a timeout says which (``start-to-close timeout``)."""
    parts: list[str] = []
    current: Failure | None = failure
    while current is not None:
        if current.HasField("timeout_failure_info"):
            kind = TimeoutType.Name(current.timeout_failure_info.timeout_type)
            parts.append(kind.removeprefix("TIMEOUT_TYPE_").lower().replace("_", "-") + " timeout")
        elif current.message and current.message.lower() not in WRAPPERS:
            parts.append(current.message)
        current = current.cause if current.HasField("cause") else None
    seen: list[str] = []
    for part in parts:
        line = " ".join(part.split())
        if line not in seen:
            seen.append(line)
    return ": ".join(seen) or "failed"


CLOSED = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: "completed",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: "failed",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT: "timed_out",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: "terminated",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED: "canceled",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW: "continued_as_new",
}


def run_from_events(workflow_id: str, run_id: str, events: Iterable[HistoryEvent]) -> RunHistory:
    """Walk a history: the start, every activity (regular ones by their scheduled event, local ones
    by their markers), the signals, and the close."""
    run = RunHistory(workflow_id=workflow_id, run_id=run_id, workflow_type="", status="running")
    by_scheduled: dict[int, ActivityRun] = {}
    for event in events:
        kind = event.event_type
        at = event.event_time.ToDatetime(UTC) if event.HasField("event_time") else None
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            attrs = event.workflow_execution_started_event_attributes
            run.workflow_type = attrs.workflow_type.name
            run.started_at = at
            run.input = first_value(attrs.input)
            if attrs.HasField("parent_workflow_execution"):
                run.parent_workflow_id = attrs.parent_workflow_execution.workflow_id
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            activity = ActivityRun(
                activity=event.activity_task_scheduled_event_attributes.activity_type.name, scheduled_at=at
            )
            by_scheduled[event.event_id] = activity
            run.activities.append(activity)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            if (activity_run := by_scheduled.get(started.scheduled_event_id)) is not None:
                activity_run.attempts = max(1, started.attempt)
                if started.HasField("last_failure"):
                    activity_run.failure = plain_failure(started.last_failure)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            _close(by_scheduled.get(event.activity_task_completed_event_attributes.scheduled_event_id), at, None)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            failed = event.activity_task_failed_event_attributes
            _close(by_scheduled.get(failed.scheduled_event_id), at, plain_failure(failed.failure))
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
            timed_out = event.activity_task_timed_out_event_attributes
            _close(by_scheduled.get(timed_out.scheduled_event_id), at, plain_failure(timed_out.failure))
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
            _close(by_scheduled.get(event.activity_task_canceled_event_attributes.scheduled_event_id), at, "canceled")
        elif kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            marker = event.marker_recorded_event_attributes
            if marker.marker_name == LOCAL_ACTIVITY_MARKER and "data" in marker.details:
                run.activities.append(
                    _local_activity(marker.details["data"], marker.failure if marker.HasField("failure") else None, at)
                )
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            run.task_failures.append(task_failure_words(event.workflow_task_failed_event_attributes))
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signal = event.workflow_execution_signaled_event_attributes
            if at is not None:
                run.signals.append(SignalSeen(name=signal.signal_name, at=at, value=first_value(signal.input)))
        elif kind in CLOSED:
            run.status = CLOSED[kind]
            run.closed_at = at
            if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
                run.result = first_value(event.workflow_execution_completed_event_attributes.result)
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
                run.failure = plain_failure(event.workflow_execution_failed_event_attributes.failure)
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
                reason = event.workflow_execution_terminated_event_attributes.reason
                run.failure = f"terminated: {reason}" if reason else "terminated"
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT:
                run.failure = "the workflow timed out"
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED:
                run.failure = "canceled"
    return run


TASK_FAILURE_CAUSES = {
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND: (
        "a signal or update came while the task was completing; the task ran again with it"
    ),
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE: (
        "the worker that had the run cached was gone; another worker replayed it"
    ),
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_NON_DETERMINISTIC_ERROR: (
        "the workflow code no longer matches this run's history (non-determinism)"
    ),
}


def task_failure_words(attrs: Any) -> str:
    """A failed workflow task in plain words: its cause, then the failure's own message if any."""
    cause = TASK_FAILURE_CAUSES.get(attrs.cause)
    if cause is None:
        name = WorkflowTaskFailedCause.Name(attrs.cause).removeprefix("WORKFLOW_TASK_FAILED_CAUSE_")
        cause = name.lower().replace("_", " ")
    message = plain_failure(attrs.failure) if attrs.HasField("failure") else ""
    return cause if not message or message in cause else f"{cause}: {message}"


def _close(activity: ActivityRun | None, at: datetime | None, failure: str | None) -> None:
    if activity is None:
        return
    activity.ok = failure is None
    if failure is not None:
        activity.failure = failure
    if at is not None and activity.scheduled_at is not None:
        activity.duration_ms = _ms(at - activity.scheduled_at)


def _local_activity(data: Payloads, failure: Failure | None, at: datetime | None) -> ActivityRun:
    """A local activity's marker: its type, attempt, schedule and completion time, and failure."""
    info = first_value(data)
    info = info if isinstance(info, dict) else {}
    scheduled = _parse_time(info.get("original_schedule_time"))
    completed = _parse_time(info.get("complete_time")) or at
    # Both are worker clock readings; a test server that skips time can put them out of order.
    duration = max(0.0, _ms(completed - scheduled)) if scheduled is not None and completed is not None else None
    return ActivityRun(
        activity=str(info.get("activity_type", "?")),
        local=True,
        attempts=int(info.get("attempt") or 1),
        scheduled_at=scheduled,
        duration_ms=duration,
        ok=failure is None,
        failure=plain_failure(failure) if failure is not None else None,
    )


def _parse_time(value: object) -> datetime | None:
    if isinstance(value, dict) and "seconds" in value:  # a protobuf Timestamp as JSON
        return datetime.fromtimestamp(int(value["seconds"]) + int(value.get("nanos", 0)) / 1e9, UTC)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


async def read_run(client: Client, workflow_id: str, run_id: str | None = None) -> RunHistory:
    """The latest run of ``workflow_id`` (or ``run_id``) from its history; :class:`UnknownRun` if none."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    try:
        description = await handle.describe()
        events = [event async for event in handle.fetch_history_events()]
    except RPCError as err:
        if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            raise UnknownRun(f"no workflow {workflow_id!r}" + (f" run {run_id!r}" if run_id else "")) from None
        raise
    return run_from_events(workflow_id, description.run_id, events)
