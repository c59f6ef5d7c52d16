"""``drctl``: bring up the local stack, inspect it, start and audit failovers.

Bad input (an unknown model or instance, a broken policy file) exits with status 2 and a message;
an unreachable Temporal or a failed runbook exits with status 1. No tracebacks for either.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import (
    SearchAttributeKey,
    WorkflowIDConflictPolicy,
)

from drctl.payloads import (
    RECONCILE_WORKFLOW_ID,
    BudgetReset,
    BudgetState,
    FailoverOutcome,
    FailoverRequest,
    FailoverResult,
    IncidentState,
    ReconcileRequest,
    ReconcileResult,
    SearchAttr,
    StepTiming,
    Trigger,
    WorkflowName,
    budget_workflow_id,
    failover_workflow_id,
)
from drctl.platforms.local import envoy, processes
from drctl.platforms.local.registry import InstanceRegistry
from drctl.policies.durations import parse_duration
from drctl.policies.loader import PolicyError, load_policy_file
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings, StateLayout
from drctl.temporal.client import connect
from drctl.temporal.incidents import budget_state
from drctl.temporal.runbooks import report_failover, start_failover_handle
from drctl.workers.binaries import MissingBinaryError

R = TypeVar("R")
Q = TypeVar("Q")

app = typer.Typer(
    help="drctl: disaster recovery for GPU model-inference fleets (failover runbooks as Temporal workflows).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
policy_app = typer.Typer(help="Check DR policy files.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
budget_app = typer.Typer(
    help="The fleet's blast-radius budget: recoveries running and waiting, the breaker (manual mode).",
    invoke_without_command=True,
)
app.add_typer(budget_app, name="budget")

out = Console()
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out = Console(width=200)
err = Console(stderr=True)

EXIT_BAD_INPUT = 2
SUCCESSFUL_OUTCOMES = {
    FailoverOutcome.RECOVERED,
    FailoverOutcome.JOINED,
    FailoverOutcome.FALSE_ALARM,
    FailoverOutcome.ALREADY_EJECTED,
    FailoverOutcome.STANDBY_EJECTED,
}
EXIT_FAILED = 1

PolicyOption = Annotated[
    Path | None,
    typer.Option("--policy", "-p", help="DR policy file [default: $DRCTL_POLICY or examples/dr-policy.yaml]"),
]
StateOption = Annotated[
    Path | None, typer.Option("--state-dir", help="state folder [default: $DRCTL_STATE_DIR or .drctl]")
]


def _settings(policy: Path | None = None, state_dir: Path | None = None) -> DrctlSettings:
    overrides: dict[str, object] = {}
    if policy is not None:
        overrides["policy"] = policy
    if state_dir is not None:
        overrides["state_dir"] = state_dir
    return DrctlSettings(**overrides)  # type: ignore[arg-type]


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``error: message`` and exit. The message is never read as markup: it carries what a
    user typed or a file holds (a model named ``[/]``, a regex ``[a-z0-9]``), printed as written."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    raise typer.Exit(code)


def _lit(value: object) -> str:
    """A value from a user, a file or a workflow, for a markup string: escaped, so brackets in it are
    printed, not taken for styles (or rejected: ``[/]`` raised ``MarkupError``)."""
    return escape(str(value))


def _cell(value: object) -> Text:
    """A table cell from data: plain text, never markup."""
    return Text(str(value))


def _load_policy(settings: DrctlSettings) -> DRPolicy:
    try:
        return load_policy_file(settings.policy)
    except PolicyError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)


async def _connect(settings: DrctlSettings) -> Client:
    try:
        return await connect(settings)
    except RuntimeError as exc:
        _fail(
            f"cannot reach Temporal at {settings.temporal_address} ({exc}). "
            "Is `drctl up` running? (or set DRCTL_TEMPORAL_ADDRESS)"
        )


# -- up ----------------------------------------------------------------------------------------


@app.command()
def up(
    policy: PolicyOption = None,
    state_dir: StateOption = None,
    fresh: Annotated[bool, typer.Option(help="delete the state folder first (Temporal history too)")] = False,
    prober: Annotated[bool, typer.Option(help="run the health prober, which starts failovers by itself")] = True,
) -> None:
    """Bring up the local stack on loopback and keep it running until Ctrl-C.

    Starts the Temporal dev server (SQLite in the state folder, UI on :8233), Envoy (one cluster per
    model), the model instances the policy asks for (serving, hot and warm standbys) and the worker.
    """
    from drctl.workers.stack import LocalStack, StackError

    settings = _settings(policy, state_dir)
    dr_policy = _load_policy(settings)
    if fresh and settings.state_dir.exists():
        # Never wipe the state of a stack that is running: check its ports first. What a `drctl up`
        # that died without stopping left running (parts and instances) is stopped, then forgotten.
        try:
            leftover = LocalStack(
                settings, dr_policy, say=lambda line: out.print(f"[dim]·[/] {_lit(line)}", highlight=False)
            )
            leftover.stop_leftovers(instances=True)
            leftover.check_ports_free()
        except StackError as exc:
            _fail(f"not removing {settings.state_dir}: {exc}")
        shutil.rmtree(settings.state_dir)
        out.print(f"removed {settings.state_dir}")

    async def _run() -> None:
        stack = LocalStack(
            settings,
            dr_policy,
            say=lambda line: out.print(f"[dim]·[/] {_lit(line)}", highlight=False),
            with_prober=prober,
            with_alert_receiver=True,
            with_node_agents=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stack.start()
            _print_summary(settings, dr_policy)
            _render_status(await _status_rows(settings, dr_policy))
            await stack.supervise(stop)
        finally:
            await stack.stop()

    try:
        asyncio.run(_run())
    except (StackError, MissingBinaryError) as exc:
        _fail(str(exc))


def _print_summary(settings: DrctlSettings, policy: DRPolicy) -> None:
    layout = StateLayout(settings.state_dir)
    lines = [
        f"Temporal UI      {settings.temporal_ui_url}",
        f"Temporal         {settings.temporal_address}  (namespace {settings.temporal_namespace}, "
        f"task queue {settings.task_queue})",
        f"Load balancer    {settings.lb_url}/v1/models/<model>/predict",
        f"Envoy admin      {settings.envoy_admin_url}",
        f"State folder     {layout.root}  (logs in {layout.logs_dir})",
        f"Policy           {Path(settings.policy).resolve()}",
        "",
        f'try:  curl -s {settings.lb_url}/v1/models/{policy.models[0].name}/predict -d \'{{"prompt": "hello"}}\'',
        "       drctl status",
        f"       drctl failover {policy.models[0].name} {policy.models[0].name}-0 --reason 'manual test'",
    ]
    out.print(Panel("\n".join(lines), title="drctl is up — Ctrl-C to stop", expand=False), highlight=False)


# -- status ------------------------------------------------------------------------------------


@app.command()
def status(
    policy: PolicyOption = None,
    state_dir: StateOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show every model's instances: role (tier), load balancer priority, process and Envoy health."""
    settings = _settings(policy, state_dir)
    dr_policy = _load_policy(settings)
    layout = StateLayout(settings.state_dir)
    if not layout.instances_file.exists():
        _fail(f"no local stack state in {layout.root}; start it with `drctl up`")
    if as_json:
        rows = asyncio.run(_status_rows(settings, dr_policy))
        out.print_json(json.dumps(rows))
        return
    _render_status(asyncio.run(_status_rows(settings, dr_policy)))
    _render_detectors(layout)
    _render_budget(settings)


def _render_budget(settings: DrctlSettings) -> None:
    """One line on the recoveries running and waiting, and the breaker (a tripped one in red)."""

    async def read() -> BudgetState | None:
        try:
            client = await asyncio.wait_for(connect(settings), timeout=3.0)
            return await budget_state(client, settings.task_queue)
        except Exception:  # status shows what it can: Temporal may be down or restarting
            return None

    state = asyncio.run(read())
    if state is None:
        out.print("budget: no recovery has asked yet (or Temporal is not answering)", highlight=False)
        return
    line = f"budget: {len(state.running)} recoveries running, {len(state.waiting)} waiting"
    if state.tripped:
        line += f" [red]TRIPPED (manual mode): {_lit(state.tripped)}; `drctl budget reset` after checking[/]"
    out.print(line, highlight=False)


def _render_detectors(layout: StateLayout) -> None:
    """One line per part `drctl up` supervises (restarts included), then one on the prober and the
    zone checks, from the status file the prober keeps."""
    from drctl.workers.stack import supervision_lines

    for line in supervision_lines(layout):
        out.print(line, highlight=False, markup=False)
    try:
        status = json.loads(layout.prober_status_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        out.print("prober: not running (no status file)", highlight=False)
        return
    alive = processes.is_alive(status.get("pid"))
    line = f"prober: {'running' if alive else 'not running'} (pid {status.get('pid')}, {status.get('ticks')} ticks)"
    if status.get("unreported"):
        line += f" [yellow]{len(status['unreported'])} failure(s) not reported yet (Temporal?)[/]"
    zones = status.get("zones")
    if zones:
        line += "; zones: " + ", ".join(f"{_lit(zone)} {_lit(verdict)}" for zone, verdict in sorted(zones.items()))
    cordoned = layout.cordoned_file
    if cordoned.exists():
        try:
            gpus = sorted(json.loads(cordoned.read_text(encoding="utf-8")))
        except ValueError:
            gpus = []
        if gpus:
            line += f"; cordoned GPUs: {_lit(', '.join(gpus))}"
    out.print(line, highlight=False)


async def _status_rows(settings: DrctlSettings, policy: DRPolicy) -> list[dict[str, object]]:
    registry = InstanceRegistry(StateLayout(settings.state_dir).instances_file)
    rows: list[dict[str, object]] = []
    async with httpx.AsyncClient(timeout=1.0) as client:
        for model in policy.model_names:
            try:
                hosts = {h.port: h for h in await envoy.cluster_hosts(settings.envoy_admin_url, model, client)}
            except (httpx.HTTPError, LookupError):
                hosts = {}
            for inst in registry.of_model(model):
                host = hosts.get(inst.port) if inst.port is not None else None
                rows.append(
                    {
                        "model": model,
                        "instance": inst.id,
                        "role": inst.role.value,
                        "lb_priority": inst.lb_priority,
                        "gpu": inst.gpu,
                        "zone": inst.zone,
                        "port": inst.port,
                        "pid": inst.pid,
                        "process": "running"
                        if processes.is_alive(inst.pid)
                        else ("-" if inst.pid is None else "exited"),
                        "envoy": None if host is None else ("healthy" if host.healthy else ",".join(host.flags)),
                        "serves": inst.lb_priority == 0 and host is not None and host.healthy,
                        "note": inst.note,
                    }
                )
    return rows


def _process_state(pid: int | None) -> str:
    if pid is None:
        return "-"
    return "running" if processes.is_alive(pid) else "exited"


def _render_status(rows: list[dict[str, object]]) -> None:
    table = Table(title="instances", title_justify="left")
    for column in ("model", "instance", "role", "LB prio", "gpu", "zone", "port", "pid", "process", "envoy", "serves"):
        table.add_column(column)
    role_style = {"serving": "bold green", "hot": "red", "warm": "yellow", "cold": "cyan", "failed": "dim"}
    for row in rows:
        table.add_row(
            _cell(row["model"]),
            _cell(row["instance"]),
            Text(str(row["role"]), style=role_style.get(str(row["role"]), "")),
            "-" if row["lb_priority"] is None else str(row["lb_priority"]),
            _cell(row["gpu"] or "-"),
            _cell(row["zone"] or "-"),
            "-" if row["port"] is None else str(row["port"]),
            "-" if row["pid"] is None else str(row["pid"]),
            _cell(row["process"]),
            _cell(row["envoy"] or "-"),
            "[green]yes[/]" if row["serves"] else "",
        )
    out.print(table)


# -- failover ----------------------------------------------------------------------------------


@app.command()
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
    settings = _settings(policy, state_dir)
    dr_policy = _load_policy(settings)
    if model not in dr_policy.model_names:
        _fail(f"unknown model {model!r}; the policy has: {', '.join(dr_policy.model_names)}", EXIT_BAD_INPUT)
    registry = InstanceRegistry(StateLayout(settings.state_dir).instances_file)
    known = [i.id for i in registry.of_model(model)]
    if not known:
        _fail(f"no instances of {model} in {settings.state_dir}; is `drctl up` running?", EXIT_BAD_INPUT)
    if instance not in known:
        _fail(f"{model} has no instance {instance!r}; known: {', '.join(known)}", EXIT_BAD_INPUT)
    try:
        request = FailoverRequest(model=model, instance=instance, reason=reason, trigger=Trigger.MANUAL)
    except ValueError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    if plan:
        request = request.model_copy(update={"plan_only": True})
        result = asyncio.run(_run_failover(settings, request, True, as_json))
    else:
        result = asyncio.run(_run_failover(settings, request, wait, as_json))
    if result is not None and result.outcome not in (*SUCCESSFUL_OUTCOMES, FailoverOutcome.PLANNED):
        raise typer.Exit(EXIT_FAILED)


def _reporter() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli {user}@{socket.gethostname()}"[:200]


async def _run_failover(
    settings: DrctlSettings, request: FailoverRequest, wait: bool, as_json: bool
) -> FailoverResult | None:
    client = await _connect(settings)
    if request.plan_only:
        handle = await client.start_workflow(
            WorkflowName.FAILOVER,
            request,
            id=f"plan-{failover_workflow_id(request.model, request.instance)}-{uuid.uuid4().hex[:6]}",
            task_queue=settings.task_queue,
            result_type=FailoverResult,
        )
        if not as_json:
            out.print(f"plan of the failover of {request.instance} (nothing will be changed)", highlight=False)
    else:
        ticket = await report_failover(client, settings, request, reporter=_reporter())
        handle = await start_failover_handle(client, settings.task_queue, ticket)
        if not as_json:
            how = "joined the recovery already open" if ticket.joined else "opened a recovery"
            out.print(f"reported to guardian-{request.model}: {how}", highlight=False)
            if ticket.detail and ticket.state == IncidentState.QUEUED:
                out.print(f"  queued: {ticket.detail}", highlight=False, markup=False)
            out.print(f"failover workflow [bold]{handle.id}[/]", highlight=False)
            ui = f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows/{handle.id}"
            out.print(f"history: {ui}", highlight=False)
    if not wait:
        return None
    task = asyncio.ensure_future(handle.result())
    shown = 0
    while not task.done():
        try:
            progress = await handle.query("progress", result_type=FailoverResult)
        except Exception:
            progress = None
        if progress is not None and not as_json:
            for step in progress.steps[shown:]:
                _print_step(step)
            shown = len(progress.steps)
        await asyncio.wait([task], timeout=0.15)
    try:
        result: FailoverResult = task.result()
    except WorkflowFailureError as exc:
        _fail(f"failover failed: {exc.cause or exc}")
    if as_json:
        out.print_json(result.model_dump_json())
        return result
    for step in result.steps[shown:]:
        _print_step(step)
    _print_result(result)
    if result.outcome == FailoverOutcome.PLANNED:
        out.print("would run, in order: " + (" → ".join(result.plan) or "nothing"), highlight=False, markup=False)
        state = await budget_state(client, settings.task_queue)
        if state is not None:
            out.print(
                f"budget: {len(state.running)} recoveries running, {len(state.waiting)} waiting, "
                f"{len(state.starts)}/{state.max_per_minute} started in the last minute"
                + (f"; TRIPPED: {state.tripped}" if state.tripped else ""),
                highlight=False,
                markup=False,
            )
        out.print("this failover would take one lease of the budget", highlight=False)
    if result.joined_total:
        out.print(f"joined by {result.joined_total} other report(s): {', '.join(result.joined)}", highlight=False)
    return result


def _print_step(step: StepTiming) -> None:
    mark = "[green]✓[/]" if step.ok else "[red]✗[/]"
    own = f" (activity {step.activity_ms:.0f} ms)" if step.activity_ms is not None else ""
    out.print(f"  {mark} {step.step:<14} {step.duration_ms:>8.0f} ms{own}  {_lit(step.detail)}", highlight=False)


def _print_result(result: FailoverResult) -> None:
    colour = "green" if result.outcome == FailoverOutcome.RECOVERED else "yellow"
    out.print(f"[bold {colour}]{result.outcome.value}[/]: {_lit(result.reason)}", highlight=False)
    if result.switch_ms is not None:
        out.print(
            f"switch {result.switch_ms:.0f} ms · RTO {result.rto_ms:.0f} ms · "
            f"orchestration overhead {result.orchestration_ms:.0f} ms"
            + (
                " · eject deferred until the replacement served (last serving instance)"
                if result.eject_deferred
                else ""
            ),
            highlight=False,
        )


# -- reconcile ---------------------------------------------------------------------------------


@app.command()
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
    settings = _settings(policy, state_dir)
    dr_policy = _load_policy(settings)
    for name in model or []:
        if name not in dr_policy.model_names:
            _fail(f"unknown model {name!r}; the policy has: {', '.join(dr_policy.model_names)}", EXIT_BAD_INPUT)
    request = ReconcileRequest(models=model or None, dry_run=dry_run)
    result = asyncio.run(_run_reconcile(settings, request))
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        _print_reconcile(result)
    if result.failed:
        raise typer.Exit(EXIT_FAILED)


async def _run_reconcile(settings: DrctlSettings, request: ReconcileRequest) -> ReconcileResult:
    client = await _connect(settings)
    workflow_id = f"reconcile-dry-run-{uuid.uuid4().hex[:8]}" if request.dry_run else RECONCILE_WORKFLOW_ID
    try:
        result: ReconcileResult = await client.execute_workflow(
            "ReconcileStandbysWorkflow",
            request,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            result_type=ReconcileResult,
        )
    except WorkflowFailureError as exc:
        _fail(f"reconciliation failed: {exc.cause or exc}")
    return result


def _print_reconcile(result: ReconcileResult) -> None:
    plan = result.plan
    if not plan.actions and not plan.violations:
        out.print("[green]in line with the policy[/]: nothing to create, re-tier or delete")
    elif not plan.actions:
        out.print("[yellow]counts in line, placement is not[/]: nothing this pass can move (below)")
    else:
        title = "plan (dry run: nothing changed)" if result.dry_run else "plan"
        table = Table(title=title, title_justify="left")
        for column in ("action", "model", "instance", "tier", "gpu", "node", "zone", "why"):
            table.add_column(column)
        for a in plan.actions:
            cells = (
                a.kind.value,
                a.model,
                a.instance,
                a.tier.value,
                a.gpu or "-",
                a.node or "-",
                a.zone or "-",
                a.reason,
            )
            table.add_row(*map(_cell, cells))
        out.print(table)
    for line in plan.unplaceable:
        out.print(f"[yellow]not placed[/]: {_lit(line)}", highlight=False)
    for line in plan.skipped_models:
        out.print(f"[yellow]skipped[/]: {_lit(line)}", highlight=False)
    for line in plan.violations:
        out.print(f"[yellow]misplaced[/]: {_lit(line)}", highlight=False)
    for line in result.applied:
        out.print(f"[green]✓[/] {_lit(line)}", highlight=False)
    for line in result.failed:
        out.print(f"[red]✗[/] {_lit(line)}", highlight=False)


# -- audit -------------------------------------------------------------------------------------


@app.command()
def audit(
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    outcome: Annotated[
        str | None, typer.Option(help="only this outcome: " + ", ".join(o.value for o in FailoverOutcome))
    ] = None,
    since: Annotated[str | None, typer.Option(help="only failovers started within this long, e.g. 1h, 30m, 7d")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """List past failovers from Temporal visibility (search attributes), newest first."""
    settings = _settings()
    clauses = ["WorkflowType = 'FailoverWorkflow'"]
    if model:
        if not model.replace("-", "").replace(".", "").isalnum():
            _fail(f"invalid model name {model!r}", EXIT_BAD_INPUT)
        clauses.append(f"{SearchAttr.MODEL} = '{model}'")
    if outcome:
        if outcome not in {o.value for o in FailoverOutcome}:
            _fail(f"unknown outcome {outcome!r}; one of {', '.join(o.value for o in FailoverOutcome)}", EXIT_BAD_INPUT)
        clauses.append(f"{SearchAttr.OUTCOME} = '{outcome}'")
    if since:
        try:
            window = parse_duration(since)
        except ValueError as exc:
            _fail(f"--since: {exc}", EXIT_BAD_INPUT)
        cutoff = datetime.now(UTC) - window
        clauses.append(f"StartTime > '{cutoff.strftime('%Y-%m-%dT%H:%M:%SZ')}'")
    query = " AND ".join(clauses)
    rows = asyncio.run(_audit_rows(settings, query, limit))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"failovers ({_lit(query)})", title_justify="left")
    for column in ("started", "model", "instance", "trigger", "outcome", "tier", "RTO ms", "status", "workflow id"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["started"])[:19],
            *(_cell(row[k] or "-") for k in ("model", "instance", "trigger", "outcome", "tier", "rto_ms", "status")),
            _cell(row["workflow_id"]),
        )
    out.print(table)


async def _audit_rows(settings: DrctlSettings, query: str, limit: int) -> list[dict[str, object]]:
    client = await _connect(settings)
    rows: list[dict[str, object]] = []
    keys = {
        "model": SearchAttributeKey.for_keyword(SearchAttr.MODEL),
        "instance": SearchAttributeKey.for_keyword(SearchAttr.INSTANCE),
        "trigger": SearchAttributeKey.for_keyword(SearchAttr.TRIGGER),
        "outcome": SearchAttributeKey.for_keyword(SearchAttr.OUTCOME),
        "tier": SearchAttributeKey.for_keyword(SearchAttr.TIER),
    }
    rto_key = SearchAttributeKey.for_int(SearchAttr.RTO_MS)
    async for wf in client.list_workflows(query, limit=limit):
        attrs = wf.typed_search_attributes
        row: dict[str, object] = {"workflow_id": wf.id, "run_id": wf.run_id}
        row |= {name: attrs.get(key) for name, key in keys.items()}
        row["rto_ms"] = attrs.get(rto_key)
        row["status"] = wf.status.name.lower() if wf.status is not None else None
        row["started"] = wf.start_time.isoformat()
        row["closed"] = wf.close_time.isoformat() if wf.close_time else None
        rows.append(row)
    return rows


# -- policy ------------------------------------------------------------------------------------


@policy_app.command("validate")
def policy_validate(file: Annotated[Path, typer.Argument(help="policy YAML file")]) -> None:
    """Check a policy file; print every error with its path and line, exit non-zero on any."""
    try:
        dr_policy = load_policy_file(file)
    except PolicyError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    names = dr_policy.model_names
    shown = ", ".join(names[:20]) + (f", … ({len(names) - 20} more)" if len(names) > 20 else "")
    out.print(f"[green]ok[/]: {_lit(file)} — {len(names)} model(s): {_lit(shown)}", highlight=False)


@policy_app.command("explain")
def policy_explain(
    file: Annotated[Path, typer.Argument(help="policy YAML file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Per model: instances per tier, GPU memory per zone, expected RTO after each failure vs the target."""
    from drctl.policies.durations import format_duration
    from drctl.policies.explain import RtoAssumptions, explain
    from drctl.policies.sizes import format_size

    try:
        dr_policy = load_policy_file(file)
    except PolicyError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    items = explain(dr_policy)
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        "model": i.name,
                        "priority": i.priority,
                        "tenant": i.tenant,
                        "rto_target_s": i.rto_target.total_seconds(),
                        "rpo_target_s": i.rpo_target.total_seconds(),
                        "instances": {k.value: v for k, v in i.instances.items()},
                        "memory_by_zone": i.memory_by_zone,
                        "failures": [
                            {
                                "failure": f.failure,
                                "tier": f.tier.value if f.tier else "emergency",
                                "expected_rto_s": f.expected_rto_s,
                                "meets_target": f.meets_target,
                            }
                            for f in i.failures
                        ],
                        "unplaced": i.unplaced,
                    }
                    for i in items
                ]
            )
        )
        return
    for item in items:
        tiers = ", ".join(f"{n} {role.value}" for role, n in item.instances.items() if n)
        out.print(
            f"[bold]{item.name}[/] ({item.priority}, tenant {item.tenant}): {tiers}; "
            f"RTO target {format_duration(item.rto_target)}, RPO {format_duration(item.rpo_target)}",
            highlight=False,
        )
        zones = "; ".join(
            f"{zone}: {format_size(m['loaded'])} loaded + {format_size(m['reserved'])} reserved"
            for zone, m in sorted(item.memory_by_zone.items())
        )
        out.print(f"  GPU memory by zone: {_lit(zones or 'none')}", highlight=False)
        steps = []
        for f in item.failures:
            mark = "[green]✓[/]" if f.meets_target else "[red]✗ misses target[/]"
            steps.append(
                f"#{f.failure} → {f.tier.value if f.tier else 'emergency instance'} ~{f.expected_rto_s:g}s {mark}"
            )
        out.print("  after each lost serving instance: " + " · ".join(steps), highlight=False)
        for line in item.unplaced:
            out.print(f"  [yellow]does not fit the pool[/]: {_lit(line)}", highlight=False)
    a = RtoAssumptions()
    out.print(
        f"[dim]estimates: detection {a.detection_s:g}s; hot switch {a.hot_switch_s:g}s (measured, docs/benchmarks.md); "
        f"warm wakes at {a.wake_gib_per_s:g} GiB/s; cold starts in {a.cold_start_s:g}s and loads at "
        f"{a.cold_load_gib_per_s:g} GiB/s; plus one health-check interval for a new endpoint[/]",
        highlight=False,
    )


# -- detection -----------------------------------------------------------------------------------

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("alert-receiver", context_settings=PASS_THROUGH, add_help_option=False)
def alert_receiver(ctx: typer.Context) -> None:
    """Receive Alertmanager webhooks and start runbooks (tokens: DRCTL_ALERT_TOKENS or _FILE).

    Options are those of `python -m drctl.detectors.alert_receiver` (see --help): --host, --port.
    """
    from drctl.detectors.alert_receiver import main as receiver_main

    receiver_main(list(ctx.args))


@app.command("node-agent", context_settings=PASS_THROUGH, add_help_option=False)
def node_agent(ctx: typer.Context) -> None:
    """Report this node's GPUs from NVML (or the policy without NVML); a GPU in "drain" starts
    DrainGpuWorkflow. Options: --node NAME [--host --port 9400 --interval 5 --policy FILE]."""
    from drctl.detectors.gpu_node_agent import main as agent_main

    raise typer.Exit(agent_main(list(ctx.args)))


@app.command()
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

    settings = _settings(policy, state_dir)
    dr_policy = _load_policy(settings)
    known = [slot.id for slot in gpu_inventory(dr_policy.gpu_pool)]
    if gpu not in known:
        _fail(
            f"unknown GPU {gpu!r}; the pool has {', '.join(known[:8])}{' …' if len(known) > 8 else ''}", EXIT_BAD_INPUT
        )

    async def _run() -> None:
        client = await _connect(settings)
        handle = await start_gpu_drain(client, settings, DrainGpuRequest(gpu=gpu, reason=reason))
        out.print(f"drain workflow [bold]{handle.id}[/]", highlight=False)
        try:
            result = await handle.result()
        except WorkflowFailureError as exc:
            _fail(f"drain failed: {exc.cause or exc}")
        for line in result.failovers:
            out.print(f"[green]✓[/] failed over {_lit(line)}", highlight=False)
        for line in result.deleted:
            out.print(
                f"[green]✓[/] removed standby {_lit(line)} (reconciliation recreates it elsewhere)", highlight=False
            )
        for line in result.failed:
            out.print(f"[red]✗[/] {_lit(line)}", highlight=False)
        out.print(f"{gpu} cordoned: placement no longer uses it")
        if result.failed:
            raise typer.Exit(EXIT_FAILED)

    asyncio.run(_run())


async def _await_with_progress(
    handle: WorkflowHandle[Any, R], query: str, query_type: type[Q], show: Callable[[Q], None]
) -> R:
    """The workflow's result; meanwhile, every half second, its ``query`` answer handed to ``show``
    (a query that fails, say before the first workflow task, is skipped)."""
    result = asyncio.ensure_future(handle.result())
    while not result.done():
        try:
            show(await handle.query(query, result_type=query_type))
        except Exception:
            pass
        await asyncio.wait([result], timeout=0.5)
    return result.result()


# -- zone failover ---------------------------------------------------------------------------------


def _require_zone(dr_policy: DRPolicy, zone: str) -> None:
    if zone not in dr_policy.zones:
        _fail(f"unknown zone {zone!r}; the policy has: {', '.join(sorted(dr_policy.zones))}", EXIT_BAD_INPUT)


@app.command("zone-failover")
def zone_failover(
    zone: Annotated[str, typer.Argument(help="the failed zone, e.g. az-1 (the policy's az_failover.activeZones)")],
    reason: Annotated[str, typer.Option(help="why; recorded in the workflow history")] = "manual zone failover",
    approved: Annotated[bool, typer.Option(help="pre-approve (when the policy requires approval)")] = False,
    plan: Annotated[
        bool, typer.Option("--plan", help="print what it would do (GPUs, instances, standbys, budget), change nothing")
    ] = False,
    policy: PolicyOption = None,
) -> None:
    """Move the serving of every model out of ZONE: cordon its GPUs, fail its serving instances over.

    Each serving instance is reported to its model's guardian, so a recovery the prober already
    runs is joined, not doubled. With --plan, the same workflow observes and decides, changing nothing.
    """
    from drctl.payloads import ZoneFailoverRequest
    from drctl.payloads import ZoneFailoverResult as ZoneFailoverResultType
    from drctl.temporal.runbooks import start_zone_failover

    settings = _settings(policy)
    dr_policy = _load_policy(settings)
    _require_zone(dr_policy, zone)

    async def _run() -> None:
        client = await _connect(settings)
        if plan:
            planned = await client.execute_workflow(
                "ZoneFailoverWorkflow",
                ZoneFailoverRequest(zone=zone, reason=reason, approved=approved, plan_only=True),
                id=f"plan-zone-failover-{zone}-{uuid.uuid4().hex[:6]}",
                task_queue=settings.task_queue,
                result_type=ZoneFailoverResultType,
            )
            out.print(f"plan of the failover of zone {zone} (nothing will be changed):", highlight=False)
            for number, line in enumerate(planned.plan, start=1):
                out.print(f"  {number}. {line}", highlight=False, markup=False)
            return
        handle = await start_zone_failover(
            client, settings, ZoneFailoverRequest(zone=zone, reason=reason, approved=approved)
        )
        out.print(f"zone failover workflow [bold]{handle.id}[/]", highlight=False)
        if dr_policy.az_failover.require_approval and not approved:
            out.print(f"waiting for approval: drctl approve {zone} --approver NAME (or the UI's Update 'approve')")
        from drctl.payloads import ZoneFailoverResult

        # Progress per model while it runs (the workflow's `progress` query), then the result.
        shown: set[str] = set()

        def show(progress: ZoneFailoverResult) -> None:
            for line in progress.moved + progress.failed:
                if line not in shown:
                    shown.add(line)
                    mark = "[green]✓[/]" if line in progress.moved else "[red]✗[/]"
                    out.print(f"{mark} {_lit(line)}", highlight=False)

        result = await _await_with_progress(handle, "progress", ZoneFailoverResult, show)
        show(result)
        out.print(
            f"{len(result.cordoned_gpus)} GPU(s) of {zone} cordoned; {result.reconcile or 'no reconcile'}",
            highlight=False,
            markup=False,
        )
        if result.failed:
            raise typer.Exit(EXIT_FAILED)

    asyncio.run(_run())


@app.command()
def failback(
    zone: Annotated[str, typer.Argument(help="the zone to take back into placement")],
    policy: PolicyOption = None,
) -> None:
    """Fail back a zone, only when asked: its GPUs return to placement and standbys are placed there
    again. Serving stays where the failover put it."""
    from drctl.payloads import ZoneFailbackResult, ZoneFailoverRequest, zone_failback_workflow_id

    settings = _settings(policy)
    dr_policy = _load_policy(settings)
    _require_zone(dr_policy, zone)

    async def _run() -> None:
        client = await _connect(settings)
        result = await client.execute_workflow(
            "ZoneFailbackWorkflow",
            ZoneFailoverRequest(zone=zone, reason="failback"),
            id=zone_failback_workflow_id(zone),
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            result_type=ZoneFailbackResult,
        )
        out.print(
            f"{zone}: {len(result.uncordoned_gpus)} GPU(s) back in placement; {result.reconcile}",
            highlight=False,
            markup=False,
        )

    asyncio.run(_run())


@app.command()
def approve(
    zone: Annotated[str, typer.Argument(help="the zone whose failover waits for approval")],
    approver: Annotated[str, typer.Option(help="who approves; recorded in the history")],
    comment: Annotated[str, typer.Option(help="optional note")] = "",
) -> None:
    """Approve a zone failover that waits for an operator (the policy's az_failover.requireApproval)."""
    from drctl.payloads import ZoneApproval, zone_failover_workflow_id

    settings = _settings()

    async def _run() -> None:
        client = await _connect(settings)
        handle = client.get_workflow_handle(zone_failover_workflow_id(zone))
        try:
            answer = await handle.execute_update(
                "approve", ZoneApproval(approver=approver, comment=comment), result_type=str
            )
        except Exception as exc:  # not found, already closed, ...
            _fail(f"cannot approve the failover of {zone}: {exc}")
        out.print(answer, highlight=False, markup=False)

    asyncio.run(_run())


# -- drills ------------------------------------------------------------------------------------


@app.command()
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
        str | None, typer.Option(help="instead of running now, run it on a Temporal Schedule this often, e.g. 24h")
    ] = None,
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
    """
    from drctl.payloads import DrillReport, DrillRequest, DrillScenario, drill_workflow_id
    from drctl.policies.durations import parse_duration

    settings = _settings(policy, state_dir)
    dr_policy = _load_policy(settings)
    scenarios = [s.value for s in DrillScenario]
    if scenario not in scenarios:
        _fail(f"unknown scenario {scenario!r}; one of: {', '.join(scenarios)}", EXIT_BAD_INPUT)
    if model is not None and model not in dr_policy.model_names:
        _fail(f"unknown model {model!r}; the policy has: {', '.join(dr_policy.model_names)}", EXIT_BAD_INPUT)
    try:
        timeout_s = parse_duration(timeout).total_seconds()
        interval = parse_duration(every) if every else None
        request = DrillRequest(scenario=DrillScenario(scenario), model=model, rps=rps, timeout_s=timeout_s)
    except ValueError as exc:
        _fail(f"bad option: {exc}", EXIT_BAD_INPUT)

    async def _run() -> None:
        from temporalio.client import WorkflowFailureError
        from temporalio.common import WorkflowIDConflictPolicy
        from temporalio.exceptions import WorkflowAlreadyStartedError

        client = await _connect(settings)
        if interval is not None:
            from drctl.temporal.schedules import ensure_drill_schedule

            schedule_id, done = await ensure_drill_schedule(client, request, interval, settings.task_queue)
            out.print(f"drill schedule [bold]{schedule_id}[/] {done}: {scenario} every {every}", highlight=False)
            return
        try:
            handle = await client.start_workflow(
                "DrillWorkflow",
                request,
                id=drill_workflow_id(scenario, model),
                task_queue=settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                result_type=DrillReport,
            )
        except WorkflowAlreadyStartedError:
            _fail(f"a {scenario} drill is already running (workflow {drill_workflow_id(scenario, model)})")
        err.print(f"drill workflow [bold]{handle.id}[/] started", highlight=False)
        phases: list[str] = []

        def show(phase: str) -> None:
            if not phases or phase != phases[-1]:
                err.print(f"[dim]·[/] {_lit(phase)}", highlight=False)
                phases.append(phase)

        try:
            report = await _await_with_progress(handle, "phase", str, show)
        except WorkflowFailureError as exc:
            _fail(f"the drill did not run: {exc.cause or exc}")
        if as_json:
            out.print_json(report.model_dump_json())
        else:
            _print_drill(report)
        if not report.passed:
            raise typer.Exit(EXIT_FAILED)

    asyncio.run(_run())


def _print_drill(report: Any) -> None:
    m = report.measurement
    out.print(
        f"[bold]{report.scenario}[/] on {report.target.instance}: "
        + ("[green]PASSED[/]" if report.passed else "[red]FAILED[/]"),
        highlight=False,
    )
    if m is not None:
        from drctl.activities.drill_report import seconds as s

        out.print(
            f"  detection {s(m.detection_ms)}   switch {s(m.switch_ms)}   total RTO {s(m.rto_ms)} "
            f"(policy {s(report.target.policy_rto_ms)}, seed {s(report.target.sla_rto_ms)})",
            highlight=False,
        )
        out.print(
            f"  redundancy back {s(m.redundancy_ms)}   requests failed {m.failed_requests} of {m.requests}"
            + (f" (+{m.lost_in_flight} in flight at the fault)" if m.lost_in_flight else ""),
            highlight=False,
        )
    for name, verdict in report.verdicts.items():
        colour = "green" if verdict.startswith("pass") else "red"
        out.print(f"  [{colour}]{_lit(name)}[/]: {_lit(verdict)}", highlight=False)
    if report.error:
        out.print(f"  [red]error[/]: {_lit(report.error)}", highlight=False)
    for line in report.restore:
        out.print(f"  restored: {_lit(line)}", highlight=False)
    for kind, path in report.files.items():
        out.print(f"  {_lit(kind)}: {_lit(path)}", highlight=False)


# -- worker ------------------------------------------------------------------------------------


@app.command()
def worker() -> None:
    """Run the Temporal worker in the foreground (``drctl up`` starts one for you)."""
    from drctl.workers.runbook_worker import main as worker_main

    worker_main()


# -- budget ------------------------------------------------------------------------------------


@budget_app.callback()
def budget(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print the budget as JSON")] = False,
    policy: PolicyOption = None,
    state_dir: StateOption = None,
) -> None:
    """Show the budget: recoveries running and waiting (and why), starts in the last minute, the breaker."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(policy, state_dir)

    async def show() -> None:
        state = await budget_state(await _connect(settings), settings.task_queue)
        if as_json:
            out.print_json(state.model_dump_json() if state else "null")
            return
        if state is None:
            out.print("no recovery has asked the budget yet (nothing running, nothing waiting)")
            return
        breaker = f"[red]TRIPPED[/] since {state.tripped_at}: {escape(state.tripped)}" if state.tripped else "closed"
        out.print(f"breaker: {breaker}", highlight=False)
        out.print(
            f"running {len(state.running)} · waiting {len(state.waiting)} · started in the last minute "
            f"{len(state.starts)}/{state.max_per_minute} · per zone at most {state.max_per_zone} · "
            f"trips past {state.trip_after_waiting} waiting",
            highlight=False,
        )
        for lease in state.running:
            out.print(f"  running  {lease.incident} (zone {lease.zone or '-'}, {lease.kind})", highlight=False)
        for lease in state.waiting:
            why = state.why_waiting.get(lease.incident, "")
            out.print(f"  waiting  {lease.incident}: {escape(why)}", highlight=False)
        for line in state.resets[-3:]:
            out.print(f"  {escape(line)}", highlight=False)

    asyncio.run(show())


@budget_app.command("reset")
def budget_reset(
    actor: Annotated[str, typer.Option(help="who resets it (recorded)")] = "",
    comment: Annotated[str, typer.Option(help="why (recorded)")] = "",
    policy: PolicyOption = None,
    state_dir: StateOption = None,
) -> None:
    """Close a tripped breaker: the recoveries waiting start again, within the budget.

    The same is the ``reset`` Update of the workflow ``drctl-budget`` in the Temporal UI.
    """
    settings = _settings(policy, state_dir)
    try:
        request = BudgetReset(actor=actor or _reporter().removeprefix("cli "), comment=comment)
    except ValueError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)

    async def reset() -> str:
        client = await _connect(settings)
        if await budget_state(client, settings.task_queue) is None:
            return "no budget yet: nothing to reset"
        answer: str = await client.get_workflow_handle(budget_workflow_id(settings.task_queue)).execute_update(
            "reset", request, result_type=str
        )
        return answer

    out.print(asyncio.run(reset()), highlight=False, markup=False)


def main() -> None:
    try:
        app()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    # Exit without interpreter finalisation: the Temporal client's Rust runtime threads can still
    # be winding down then, and CPython aborts ("PyGILState_Release ... finalizing", seen in CI
    # once in ~50 CLI runs). Everything the command does is finished and flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
