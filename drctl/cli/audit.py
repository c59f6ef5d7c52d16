"""``drctl audit``: past failovers, newest first, from Temporal's visibility store; ``audit show``
tells one run's story from its history; ``audit export`` writes every runbook run for compliance.

Every failover runbook sets search attributes (model, instance, trigger, outcome, tier, RTO), so
the audit is a visibility query, not a log of drctl's own that could drift from the histories. A run
that failed before setting them (bad input from the Temporal UI) shows its failure instead.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus, WorkflowHistoryEventFilterType
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError

from drctl.cli.audit_story import RunStory, build_story
from drctl.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, connect, fail, make_settings, out, show
from drctl.cli.policy_path import PolicyNotFound, find_policy
from drctl.cli.render import audit_story_lines, audit_story_markdown, audit_table
from drctl.payloads import FailoverOutcome, SearchAttr
from drctl.policies.durations import parse_duration
from drctl.policies.loader import PolicyError, load_policy_file
from drctl.settings import DrctlSettings
from drctl.temporal.history import UnknownRun, plain_failure, read_run

app = typer.Typer(no_args_is_help=False, add_completion=False)

KEYS = {
    "model": SearchAttributeKey.for_keyword(SearchAttr.MODEL),
    "instance": SearchAttributeKey.for_keyword(SearchAttr.INSTANCE),
    "trigger": SearchAttributeKey.for_keyword(SearchAttr.TRIGGER),
    "outcome": SearchAttributeKey.for_keyword(SearchAttr.OUTCOME),
    "tier": SearchAttributeKey.for_keyword(SearchAttr.TIER),
}
RTO_KEY = SearchAttributeKey.for_int(SearchAttr.RTO_MS)
EXPORT_COLUMNS = [
    "workflow_id", "run_id", "workflow_type", "status", "started", "closed", "duration_ms",
    "model", "instance", "trigger", "outcome", "tier", "rto_ms", "failure",
]  # fmt: skip


@app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    outcome: Annotated[
        str | None,
        typer.Option(
            help="only this outcome: "
            + ", ".join(o.value for o in FailoverOutcome)
            + " (plans, from --plan, are listed only with --outcome planned)"
        ),
    ] = None,
    since: Annotated[str | None, typer.Option(help="only failovers started within this long, e.g. 1h, 30m, 7d")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows", min=1)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """List past failovers from Temporal visibility (search attributes), newest first; `audit show
    ID` tells one run's story, `audit export` writes all runbook runs."""
    if ctx.invoked_subcommand is not None:
        return
    query = audit_query(model, outcome, since)
    rows = asyncio.run(audit_rows(make_settings(), query, limit))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    out.print(audit_table(query, rows))


@app.command("show")
def audit_show(
    workflow_id: Annotated[str, typer.Argument(help="the runbook's workflow id (as `drctl audit` lists it)")],
    run_id: Annotated[str | None, typer.Option("--run-id", help="this run, not the latest")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print Markdown, for an incident review")] = False,
) -> None:
    """One run's story from its history: who started it, each step, the standby chosen, the RTO."""
    story = asyncio.run(read_story(make_settings(), workflow_id, run_id))
    if as_json:
        out.print_json(story.model_dump_json())
    elif markdown:
        sys.stdout.write(audit_story_markdown(story))
        sys.stdout.flush()
    else:
        show(audit_story_lines(story))


@app.command("export")
def audit_export(
    since: Annotated[str, typer.Option(help="runs started within this long, e.g. 30d, 12h")] = "30d",
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")] = None,
) -> None:
    """Every runbook run started within --since, one row each (JSON lines or CSV), for compliance."""
    if fmt not in {"jsonl", "csv"}:
        fail(f"--format: {fmt!r} is not jsonl or csv", EXIT_BAD_INPUT)
    query = export_query(since)
    settings = make_settings()
    if output is None:
        count = asyncio.run(export(settings, query, fmt, sys.stdout))
    else:
        try:
            with output.open("w", newline="", encoding="utf-8") as sink:
                count = asyncio.run(export(settings, query, fmt, sink))
        except OSError as exc:
            fail(f"cannot write {output}: {exc}", EXIT_BAD_INPUT)
        print(f"{count} runs written to {output}", file=sys.stderr)


def _since_clause(since: str, now: datetime | None) -> str:
    try:
        window = parse_duration(since)
    except ValueError as exc:
        fail(f"--since: {exc}", EXIT_BAD_INPUT)
    cutoff = (now or datetime.now(UTC)) - window
    return f"StartTime > '{cutoff.strftime('%Y-%m-%dT%H:%M:%SZ')}'"


def audit_query(model: str | None, outcome: str | None, since: str | None, now: datetime | None = None) -> str:
    """The visibility query for the filters; exits 2 on a filter that could not be in it safely."""
    from drctl.temporal.refs import workflow_type
    from drctl.workflows.failover import FailoverWorkflow

    clauses = [f"WorkflowType = '{workflow_type(FailoverWorkflow)}'"]
    if model:
        if not model.replace("-", "").replace(".", "").isalnum():
            fail(f"invalid model name {model!r}", EXIT_BAD_INPUT)
        clauses.append(f"{SearchAttr.MODEL} = '{model}'")
    if outcome:
        if outcome not in {o.value for o in FailoverOutcome}:
            fail(f"unknown outcome {outcome!r}; one of {', '.join(o.value for o in FailoverOutcome)}", EXIT_BAD_INPUT)
        if outcome == FailoverOutcome.FAILED:
            # A run that failed before it recorded its search attributes (input missing or invalid,
            # from the UI or `temporal workflow start`) has no outcome but its execution status.
            clauses.append(f"({SearchAttr.OUTCOME} = '{outcome}' OR ExecutionStatus = 'Failed')")
        else:
            clauses.append(f"{SearchAttr.OUTCOME} = '{outcome}'")
    else:
        # A plan (`drctl failover --plan`) changed nothing: not a failover, unless asked for. A run
        # that failed before recording an outcome has none, and is listed.
        clauses.append(f"({SearchAttr.OUTCOME} != '{FailoverOutcome.PLANNED}' OR {SearchAttr.OUTCOME} IS NULL)")
    if since:
        clauses.append(_since_clause(since, now))
    return " AND ".join(clauses)


def runbook_types() -> list[str]:
    """The workflow types of the runbooks (not the long-running guardians and budget)."""
    from drctl.temporal.refs import workflow_type
    from drctl.workflows.drain import DrainGpuWorkflow
    from drctl.workflows.drill import DrillWorkflow
    from drctl.workflows.failover import FailoverWorkflow
    from drctl.workflows.reconcile import ReconcilePassWorkflow, ReconcileStandbysWorkflow
    from drctl.workflows.zone import ZoneFailbackWorkflow, ZoneFailoverWorkflow

    classes = [
        FailoverWorkflow, ZoneFailoverWorkflow, ZoneFailbackWorkflow, DrainGpuWorkflow,
        ReconcileStandbysWorkflow, ReconcilePassWorkflow, DrillWorkflow,
    ]  # fmt: skip
    return [workflow_type(c) for c in classes]


def export_query(since: str, now: datetime | None = None) -> str:
    types = " OR ".join(f"WorkflowType = '{t}'" for t in runbook_types())
    return f"({types}) AND {_since_clause(since, now)}"


async def failure_of(client: Client, workflow_id: str, run_id: str | None) -> str | None:
    """Why a closed run failed, from its close event (one request); None if that cannot be read."""
    try:
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        close_only = WorkflowHistoryEventFilterType.CLOSE_EVENT
        async for event in handle.fetch_history_events(event_filter_type=close_only):
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
                return plain_failure(event.workflow_execution_failed_event_attributes.failure)
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
                reason = event.workflow_execution_terminated_event_attributes.reason
                return f"terminated: {reason}" if reason else "terminated"
    except RPCError:
        return None
    return None


def visibility_row(wf: WorkflowExecution) -> dict[str, Any]:
    """One listed run: its search attributes, status, times and duration."""
    attrs = wf.typed_search_attributes
    row: dict[str, Any] = {"workflow_id": wf.id, "run_id": wf.run_id, "workflow_type": wf.workflow_type}
    row |= {name: attrs.get(key) for name, key in KEYS.items()}
    row["rto_ms"] = attrs.get(RTO_KEY)
    row["status"] = wf.status.name.lower() if wf.status is not None else None
    row["started"] = wf.start_time.isoformat()
    row["closed"] = wf.close_time.isoformat() if wf.close_time else None
    row["duration_ms"] = round((wf.close_time - wf.start_time).total_seconds() * 1000, 1) if wf.close_time else None
    row["failure"] = None
    return row


async def stream_rows(client: Client, query: str, limit: int | None = None) -> AsyncIterator[dict[str, Any]]:
    """The rows the query finds, one page of visibility at a time (never all in memory); a failed
    or terminated run carries why, from its close event."""
    async for wf in client.list_workflows(query, limit=limit, page_size=100):
        row = visibility_row(wf)
        if wf.status in (WorkflowExecutionStatus.FAILED, WorkflowExecutionStatus.TERMINATED):
            row["failure"] = await failure_of(client, wf.id, wf.run_id)
        yield row


async def audit_rows(settings: DrctlSettings, query: str, limit: int) -> list[dict[str, object]]:
    """One row per failover the query finds: its search attributes, status and times."""
    client = await connect(settings)
    return [row async for row in stream_rows(client, query, limit)]


async def export(settings: DrctlSettings, query: str, fmt: str, sink: IO[str]) -> int:
    client = await connect(settings)
    return await write_rows(stream_rows(client, query), fmt, sink)


async def write_rows(rows: AsyncIterator[dict[str, Any]], fmt: str, sink: IO[str]) -> int:
    """Each row written as it comes (jsonl: one object a line; csv: a header, then a line each)."""
    writer = csv.DictWriter(sink, fieldnames=EXPORT_COLUMNS, extrasaction="ignore") if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    count = 0
    async for row in rows:
        if writer is not None:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in EXPORT_COLUMNS})
        else:
            sink.write(json.dumps(row) + "\n")
        count += 1
    sink.flush()
    return count


async def read_story(settings: DrctlSettings, workflow_id: str, run_id: str | None) -> RunStory:
    client = await connect(settings)
    try:
        run = await read_run(client, workflow_id, run_id)
    except UnknownRun as exc:
        fail(str(exc), EXIT_FAILED)
    given = run.input if isinstance(run.input, dict) else {}
    first = None
    parent = run.parent_workflow_id
    if parent and parent.startswith("guardian-"):
        first = await first_reporter(client, parent, workflow_id)
    return build_story(run, rto_target_ms=rto_target_ms(settings, given.get("model")), first_reporter=first)


async def first_reporter(client: Client, guardian_id: str, workflow_id: str) -> str | None:
    """The report that opened the incident this run handled, as its guardian remembers it."""
    from drctl.workflows.guardian import ModelGuardianWorkflow

    try:
        handle = client.get_workflow_handle_for(ModelGuardianWorkflow.run, guardian_id)
        state = await asyncio.wait_for(handle.query(ModelGuardianWorkflow.incidents), timeout=5)
    except Exception:  # a guardian gone, busy or of another shape: the story goes without it
        return None
    for incident in [*state.queue, *state.recent]:
        if incident.workflow_id == workflow_id:
            return incident.reporter or None
    return None


def rto_target_ms(settings: DrctlSettings, model: object) -> float | None:
    """The model's RTO target from the policy, if a policy is found and names the model."""
    if not isinstance(model, str):
        return None
    try:
        policy = load_policy_file(find_policy(settings))
    except (PolicyNotFound, PolicyError, OSError):
        return None
    for entry in policy.models:
        if entry.name == model:
            return entry.rto.total_seconds() * 1000
    return None
