"""Failover benchmark: ``kill -9`` a serving instance on the real local stack and time the recovery.

    .venv/bin/python bench/failover_bench.py [--runs N] [--model llama-2-7b] [--rate-hz 100]
        [--steps local|regular|both] [--telemetry on|off|both] [--json]

With ``--steps both`` (the default) each round runs the failover twice, once with its short steps as
local activities and once with every step a regular activity, so the two are compared side by side
on the same machine in the same minute. ``--telemetry both`` likewise runs each round with drctl's
telemetry on (metrics endpoints, OpenTelemetry spans to the state folder) and off (metrics ports 0,
``OTEL_SDK_DISABLED=true`` for every part), to measure what observing a failover costs it.

Every run brings up a fresh private stack (Temporal dev server, Envoy, demo model processes, worker)
in its own temporary state folder and on free ports, so each run starts with the policy's full set
of standbys and can run beside a ``drctl up``. Then, with predict requests going through Envoy at a
fixed rate, it ``SIGKILL``s the model's serving instance, starts the failover runbook at once
(trigger ``drill``, ``failed_at`` = the kill) and waits for its result, keeps the load going a moment
longer, and stops the stack.

Per run it records what the client saw (requests, failures, the time from the kill to the first 200
answered by a standby) and what the workflow saw (each step's duration and the activity's own time,
``switch_ms``, ``rto_ms``, ``orchestration_ms``), plus the workflow's wall time and the stack's
startup time. It prints a table per run, the median and worst of each figure, and a summary line
(``--json``: one JSON document instead). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from drctl.payloads import FailoverOutcome, FailoverRequest, FailoverResult, Role, Trigger
from drctl.policies.loader import PolicyError, load_policy_file
from drctl.policies.schema import DRPolicy
from drctl.temporal.runbooks import start_failover
from drctl.workers.stack import LocalStack, isolated_settings

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "examples" / "dr-policy.yaml"

STEADY_S = 1.0
"""Steady traffic before the kill."""
AFTER_S = 1.0
"""Traffic kept going after the failover's result."""
REQUEST_TIMEOUT_S = 5.0
MAX_IN_FLIGHT = 512
"""Load generator bound: a tick that finds this many requests in flight is skipped (and counted)."""
WORKFLOW_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 150.0
"""Stack startup plus the measurement; stopping the stack comes on top."""

_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- load generator ----------------------------------------------------------------------------


@dataclass
class Sample:
    """One predict request as the client saw it (monotonic seconds)."""

    sent: float
    done: float
    outcome: int | str
    """HTTP status, or the exception's type name."""
    instance: str
    """The ``x-drctl-instance`` response header ('' if none)."""

    @property
    def ok(self) -> bool:
        return self.outcome == 200


@dataclass
class LoadGenerator:
    """Open-loop predict requests at ``rate_hz`` through Envoy, at most ``MAX_IN_FLIGHT`` at once."""

    url: str
    rate_hz: float
    max_requests: int = 100_000
    samples: list[Sample] = field(default_factory=list)
    skipped: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
        interval = 1.0 / self.rate_hz
        in_flight: set[asyncio.Task[None]] = set()
        sent = 0
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
            next_at = time.monotonic()
            while not self.stop.is_set() and sent < self.max_requests:
                if len(in_flight) >= MAX_IN_FLIGHT:
                    self.skipped += 1
                else:
                    task = asyncio.create_task(self._one(client, sent))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    sent += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    if delay < -0.5:  # fell far behind (a stalled loop): do not burst to catch up
                        next_at = time.monotonic()
                    await asyncio.sleep(0)
            if in_flight:
                await asyncio.gather(*in_flight)  # each is bounded by the request timeout

    async def _one(self, client: httpx.AsyncClient, n: int) -> None:
        sent = time.monotonic()
        outcome: int | str
        try:
            response = await client.post(self.url, json={"prompt": f"drctl bench request {n}", "max_tokens": 8})
            outcome, instance = response.status_code, response.headers.get("x-drctl-instance", "")
        except Exception as exc:  # httpx errors mostly; any failure is what the client saw
            outcome, instance = type(exc).__name__, ""
        self.samples.append(Sample(sent=sent, done=time.monotonic(), outcome=outcome, instance=instance))


# -- one run -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    run: int
    activity_mode: str = "local"
    """``local``: short steps as local activities; ``regular``: every step a regular activity."""
    telemetry: bool = True
    """Metrics endpoints and tracing on (the default), or all off."""
    error: str | None = None
    startup_s: float | None = None
    victim: str | None = None
    victim_pid: int | None = None
    killed_at: str | None = None
    requests: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    """The first few failed requests: ms from the kill (send and done), outcome, instance."""
    dataplane_switch_ms: float | None = None
    """Kill to the first 200 answered by an instance other than the killed one (client clock)."""
    dataplane_instance: str | None = None
    promoted_first_ms: float | None = None
    """Kill to the first 200 answered by the promoted instance (client clock)."""
    median_ms: float | None = None
    """Median latency of the answered requests (sent to answered, client clock), the whole run."""
    slowest_ms: float | None = None
    """The slowest answered request: what waiting across the switch added, at worst."""
    outcome: str | None = None
    promoted: str | None = None
    tier: str | None = None
    switch_ms: float | None = None
    rto_ms: float | None = None
    orchestration_ms: float | None = None
    workflow_wall_ms: float | None = None
    """From the start_failover call to its result, on the client's clock."""
    steps: list[dict[str, Any]] = field(default_factory=list)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


async def one_run(
    n: int, runs: int, policy: DRPolicy, model: str, rate_hz: float, steps: str, telemetry: bool = True
) -> RunResult:
    out = RunResult(run=n, activity_mode=steps, telemetry=telemetry)
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f"drctl-bench-{n}-") as tmp:
        settings = isolated_settings(Path(tmp), POLICY)
        if not telemetry:
            settings = settings.model_copy(
                update={"worker_metrics_port": 0, "worker_sdk_metrics_port": 0, "prober_metrics_port": 0}
            )
        # The stack's parts inherit OTEL_* from this process (drctl.workers.part_env).
        if telemetry:
            os.environ.pop("OTEL_SDK_DISABLED", None)
        else:
            os.environ["OTEL_SDK_DISABLED"] = "true"
        stack = LocalStack(settings, policy, say=lines.append)
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S):
                progress(f"run {n}/{runs} ({steps} activities): starting a private stack in {tmp}")
                started = time.monotonic()
                await stack.start()
                out.startup_s = round(time.monotonic() - started, 2)
                progress(
                    f"run {n}/{runs}: stack up in {out.startup_s:.1f}s; load at {rate_hz:g} Hz via {settings.lb_url}"
                )
                await _measure(out, stack, model, rate_hz)
        except Exception as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            progress(f"run {n}/{runs}: ERROR {out.error}")
            for line in lines[-8:]:
                progress(f"    stack: {line}")
            _print_log_tail(stack, "worker.log")
        finally:
            stopping = time.monotonic()
            await stack.stop()
            progress(f"run {n}/{runs}: stack stopped in {time.monotonic() - stopping:.1f}s")
    return out


async def _measure(out: RunResult, stack: LocalStack, model: str, rate_hz: float) -> None:
    settings = stack.settings
    assert stack.client is not None
    serving = [i for i in stack.platform.registry.of_model(model) if i.role == Role.SERVING and i.pid]
    if not serving:
        raise RuntimeError(f"{model} has no serving instance with a process")
    victim = serving[0]
    assert victim.pid is not None
    out.victim, out.victim_pid = victim.id, victim.pid

    load = LoadGenerator(f"{settings.lb_url}/v1/models/{model}/predict", rate_hz)
    load_task = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(STEADY_S)
        os.kill(victim.pid, signal.SIGKILL)
        kill_mono = time.monotonic()
        killed_at = datetime.now(UTC)
        out.killed_at = killed_at.isoformat()
        progress(f"    kill -9 {victim.id} (pid {victim.pid}); starting the failover workflow")
        request = FailoverRequest(
            model=model,
            instance=victim.id,
            trigger=Trigger.DRILL,
            failed_at=killed_at,
            reason="bench",
            local_activities=out.activity_mode == "local",
        )
        wf_started = time.monotonic()
        handle = await start_failover(stack.client, settings, request)
        result: FailoverResult = await asyncio.wait_for(handle.result(), timeout=WORKFLOW_TIMEOUT_S)
        out.workflow_wall_ms = _ms(time.monotonic() - wf_started)
        progress(
            f"    {result.outcome.value}: {result.promoted} ({result.tier}) in {out.workflow_wall_ms:.0f} ms, "
            f"RTO {result.rto_ms} ms; load for {AFTER_S:g}s more"
        )
        await asyncio.sleep(AFTER_S)
    finally:
        load.stop.set()
        await load_task

    out.outcome = result.outcome.value
    out.promoted = result.promoted
    out.tier = result.tier.value if result.tier is not None else None
    out.switch_ms, out.rto_ms, out.orchestration_ms = (
        None if v is None else round(v, 1) for v in (result.switch_ms, result.rto_ms, result.orchestration_ms)
    )
    out.steps = [
        {"step": s.step, "duration_ms": s.duration_ms, "activity_ms": s.activity_ms, "ok": s.ok, "detail": s.detail}
        for s in result.steps
    ]

    samples = sorted(load.samples, key=lambda s: s.sent)
    out.requests, out.skipped = len(samples), load.skipped
    failed = [s for s in samples if not s.ok]
    out.failed = len(failed)
    out.failures = [
        {
            "sent_ms": _ms(s.sent - kill_mono),
            "done_ms": _ms(s.done - kill_mono),
            "outcome": s.outcome,
            "instance": s.instance,
        }
        for s in failed[:10]
    ]
    after = sorted((s for s in samples if s.ok and s.done >= kill_mono), key=lambda s: s.done)
    standby = next((s for s in after if s.instance != victim.id), None)
    if standby is not None:
        out.dataplane_switch_ms, out.dataplane_instance = _ms(standby.done - kill_mono), standby.instance
    promoted = next((s for s in after if s.instance == result.promoted), None)
    if promoted is not None:
        out.promoted_first_ms = _ms(promoted.done - kill_mono)
    latencies = [s.done - s.sent for s in samples if s.ok]
    if latencies:
        out.median_ms, out.slowest_ms = _ms(statistics.median(latencies)), _ms(max(latencies))
    if result.outcome != FailoverOutcome.RECOVERED:
        raise RuntimeError(f"failover ended {result.outcome.value}: {result.reason}")
    progress(
        f"    {out.requests} requests, {out.failed} failed; first 200 from a standby "
        f"{out.dataplane_switch_ms} ms after the kill ({out.dataplane_instance})"
    )


def _print_log_tail(stack: LocalStack, name: str, lines: int = 10) -> None:
    path = stack.layout.logs_dir / name
    try:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    for line in tail:
        progress(f"    {name}: {line}")


# -- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    worst: Callable[[list[float]], float] = max
    digits: int = 0


FIGURES = [
    Figure("startup_s", "stack startup s", digits=1),
    Figure("requests", "requests", worst=min),
    Figure("failed", "failed requests"),
    Figure("dataplane_switch_ms", "kill→first 200 from a standby ms", digits=1),
    Figure("promoted_first_ms", "kill→first 200 from promoted ms", digits=1),
    Figure("median_ms", "request latency, median ms", digits=1),
    Figure("slowest_ms", "request latency, slowest ms", digits=1),
    Figure("switch_ms", "switch_ms (wf start→verified)"),
    Figure("rto_ms", "rto_ms (kill→verified)"),
    Figure("orchestration_ms", "orchestration_ms"),
    Figure("workflow_wall_ms", "workflow wall ms (client)"),
]


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def step_keys(runs: list[RunResult]) -> list[str]:
    """Step names in workflow order; a step that repeats within a run gets ``#2``, ``#3``…"""
    keys: list[str] = []
    for run in runs:
        for key in _keyed_steps(run):
            if key not in keys:
                keys.append(key)
    return keys


def _keyed_steps(run: RunResult) -> dict[str, dict[str, Any]]:
    keyed: dict[str, dict[str, Any]] = {}
    for step in run.steps:
        key, n = step["step"], 2
        while key in keyed:
            key, n = f"{step['step']}#{n}", n + 1
        keyed[key] = step
    return keyed


def _values(runs: list[RunResult], key: str) -> list[float]:
    return [float(v) for r in runs if (v := getattr(r, key)) is not None]


def _step_values(runs: list[RunResult], key: str, field_name: str) -> list[float]:
    values = []
    for run in runs:
        step = _keyed_steps(run).get(key)
        if step is not None and step[field_name] is not None:
            values.append(float(step[field_name]))
    return values


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    ok = [r for r in runs if r.error is None]
    figures: dict[str, Any] = {}
    for fig in FIGURES:
        values = _values(ok, fig.key)
        figures[fig.key] = (
            {
                "median": statistics.median(values),
                "worst": fig.worst(values),
                "worst_is": fig.worst.__name__,
                "n": len(values),
            }
            if values
            else None
        )
    steps: dict[str, Any] = {}
    for key in step_keys(ok):
        entry: dict[str, Any] = {}
        for field_name in ("duration_ms", "activity_ms"):
            values = _step_values(ok, key, field_name)
            entry[field_name] = {"median": statistics.median(values), "worst": max(values)} if values else None
        steps[key] = entry
    return {
        "runs": len(runs),
        "recovered": sum(1 for r in ok if r.outcome == FailoverOutcome.RECOVERED.value),
        "errors": len(runs) - len(ok),
        "requests": sum(r.requests for r in runs),
        "failed": sum(r.failed for r in runs),
        "figures": figures,
        "steps": steps,
    }


def summary_line(summary: dict[str, Any]) -> str:
    figs = summary["figures"]

    def fig(key: str) -> str:
        f = figs.get(key)
        return "n/a" if f is None else f"{f['median']:.0f} ms median (worst {f['worst']:.0f})"

    return (
        f"{summary['recovered']}/{summary['runs']} runs recovered; "
        f"{summary['failed']} of {summary['requests']} client requests failed; "
        f"kill→first 200 from a standby {fig('dataplane_switch_ms')}; RTO {fig('rto_ms')}; "
        f"orchestration {fig('orchestration_ms')}"
    )


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(
    console: Console, runs: list[RunResult], summary: dict[str, Any], machine: dict[str, Any], command: str
) -> None:
    console.print(
        f"machine: nproc {machine['nproc']} (cpu_count {machine['cpu_count']}), {machine['cpu_model']}, "
        f"Python {machine['python']}, {machine['platform']}",
        highlight=False,
    )
    console.print(f"command: {command}", highlight=False)

    per_run = Table(title="per run (client: load generator; workflow: FailoverResult)", title_justify="left")
    per_run.add_column("figure")
    for run in runs:
        per_run.add_column(f"run {run.run}", justify="right")
    per_run.add_column("median", justify="right", style="bold")
    per_run.add_column("worst", justify="right", style="bold")
    per_run.add_row("killed", *(r.victim or "-" for r in runs), "", "")
    per_run.add_row("promoted", *(f"{r.promoted} ({r.tier})" if r.promoted else "-" for r in runs), "", "")
    per_run.add_row("outcome", *(r.outcome or "error" for r in runs), "", "")
    for fig in FIGURES:
        stats = summary["figures"][fig.key]
        per_run.add_row(
            fig.label,
            *(_fmt(getattr(r, fig.key), fig.digits) for r in runs),
            _fmt(stats and stats["median"], fig.digits),
            _fmt(stats and stats["worst"], fig.digits),
        )
    per_run.add_row("skipped ticks (load bound)", *(str(r.skipped) for r in runs), "", "")
    console.print(per_run)

    steps = Table(title="workflow steps: duration_ms (activity_ms)", title_justify="left")
    steps.add_column("step")
    for run in runs:
        steps.add_column(f"run {run.run}", justify="right")
    steps.add_column("median", justify="right", style="bold")
    steps.add_column("worst", justify="right", style="bold")
    for key in step_keys(runs):
        cells = []
        for run in runs:
            step = _keyed_steps(run).get(key)
            cells.append("-" if step is None else f"{step['duration_ms']:.0f} ({_fmt(step['activity_ms'], 1)})")
        stat = summary["steps"].get(key, {})
        dur, act = stat.get("duration_ms"), stat.get("activity_ms")
        steps.add_row(
            key,
            *cells,
            f"{_fmt(dur and dur['median'])} ({_fmt(act and act['median'], 1)})",
            f"{_fmt(dur and dur['worst'])} ({_fmt(act and act['worst'], 1)})",
        )
    console.print(steps)

    for run in runs:
        if run.error:
            console.print(f"[red]run {run.run} error:[/] {run.error}", highlight=False)
        for failure in run.failures:
            console.print(f"run {run.run} failed request: {failure}", highlight=False)
    console.print(f"[bold]summary:[/] {summary_line(summary)}", highlight=False)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="runs, each on a fresh stack (default 5)")
    parser.add_argument("--model", default="llama-2-7b", help="model whose serving instance is killed")
    parser.add_argument("--rate-hz", type=float, default=100.0, help="predict requests per second (default 100)")
    parser.add_argument(
        "--steps",
        choices=["local", "regular", "both"],
        default="both",
        help="short steps as local activities, all regular activities, or both side by side (default both)",
    )
    parser.add_argument(
        "--telemetry",
        choices=["on", "off", "both"],
        default="on",
        help="metrics and tracing on, off, or both side by side (default on)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not 0 < args.rate_hz <= 2000:
        parser.error("--rate-hz must be in (0, 2000]")
    return args


async def bench(args: argparse.Namespace, policy: DRPolicy) -> list[RunResult]:
    # SIGTERM ends the benchmark like Ctrl-C does: the current run's stack is stopped on the way out
    # (the model instances run in their own sessions and would otherwise outlive this process).
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    modes = ["local", "regular"] if args.steps == "both" else [args.steps]
    observed = [True, False] if args.telemetry == "both" else [args.telemetry == "on"]
    results = []
    for n in range(1, args.runs + 1):
        for mode in modes:  # interleaved, so every mode sees the same machine conditions
            for telemetry in observed:
                results.append(await one_run(n, args.runs, policy, args.model, args.rate_hz, mode, telemetry))
    return results


def mode_of(run: RunResult) -> str:
    return run.activity_mode + ("" if run.telemetry else " (telemetry off)")


def compare(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Ratios of the medians, regular over local, for the figures the step mode changes; and each
    mode with telemetry on over the same mode with it off."""
    lines = []
    for mode in ("local", "regular"):
        off = summaries.get(f"{mode} (telemetry off)")
        on = summaries.get(mode)
        for key in ("rto_ms", "orchestration_ms", "workflow_wall_ms"):
            a = ((on or {}).get("figures", {}).get(key) or {}).get("median")
            b = ((off or {}).get("figures", {}).get(key) or {}).get("median")
            if a and b:
                lines.append(f"{mode} {key}: median {a:.0f} ms with telemetry vs {b:.0f} ms without ({a / b:.2f}x)")
    if not {"local", "regular"} <= summaries.keys():
        return lines
    for key in ("switch_ms", "rto_ms", "orchestration_ms", "workflow_wall_ms"):
        local = (summaries["local"]["figures"].get(key) or {}).get("median")
        regular = (summaries["regular"]["figures"].get(key) or {}).get("median")
        if local and regular:
            lines.append(f"{key}: median {regular:.0f} ms regular vs {local:.0f} ms local ({regular / local:.1f}x)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(sys.orig_argv)
    try:
        policy = load_policy_file(POLICY)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.model not in policy.model_names:
        print(f"error: unknown model {args.model!r}; the policy has: {', '.join(policy.model_names)}", file=sys.stderr)
        return 2
    machine = machine_info()
    progress(f"{args.runs} run(s) of kill -9 + failover for {args.model} at {args.rate_hz:g} Hz; policy {POLICY}")
    try:
        runs = asyncio.run(bench(args, policy))
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress("interrupted; the stack of the run in progress was stopped")
        return 130
    modes = sorted({mode_of(r) for r in runs})
    summaries = {mode: summarize([r for r in runs if mode_of(r) == mode]) for mode in modes}
    summary = summarize(runs)
    comparison = compare(summaries)
    if args.json:
        document = {
            "command": command,
            "machine": machine,
            "config": {
                "runs": args.runs,
                "model": args.model,
                "rate_hz": args.rate_hz,
                "policy": str(POLICY),
                "steady_s": STEADY_S,
                "after_s": AFTER_S,
                "request_timeout_s": REQUEST_TIMEOUT_S,
                "max_in_flight": MAX_IN_FLIGHT,
            },
            "runs": [vars(r) for r in runs],
            "summary": summary,
            "summary_by_steps": summaries,
            "comparison": comparison,
            "summary_line": summary_line(summary),
        }
        print(json.dumps(document, indent=2))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
        for mode in modes:
            console.rule(f"{mode} activities")
            print_report(console, [r for r in runs if mode_of(r) == mode], summaries[mode], machine, command)
        for line in comparison:
            console.print(line, highlight=False)
    progress(f"done in {time.monotonic() - _T0:.1f}s")
    return 0 if summary["recovered"] == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
