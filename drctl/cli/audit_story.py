"""``drctl audit show``: one run's story, made from its history (:mod:`drctl.temporal.history`), its
result and the policy's target. Pure: no I/O, so it is tested from a recorded or made-up history.

For a failover: who or what started it and who reported the failure (an alert's fingerprint and
receiver, a CLI user, the prober, a drill, the Temporal UI), each step with its attempts, duration and
failure in plain words, the standby chosen and why, and the RTO against the model's target. For the
other runbooks: type, status, times and a summary of the result.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from drctl.payloads import ActivityName
from drctl.temporal.history import ActivityRun, RunHistory

STEP_ACTIVITIES = {
    "confirm": ActivityName.PROBE_INSTANCE,
    "list": ActivityName.LIST_INSTANCES,
    "eject": ActivityName.EJECT_INSTANCE,
    "eject-standby": ActivityName.EJECT_INSTANCE,
    "promote": ActivityName.PROMOTE_STANDBY,
    "load": ActivityName.LOAD_MODEL,
    "restore-checkpoint": ActivityName.RESTORE_CHECKPOINT,
    "register": ActivityName.REGISTER_INSTANCE,
    "verify": ActivityName.VERIFY_SERVING,
    "observe": ActivityName.OBSERVE_FLEET,
    "preempt": ActivityName.DELETE_INSTANCE,
    "emergency": ActivityName.CREATE_INSTANCE,
    "replenish": ActivityName.REQUEST_RECONCILE,
    "report": ActivityName.REPORT_FAILURE,
    "follow": ActivityName.AWAIT_RUNBOOKS,
}
"""The activity behind each FailoverWorkflow step (``pick`` and ``place`` are decisions, no activity)."""

ALERT = re.compile(r"^alert (?P<fingerprint>\S+)(?: \((?P<receiver>[^)]*)\))?")


class Reporter(BaseModel):
    """One report of the failure, as the reporter string tells it."""

    reporter: str
    kind: str
    """alert, cli, prober, kube-watcher, workflow, drill or other."""
    fingerprint: str | None = None
    receiver: str | None = None
    user: str | None = None
    workflow: str | None = None
    drill: str | None = None


def parse_reporter(reporter: str) -> Reporter:
    """``alert 3f9a… (default)``, ``cli ann@host``, ``prober``, ``workflow drill-…``, a workflow id."""
    text = reporter.strip()
    if match := ALERT.match(text):
        return Reporter(
            reporter=text, kind="alert", fingerprint=match["fingerprint"], receiver=match["receiver"] or None
        )
    if text.startswith("cli "):
        return Reporter(reporter=text, kind="cli", user=text.removeprefix("cli ").strip())
    if text in {"prober", "kube-watcher"}:
        return Reporter(reporter=text, kind=text)
    workflow = text.removeprefix("workflow ").strip()
    if workflow.startswith("drill"):
        return Reporter(reporter=text, kind="drill", workflow=workflow, drill=workflow)
    if text.startswith("workflow ") or re.fullmatch(r"[a-z][a-z0-9-]*-[A-Za-z0-9._-]+", text):
        return Reporter(reporter=text, kind="workflow", workflow=workflow)
    return Reporter(reporter=text, kind="other")


class StoryStep(BaseModel):
    step: str
    ok: bool | None = None
    duration_ms: float | None = None
    """Wall time of the step in the workflow (retries included)."""
    activity_ms: float | None = None
    """Time the activity itself reported."""
    attempts: int | None = None
    activity: str | None = None
    local: bool | None = None
    detail: str = ""
    failure: str | None = None


class RunStory(BaseModel):
    workflow_id: str
    run_id: str
    workflow_type: str
    status: str
    started_at: datetime | None = None
    closed_at: datetime | None = None
    duration_ms: float | None = None
    parent_workflow_id: str | None = None
    model: str | None = None
    instance: str | None = None
    trigger: str | None = None
    reason: str | None = None
    started_by: str = ""
    reporters: list[Reporter] = Field(default_factory=list)
    joined_total: int = 0
    handled_by: str | None = None
    outcome: str | None = None
    outcome_reason: str | None = None
    steps: list[StoryStep] = Field(default_factory=list)
    standby: str | None = None
    standby_tier: str | None = None
    standby_why: str | None = None
    rto_ms: float | None = None
    rto_target_ms: float | None = None
    rto_met: bool | None = None
    summary: list[str] = Field(default_factory=list)
    failure: str | None = None
    task_failures: list[str] = Field(default_factory=list)
    """Workflow tasks that failed and ran again (with the local activities they had run)."""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def build_story(run: RunHistory, *, rto_target_ms: float | None = None, first_reporter: str | None = None) -> RunStory:
    """The story of ``run``; ``rto_target_ms`` is the model's target from the policy, and
    ``first_reporter`` the report that opened the incident (the guardian knows it)."""
    story = RunStory(
        workflow_id=run.workflow_id,
        run_id=run.run_id,
        workflow_type=run.workflow_type,
        status=run.status,
        started_at=run.started_at,
        closed_at=run.closed_at,
        duration_ms=run.duration_ms,
        parent_workflow_id=run.parent_workflow_id,
        failure=run.failure,
        task_failures=run.task_failures,
    )
    given, result = _dict(run.input), _dict(run.result)
    if run.workflow_type == "FailoverWorkflow":
        _failover(story, run, given, result, rto_target_ms, first_reporter)
    else:
        story.reason = given.get("reason") or None
        story.summary = summarise(given, "input") + summarise(result, "result")
        story.steps = [_activity_step(a) for a in run.activities]
    return story


def _failover(
    story: RunStory,
    run: RunHistory,
    given: dict[str, Any],
    result: dict[str, Any],
    rto_target_ms: float | None,
    first_reporter: str | None,
) -> None:
    story.model = given.get("model") or result.get("model")
    story.instance = given.get("instance") or result.get("instance")
    story.trigger = given.get("trigger") or ("manual" if given else None)  # no input: no trigger
    story.reason = given.get("reason") or None
    joined = [str(r) for r in result.get("joined") or []]
    if not result:  # failed or running: the joined signals are in the history
        joined = [str(s.value) for s in run.signals if s.name == "joined"]
    story.joined_total = int(result.get("joined_total") or len(joined))
    story.reporters = [parse_reporter(r) for r in ([first_reporter] if first_reporter else []) + joined]
    story.handled_by = result.get("handled_by")
    story.started_by = _started_by(run, given, story.handled_by, first_reporter)
    story.outcome = result.get("outcome") or ("failed" if run.status == "failed" else None)
    story.outcome_reason = result.get("reason") or run.failure
    steps = [s for s in result.get("steps") or [] if isinstance(s, dict)]
    story.steps = _match_steps(steps, run.activities) if steps else [_activity_step(a) for a in run.activities]
    pick = next((s for s in steps if s.get("step") == "pick"), None)
    place = next((s for s in steps if s.get("step") == "place"), None)
    story.standby = result.get("promoted")
    story.standby_tier = "emergency" if result.get("emergency") else result.get("tier")
    why = []
    if pick is not None:
        why.append(f"{pick.get('detail', '')} (first that works wins: hot, then warm, then cold)")
    failed_promotions = [
        s.detail for s in story.steps if s.step in {"promote", "load", "register", "verify"} and s.ok is False
    ]
    why += [f"passed over: {d}" for d in failed_promotions]
    if place is not None:
        why.append(f"emergency placement: {place.get('detail', '')}")
    story.standby_why = "; ".join(why) or None
    story.rto_ms = result.get("rto_ms")
    story.rto_target_ms = rto_target_ms
    if story.rto_ms is not None and rto_target_ms is not None:
        story.rto_met = float(story.rto_ms) <= rto_target_ms


def _started_by(run: RunHistory, given: dict[str, Any], handled_by: str | None, first: str | None) -> str:
    parent = run.parent_workflow_id
    epoch = given.get("epoch")
    if given.get("plan_only"):
        return "a plan only (drctl failover --plan): nothing was changed"
    switched = _dict(given.get("switched"))
    if switched:
        return (
            f"the zone failover {switched.get('handled_by', '?')}, which switched it in its batch (fencing epoch "
            f"{epoch}): this run records that switch, its steps and times"
        )
    if parent and parent.startswith("guardian-"):
        by = f" on a report from {first}" if first else ""
        return f"the model's guardian {parent} (fencing epoch {epoch}){by}"
    if parent:
        return f"workflow {parent}"
    if epoch is None:
        where = f": it reported the failure to the guardian, which ran {handled_by}" if handled_by else ""
        return "started directly without an epoch (Temporal UI, `temporal workflow start` or the API)" + where
    return f"started directly with fencing epoch {epoch}"


def _activity_step(activity: ActivityRun) -> StoryStep:
    return StoryStep(
        step=activity.activity,
        ok=activity.ok,
        duration_ms=activity.duration_ms,
        attempts=activity.attempts,
        activity=activity.activity,
        local=activity.local,
        failure=activity.failure,
    )


def _match_steps(steps: list[dict[str, Any]], activities: list[ActivityRun]) -> list[StoryStep]:
    """The result's steps, each with the history's record of its activity (attempts, failure): in
    order, each step takes the next activity of its type; planned and skipped steps ran none."""
    out: list[StoryStep] = []
    cursor = 0
    for raw in steps:
        step = StoryStep(
            step=str(raw.get("step", "?")),
            ok=raw.get("ok"),
            duration_ms=raw.get("duration_ms"),
            activity_ms=raw.get("activity_ms"),
            detail=str(raw.get("detail", "")),
        )
        wanted = STEP_ACTIVITIES.get(step.step)
        ran = not (step.detail == "planned, not run" or step.detail.startswith("skipped"))
        if wanted is not None and ran:
            for index in range(cursor, len(activities)):
                if activities[index].activity == wanted:
                    found = activities[index]
                    step.activity, step.attempts, step.local = found.activity, found.attempts, found.local
                    if found.failure and (step.ok is False or found.attempts > 1):
                        step.failure = found.failure
                    cursor = index + 1
                    break
        out.append(step)
    return out


def summarise(values: dict[str, Any], what: str) -> list[str]:
    """A result or an input in a few lines: scalars as they are, lists by their length (and items,
    when few)."""
    lines = []
    for key, value in values.items():
        if value in (None, "", [], {}, False):
            continue
        if isinstance(value, list):
            shown = ", ".join(str(v) for v in value[:5]) + (" …" if len(value) > 5 else "")
            lines.append(f"{what} {key}: {len(value)} ({shown})")
        elif isinstance(value, dict):
            lines.append(f"{what} {key}: {len(value)} entries")
        else:
            lines.append(f"{what} {key}: {value}")
    return lines
