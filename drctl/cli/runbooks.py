"""The runbooks of GPUs and zones an operator starts by hand: ``drain`` (one GPU), ``zone-failover``
and ``failback`` (a zone), ``approve`` (a zone failover that waits for a person).

Each checks its input against the policy first (bad input exits 2 and starts nothing), then starts
or joins its workflow through :mod:`drctl.temporal.runbooks` and follows it. A ``--plan`` runs the
same workflow code with every change left out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from temporalio.client import Client, Interceptor, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy

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
    show,
    with_policy,
)
from drctl.cli.render import lit, zone_progress_line
from drctl.payloads import ZoneFailoverRequest, ZoneFailoverResult
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings
from drctl.telemetry.tracing import setup_tracing, span


@contextmanager
def traced_command(settings: DrctlSettings) -> Iterator[list[Interceptor]]:
    """Tracing for a command that starts a runbook: the interceptors for its client; what it traced
    is exported when it ends (the trace starts in the command: `drctl trace WORKFLOW_ID`)."""
    tracing = setup_tracing("cli", settings.state_dir)
    try:
        yield list(tracing.interceptors())
    finally:
        tracing.shutdown()


def drain(
    gpu: Annotated[str, typer.Argument(help="GPU id as {node}/{index}, e.g. gpu-node-0/1 (see `drctl status`)")],
    reason: Annotated[str, typer.Option(help="why; recorded in the workflow history")] = "manual drain",
    policy: PolicyOption = None,
    state_dir: StateOption = None,
) -> None:
    """Drain one GPU: keep it out of placement, fail over its serving instances, move its standbys."""
    from drctl.payloads import DrainGpuRequest
    from drctl.policies.placement import gpu_inventory
    from drctl.temporal.runbooks import start_gpu_drain

    settings, dr_policy = with_policy(policy, state_dir)
    known = [slot.id for slot in gpu_inventory(dr_policy.gpu_pool)]
    if gpu not in known:
        more = " …" if len(known) > 8 else ""
        fail(f"unknown GPU {clip_input(gpu)!r}; the pool has {', '.join(known[:8])}{more}", EXIT_BAD_INPUT)
    try:
        request = DrainGpuRequest(gpu=gpu, reason=reason)
    except ValueError as exc:
        fail(input_said(exc, {"gpu": "GPU"}), EXIT_BAD_INPUT)

    async def run(interceptors: list[Interceptor]) -> None:
        client = await connect(settings, interceptors)
        with span("drctl drain", gpu=gpu, trigger="manual"):
            handle = await start_gpu_drain(client, settings, request)
        out.print(f"drain workflow [bold]{handle.id}[/]", highlight=False)
        try:
            result = await handle.result()
        except WorkflowFailureError as exc:
            fail(f"drain failed: {exc.cause or exc}")
        show(
            [f"[green]✓[/] failed over {lit(line)}" for line in result.failovers]
            + [
                f"[green]✓[/] removed standby {lit(line)} (reconciliation recreates it elsewhere)"
                for line in result.deleted
            ]
            + [f"[red]✗[/] {lit(line)}" for line in result.failed]
        )
        out.print(f"{gpu} cordoned: placement no longer uses it")
        if result.failed:
            raise typer.Exit(EXIT_FAILED)

    with traced_command(settings) as interceptors:
        asyncio.run(run(interceptors))


def require_zone(dr_policy: DRPolicy, zone: str) -> None:
    if zone not in dr_policy.zones:
        fail(f"unknown zone {clip_input(zone)!r}; the policy has: {', '.join(sorted(dr_policy.zones))}", EXIT_BAD_INPUT)


JsonOption = Annotated[bool, typer.Option("--json", help="print the result (or the plan) as JSON")]


def zone_failover(
    zone: Annotated[str, typer.Argument(help="the failed zone, e.g. az-1 (the policy's az_failover.activeZones)")],
    reason: Annotated[str, typer.Option(help="why; recorded in the workflow history")] = "manual zone failover",
    approved: Annotated[bool, typer.Option(help="pre-approve (when the policy requires approval)")] = False,
    plan: Annotated[
        bool, typer.Option("--plan", help="print what it would do (GPUs, instances, standbys, budget), change nothing")
    ] = False,
    as_json: JsonOption = False,
    policy: PolicyOption = None,
) -> None:
    """Move the serving of every model out of ZONE: cordon its GPUs, fail its serving instances over.

    Each serving instance is reported to its model's guardian, so a recovery the prober already
    runs is joined, not doubled. With --plan, the same workflow observes and decides, changing nothing.
    """
    settings, dr_policy = with_policy(policy)
    require_zone(dr_policy, zone)
    try:
        request = ZoneFailoverRequest(zone=zone, reason=reason, approved=approved)
    except ValueError as exc:
        fail(input_said(exc, {"zone": "ZONE"}), EXIT_BAD_INPUT)
    waits = dr_policy.az_failover.require_approval and not approved

    async def run(interceptors: list[Interceptor]) -> None:
        client = await connect(settings, interceptors)
        if plan:
            with span("drctl zone-failover --plan", zone=zone, trigger="manual"):
                await _plan_zone_failover(client, settings, request, as_json)
        else:
            await _zone_failover(client, settings, request, waits_for_approval=waits, as_json=as_json)

    with traced_command(settings) as interceptors:
        asyncio.run(run(interceptors))


def _print_plan(title: str, lines: list[str]) -> None:
    out.print(title, highlight=False)
    for number, line in enumerate(lines, start=1):
        out.print(f"  {number}. {line}", highlight=False, markup=False)


async def _plan_zone_failover(
    client: Client, settings: DrctlSettings, request: ZoneFailoverRequest, as_json: bool
) -> None:
    from drctl.workflows.zone import ZoneFailoverWorkflow

    planned = await client.execute_workflow(
        ZoneFailoverWorkflow.run,
        request.model_copy(update={"plan_only": True}),
        id=f"plan-zone-failover-{request.zone}-{uuid.uuid4().hex[:6]}",
        task_queue=settings.task_queue,
    )
    if as_json:
        out.print_json(planned.model_dump_json())
        return
    _print_plan(f"plan of the failover of zone {request.zone} (nothing will be changed):", planned.plan)


async def _zone_failover(
    client: Client, settings: DrctlSettings, request: ZoneFailoverRequest, waits_for_approval: bool, as_json: bool
) -> None:
    """Start (or join) the zone's failover and show each model moved (the workflow's ``progress``
    query) while it runs, then the result (with ``as_json``: only the result, as JSON)."""
    from drctl.temporal.runbooks import start_zone_failover
    from drctl.workflows.zone import ZoneFailoverWorkflow

    zone = request.zone
    with span("drctl zone-failover", zone=zone, trigger="manual"):
        handle = await start_zone_failover(client, settings, request)
    if as_json:
        result = await handle.result()
        out.print_json(result.model_dump_json())
        if result.failed:
            raise typer.Exit(EXIT_FAILED)
        return
    out.print(f"zone failover workflow [bold]{handle.id}[/]", highlight=False)
    if waits_for_approval:
        out.print(f"waiting for approval: drctl approve {zone} --approver NAME (or the UI's Update 'approve')")
    shown: set[str] = set()

    def progress(result: ZoneFailoverResult) -> None:
        new = [line for line in result.moved + result.failed if line not in shown]
        shown.update(new)
        batch = f"switching {len(result.switching)}"
        if result.switching and batch not in shown:  # once: the batch's moves come when it ends
            shown.add(batch)
            new.insert(0, batch)
        show([zone_progress_line(line, result) for line in new])

    result = await await_with_progress(handle, ZoneFailoverWorkflow.progress, progress)
    progress(result)
    out.print(
        f"{len(result.cordoned_gpus)} GPU(s) of {zone} cordoned; {result.reconcile or 'no reconcile'}",
        highlight=False,
        markup=False,
    )
    if result.failed:
        raise typer.Exit(EXIT_FAILED)


def failback(
    zone: Annotated[str, typer.Argument(help="the zone to take back into placement")],
    plan: Annotated[
        bool, typer.Option("--plan", help="print what it would do (GPUs back in placement), change nothing")
    ] = False,
    as_json: JsonOption = False,
    policy: PolicyOption = None,
) -> None:
    """Fail back a zone, only when asked: its GPUs return to placement and standbys are placed there
    again. Serving stays where the failover put it."""
    from drctl.payloads import zone_failback_workflow_id
    from drctl.workflows.zone import ZoneFailbackWorkflow

    settings, dr_policy = with_policy(policy)
    require_zone(dr_policy, zone)
    request = ZoneFailoverRequest(zone=zone, reason="failback", plan_only=plan)

    async def run(interceptors: list[Interceptor]) -> None:
        client = await connect(settings, interceptors)
        with span("drctl failback" + (" --plan" if plan else ""), zone=zone, trigger="manual"):
            handle = await client.start_workflow(
                ZoneFailbackWorkflow.run,
                request,
                # A plan is a run of its own: it never joins (or blocks) the zone's real failback.
                id=f"plan-{zone_failback_workflow_id(zone)}-{uuid.uuid4().hex[:6]}"
                if plan
                else zone_failback_workflow_id(zone),
                task_queue=settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
        result = await handle.result()
        if as_json:
            out.print_json(result.model_dump_json())
        elif plan:
            _print_plan(f"plan of the failback of zone {zone} (nothing will be changed):", result.plan)
        else:
            out.print(
                f"{zone}: {len(result.uncordoned_gpus)} GPU(s) back in placement; {result.reconcile}",
                highlight=False,
                markup=False,
            )

    with traced_command(settings) as interceptors:
        asyncio.run(run(interceptors))


def approve(
    zone: Annotated[str, typer.Argument(help="the zone whose failover waits for approval")],
    approver: Annotated[str, typer.Option(help="who approves; recorded in the history")],
    comment: Annotated[str, typer.Option(help="optional note")] = "",
    policy: PolicyOption = None,
) -> None:
    """Approve a zone failover that waits for an operator (the policy's az_failover.requireApproval)."""
    from drctl.payloads import ZoneApproval, zone_failover_workflow_id
    from drctl.workflows.zone import ZoneFailoverWorkflow

    settings, dr_policy = with_policy(policy)
    require_zone(dr_policy, zone)
    if not approver.strip():
        fail("--approver: say who approves (it is recorded in the workflow history)", EXIT_BAD_INPUT)

    async def run() -> None:
        client = await connect(settings)
        handle = client.get_workflow_handle(zone_failover_workflow_id(zone))
        try:
            answer = await handle.execute_update(
                ZoneFailoverWorkflow.approve, ZoneApproval(approver=approver, comment=comment)
            )
        except Exception as exc:  # not found, already closed, ...
            fail(f"cannot approve the failover of {zone}: {exc}")
        out.print(answer, highlight=False, markup=False)

    asyncio.run(run())
