"""``drctl failover``: report a failed instance by hand and follow its recovery step by step.

The report goes to the model's guardian, like the prober's and the alerts' (one recovery per
failure: a second report joins the first); ``--plan`` runs the same runbook with every change left
out and lists what it would do.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Annotated

import typer
from temporalio.client import Interceptor, WorkflowFailureError

from drctl.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    PolicyOption,
    StateOption,
    await_with_progress,
    clip_input,
    connect,
    fail,
    input_said,
    out,
    platform_place,
    read_fleet,
    reporter,
    require_model,
    show,
    with_policy,
)
from drctl.cli.render import plan_budget_lines, result_lines, step_line
from drctl.payloads import (
    FailoverOutcome,
    FailoverRequest,
    FailoverResult,
    IncidentState,
    Trigger,
    failover_workflow_id,
)
from drctl.settings import DrctlSettings
from drctl.telemetry.tracing import setup_tracing, span
from drctl.temporal.incidents import budget_state
from drctl.temporal.runbooks import report_failover, start_failover_handle

SUCCESSFUL_OUTCOMES = {
    FailoverOutcome.RECOVERED,
    FailoverOutcome.JOINED,
    FailoverOutcome.FALSE_ALARM,
    FailoverOutcome.ALREADY_EJECTED,
    FailoverOutcome.STANDBY_EJECTED,
}
"""Outcomes after which ``drctl failover`` exits 0: the model serves (or never stopped)."""


def failover(
    model: Annotated[str, typer.Argument(help="model name from the policy, e.g. llama-2-7b")],
    instance: Annotated[str, typer.Argument(help="failed instance id, e.g. llama-2-7b-0 (see `drctl status`)")],
    reason: Annotated[str, typer.Option(help="why; recorded in the workflow history")] = "",
    wait: Annotated[bool, typer.Option(help="follow progress until the runbook finishes")] = True,
    plan: Annotated[
        bool, typer.Option("--plan", help="print what the runbook would do (steps, standby promoted), change nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the final result as JSON")] = False,
    policy: PolicyOption = None,
    state_dir: StateOption = None,
) -> None:
    """Report a failed instance to its model's guardian and show the recovery step by step.

    The guardian runs one recovery per failure: if the prober, an alert or another operator
    reported the same instance already, this joins that runbook instead of starting a second one.
    With --plan, the same runbook code decides every step and lists them, changing nothing.
    """
    settings, dr_policy = with_policy(policy, state_dir)
    require_model(dr_policy, model)
    # The instance is checked where it lives: through the platform DRCTL_PLATFORM names (the local
    # registry, or the cluster), never a local file behind its back.
    fleet, _ = asyncio.run(read_fleet(settings, dr_policy, [model]))
    known = [i.id for i in fleet[model]]
    if not known:
        hint = "is `drctl up` running?" if settings.platform == "local" else "has reconciliation created them?"
        fail(f"no instances of {model} in {platform_place(settings)}; {hint}", EXIT_BAD_INPUT)
    if instance not in known:
        fail(f"{model} has no instance {clip_input(instance)!r}; known: {', '.join(known)}", EXIT_BAD_INPUT)
    try:
        request = FailoverRequest(model=model, instance=instance, reason=reason, trigger=Trigger.MANUAL)
    except ValueError as exc:
        fail(input_said(exc, {"instance": "INSTANCE", "model": "MODEL"}), EXIT_BAD_INPUT)
    if plan:
        request = request.model_copy(update={"plan_only": True})
    # The trace of a failover reported by hand starts in this command (`drctl trace WORKFLOW_ID`).
    tracing = setup_tracing("cli", settings.state_dir)
    try:
        result = asyncio.run(_run_failover(settings, request, wait or plan, as_json, tracing.interceptors()))
    finally:
        tracing.shutdown()
    if result is not None and result.outcome not in (*SUCCESSFUL_OUTCOMES, FailoverOutcome.PLANNED):
        raise typer.Exit(EXIT_FAILED)


async def _run_failover(
    settings: DrctlSettings,
    request: FailoverRequest,
    wait: bool,
    as_json: bool,
    interceptors: Sequence[Interceptor] = (),
) -> FailoverResult | None:
    from drctl.workflows.failover import FailoverWorkflow

    client = await connect(settings, interceptors)
    if request.plan_only:
        with span("drctl failover --plan", model=request.model, instance=request.instance, trigger=request.trigger):
            handle = await client.start_workflow(
                FailoverWorkflow.run,
                request,
                id=f"plan-{failover_workflow_id(request.model, request.instance)}-{uuid.uuid4().hex[:6]}",
                task_queue=settings.task_queue,
            )
        if not as_json:
            out.print(f"plan of the failover of {request.instance} (nothing will be changed)", highlight=False)
    else:
        with span("drctl failover", model=request.model, instance=request.instance, trigger=request.trigger) as current:
            ticket = await report_failover(client, settings, request, reporter=reporter())
            current.set_attribute("drctl.incident", ticket.workflow_id)
            handle = await start_failover_handle(client, settings.task_queue, ticket)
        if not as_json:
            if not ticket.joined:
                how = "opened a recovery"
            elif ticket.state == IncidentState.DONE:
                # Recorded with the closed incident (the guardian's `incidents` query), not in the
                # runbook's history: the runbook had ended before this report came.
                outcome = ticket.outcome.value if ticket.outcome is not None else "done"
                how = f"this failure was already handled (the runbook ended {outcome}); nothing more to do"
            else:
                how = "joined the recovery already open"
            out.print(f"reported to guardian-{request.model}: {how}", highlight=False)
            if ticket.detail and ticket.state == IncidentState.QUEUED:
                out.print(f"  queued: {ticket.detail}", highlight=False, markup=False)
            out.print(f"failover workflow [bold]{handle.id}[/]", highlight=False)
            ui = f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows/{handle.id}"
            out.print(f"history: {ui}", highlight=False)
    if not wait:
        return None
    shown = 0

    def progress(steps: FailoverResult) -> None:
        nonlocal shown
        if not as_json:
            show([step_line(step) for step in steps.steps[shown:]])
            shown = len(steps.steps)

    try:
        result = await await_with_progress(handle, FailoverWorkflow.progress, progress, every_s=0.15)
    except WorkflowFailureError as exc:
        fail(f"failover failed: {exc.cause or exc}")
    if as_json:
        out.print_json(result.model_dump_json())
        return result
    show([step_line(step) for step in result.steps[shown:]] + result_lines(result))
    if result.outcome == FailoverOutcome.PLANNED:
        show(plan_budget_lines(result, await budget_state(client, settings.task_queue)))
    if result.joined_total:
        out.print(f"joined by {result.joined_total} other report(s): {', '.join(result.joined)}", highlight=False)
    return result
