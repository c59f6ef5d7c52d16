"""A zone outage at fleet scale on the real local stack: how long until every affected model is
switched for good, every runbook is done and redundancy is back.

    .venv/bin/python bench/zone_bench.py [--models 50 150 500] [--mode pooled] [--rate-hz 2] [--json]

For each size, a generated policy (``--models`` models, 1 serving + 1 hot standby each, 4 nodes x
16 GPUs in two zones, the example policy's detection and zone-check settings) runs on a private
stack (Temporal dev server, Envoy and drctl's xDS server, the instances, the worker, the prober and
one node agent per node). With ``--rate-hz`` requests per second per model going through Envoy, every
process of zone az-1 is stopped with SIGSTOP (its node agents, and its instances: in pooled mode the
pools of its nodes, one process each), as a zone that loses power or network would look. Then, every
100 ms, from the registry and Temporal's visibility:

- **switched**: every model whose serving instance was in az-1 serves from az-2 (registered at
  priority 0), for good;
- **runbooks done**: no FailoverWorkflow or ZoneFailoverWorkflow still running;
- **redundancy back**: every model has its serving instance and hot standby, none in az-1.

Also: the client requests that failed (the load runs from before the outage until redundancy is
back, or the timeout; each failure says how long after the outage it came), Envoy's cluster
updates during the outage (``update_success`` summed over the clusters), the prober's CPU while
idle before the outage, and the stack's memory (RSS of every part and pool). ``--mode process``
runs one demo-server process per instance (the default mode of ``drctl up``), which needs ~23 MiB
each.

Before and after a change, run the *before* from its own checkout: the stack's parts start as
``python -m drctl...`` in the working directory, which ``-m`` puts ahead of ``PYTHONPATH``, so a run
from the new checkout with only ``PYTHONPATH`` set to the old one runs the new worker::

    git worktree add /tmp/before REV
    (cd /tmp/before && PYTHONPATH=/tmp/before /path/to/.venv/bin/python bench/zone_bench.py ...)

Runs of the same code spread by a fifth or more on a 2-core machine: alternate, and look for
leftover busy processes (``ps aux --sort=-%cpu``) first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datetime

import aiohttp
import httpx
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.service import RPCError

from drctl.payloads import FailoverResult, Role, SearchAttr, guardian_workflow_id
from drctl.platforms.local.pools import InstancePools
from drctl.policies.loader import load_policy_file
from drctl.settings import DrctlSettings
from drctl.workers.stack import LocalStack, isolated_settings

DOWN_ZONE, UP_ZONE = "az-1", "az-2"
NODES, GPUS = 4, 16
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dr-policy.yaml"


def policy_document(
    models: int,
    parallel: int | None = None,
    reconcile: dict[str, int] | None = None,
    switches: int | None = None,
) -> dict[str, Any]:
    example = yaml.safe_load(EXAMPLE.read_text())
    # Instances per GPU when the whole fleet runs in one zone (half the nodes), with room to spare.
    per_gpu = max(1, -(-models * 2 // (NODES // 2 * GPUS)))
    memory_gib = max(1, 80 // (per_gpu + 1))
    return {
        "models": [
            {"name": f"m{i:04d}", "engine": "demo", "hotStandby": 1, "gpuMemory": f"{memory_gib}Gi", "rto": "30s"}
            for i in range(models)
        ],
        "az_failover": {"activeZones": [DOWN_ZONE, UP_ZONE], "healthCheckInterval": "10s", "failoverThreshold": 3}
        | ({"maxParallelFailovers": parallel} if parallel else {})
        | ({"maxParallelSwitches": switches} if switches else {}),
        "tenants": [{"name": "default", "weight": 5, "capability": {"gpus": NODES * GPUS, "memory": "100Ti"}}],
        "gpuPool": {
            "nodes": [
                {
                    "name": f"gpu-node-{n}",
                    "zone": DOWN_ZONE if n % 2 == 0 else UP_ZONE,
                    "gpus": GPUS,
                    "gpuMemory": "80Gi",
                }
                for n in range(NODES)
            ]
        },
        "detection": example["detection"],
        "loadBalancer": example["loadBalancer"],
        "reconcile": {"interval": "30s"} | (reconcile or {}),
        "local": {"checkpointSize": "64KiB"},
    }


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return 0


async def envoy_updates(http: httpx.AsyncClient, admin_url: str) -> int:
    text = (await http.get(f"{admin_url}/stats", params={"filter": r"\.update_success$"})).text
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.strip())


async def cache_evictions(http: httpx.AsyncClient, settings: DrctlSettings) -> int | None:
    """Workflows the worker pushed out of its cache to make room (the SDK's own metrics): each one
    replays its history on its next workflow task. None when the SDK's metrics are off."""
    if not settings.worker_sdk_metrics_port:
        return None
    text = (await http.get(f"http://{settings.host}:{settings.worker_sdk_metrics_port}/metrics")).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("temporal_sticky_cache_total_forced_eviction") and not line.startswith("#")
        )
    )


def _first(values: Any) -> str:
    return str(values[0]) if values else "-"


class Load:
    """Open-loop predict requests to every model in turn, ``rate_hz`` per model (aiohttp: a tenth
    of httpx's CPU per request, which matters at a thousand requests a second on two cores)."""

    def __init__(self, lb_url: str, models: list[str], rate_hz: float) -> None:
        self.lb_url, self.models, self.rate = lb_url, models, rate_hz * len(models)
        self.sent = self.failed = self.skipped = 0
        self.failures: list[str] = []
        self.zero: float | None = None
        """When the outage began (``time.monotonic()``): failures say how long after it."""
        self.stop = asyncio.Event()

    async def run(self) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512), timeout=timeout) as client:
            next_at, n = time.monotonic(), 0
            while not self.stop.is_set():
                if len(in_flight) >= 512:
                    self.skipped += 1
                else:
                    task = asyncio.create_task(self._one(client, self.models[n % len(self.models)]))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    n += 1
                next_at += 1 / self.rate
                delay = next_at - time.monotonic()
                if delay < -0.5:
                    next_at = time.monotonic()
                await asyncio.sleep(max(0.0, delay))
            if in_flight:
                await asyncio.gather(*in_flight)

    async def _one(self, client: aiohttp.ClientSession, model: str) -> None:
        self.sent += 1
        try:
            async with client.post(
                f"{self.lb_url}/v1/models/{model}/predict", json={"prompt": "x", "max_tokens": 4}
            ) as r:
                await r.read()
                ok, what = r.status == 200, str(r.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, what = False, type(exc).__name__
        if not ok:
            self.failed += 1
            if len(self.failures) < 5:
                when = "" if self.zero is None else f" at {time.monotonic() - self.zero:.1f} s"
                self.failures.append(f"{model}{when}: {what}")


async def running_runbooks(stack: LocalStack) -> int:
    assert stack.client is not None
    query = "ExecutionStatus = 'Running' AND WorkflowType IN ('FailoverWorkflow', 'ZoneFailoverWorkflow')"
    return (await stack.client.count_workflows(query)).count


async def measure(models: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    policy_path = workdir / "policy.yaml"
    pacing = {"maxParallelChanges": args.reconcile_parallel, "maxLoadsPerNode": args.loads_per_node}
    document = policy_document(
        models, args.parallel, {k: v for k, v in pacing.items() if v is not None}, switches=args.switches
    )
    if args.runbooks_per_minute:
        document["budget"] = {"maxRunbooksPerMinute": args.runbooks_per_minute}
    policy_path.write_text(yaml.safe_dump(document, sort_keys=False))
    policy = load_policy_file(policy_path)
    settings = isolated_settings(workdir / "state", policy_path).model_copy(update={"instance_mode": args.mode})
    os.environ["DRCTL_INSTANCE_MODE"] = args.mode  # the parts read their settings from the environment
    stack = LocalStack(settings, policy, say=lambda m: print(f"    {m}", file=sys.stderr), with_prober=True)
    stack.with_node_agents = True
    began = time.monotonic()
    try:
        await stack.start()
    except BaseException:
        await stack.stop()  # what did start (Temporal, Envoy, the pools) must not outlive the bench
        raise
    startup_s = time.monotonic() - began
    stopped: list[int] = []
    # --kill-worker-at: the stack's supervisor (as under ``drctl up``) starts the killed worker again.
    supervisor_stop = asyncio.Event()
    supervisor = asyncio.create_task(stack.supervise(supervisor_stop)) if args.kill_worker_at is not None else None
    worker_killed_at: float | None = None
    load = Load(settings.lb_url, policy.model_names, args.rate_hz)
    loader = asyncio.create_task(load.run())
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            await asyncio.sleep(3)
            pools = InstancePools(stack.layout, settings.instance_pool_base_port).recorded()
            # What each part costs before the outage (the load, the probes, Envoy's health checks):
            # the machine the recoveries have is what is left of it.
            idle_pids = {**stack.pids, **{f"pool {p.name}": p.pid for p in pools}}
            idle0, bench0 = {name: cpu_s(pid) for name, pid in idle_pids.items()}, time.process_time()
            await asyncio.sleep(5)
            idle_cpu = {name: (cpu_s(pid) - idle0[name]) / 5 for name, pid in idle_pids.items()}
            idle_cpu["bench (load, polling)"] = (time.process_time() - bench0) / 5
            prober_idle = idle_cpu["prober"]
            parts = [*stack.pids.values(), *(p.pid for p in pools)]
            instances = list(stack.platform.registry.load().values())
            instance_pids = {i.pid for i in instances if i.pid is not None} if args.mode == "process" else set()
            rss = sum(rss_bytes(pid) for pid in [*parts, *instance_pids])
            down_nodes = {n.name for n in policy.gpu_pool.nodes if n.zone == DOWN_ZONE}
            affected = {i.model for i in instances if i.role == Role.SERVING and i.zone == DOWN_ZONE}
            updates0 = await envoy_updates(http, settings.envoy_admin_url)

            # The outage: every process of the zone stops at once.
            victims = [stack.pids[n] for n in down_nodes if n in stack.pids]
            if args.mode == "pooled":
                victims += [p.pid for p in pools if p.name in down_nodes]
            else:
                victims += [i.pid for i in instances if i.zone == DOWN_ZONE and i.pid is not None]
            profiler = None

            async def start_profiler() -> asyncio.subprocess.Process:
                # py-spy (a dev tool: pip install py-spy) samples the worker from the outage (or the switch).
                out = Path(args.profile) / f"worker-{models}-{args.profile_from}.txt"
                return await asyncio.create_subprocess_exec(
                    "py-spy", "record", "--nonblocking", "--format", "raw",
                    "-d", str(int(args.profile_s or args.timeout)), "-p", str(stack.pids["worker"]), "-o", str(out),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip

            if args.profile and args.profile_from == "outage":
                profiler = await start_profiler()
            perf_samplers: list[asyncio.subprocess.Process] = []
            for part in args.perf_parts if args.perf else []:
                # perf (linux-perf) samples a part (the Temporal server, the worker...) through the
                # same window: native frames too, so the Go runtime's or CPython's GC shows.
                perf_command = [
                    "perf", "record", "-F", "499", "-g", "-p", str(stack.pids[part]),
                    "-o", str(Path(args.perf) / f"{part}-{models}.perf"),
                    "--", "sleep", str(int(args.profile_s or args.timeout)),
                ]  # fmt: skip
                perf_samplers.append(
                    await asyncio.create_subprocess_exec(
                        *perf_command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
                    )
                )
            up_pools = [p.pid for p in pools if p.name not in down_nodes]
            cpu_parts = {name: pid for name, pid in stack.pids.items() if name not in down_nodes}
            if args.kill_worker_at is not None:
                cpu_parts.pop("worker", None)  # killed mid-way: its CPU is not comparable
            cpu_before = {name: cpu_s(pid) for name, pid in cpu_parts.items()}
            pools_before, bench_before = sum(cpu_s(pid) for pid in up_pools), time.process_time()
            t0, t0_wall = time.monotonic(), time.time()
            load.zero = t0
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)

            switched_s = done_s = back_s = None
            cpu_spent: dict[str, float] = {}
            deadline = t0 + args.timeout
            while time.monotonic() < deadline and back_s is None:
                await asyncio.sleep(0.1)
                now = time.monotonic() - t0
                if args.kill_worker_at is not None and worker_killed_at is None and now >= args.kill_worker_at:
                    os.kill(stack.pids["worker"], signal.SIGKILL)  # the zone failover's orchestrator, mid-way
                    worker_killed_at = round(now, 1)
                # Read, not copied (``view``): copying 1,000 instances ten times a second was most
                # of the bench's own CPU, taken from the stack it measures.
                fleet = list(stack.platform.registry.view().values())
                serving_up = {
                    i.model for i in fleet if i.role == Role.SERVING and i.lb_priority == 0 and i.zone == UP_ZONE
                }
                if switched_s is None and affected <= serving_up:
                    switched_s = now
                    if args.profile and args.profile_from == "switch":
                        profiler = await start_profiler()
                if done_s is None:  # CPU seconds each part spent from the outage to the last runbook
                    cpu_spent = {name: cpu_s(pid) - cpu_before[name] for name, pid in cpu_parts.items()}
                    cpu_spent["pools (up zone)"] = sum(cpu_s(pid) for pid in up_pools) - pools_before
                    cpu_spent["bench (load, polling)"] = time.process_time() - bench_before
                if switched_s is not None and done_s is None and await running_runbooks(stack) == 0:
                    done_s = now
                hot_up = {i.model for i in fleet if i.role == Role.HOT and i.lb_priority == 1 and i.zone != DOWN_ZONE}
                in_down = {i.model for i in fleet if i.zone == DOWN_ZONE and i.role in (Role.SERVING, Role.HOT)}
                if done_s is not None and set(policy.model_names) <= (serving_up & hot_up) and not in_down:
                    back_s = now
            # The fleet as the measured window ends, judged here and not after the analysis below:
            # that analysis loaded the machine until the prober judged az-2's instances down, and a
            # runbook it started, caught between its register and its deferred eject, showed a
            # model with two serving instances (a run at --parallel 32 in the fourteenth session).
            final = list(stack.platform.registry.view().values())
            running_at_end = await running_runbooks(stack)
            # The load ends with the measured window: the analysis below (hundreds of histories
            # fetched from Temporal) loads the machine as no outage does, and requests failed in it
            # were counted as the outage's (140 in one run, az-2's instances judged down at 111 s).
            load.stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(loader, 70)
            for sampler in (profiler, *perf_samplers):
                if sampler is not None:
                    with contextlib.suppress(ProcessLookupError):  # --profile-s: it may have ended
                        sampler.send_signal(signal.SIGINT)  # both write what they have on SIGINT
                    await sampler.wait()
            updates = await envoy_updates(http, settings.envoy_admin_url) - updates0
            evictions = await cache_evictions(http, settings)
            zone_runs = []
            zone_started: list[float] = []
            assert stack.client is not None
            async for wf in stack.client.list_workflows("WorkflowType = 'ZoneFailoverWorkflow'"):
                zone_started.append(round(wf.start_time.timestamp() - t0_wall, 1))
                if args.events:
                    print_events(await stack.client.get_workflow_handle(wf.id).fetch_history(), t0_wall)
                    # A guardian whose zone-level recovery waited for the budget: the hand-offs.
                    last = max(affected)
                    print(f"    guardian of {last}:", file=sys.stderr)
                    guardian = stack.client.get_workflow_handle(guardian_workflow_id(last, settings.task_queue))
                    try:
                        print_events(await guardian.fetch_history(), t0_wall)
                    except RPCError:  # switched in the zone failover's batch: no guardian was needed
                        print("    (none: switched in the zone failover's batch)", file=sys.stderr)
                if wf.close_time is not None:
                    zone_runs.append((wf.close_time - wf.start_time).total_seconds())
            task_timeouts = 0  # workflow tasks that timed out (a worker too busy to finish one in time)
            tasks_failed: Counter[str] = Counter()
            signals: Counter[str] = Counter()
            async for wf in stack.client.list_workflows(
                "WorkflowType IN ('FailoverWorkflow', 'ModelGuardianWorkflow', 'BudgetWorkflow')"
            ):
                history = await stack.client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
                task_timeouts += sum(
                    1 for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT
                )
                for e in history.events:  # workflow tasks whose completion was refused, and why
                    if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                        cause = e.workflow_task_failed_event_attributes.cause
                        tasks_failed[f"{wf.workflow_type} {cause}"] += 1
                    elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                        signals[wf.workflow_type] += 1
            passes = await reconcile_passes(stack, t0_wall)
            zone_detection = zone_check_lines(stack.layout.logs_dir / "prober.log", t0_wall)
            runbooks, runbook_spans = [], []
            kinds: Counter[str] = Counter()  # trigger and outcome: which runbooks ran, and to what end
            kind_starts: dict[str, list[float]] = {}  # and when each kind started, after the outage
            step_ms: dict[str, list[float]] = {}
            async for wf in stack.client.list_workflows("WorkflowType = 'FailoverWorkflow'"):
                attrs = wf.search_attributes
                kind = f"{_first(attrs.get(SearchAttr.TRIGGER))} {_first(attrs.get(SearchAttr.OUTCOME))}"
                kinds[kind] += 1
                kind_starts.setdefault(kind, []).append(wf.start_time.timestamp() - t0_wall)
                if wf.close_time is not None:
                    runbooks.append((wf.close_time - wf.start_time).total_seconds())
                    runbook_spans.append((wf.start_time.timestamp() - t0_wall, wf.close_time.timestamp() - t0_wall))
                if kind == "zone-failover recovered":  # where a recovery's time goes, step by step
                    ended = await stack.client.get_workflow_handle(
                        wf.id, run_id=wf.run_id, result_type=FailoverResult
                    ).result()
                    for step in ended.steps:
                        step_ms.setdefault(step.step, []).append(step.duration_ms)
            serving_now = Counter(i.model for i in final if i.role == Role.SERVING and i.lb_priority == 0)
            serving_off = sorted(m for m in policy.model_names if serving_now[m] != 1)
            why_off = {m: await explain_model(stack, m, final, t0_wall) for m in serving_off[:3]}
    finally:
        supervisor_stop.set()
        if supervisor is not None:
            with contextlib.suppress(Exception):
                await supervisor
        load.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(loader, 70)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await stack.stop()
    return {
        "models": models,
        "instances": len(instances),
        "mode": args.mode,
        "startup_s": round(startup_s, 1),
        "affected_models": len(affected),
        "switched_s": None if switched_s is None else round(switched_s, 1),
        "runbooks_done_s": None if done_s is None else round(done_s, 1),
        "redundancy_back_s": None if back_s is None else round(back_s, 1),
        "zone_failover_s": round(statistics.median(zone_runs), 1) if zone_runs else None,
        "zone_failover_started_s": zone_started,
        "zone_detection": zone_detection,
        "runbooks_started_by_2s": _by_2s(start for start, _ in runbook_spans),
        "runbooks_closed_by_2s": _by_2s(close for _, close in runbook_spans),
        "runbooks": len(runbooks),
        "runbook_kinds": dict(kinds.most_common()),
        "runbook_kinds_started": {kind: _spread(kind_starts[kind]) for kind, _ in kinds.most_common()},
        "workflow_task_timeouts": task_timeouts,
        "workflow_tasks_failed": dict(tasks_failed),
        "signals_received": dict(signals),
        "workflow_cache_evictions": evictions,
        "runbook_median_s": round(statistics.median(runbooks), 2) if runbooks else None,
        "reconcile_passes": passes,
        "envoy_updates": updates,
        "requests": load.sent,
        "failed": load.failed,
        "skipped_ticks": load.skipped,
        "failures": load.failures,
        "prober_idle_cpu_pct": round(prober_idle * 100, 1),
        "idle_cpu_pct": {k: round(v * 100, 1) for k, v in sorted(idle_cpu.items(), key=lambda kv: -kv[1]) if v > 0.005},
        "idle_cpu_pct_total": round(sum(idle_cpu.values()) * 100, 1),
        "cpu_s_until_runbooks_done": {k: round(v, 1) for k, v in sorted(cpu_spent.items(), key=lambda kv: -kv[1])},
        "stack_rss_gib": round(rss / 2**30, 2),
        "zone_failover_step_median_ms": {k: round(statistics.median(v), 1) for k, v in step_ms.items()},
        "worker_killed_at_s": worker_killed_at,
        "runbooks_running_at_end": running_at_end,
        "models_not_serving_once": serving_off,
        "models_not_serving_once_explained": why_off,
    }


async def explain_model(stack: LocalStack, model: str, final: list[Any], t0_wall: float) -> list[str]:
    """What a model that does not end with one serving instance has, and every runbook and
    reconciliation change of it since the outage (seconds after it): to tell a race from a slow end."""
    assert stack.client is not None
    lines = [
        f"{i.id}: {i.role} priority {i.lb_priority} zone {i.zone} pid {i.pid} created {i.created_at} {i.note[:80]}"
        for i in final
        if i.model == model
    ]
    async for wf in stack.client.list_workflows(f"WorkflowType = 'FailoverWorkflow' AND DrctlModel = '{model}'"):
        at = wf.start_time.timestamp() - t0_wall
        attrs = wf.search_attributes
        outcome = f"{_first(attrs.get(SearchAttr.TRIGGER))} {_first(attrs.get(SearchAttr.OUTCOME))}"
        lines.append(f"{at:.1f} s runbook {wf.id} ({outcome})")
        if wf.close_time is not None:
            with contextlib.suppress(Exception):
                handle = stack.client.get_workflow_handle(wf.id, run_id=wf.run_id, result_type=FailoverResult)
                ended = await handle.result()
                for step in ended.steps:
                    lines.append(f"    {step.started_at.timestamp() - t0_wall:.2f} s {step.step}: {step.detail[:120]}")
    async for wf in stack.client.list_workflows("WorkflowType = 'ReconcilePassWorkflow'"):
        if wf.start_time.timestamp() < t0_wall:
            continue
        history = await stack.client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        for e in history.events:
            if e.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                continue
            at = e.event_time.ToDatetime(datetime.UTC).timestamp() - t0_wall
            result = json.loads(e.activity_task_completed_event_attributes.result.payloads[0].data or b"null")
            if isinstance(result, dict) and "actions" in result:
                lines += [
                    f"{at:.1f} s {wf.id} planned {a['kind']} {a['instance']} ({a['tier']}) epoch {a.get('epoch')}"
                    for a in result["actions"]
                    if a.get("model") == model
                ]
    return lines


async def reconcile_passes(stack: LocalStack, t0_wall: float) -> list[str]:
    """Each reconciliation pass since the outage: when it ran (seconds after the outage), and its
    creates and deletes with the median time of one (scheduled to completed)."""
    assert stack.client is not None
    lines: list[tuple[float, str]] = []
    async for wf in stack.client.list_workflows("WorkflowType = 'ReconcilePassWorkflow'"):
        start = wf.start_time.timestamp() - t0_wall
        if start < 0:
            continue
        history = await stack.client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        scheduled: dict[int, tuple[str, float]] = {}
        took: dict[str, list[float]] = {}
        plans: list[str] = []
        errors: list[str] = []
        for e in history.events:
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                kind = e.activity_task_scheduled_event_attributes.activity_type.name
                scheduled[e.event_id] = (kind, e.event_time.ToDatetime(datetime.UTC).timestamp())
            elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                kind, at = scheduled[e.activity_task_completed_event_attributes.scheduled_event_id]
                took.setdefault(kind, []).append(e.event_time.ToDatetime(datetime.UTC).timestamp() - at)
                if kind == "plan_reconcile":  # what each plan asked for: kind and tier of its actions
                    plan = json.loads(e.activity_task_completed_event_attributes.result.payloads[0].data)
                    asked = Counter(f"{a['kind']} {a['tier']}" for a in plan["actions"])
                    plans.append(", ".join(f"{n} {what}" for what, n in sorted(asked.items())) or "nothing")
                elif kind == "await_zone_failovers":  # why the wait ended: the failover's end, or a cordon
                    waited = json.loads(e.activity_task_completed_event_attributes.result.payloads[0].data)
                    plans.append(f"(waited: {waited['detail'][:80]})")
                elif kind == "apply_changes":
                    done = json.loads(e.activity_task_completed_event_attributes.result.payloads[0].data)
                    errors.extend(o["error"] for o in done["outcomes"] if o.get("error"))
        end = f"{wf.close_time.timestamp() - t0_wall:.1f}" if wf.close_time else "-"
        done = ", ".join(f"{len(v)} {k} ({statistics.median(v):.2f} s)" for k, v in sorted(took.items()))
        failed = f"; {len(errors)} failed, first: {errors[0][:160]}" if errors else ""
        lines.append((start, f"{start:.1f}-{end} s: {done}; planned {' / '.join(plans)}{failed}"))
    return [line for _, line in sorted(lines)]


ZONE_CHECK_LOG = re.compile(r"^(\S+ \S+) \w+ drctl\.(?:zone_checker|prober): (.*(?:zone|watched instance).*)$")


def zone_check_lines(prober_log: Path, t0_wall: float) -> list[str]:
    """The prober's zone alarms and zone checks after the outage (seconds after it): when the zone
    was judged down, and what it waited for before."""
    lines = []
    for raw in prober_log.read_text(errors="replace").splitlines():
        match = ZONE_CHECK_LOG.match(raw)
        if match is None:
            continue
        at = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0_wall
        if at >= -1.0:
            lines.append(f"{at:.1f} s: {match[2][:160]}")
    return lines


def print_events(history: Any, t0_wall: float) -> None:
    """The zone failover's history, runs of one event type folded: when each phase began and ended."""
    runs: list[list[Any]] = []
    for event in history.events:
        name = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")
        at = event.event_time.ToDatetime(datetime.UTC).timestamp() - t0_wall
        if runs and runs[-1][0] == name:
            runs[-1][2], runs[-1][3] = at, runs[-1][3] + 1
        else:
            runs.append([name, at, at, 1])
    for name, first, last, count in runs:
        print(f"      {first:7.2f}-{last:7.2f} s  {count:4d} x {name}", file=sys.stderr)


def _by_2s(offsets: Any) -> dict[int, int]:
    """How many of ``offsets`` (seconds after the outage) fall in each 2-second bucket."""
    buckets: dict[int, int] = {}
    for offset in offsets:
        buckets[int(offset // 2) * 2] = buckets.get(int(offset // 2) * 2, 0) + 1
    return dict(sorted(buckets.items()))


def _spread(offsets: list[float]) -> str:
    """When runbooks of one kind started (seconds after the outage): first, median, last."""
    ordered = sorted(offsets)
    return f"{ordered[0]:.1f} / {statistics.median(ordered):.1f} / {ordered[-1]:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[50, 150, 500])
    parser.add_argument("--mode", choices=["pooled", "process"], default="pooled")
    parser.add_argument("--rate-hz", type=float, default=2.0, help="requests per second per model")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for redundancy")
    parser.add_argument("--parallel", type=int, default=None, help="az_failover.maxParallelFailovers (policy: 4)")
    parser.add_argument(
        "--switches", type=int, default=None, help="az_failover.maxParallelSwitches: hot switches at once (policy: 32)"
    )
    parser.add_argument("--reconcile-parallel", type=int, default=None, help="reconcile.maxParallelChanges")
    parser.add_argument("--loads-per-node", type=int, default=None, help="reconcile.maxLoadsPerNode")
    parser.add_argument("--runbooks-per-minute", type=int, default=None, help="budget.maxRunbooksPerMinute")
    parser.add_argument("--profile", default=None, help="folder for py-spy samples of the worker (raw format)")
    parser.add_argument("--profile-s", type=float, default=None, help="sample only this long after it started")
    parser.add_argument("--perf", default=None, help="folder for perf records of --perf-parts through the outage")
    parser.add_argument(
        "--perf-parts",
        nargs="+",
        default=["temporal"],
        help="the stack's parts perf samples with --perf (default: temporal; e.g. temporal worker)",
    )
    parser.add_argument(
        "--profile-from",
        choices=("outage", "switch"),
        default="outage",
        help="start sampling at the outage or once every model switched",
    )
    parser.add_argument(
        "--kill-worker-at",
        type=float,
        default=None,
        help="kill -9 the worker this many seconds after the outage (the stack's supervisor starts it again)",
    )
    parser.add_argument(
        "--keep-failed",
        type=Path,
        default=None,
        help="copy a run's state folder (the stack's logs) here when a model did not end serving once "
        "or a client request failed",
    )
    parser.add_argument(
        "--keep-slower-than",
        type=float,
        default=None,
        help="with --keep-failed, keep a run's state folder too when its switch took longer (seconds)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--events", action="store_true", help="print the zone failover's history, folded")
    args = parser.parse_args()
    rows = []
    for models in args.models:
        print(f"{models} models ({models * 2} instances), {args.mode} …", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="drctl-zone-bench-") as tmp:
            rows.append(asyncio.run(measure(models, args, Path(tmp))))
            row = rows[-1]
            slow = args.keep_slower_than is not None and (row["switched_s"] or 1e9) > args.keep_slower_than
            if args.keep_failed is not None and (row["models_not_serving_once"] or row["failed"] or slow):
                kept = args.keep_failed / f"{models}-models-{time.strftime('%H%M%S')}"
                shutil.copytree(tmp, kept, ignore_dangling_symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
                print(f"    state folder kept in {kept}", file=sys.stderr)
        print(f"    {rows[-1]}", file=sys.stderr)
    if args.json:
        print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
        return
    print(f"Zone {DOWN_ZONE} stopped (SIGSTOP), {args.rate_hz:g} req/s per model, {args.mode} instances")
    keys = [
        ("instances", "instances"),
        ("affected_models", "models served from the zone"),
        ("switched_s", "every affected model switched for good, s"),
        ("runbooks_done_s", "every runbook complete, s"),
        ("redundancy_back_s", "redundancy back, s"),
        ("zone_failover_s", "zone failover workflow, s"),
        ("runbooks", "FailoverWorkflow runs"),
        ("runbook_median_s", "FailoverWorkflow, median s"),
        ("workflow_task_timeouts", "workflow task timeouts"),
        ("workflow_cache_evictions", "workflows pushed out of the worker's cache"),
        ("failed", "failed client requests"),
        ("requests", "client requests"),
        ("envoy_updates", "Envoy cluster updates"),
        ("prober_idle_cpu_pct", "prober idle CPU, % of a core"),
        ("stack_rss_gib", "stack memory (RSS), GiB"),
        ("startup_s", "stack startup, s"),
    ]
    print("| | " + " | ".join(str(r["models"]) + " models" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key, title in keys:
        print(f"| {title} | " + " | ".join("-" if r[key] is None else str(r[key]) for r in rows) + " |")


if __name__ == "__main__":
    main()
