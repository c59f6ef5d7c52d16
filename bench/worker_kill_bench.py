"""What a worker killed in the middle of a failover costs: ``kill -9`` of the worker at a random
moment of a hot-standby failover, a new worker started at once (as ``drctl up``'s supervisor does),
and the RTO compared with undisturbed failovers on the same stack, side by side.

    .venv/bin/python bench/worker_kill_bench.py [--runs 12] [--seed 7] [--json]

Each round kills llama-2-7b's serving instance, reports it as the prober would, and — in the
"kill" rounds — sends ``SIGKILL`` to the worker after a random delay of 0 to 400 ms, which lands in the
guardian's lease and epoch steps or anywhere in the runbook; the histories say where. Rounds
alternate undisturbed and kill, so both see the same machine load. Between rounds the stack
reconciles back to the policy's standbys. The cost of a kill is its RTO minus the median undisturbed
RTO; the bound to meet is 3 s (the 2 s workflow task timeout plus the restart).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, ScheduleOverlapPolicy

from drctl.payloads import RECONCILE_SCHEDULE_ID, FailoverRequest, FailureReport, Role, Trigger
from drctl.policies.loader import load_policy_file
from drctl.temporal.incidents import busy_models, report_failure, runbook_result, wait_closed
from drctl.workers.stack import LocalStack, isolated_settings

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "examples" / "dr-policy.yaml"
MODEL = "llama-2-7b"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def at_redundancy(stack: LocalStack, timeout_s: float = 120.0) -> None:
    """Until the model has its serving instance and both hot standbys again (reconcile is asked
    every few seconds: a pass planned before a failover claimed its epoch is refused as stale)."""
    assert stack.client is not None
    schedule = stack.client.get_schedule_handle(RECONCILE_SCHEDULE_ID)
    deadline = time.monotonic() + timeout_s
    asked = 0.0
    while time.monotonic() < deadline:
        roles = [i.role for i in stack.platform.registry.of_model(MODEL)]
        if roles.count(Role.SERVING) == 1 and roles.count(Role.HOT) == 2:
            return
        if time.monotonic() - asked > 5.0:
            await schedule.trigger(overlap=ScheduleOverlapPolicy.BUFFER_ONE)
            asked = time.monotonic()
        await asyncio.sleep(0.2)
    busy = await busy_models(stack.client, stack.settings.task_queue)
    last = ""
    async for wf in stack.client.list_workflows("WorkflowType = 'ReconcileStandbysWorkflow'", limit=1):
        result = await stack.client.get_workflow_handle(wf.id, run_id=wf.run_id).result()
        last = f"skipped {result['plan'].get('skipped_models')}, unplaceable {result['plan'].get('unplaceable')}, "
        last += f"failed {result.get('failed')}, applied {result.get('applied')}"
    raise TimeoutError(f"{MODEL} did not get its standbys back in {timeout_s:.0f}s: {roles}; busy {busy}; last {last}")


async def where_killed(client: Client, workflow_id: str, run_id: str | None, killed: datetime) -> str:
    """What the runbook had last recorded when the worker died (its history up to the kill)."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    last = "not started yet (guardian: lease, epoch, start)"
    async for event in handle.fetch_history_events():
        when = event.event_time.ToDatetime().replace(tzinfo=UTC)
        if when > killed:
            break
        last = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").lower()
    return last


async def one_round(stack: LocalStack, kill_after_s: float | None) -> dict[str, Any]:
    assert stack.client is not None
    [serving] = [i for i in stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]
    os.kill(serving.pid or 0, signal.SIGKILL)
    failed_at = datetime.now(UTC)
    request = FailoverRequest(model=MODEL, instance=serving.id, trigger=Trigger.DRILL, failed_at=failed_at)
    reporting = asyncio.create_task(
        report_failure(stack.client, stack.settings.task_queue, FailureReport(request=request, reporter="bench"))
    )
    killed: datetime | None = None
    if kill_after_s is not None:
        await asyncio.sleep(kill_after_s)
        os.kill(stack.pids["worker"], signal.SIGKILL)
        killed = datetime.now(UTC)
        stack.start_worker()  # what the supervisor does within its 100 ms tick
    ticket = await reporting
    incident = await asyncio.wait_for(wait_closed(stack.client, stack.settings.task_queue, ticket), timeout=120)
    result = await runbook_result(stack.client, incident)
    row: dict[str, Any] = {
        "kill_after_ms": None if kill_after_s is None else round(kill_after_s * 1000),
        "outcome": result.outcome.value,
        "rto_ms": result.rto_ms,
    }
    if killed is not None:
        row["killed_during"] = await where_killed(stack.client, incident.workflow_id, incident.run_id, killed)
    await at_redundancy(stack)
    return row


async def main_async(runs: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="drctl-worker-kill-") as tmp:
        settings = isolated_settings(Path(tmp) / "state", POLICY)
        stack = LocalStack(settings, load_policy_file(POLICY), say=lambda _: None)
        await stack.start()
        rows: list[dict[str, Any]] = []
        try:
            for n in range(runs):
                kill = n % 2 == 1
                row = await one_round(stack, rng.uniform(0.0, 0.4) if kill else None)
                rows.append(row)
                say(json.dumps(row))
        finally:
            await stack.stop()
            if os.environ.get("DRCTL_BENCH_KEEP_LOGS"):
                import shutil

                shutil.copytree(stack.layout.logs_dir, os.environ["DRCTL_BENCH_KEEP_LOGS"], dirs_exist_ok=True)
    calm = [r["rto_ms"] for r in rows if r["kill_after_ms"] is None and r["rto_ms"] is not None]
    hit = [r for r in rows if r["kill_after_ms"] is not None]
    baseline = statistics.median(calm) if calm else 0.0
    costs = [r["rto_ms"] - baseline for r in hit if r["rto_ms"] is not None]
    return {
        "runs": rows,
        "undisturbed_rto_ms_median": baseline,
        "kill_cost_ms_median": statistics.median(costs) if costs else None,
        "kill_cost_ms_worst": max(costs) if costs else None,
        "all_recovered": all(r["outcome"] == "recovered" for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=12, help="rounds, alternating undisturbed and worker kill")
    parser.add_argument("--seed", type=int, default=7, help="seed of the kill delays")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    summary = asyncio.run(main_async(args.runs, args.seed))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for row in summary["runs"]:
        where = ""
        if "killed_during" in row:
            where = f"  killed at +{row['kill_after_ms']} ms during {row['killed_during']}"
        print(f"{row['outcome']:<10} RTO {row['rto_ms']:>8.0f} ms{where}")
    print(
        f"undisturbed RTO median {summary['undisturbed_rto_ms_median']:.0f} ms; "
        f"a worker kill costs median {summary['kill_cost_ms_median']:.0f} ms, "
        f"worst {summary['kill_cost_ms_worst']:.0f} ms (bound: 3000 ms); "
        f"all recovered: {summary['all_recovered']}"
    )


if __name__ == "__main__":
    main()
