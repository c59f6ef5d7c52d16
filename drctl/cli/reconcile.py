"""``drctl reconcile``: bring the standbys back to the policy now, as the schedule does every interval.

It runs the same ``ReconcileStandbysWorkflow`` under the schedule's fixed workflow ID, so a run by
hand joins one already going instead of racing it; a ``--dry-run`` gets an ID of its own and
changes nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

import typer
from temporalio.client import WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy

from drctl.cli.common import (
    EXIT_FAILED,
    PolicyOption,
    StateOption,
    await_with_progress,
    connect,
    err,
    fail,
    out,
    require_model,
    show,
    with_policy,
)
from drctl.cli.render import reconcile_lines, reconcile_progress
from drctl.payloads import RECONCILE_WORKFLOW_ID, ReconcileRequest, ReconcileResult, reconcile_pass_workflow_id
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
        require_model(dr_policy, name)
    request = ReconcileRequest(models=model or None, dry_run=dry_run)
    result = asyncio.run(run_reconcile(settings, request, on_progress=ProgressLine()))
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        show(reconcile_lines(result))
    if result.failed:
        raise typer.Exit(EXIT_FAILED)


PROGRESS_EVERY_S = 1.0


class ProgressLine:
    """What a pass going is doing, on stderr: a spinner's line on a terminal, else one line each
    time it changes (a pass can wait minutes for a zone failover to end)."""

    def __init__(self) -> None:
        self._said = ""
        self._status: Any = None

    def __call__(self, line: str) -> None:
        if line == self._said:
            return
        self._said = line
        if not err.is_terminal:
            err.print(f"reconcile: {line}", markup=False, highlight=False)
        elif self._status is None:
            self._status = err.status(line)
            self._status.start()
        else:
            self._status.update(line)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()


async def run_reconcile(
    settings: DrctlSettings, request: ReconcileRequest, on_progress: ProgressLine | None = None
) -> ReconcileResult:
    from drctl.workflows.reconcile import ReconcilePassWorkflow, ReconcileStandbysWorkflow

    client = await connect(settings)
    workflow_id = f"reconcile-dry-run-{uuid.uuid4().hex[:8]}" if request.dry_run else RECONCILE_WORKFLOW_ID
    handle = await client.start_workflow(
        ReconcileStandbysWorkflow.run,
        request,
        id=workflow_id,
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    try:
        if on_progress is None or request.dry_run:  # a dry run plans in line: no pass to ask
            return await handle.result()
        on_progress(reconcile_progress(None))
        return await await_with_progress(
            handle,
            ReconcilePassWorkflow.progress,
            lambda going: on_progress(reconcile_progress(going)),
            every_s=PROGRESS_EVERY_S,
            asked=client.get_workflow_handle(reconcile_pass_workflow_id(settings.task_queue)),
        )
    except WorkflowFailureError as exc:
        fail(f"reconciliation failed: {exc.cause or exc}")
    finally:
        if on_progress is not None:
            on_progress.close()
