"""What the commands print, made from their results: pure functions to rich renderables, no I/O.

Kept apart from the commands so that each output can be tested from a result alone, and so that
one rule holds everywhere: a value from a user, a file or a workflow is never read as markup. A
``str`` line here is markup whose data went through :func:`lit`; a ``Text`` line is data as
written; :func:`drctl.cli.common.show` prints either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from drctl.activities.drill_report import seconds
from drctl.cli.audit_story import Reporter as AuditReporter
from drctl.cli.audit_story import RunStory as AuditRunStory
from drctl.cli.audit_story import StoryStep as AuditStoryStep
from drctl.payloads import (
    PASS_WAITED,
    BudgetState,
    DrillReport,
    FailoverOutcome,
    FailoverResult,
    ReconcileResult,
    StepTiming,
    ZoneFailoverResult,
)
from drctl.policies.budget import FAILED_OVER_COVERS_FOR
from drctl.policies.explain import ModelExplanation, RtoAssumptions
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings, StateLayout

Lines = list[RenderableType]


def lit(value: object) -> str:
    """A value from a user, a file or a workflow, for a markup string: escaped, so brackets in it are
    printed, not taken for styles (or rejected: ``[/]`` raised ``MarkupError``)."""
    return escape(str(value))


def cell(value: object) -> Text:
    """A table cell from data: plain text, never markup."""
    return Text(str(value))


def dot(line: str) -> str:
    """A progress line of the stack or a drill: ``· line``."""
    return f"[dim]·[/] {lit(line)}"


# -- up and status -------------------------------------------------------------------------------


def summary_panel(settings: DrctlSettings, policy: DRPolicy, prometheus_url: str | None = None) -> Panel:
    """Where everything of a stack that has just come up is, and what to try first; ``prometheus_url``
    when ``drctl up --with-prometheus`` runs one."""
    layout = StateLayout(settings.state_dir)
    first = policy.models[0].name
    lines = [
        f"Temporal UI      {settings.temporal_ui_url}",
        f"Temporal         {settings.temporal_address}  (namespace {settings.temporal_namespace}, "
        f"task queue {settings.task_queue})",
        f"Load balancer    {settings.lb_url}/v1  (OpenAI API: /v1/completions, /v1/chat/completions)",
        f"Envoy admin      {settings.envoy_admin_url}",
        f"Metrics          {metrics_line(settings)}",
        (
            f"Prometheus       {lit(prometheus_url)}  (drctl's alert rules; dashboard: deploy/grafana/drctl.json)"
            if prometheus_url
            else "Prometheus       not running (drctl up --with-prometheus; or deploy/prometheus/prometheus.yml)"
        ),
        f"State folder     {layout.root}  (logs in {layout.logs_dir})",
        f"Policy           {Path(settings.policy).resolve()}",
        "",
        f"try:  curl -s {settings.lb_url}/v1/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{first}", "prompt": "hello", "max_tokens": 8}}\'',
        "       drctl status",
        f"       drctl failover {first} {first}-0 --reason 'manual test'",
    ]
    return Panel("\n".join(lines), title="drctl is up — Ctrl-C to stop", expand=False)


def metrics_line(settings: DrctlSettings) -> str:
    """The stack's Prometheus endpoints: ``worker :9464, SDK :9465, prober :9466`` (0: off)."""
    ports = {
        "worker": settings.worker_metrics_port,
        "Temporal SDK": settings.worker_sdk_metrics_port,
        "prober": settings.prober_metrics_port,
    }
    shown = [f"{name} :{port}" for name, port in ports.items() if port]
    return f"/metrics on {settings.host}: " + ", ".join(shown) + ", node agents, alert receiver" if shown else "off"


ROLE_STYLE = {"serving": "bold green", "hot": "red", "warm": "yellow", "cold": "cyan", "failed": "dim"}


def status_table(rows: list[dict[str, object]]) -> Table:
    """One row per instance: its role, load-balancer priority, place, process and Envoy health."""
    table = Table(title="instances", title_justify="left")
    for column in ("model", "instance", "role", "LB prio", "gpu", "zone", "port", "pid", "process", "envoy", "serves"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            cell(row["model"]),
            cell(row["instance"]),
            Text(str(row["role"]), style=ROLE_STYLE.get(str(row["role"]), "")),
            "-" if row["lb_priority"] is None else str(row["lb_priority"]),
            cell(row["gpu"] or "-"),
            cell(row["zone"] or "-"),
            "-" if row["port"] is None else str(row["port"]),
            "-" if row["pid"] is None else str(row["pid"]),
            cell(row["process"]),
            cell(row["envoy"] or "-"),
            "[green]yes[/]" if row["serves"] else "",
        )
    return table


def prober_line(
    state: str, detail: str, unreported: int, zones: dict[str, str] | None, cordoned: list[str], held: int = 0
) -> str:
    """``prober: running (pid 7, 42 ticks); zones: az-1 up; cordoned GPUs: n/0``. The failures not
    reported yet (``held``: of them, those waiting for their zone's failover to end) and the zone
    verdicts are given only for a prober that is running (the caller passes none otherwise); the
    cordoned GPUs are the platform's, current whatever the prober."""
    line = f"prober: {state} ({lit(detail)})"
    if unreported:
        line += f" [yellow]{unreported} failure(s) not reported yet (Temporal?)[/]"
    if held:
        line += f" {held} failure(s) left to their zone's failover until it ends"
    if zones:
        line += "; zones: " + ", ".join(f"{lit(zone)} {lit(verdict)}" for zone, verdict in sorted(zones.items()))
    if cordoned:
        line += f"; cordoned GPUs: {lit(', '.join(cordoned))}"
    return line


def budget_line(state: BudgetState | None) -> str:
    """``drctl status``'s one line on the budget (a tripped breaker in red)."""
    if state is None:
        return "budget: no recovery has asked yet (or Temporal is not answering)"
    line = f"budget: {len(state.running)} recoveries running, {len(state.waiting)} waiting"
    if state.tripped:
        line += f" [red]TRIPPED (manual mode): {lit(state.tripped)}; `drctl budget reset` after checking[/]"
    return line


# -- failover ------------------------------------------------------------------------------------


def step_line(step: StepTiming) -> str:
    mark = "[green]✓[/]" if step.ok else "[red]✗[/]"
    own = f" (activity {step.activity_ms:.0f} ms)" if step.activity_ms is not None else ""
    return f"  {mark} {step.step:<14} {step.duration_ms:>8.0f} ms{own}  {lit(step.detail)}"


def result_lines(result: FailoverResult) -> Lines:
    """The outcome of a failover, its switch time, RTO and overhead."""
    colour = "green" if result.outcome == FailoverOutcome.RECOVERED else "yellow"
    lines: Lines = [f"[bold {colour}]{result.outcome.value}[/]: {lit(result.reason)}"]
    if result.switch_ms is not None:
        lines.append(
            f"switch {result.switch_ms:.0f} ms · RTO {result.rto_ms:.0f} ms · "
            f"orchestration overhead {result.orchestration_ms:.0f} ms"
            + (
                " · eject deferred until the replacement served (last serving instance)"
                if result.eject_deferred
                else ""
            )
        )
    return lines


def plan_budget_lines(result: FailoverResult, budget: BudgetState | None) -> Lines:
    """After a ``--plan``: the steps in order, and the budget the failover would take a lease of."""
    if not result.plan:  # nothing to change (a healthy instance, nothing to promote): no lease either
        return [Text("would run: nothing (nothing to change), and take no lease of the budget")]
    lines: Lines = [Text("would run, in order: " + " → ".join(result.plan))]
    if budget is not None:
        lines.append(
            Text(
                f"budget: {len(budget.running)} recoveries running, {len(budget.waiting)} waiting, "
                f"{len(budget.starts)}/{budget.max_per_minute} started in the last minute"
                + (f"; TRIPPED: {budget.tripped}" if budget.tripped else "")
            )
        )
    lines.append("this failover would take one lease of the budget")
    return lines


def zone_progress_line(line: str, progress: ZoneFailoverResult) -> str:
    if line.startswith("switching ") and progress.switching:
        count = len(progress.switching)
        return f"… switching {count} serving instance{'s' if count != 1 else ''} to their hot standbys in one batch"
    mark = "[green]✓[/]" if line in progress.moved else "[red]✗[/]"
    return f"{mark} {lit(line)}"


# -- reconcile -----------------------------------------------------------------------------------


def reconcile_lines(result: ReconcileResult) -> Lines:
    """The models left alone first, then a headline that claims no more than was checked, then the
    plan (a table) and what was done. A model skipped (a failover in flight) was not compared with
    the policy: the headline never says the fleet is in line while one was."""
    plan = result.plan
    skipped = len(plan.skipped_models)
    lines: Lines = [f"[yellow]skipped[/]: {lit(line)}" for line in plan.skipped_models]
    but = f" except the {skipped} skipped model{'s' if skipped != 1 else ''} above" if skipped else ""
    if plan.actions:
        title = "plan (dry run: nothing changed)" if result.dry_run else "plan"
        table = Table(title=title, title_justify="left")
        for column in ("action", "model", "instance", "tier", "gpu", "node", "zone", "why"):
            table.add_column(column)
        for a in plan.actions:
            cells = (a.kind.value, a.model, a.instance, a.tier.value, a.gpu or "-", a.node or "-", a.zone or "-")
            table.add_row(*map(cell, (*cells, a.reason)))
        lines.append(table)
    elif plan.unplaceable:
        lines.append("[yellow]short of the policy[/]: what is missing does not fit the pool (below)")
    elif plan.violations:
        lines.append(f"[yellow]counts in line{but}, placement is not[/]: nothing this pass can move (below)")
    elif skipped:
        lines.append(f"[yellow]in line with the policy{but}[/]: nothing to create, re-tier or delete for the others")
    else:
        lines.append("[green]in line with the policy[/]: nothing to create, re-tier or delete")
    lines += [f"[yellow]not placed[/]: {lit(line)}" for line in plan.unplaceable]
    lines += [f"[yellow]misplaced[/]: {lit(line)}" for line in plan.violations]
    lines += [f"[green]✓[/] {lit(line)}" for line in result.applied]
    lines += [f"[red]✗[/] {lit(line)}" for line in result.failed]
    return lines


def reconcile_progress(result: ReconcileResult | None) -> str:
    """One line on a pass going (its ``progress`` query), for ``drctl reconcile`` while it waits."""
    if result is None:
        return "planning (or waiting for the pass already going to end)"
    plan = result.plan
    # A pass from before ``waits`` was counted has only its lines to tell.
    waits = result.waits or sum(1 for line in result.applied if line.startswith(PASS_WAITED))
    done = f"{len(result.applied) - waits + len(result.failed)} change(s) made"
    if plan.after_zone_failover and not waits:
        zones = ", ".join(plan.after_zone_failover)
        return f"{done}; new standbys wait for the failover of zone {zones} to end (its recoveries go first)"
    if waits:
        return f"{done}; the plan after the zone failover has {len(plan.actions)}"
    return f"{done} of {len(plan.actions)} planned"


# -- audit ---------------------------------------------------------------------------------------


def audit_table(query: str, rows: list[dict[str, object]]) -> Table:
    """The failovers found; a run that failed before recording its search attributes (bad input)
    shows why it failed instead of a row of dashes."""
    table = Table(title=f"failovers ({lit(query)})", title_justify="left")
    for column in ("started", "model", "instance", "trigger", "outcome", "tier", "RTO ms", "status", "workflow id"):
        table.add_column(column)
    for row in rows:
        failure = row.get("failure")
        if failure and not any(row.get(k) for k in ("model", "instance", "trigger", "outcome")):
            table.add_row(
                str(row["started"])[:19],
                Text(str(failure), style="red"),
                *(cell("") for _ in range(4)),
                "",
                cell(row["status"] or "-"),
                cell(row["workflow_id"]),
            )
            continue
        table.add_row(
            str(row["started"])[:19],
            *(cell(row[k] or "-") for k in ("model", "instance", "trigger", "outcome", "tier", "rto_ms", "status")),
            cell(row["workflow_id"]),
        )
    if not rows:
        table.caption = "no failover matches (none has run yet, or the filters leave none)"
        table.caption_justify = "left"
    return table


def _ms_text(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _step_words(step: AuditStoryStep) -> str:
    """A step in plain words: ``promote llama-2-7b-1: failed after 3 attempts (checksum mismatch)``."""
    state = {True: "ok", False: "failed", None: "running"}[step.ok]
    attempts = f" after {step.attempts} attempts" if step.attempts and step.attempts > 1 else ""
    words = f"{state}{attempts} in {_ms_text(step.duration_ms)}"
    if step.activity_ms is not None:
        words += f" (activity {_ms_text(step.activity_ms)})"
    if step.detail:
        words += f" — {step.detail}"
    if step.failure and step.failure not in step.detail:
        words += f" — {'why' if step.ok is False else 'retried because'}: {step.failure}"
    return words


def _story_facts(story: AuditRunStory) -> list[tuple[str, str]]:
    facts = [
        ("workflow", f"{story.workflow_type} {story.workflow_id} (run {story.run_id})"),
        ("status", story.status),
        ("started", story.started_at.isoformat() if story.started_at else "-"),
        ("closed", story.closed_at.isoformat() if story.closed_at else "-"),
        ("duration", _ms_text(story.duration_ms)),
    ]
    if story.model or story.instance:
        facts.append(("failed instance", f"{story.instance or '?'} of {story.model or '?'}"))
    if story.trigger:
        facts.append(("trigger", story.trigger + (f" — {story.reason}" if story.reason else "")))
    elif story.reason:
        facts.append(("reason", story.reason))
    if story.started_by:
        facts.append(("started by", story.started_by))
    for reporter in story.reporters:
        facts.append(("reported by", _reporter_words(reporter)))
    if story.joined_total > len(story.reporters):
        facts.append(("reports", f"{story.joined_total} joined in all"))
    if story.outcome:
        facts.append(("outcome", story.outcome + (f" — {story.outcome_reason}" if story.outcome_reason else "")))
    elif story.failure:
        facts.append(("failure", story.failure))
    if story.standby:
        facts.append(("standby chosen", f"{story.standby} ({story.standby_tier or '?'})"))
    if story.standby_why:
        facts.append(("why", story.standby_why))
    if story.rto_ms is not None and story.rto_target_ms is not None:
        verdict = "met" if story.rto_met else "MISSED"
        facts.append(
            ("RTO", f"{_ms_text(story.rto_ms)} against a target of {_ms_text(story.rto_target_ms)}: {verdict}")
        )
    elif story.rto_ms is not None:
        facts.append(("RTO", f"{_ms_text(story.rto_ms)} (no target known for the model)"))
    elif story.rto_target_ms is not None:
        # No recovery to time (a false alarm, a plan, a failed run): the target alone, said as such.
        facts.append(
            ("RTO", f"none measured (nothing was recovered); the model's target is {_ms_text(story.rto_target_ms)}")
        )
    facts += [("result", line) for line in story.summary]
    if story.task_failures:
        again = "; the steps it had run ran again in the next task"
        facts += [("workflow task failed", words + again) for words in story.task_failures]
    return facts


def _reporter_words(reporter: AuditReporter) -> str:
    if reporter.kind == "alert":
        return f"alert {reporter.fingerprint} via the alert receiver ({reporter.receiver or 'default'})"
    if reporter.kind == "cli":
        return f"CLI user {reporter.user}"
    if reporter.kind == "drill":
        return f"drill {reporter.drill}"
    if reporter.kind == "workflow":
        return f"workflow {reporter.workflow}"
    return reporter.reporter


def audit_story_lines(story: AuditRunStory) -> Lines:
    """``drctl audit show``: the facts, then each step in plain words."""
    width = max(len(k) for k, _ in _story_facts(story))
    lines: Lines = [Text.assemble((f"{key:<{width}}  ", "bold"), value) for key, value in _story_facts(story)]
    if story.steps:
        lines.append(Text("steps", style="bold"))
        for step in story.steps:
            mark = {True: ("✓", "green"), False: ("✗", "red"), None: ("…", "yellow")}[step.ok]
            lines.append(Text.assemble("  ", (mark[0], mark[1]), f" {step.step:<18} ", _step_words(step)))
    return lines


def audit_story_markdown(story: AuditRunStory) -> str:
    """``drctl audit show --markdown``: the same story for an incident review."""
    lines = [f"## {story.workflow_type} `{story.workflow_id}`", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {key} | {_md(value)} |" for key, value in _story_facts(story)]
    if story.steps:
        lines += ["", "| step | result | attempts | duration | detail |", "|---|---|---|---|---|"]
        for step in story.steps:
            state = {True: "ok", False: "**failed**", None: "running"}[step.ok]
            detail = step.detail + (f" ({step.failure})" if step.failure and step.failure not in step.detail else "")
            took = _ms_text(step.duration_ms)
            lines.append(f"| {_md(step.step)} | {state} | {step.attempts or '-'} | {took} | {_md(detail)} |")
    return "\n".join(lines) + "\n"


def _md(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


# -- drills --------------------------------------------------------------------------------------


def drill_lines(report: DrillReport) -> Lines:
    """A drill's verdict, its figures against the policy and the seed's SLA, and its files."""
    m = report.measurement
    lines: Lines = [
        f"[bold]{report.scenario}[/] on {lit(report.target.instance)}: "
        + ("[green]PASSED[/]" if report.passed else "[red]FAILED[/]")
    ]
    if m is not None:
        lines.append(
            f"  detection {seconds(m.detection_ms)}   switch {seconds(m.switch_ms)}   total RTO {seconds(m.rto_ms)} "
            f"(policy {seconds(report.target.policy_rto_ms)}, seed {seconds(report.target.sla_rto_ms)})"
        )
        lines.append(
            f"  redundancy back {seconds(m.redundancy_ms)}   requests failed {m.failed_requests} of {m.requests}"
            + (f" (+{m.lost_in_flight} in flight at the fault)" if m.lost_in_flight else "")
        )
        lines.append(
            f"  streams: {m.streams_cut} cut at the fault; after it {m.streams_failed} of {m.streams} failed, "
            f"{m.streams_by_replacement} served by the replacement"
        )
    for name, verdict in report.verdicts.items():
        colour = "green" if verdict.startswith("pass") else "red"
        lines.append(f"  [{colour}]{lit(name)}[/]: {lit(verdict)}")
    if report.error:
        lines.append(f"  [red]error[/]: {lit(report.error)}")
    lines += [f"  restored: {lit(line)}" for line in report.restore]
    lines += [f"  {lit(kind)}: {lit(path)}" for kind, path in report.files.items()]
    return lines


# -- budget --------------------------------------------------------------------------------------


def budget_lines(state: BudgetState) -> Lines:
    """``drctl budget``: the breaker, the limits, each recovery running and waiting (and why)."""
    breaker = f"[red]TRIPPED[/] since {state.tripped_at}: {lit(state.tripped)}" if state.tripped else "closed"
    lines: Lines = [
        f"breaker: {breaker}",
        f"running {len(state.running)} · waiting {len(state.waiting)} · started in the last minute "
        f"{len(state.starts)}/{state.max_per_minute} · per zone at most {state.max_per_zone} · "
        f"trips past {state.trip_after_waiting} waiting",
    ]
    lines += [
        f"  running  {lease.incident} (zone {lease.zone or '-'}, {lease.kind}"
        + (f", {lease.slots} runbooks at a time for {len(lease.covers)} models)" if lease.covers else ")")
        for lease in state.running
    ]
    for lease in state.waiting:
        lines.append(f"  waiting  {lease.incident}: {lit(state.why_waiting.get(lease.incident, ''))}")
    lines += [
        f"  zone {lit(zone)} failed over at {at.isoformat(timespec='seconds')}: its recoveries count as "
        f"the zone's until {(at + FAILED_OVER_COVERS_FOR).isoformat(timespec='seconds')}"
        for zone, at in sorted(state.failed_over.items())
    ]
    lines += [f"  {lit(line)}" for line in state.resets[-3:]]
    return lines


# -- policy --------------------------------------------------------------------------------------


def validated_line(file: Path, policy: DRPolicy) -> str:
    names = policy.model_names
    shown = ", ".join(names[:20]) + (f", … ({len(names) - 20} more)" if len(names) > 20 else "")
    return f"[green]ok[/]: {lit(file)} — {len(names)} model(s): {lit(shown)}"


def explain_data(items: list[ModelExplanation]) -> list[dict[str, Any]]:
    """``drctl policy explain --json``."""
    return [
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
            "outside_active_zones": i.outside_active_zones,
        }
        for i in items
    ]


def explain_lines(
    items: list[ModelExplanation], a: RtoAssumptions | None = None, measured_on: str | None = None
) -> Lines:
    """Per model: its tiers and targets, GPU memory per zone, the expected RTO after each loss;
    ``measured_on`` names the GPU whose figures gave the warm and cold rates (None: assumed)."""
    from drctl.policies.durations import format_duration
    from drctl.policies.sizes import format_size

    lines: Lines = []
    for item in items:
        tiers = ", ".join(f"{n} {role.value}" for role, n in item.instances.items() if n)
        lines.append(
            f"[bold]{lit(item.name)}[/] ({lit(item.priority)}, tenant {lit(item.tenant)}): {lit(tiers)}; "
            f"RTO target {format_duration(item.rto_target)}, RPO {format_duration(item.rpo_target)}"
        )
        zones = "; ".join(
            f"{zone}: {format_size(m['loaded'])} loaded + {format_size(m['reserved'])} reserved"
            for zone, m in sorted(item.memory_by_zone.items())
        )
        lines.append(f"  GPU memory by zone: {lit(zones or 'none')}")
        steps = []
        for f in item.failures:
            mark = "[green]✓[/]" if f.meets_target else "[red]✗ misses target[/]"
            steps.append(
                f"#{f.failure} → {f.tier.value if f.tier else 'emergency instance'} ~{f.expected_rto_s:g}s {mark}"
            )
        lines.append("  after each lost serving instance: " + " · ".join(steps))
        lines += [f"  [yellow]does not fit the pool[/]: {lit(line)}" for line in item.unplaced]
        lines += [f"  [yellow]serves outside the active zones[/]: {lit(line)}" for line in item.outside_active_zones]
    a = a or RtoAssumptions()
    rates = (
        f"measured on {lit(measured_on)} by scripts/gpu_check.py"
        if measured_on
        else "assumed: measure them with scripts/gpu_check.py, then --gpu-figures"
    )
    lines.append(
        f"[dim]estimates: detection {a.detection_s:g}s; hot switch {a.hot_switch_s:g}s (measured, docs/benchmarks.md); "
        f"warm wakes at {a.wake_gib_per_s:g} GiB/s; cold starts in {a.cold_start_s:g}s and loads at "
        f"{a.cold_load_gib_per_s:g} GiB/s ({rates}); plus one health-check interval for a new endpoint[/]"
    )
    return lines
