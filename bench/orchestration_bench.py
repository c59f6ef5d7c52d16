"""Orchestration benchmark: the same hot-standby failover as plain asyncio and through Temporal.

    .venv/bin/python bench/orchestration_bench.py [--rounds 8] [--model llama-2-7b] [--confirmed] [--json]

One private stack (Temporal dev server, Envoy, the demo model processes, the worker) in a temporary
state folder. Each round ``kill -9``s the model's serving instance and recovers it one of three ways,
the three interleaved so that they share the machine's minute:

``plain``
    This process calls the runbook's activity functions itself, in the runbook's order (claim the
    epoch and list, confirm, promote, load, register, verify, eject, ask for replenishment), through
    ``temporalio.testing.ActivityEnvironment`` and the same platform code the worker runs. No
    Temporal round trip except the replenish step's schedule trigger, which is one of the steps.
``runbook``
    ``FailoverWorkflow`` started directly by this process with the claimed epoch and the listing
    claimed with it, as a guardian starts it, on a worker in this process (``request_eager_start``:
    the start's answer carries the first workflow task, so no poll round trip), the steps as local
    activities, as in production.
``guardian``
    The production path: a report to the model's guardian (Update-with-start), the budget's lease,
    the epoch, the runbook as the guardian's child on the stack's own worker; the time until the
    runbook's result.

Each round's figure is the wall time from just after the kill to the recovery's end as this process
sees it. Between rounds the bench waits until reconciliation has put a hot standby back. It prints
the medians and each Temporal mode's ratio to ``plain``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from drctl.activities.failover import FailoverActivities
from drctl.activities.incidents import IncidentActivities
from drctl.activities.reconcile import ReconcileActivities
from drctl.payloads import (
    EjectRequest,
    FailoverOutcome,
    FailoverRequest,
    InstanceRef,
    ModelRef,
    RegisterRequest,
    Role,
    Trigger,
)
from drctl.policies.loader import load_policy_file
from drctl.policies.standby import FailoverPlan, must_defer_eject, plan_failover, standby_candidates
from drctl.temporal.runbooks import start_failover
from drctl.workers.runbook_worker import workflow_runner
from drctl.workers.stack import LocalStack, isolated_settings
from drctl.workflows.failover import FailoverWorkflow

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "examples" / "dr-policy.yaml"
MODES = tuple(os.environ.get("ORCH_MODES", "plain runbook guardian").split())
BENCH_QUEUE = "drctl-orchestration-bench"
"""The in-process worker's task queue (the stack's own worker polls the stack's queue)."""
SETTLE_TIMEOUT_S = 60.0


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Plain:
    """The hot-standby runbook's steps in plain asyncio, calling the activity functions the worker runs."""

    def __init__(self, stack: LocalStack, client: Client, confirmed: bool) -> None:
        self.confirmed = confirmed
        self.failover = FailoverActivities(stack.platform)
        self.incidents = IncidentActivities(stack.platform)
        self.reconcile = ReconcileActivities(stack.platform)
        self.env = ActivityEnvironment(client=client)

    async def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await self.env.run(fn, *args)

    async def recover(self, model: str, instance: str) -> str:
        grant = await self._run(self.incidents.claim_epoch, ModelRef(model=model))
        epoch = grant.epoch
        if not self.confirmed:
            probe = await self._run(self.failover.probe_instance, InstanceRef(model=model, instance=instance))
            if probe.healthy:
                return "false-alarm"
        listing = grant.listing or await self._run(self.failover.list_instances, ModelRef(model=model))
        if plan_failover(listing.instances, instance) != FailoverPlan.REPLACE:
            return "nothing to promote"
        eject = EjectRequest(model=model, instance=instance, reason="bench", epoch=epoch)
        deferred = must_defer_eject(listing.instances, instance)
        if not deferred:
            await self._run(self.failover.eject_instance, eject)
        candidate = standby_candidates(listing.instances, instance, None)[0]
        ref = InstanceRef(model=model, instance=candidate.id, epoch=epoch)
        await self._run(self.failover.promote_standby, ref)
        await self._run(self.failover.load_model, ref)
        register = RegisterRequest(model=model, instance=candidate.id, priority=0, epoch=epoch)
        await self._run(self.failover.register_instance, register)
        await self._run(self.failover.verify_serving, ref)
        if deferred:
            await self._run(self.failover.eject_instance, eject)
        await self._run(self.reconcile.request_reconcile, ModelRef(model=model))
        return FailoverOutcome.RECOVERED.value


def _request(model: str, instance: str, confirmed: bool) -> FailoverRequest:
    """The report of the kill: established (as the prober's) or to be confirmed (as an alert's)."""
    return FailoverRequest(
        model=model,
        instance=instance,
        trigger=Trigger.PROBE if confirmed else Trigger.DRILL,
        confirmed=confirmed,
        reason="bench",
        failed_at=_now(),
    )


async def _through_runbook(
    client: Client, stack: LocalStack, model: str, instance: str, n: int, confirmed: bool
) -> str:
    grant = await ActivityEnvironment(client=client).run(
        IncidentActivities(stack.platform).claim_epoch, ModelRef(model=model)
    )
    # As the guardian hands it over: the epoch, and the listing claimed with it.
    request = _request(model, instance, confirmed).model_copy(update={"epoch": grant.epoch, "listing": grant.listing})
    t0 = _now()
    handle = await client.start_workflow(
        FailoverWorkflow.run,
        request,
        id=f"orchestration-bench-{n}-{instance}",
        task_queue=BENCH_QUEUE,
        request_eager_start=True,
    )
    t1 = _now()
    result = await handle.result()
    if os.environ.get("ORCH_TIMELINE"):
        events = []
        async for ev in handle.fetch_history_events():
            t = ev.event_time.ToDatetime().replace(tzinfo=UTC)
            events.append((round((t - t0).total_seconds() * 1000, 1), ev.event_type))
        progress(f"start rpc {(t1 - t0).total_seconds() * 1000:.1f} ms; {events}")
        for s in result.steps:
            progress(f"   {s.step} {s.duration_ms} {s.activity_ms}")
    return result.outcome.value


async def _through_guardian(client: Client, stack: LocalStack, model: str, instance: str, confirmed: bool) -> str:
    handle = await start_failover(client, stack.settings, _request(model, instance, confirmed))
    result = await handle.result()
    return result.outcome.value


def _now() -> datetime:
    return datetime.now(UTC)


async def _settled(stack: LocalStack, model: str) -> None:
    """Wait until the model has a live serving instance and a live hot standby again."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        instances = stack.platform.registry.of_model(model)
        serving = [i for i in instances if i.role == Role.SERVING and i.pid]
        hot = [i for i in instances if i.role == Role.HOT and i.pid]
        if serving and hot:
            answers = [await stack.platform.probe(i) for i in (serving[0], hot[0])]
            if all(healthy for healthy, _ in answers):
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{model} did not get its hot standby back within {SETTLE_TIMEOUT_S:.0f} s")


async def bench(rounds: int, model: str, confirmed: bool) -> dict[str, list[float]]:
    """``confirmed``: the failure comes established, as the prober's and a zone failover's reports
    do, and no path probes it (the runbook runs every step in one workflow task)."""
    policy = load_policy_file(POLICY)
    walls: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="drctl-orch-bench-") as tmp:
        settings = isolated_settings(Path(tmp), POLICY)
        lines: list[str] = []
        stack = LocalStack(settings, policy, say=lines.append)
        progress(f"starting a private stack in {tmp}")
        await stack.start()
        try:
            assert stack.client is not None
            client = stack.client
            worker = Worker(
                client,
                task_queue=BENCH_QUEUE,
                workflow_runner=workflow_runner(stack.settings),  # as the stack's worker runs them
                workflows=[FailoverWorkflow],
                activities=[
                    *FailoverActivities(stack.platform).all(),
                    *ReconcileActivities(stack.platform).all(),
                    *IncidentActivities(stack.platform).all(),
                ],
                graceful_shutdown_timeout=timedelta(seconds=2),
            )
            plain = Plain(stack, client, confirmed)
            async with worker:
                for n in range(rounds):
                    for mode in MODES if n % 2 == 0 else tuple(reversed(MODES)):
                        await _settled(stack, model)
                        await asyncio.sleep(0.5)
                        victim = next(
                            i for i in stack.platform.registry.of_model(model) if i.role == Role.SERVING and i.pid
                        )
                        assert victim.pid is not None
                        os.kill(victim.pid, signal.SIGKILL)
                        began = time.monotonic()
                        if mode == "plain":
                            outcome = await plain.recover(model, victim.id)
                        elif mode == "runbook":
                            outcome = await _through_runbook(client, stack, model, victim.id, n, confirmed)
                        else:
                            outcome = await _through_guardian(client, stack, model, victim.id, confirmed)
                        wall_ms = (time.monotonic() - began) * 1000
                        progress(f"round {n + 1}/{rounds} {mode:8s} {outcome:10s} {wall_ms:6.1f} ms")
                        if outcome != FailoverOutcome.RECOVERED.value:
                            raise RuntimeError(f"{mode} ended {outcome}, not recovered")
                        walls[mode].append(round(wall_ms, 1))
        finally:
            await stack.stop()
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds; each runs all three modes (default 8)")
    parser.add_argument("--model", default="llama-2-7b", help="a model with a hot standby in the example policy")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument(
        "--confirmed",
        action="store_true",
        help="the failure comes established (the prober's reports, a zone failover's): no confirm probe on any path",
    )
    args = parser.parse_args()
    walls = asyncio.run(bench(args.rounds, args.model, args.confirmed))
    medians = {mode: statistics.median(values) for mode, values in walls.items()}
    # Ratios only when plain ran (``ORCH_MODES`` may leave it out).
    ratios = {mode: round(medians[mode] / medians["plain"], 2) for mode in MODES} if "plain" in medians else {}
    summary = {
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "rounds": args.rounds,
        "confirmed": args.confirmed,
        "wall_ms": walls,
        "median_ms": medians,
        "ratio_to_plain": ratios,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'mode':10s} {'median ms':>10s} {'min':>7s} {'max':>7s} {'vs plain':>8s}")
    for mode in MODES:
        values = walls[mode]
        print(
            f"{mode:10s} {medians[mode]:10.1f} {min(values):7.1f} {max(values):7.1f} "
            + (f"{ratios[mode]:8.2f}" if mode in ratios else f"{'-':>8s}")
        )


if __name__ == "__main__":
    main()
