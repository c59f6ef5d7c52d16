"""``drctl drill``: a DR drill on the running stack, now or on a Temporal Schedule.

The drill is a workflow (``DrillWorkflow``) so that a drill interrupted by the very failure it
injects still restores its fault and writes its report; this command starts it, shows its phases
on stderr while it runs, and prints the report (stdout stays the report alone, for ``--json``).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Annotated

import typer
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from drctl.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    PolicyOption,
    StateOption,
    await_with_progress,
    connect,
    err,
    fail,
    input_said,
    out,
    require_model,
    show,
    with_policy,
)
from drctl.cli.render import dot, drill_lines
from drctl.payloads import DrillRequest, DrillScenario, drill_workflow_id
from drctl.policies.durations import parse_duration
from drctl.settings import DrctlSettings


def drill(
    scenario: Annotated[
        str,
        typer.Argument(
            help="pod-crash | node-down | gpu-failure | zone-outage | model-corruption (the seed's SLA table)"
        ),
    ],
    model: Annotated[
        str | None, typer.Option(help="the model whose serving instance is hit (default: the most critical)")
    ] = None,
    rps: Annotated[int, typer.Option(help="requests per second sent through the load balancer")] = 50,
    timeout: Annotated[str, typer.Option(help="give up waiting for recovery after this long")] = "3m",
    every: Annotated[
        str | None,
        typer.Option(
            help="instead of running now, run it on a Temporal Schedule this often, e.g. 24h "
            "(at least 5m and at least --timeout: each run injects a real fault)"
        ),
    ] = None,
    unschedule: Annotated[
        bool, typer.Option("--unschedule", help="delete the drill's schedule (made with --every) and exit")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    policy: PolicyOption = None,
    state_dir: StateOption = None,
) -> None:
    """Run a DR drill on the running stack: inject SCENARIO under load, measure detection, switch,
    total RTO, failed requests and time to redundancy, restore the fault, and write a report (JSON,
    Markdown, PNG timeline) compared with the policy's RTO and the seed's SLA. Exits 1 when a figure
    misses its bar.

    \b
    drctl drill pod-crash
    drctl drill zone-outage --model mistral-7b
    drctl drill gpu-failure --every 24h      # a Temporal Schedule
    drctl drill gpu-failure --unschedule     # ... deleted
    """
    settings, dr_policy = with_policy(policy, state_dir)
    scenarios = [s.value for s in DrillScenario]
    if scenario not in scenarios:
        fail(f"unknown scenario {scenario!r}; one of: {', '.join(scenarios)}", EXIT_BAD_INPUT)
    if model is not None:
        require_model(dr_policy, model)
    if unschedule:
        if every is not None:
            fail("--unschedule and --every do not go together: one deletes the schedule, one makes it", EXIT_BAD_INPUT)
        asyncio.run(_unschedule(settings, scenario, model))
        return
    try:
        timeout_s = parse_duration(timeout).total_seconds()
        interval = parse_duration(every) if every else None
        request = DrillRequest(scenario=DrillScenario(scenario), model=model, rps=rps, timeout_s=timeout_s)
    except ValueError as exc:
        fail(f"bad option: {input_said(exc, OPTION_OF)}", EXIT_BAD_INPUT)
    if interval is not None and interval.total_seconds() < max(MIN_SCHEDULE_S, timeout_s):
        fail(
            f"--every {every} is too often: a scheduled drill injects a real fault each time; "
            f"at least {MIN_SCHEDULE_S // 60:.0f}m and at least --timeout ({timeout})",
            EXIT_BAD_INPUT,
        )

    async def run() -> None:
        client = await connect(settings)
        if interval is not None:
            await _schedule(client, settings, request, interval, every or "")
        else:
            await _run_now(client, settings, request, as_json)

    asyncio.run(run())


MIN_SCHEDULE_S = 300.0
"""The most often a drill may be scheduled (``--every``): each run kills or hangs a serving
instance of the running fleet, so "every 1s" (accepted before) was an outage generator."""

OPTION_OF = {"rps": "--rps", "timeout_s": "--timeout", "model": "--model", "scenario": "SCENARIO"}
"""DrillRequest's fields as the command's options (for :func:`~drctl.cli.common.input_said`)."""


async def _unschedule(settings: DrctlSettings, scenario: str, model: str | None) -> None:
    from drctl.temporal.schedules import delete_drill_schedule

    client = await connect(settings)
    schedule_id, deleted = await delete_drill_schedule(client, scenario, model)
    if deleted:
        out.print(f"drill schedule [bold]{schedule_id}[/] deleted", highlight=False)
    else:
        fail(f"no drill schedule {schedule_id} (nothing deleted)")


async def _schedule(
    client: Client, settings: DrctlSettings, request: DrillRequest, interval: timedelta, every: str
) -> None:
    from drctl.temporal.schedules import ensure_drill_schedule

    schedule_id, done = await ensure_drill_schedule(client, request, interval, settings.task_queue)
    out.print(f"drill schedule [bold]{schedule_id}[/] {done}: {request.scenario.value} every {every}", highlight=False)


async def _run_now(client: Client, settings: DrctlSettings, request: DrillRequest, as_json: bool) -> None:
    """Start the drill (one per scenario and model at a time), show its phases, print its report."""
    from drctl.workflows.drill import DrillWorkflow

    scenario = request.scenario.value
    workflow_id = drill_workflow_id(scenario, request.model)
    try:
        handle = await client.start_workflow(
            DrillWorkflow.run,
            request,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        )
    except WorkflowAlreadyStartedError:
        fail(f"a {scenario} drill is already running (workflow {workflow_id})")
    err.print(f"drill workflow [bold]{handle.id}[/] started", highlight=False)
    phases: list[str] = []

    def progress(phase: str) -> None:
        if not phases or phase != phases[-1]:
            show([dot(phase)], err)
            phases.append(phase)

    try:
        report = await await_with_progress(handle, DrillWorkflow.phase, progress)
    except WorkflowFailureError as exc:
        fail(f"the drill did not run: {exc.cause or exc}")
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        show(drill_lines(report))
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)
