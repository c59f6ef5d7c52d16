"""``drctl reconcile``: bring the standbys back to the policy now, as the schedule does every interval.

It runs the same ``ReconcileStandbysWorkflow`` under the schedule's fixed workflow ID, so a run by
hand joins one already going instead of racing it; a ``--dry-run`` gets an ID of its own and
changes nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated

import typer
from temporalio.client import WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy

from drctl.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    PolicyOption,
    StateOption,
    connect,
    fail,
    out,
    show,
    with_policy,
)
from drctl.cli.render import reconcile_lines
from drctl.payloads import RECONCILE_WORKFLOW_ID, ReconcileRequest, ReconcileResult
from drctl.settings import DrctlSettings


def reconcile(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the diff, change nothing")] = False,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="only this model (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    policy: PolicyOption = None,
    state_dir: StateOption = None,
) -> None:
    """Bring standbys back to the policy's hot/warm/cold counts (what the schedule runs), now.

    With --dry-run, only show what it would create, re-tier or delete, and where placement puts it.
    """
    settings, dr_policy = with_policy(policy, state_dir)
    for name in model or []:
        if name not in dr_policy.model_names:
            fail(f"unknown model {name!r}; the policy has: {', '.join(dr_policy.model_names)}", EXIT_BAD_INPUT)
    request = ReconcileRequest(models=model or None, dry_run=dry_run)
    result = asyncio.run(run_reconcile(settings, request))
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        show(reconcile_lines(result))
    if result.failed:
        raise typer.Exit(EXIT_FAILED)


async def run_reconcile(settings: DrctlSettings, request: ReconcileRequest) -> ReconcileResult:
    from drctl.workflows.reconcile import ReconcileStandbysWorkflow

    client = await connect(settings)
    workflow_id = f"reconcile-dry-run-{uuid.uuid4().hex[:8]}" if request.dry_run else RECONCILE_WORKFLOW_ID
    try:
        return await client.execute_workflow(
            ReconcileStandbysWorkflow.run,
            request,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
    except WorkflowFailureError as exc:
        fail(f"reconciliation failed: {exc.cause or exc}")
