"""What Temporal itself costs on this machine, apart from drctl's steps: the floor under issue 12's
two unmet goals.

    .venv/bin/python bench/temporal_floor_bench.py [--runs 25] [--records 250] [--json]

One private Temporal dev server, started as ``drctl up`` starts it (the same SQLite pragmas and
search attributes), nothing else running. Two parts:

``steps``
    A workflow that runs K no-op local activities (an ``async def`` returning its input), K = 0, 6
    and 12, started with ``request_eager_start`` on a worker in this process (unsandboxed, as the
    stack's), the caller waiting for its result: the runbook's shape (a confirmed failover runs its
    six steps as local activities in its first workflow task) with no work in the steps. K = 0 is a
    workflow's own floor (start, one workflow task, the result's long poll); the slope is what one
    local activity costs. Set against the plain code's failover (``bench/orchestration_bench.py``),
    it says how far down orchestration could go at best while every step stays an activity.
``records``
    ``N`` switch records as a zone failover's batch starts them after its switches
    (:func:`drctl.temporal.incidents.start_switch_record`: a ``FailoverWorkflow`` with the switch's
    steps, search attributes and memo, started eagerly, its one workflow task run here), 16 at a
    time (``RECORDS_AT_ONCE``), three rounds; the dev server's CPU (``/proc``) per record. Beside it
    the same starts without search attributes and memo, to show what the audit's attributes cost.

Rounds of the variants are interleaved so that they share the machine's minute. It prints medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import TypedSearchAttributes
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.zone_bench import cpu_s
from drctl.activities.incidents import in_order_at_most
from drctl.activities.zone_switch import RECORDS_AT_ONCE
from drctl.payloads import FailoverRequest, StepTiming, SwitchRecord, Trigger
from drctl.temporal.converter import drctl_data_converter
from drctl.temporal.incidents import start_switch_record
from drctl.temporal.search_attributes import dev_server_flags
from drctl.workers.binaries import find_binary
from drctl.workers.stack import SQLITE_PRAGMAS, free_ports
from drctl.workflows.failover import FailoverWorkflow

TASK_QUEUE = "temporal-floor"
STEP_COUNTS = (0, 6, 12)
RUNBOOK_STEPS = 6
"""Local activities of a confirmed hot-standby failover: promote, load, register, verify, eject,
replenish (the listing comes with the epoch)."""


@activity.defn(name="floor_noop")
async def noop(value: str) -> str:
    return value


@workflow.defn(name="FloorSteps")
class FloorSteps:
    """K local activities that do nothing, one after the other."""

    @workflow.run
    async def run(self, steps: int) -> int:
        for _ in range(steps):
            await workflow.execute_local_activity(noop, "x", start_to_close_timeout=timedelta(seconds=10))
        return steps


def spawn_dev_server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """The dev server as the stack runs it, on ``port``, its database and log in ``folder``."""
    http_port, metrics_port = free_ports(2)
    command = [
        find_binary("temporal"), "server", "start-dev",
        "--db-filename", str(folder / "temporal.db"),
        "--ip", "127.0.0.1", "--port", str(port),
        "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        "--headless", "--log-level", "warn",
        *SQLITE_PRAGMAS, *dev_server_flags(),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=(folder / "temporal.log").open("wb"), stderr=subprocess.STDOUT)


async def start_dev_server(folder: Path) -> tuple[subprocess.Popen[bytes], Client]:
    (port,) = free_ports(1)
    server = spawn_dev_server(folder, port)
    deadline = time.monotonic() + 60
    while True:
        try:
            client = await Client.connect(f"127.0.0.1:{port}", data_converter=drctl_data_converter)
            return server, client
        except RuntimeError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the dev server did not start; see {folder / 'temporal.log'}") from None
            await asyncio.sleep(0.1)


async def bench_steps(client: Client, runs: int) -> dict[str, Any]:
    walls: dict[int, list[float]] = {k: [] for k in STEP_COUNTS}
    starts: list[float] = []
    for run in range(runs):
        for steps in STEP_COUNTS:  # interleaved
            began = time.perf_counter()
            handle = await client.start_workflow(
                FloorSteps.run,
                steps,
                id=f"floor-{steps}-{run}-{time.time_ns()}",
                task_queue=TASK_QUEUE,
                request_eager_start=True,
            )
            started = time.perf_counter()
            await handle.result()
            walls[steps].append((time.perf_counter() - began) * 1000)
            starts.append((started - began) * 1000)
    medians = {k: round(statistics.median(v), 1) for k, v in walls.items()}
    per_step = (medians[STEP_COUNTS[-1]] - medians[0]) / STEP_COUNTS[-1]
    return {
        "workflow_ms_by_local_activities": medians,
        "start_call_ms": round(statistics.median(starts), 1),
        "per_local_activity_ms": round(per_step, 2),
        "runbook_floor_ms": round(medians[0] + RUNBOOK_STEPS * per_step, 1),
    }


def switch_record(model: int, tag: str) -> FailoverRequest:
    now = datetime.now(UTC)
    steps = [
        StepTiming(step=s, started_at=now, duration_ms=12.0, activity_ms=11.0, detail=f"{s} m{model:04d}-hot: done")
        for s in ("pick", "promote", "load", "register", "verify", "eject")
    ]
    return FailoverRequest(
        model=f"m{model:04d}",
        instance=f"m{model:04d}-{tag}",
        reason="zone az-1 down (floor benchmark)",
        trigger=Trigger.ZONE_FAILOVER,
        confirmed=True,
        epoch=3,
        switched=SwitchRecord(
            standby=f"m{model:04d}-hot",
            epoch=3,
            steps=steps,
            started_at=now,
            verified_at=now,
            handled_by="zone-failover-az-1",
        ),
    )


async def bare_start(client: Client, request: FailoverRequest) -> None:
    await client.start_workflow(
        FailoverWorkflow.run,
        request,
        id=f"bare-{request.instance}",
        task_queue=TASK_QUEUE,
        search_attributes=TypedSearchAttributes.empty,
        request_eager_start=True,
    )


async def bench_records(client: Client, server_pid: int, count: int) -> dict[str, Any]:
    per_record: dict[str, list[float]] = {"record": [], "without_attributes": []}
    rates: dict[str, list[float]] = {"record": [], "without_attributes": []}
    for round_ in range(3):
        for kind in per_record:  # interleaved
            tag = f"{kind[:1]}{round_}"
            starts: list[Awaitable[Any]] = [
                start_switch_record(client, TASK_QUEUE, switch_record(m, tag))
                if kind == "record"
                else bare_start(client, switch_record(m, tag))
                for m in range(count)
            ]
            cpu, began = cpu_s(server_pid), time.monotonic()
            await in_order_at_most(RECORDS_AT_ONCE, starts)
            took = time.monotonic() - began
            await asyncio.sleep(1.0)  # the server's queues (visibility, close) finish their share
            per_record[kind].append((cpu_s(server_pid) - cpu) / count * 1000)
            rates[kind].append(count / took)
    return {
        kind: {
            "server_cpu_ms_per_record": round(statistics.median(per_record[kind]), 1),
            "records_per_s": round(statistics.median(rates[kind]), 1),
            "server_cpu_s_for_all": round(statistics.median(per_record[kind]) * count / 1000, 2),
        }
        for kind in per_record
    }


async def bench(runs: int, records: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="drctl-temporal-floor-"))
    server, client = await start_dev_server(folder)
    try:
        async with Worker(
            client,
            task_queue=TASK_QUEUE,
            workflows=[FloorSteps, FailoverWorkflow],
            activities=[noop],
            workflow_runner=UnsandboxedWorkflowRunner(),
        ):
            await bench_steps(client, 3)  # warm up
            steps = await bench_steps(client, runs)
            recorded = await bench_records(client, server.pid, records)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "runs": runs,
        "steps": steps,
        "records": {"count": records, "at_once": RECORDS_AT_ONCE, **recorded},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=25, help="workflows per step count (default 25)")
    parser.add_argument("--records", type=int, default=250, help="switch records per round (default 250)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.runs < 1 or args.records < 1:
        parser.error("--runs and --records must be at least 1")
    result = asyncio.run(bench(args.runs, args.records))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    steps = result["steps"]
    print(result["machine"])
    print("workflow started eagerly until its result, by no-op local activities (median):")
    for count, ms in steps["workflow_ms_by_local_activities"].items():
        print(f"  {count:>2}: {ms:.1f} ms")
    print(f"  one local activity: {steps['per_local_activity_ms']:.2f} ms; the start call {steps['start_call_ms']} ms")
    print(f"  a {RUNBOOK_STEPS}-step runbook's floor with no work in its steps: {steps['runbook_floor_ms']:.1f} ms")
    print(f"{result['records']['count']} switch records, {RECORDS_AT_ONCE} at a time (median of 3 rounds):")
    for kind, figures in result["records"].items():
        if isinstance(figures, dict):
            print(
                f"  {kind}: {figures['server_cpu_ms_per_record']} ms of server CPU each "
                f"({figures['server_cpu_s_for_all']} s for all), {figures['records_per_s']}/s"
            )


if __name__ == "__main__":
    main()
