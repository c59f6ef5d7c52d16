"""The Temporal worker: runs the runbook workflows and their activities on the platform the settings choose.

    python -m drctl.workers.runbook_worker [--log-format json]   # settings from DRCTL_* variables

``drctl up`` starts it as a child process (and restarts it if it dies); a failover in flight
when it dies resumes from its last completed step once a worker polls the task queue again.

At start it creates the Temporal Schedule ``drctl-reconcile-standbys`` if it does not exist (and
leaves an existing one alone), so that standbys are replaced wherever a worker runs: on Kubernetes
nothing else creates it. ``DRCTL_WORKER_CREATES_RECONCILE_SCHEDULE=false`` turns that off; ``drctl
up`` does, as it creates or updates the schedule itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import timedelta

from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from drctl.activities.drill import DrillActivities
from drctl.activities.failover import FailoverActivities
from drctl.activities.incidents import IncidentActivities
from drctl.activities.reconcile import ReconcileActivities
from drctl.activities.zone_switch import ZoneSwitchActivities
from drctl.payloads import RECONCILE_SCHEDULE_ID
from drctl.platforms.factory import make_platform
from drctl.policies.loader import load_policy_file
from drctl.policies.schema import DRPolicy
from drctl.service import run_service
from drctl.settings import DrctlSettings
from drctl.telemetry.metrics import run_worker_metrics, sdk_runtime
from drctl.telemetry.tracing import setup_tracing
from drctl.temporal.client import connect
from drctl.temporal.refs import workflow_type
from drctl.temporal.schedules import create_reconcile_schedule_if_missing
from drctl.workflows.budget import BudgetWorkflow
from drctl.workflows.drain import DrainGpuWorkflow
from drctl.workflows.drill import DrillWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.guardian import ModelGuardianWorkflow
from drctl.workflows.reconcile import ReconcilePassWorkflow, ReconcileStandbysWorkflow
from drctl.workflows.zone import ZoneFailbackWorkflow, ZoneFailoverWorkflow

log = logging.getLogger("drctl.worker")

WORKFLOWS = [
    ModelGuardianWorkflow,
    BudgetWorkflow,
    FailoverWorkflow,
    ReconcileStandbysWorkflow,
    ReconcilePassWorkflow,
    DrainGpuWorkflow,
    ZoneFailoverWorkflow,
    ZoneFailbackWorkflow,
    DrillWorkflow,
]

RUNBOOKS = [w for w in WORKFLOWS if w not in (ModelGuardianWorkflow, BudgetWorkflow)]
"""The runs counted in ``drctl_runbooks_total`` (the guardians and the budget never close)."""


SDK_DEFAULT_WORKFLOW_CACHE = 1000
"""The SDK's default ``max_cached_workflows``."""


def workflow_cache_size(policy: DRPolicy, settings: DrctlSettings) -> int:
    """Workflows the worker keeps in memory between their tasks (``DRCTL_WORKER_WORKFLOW_CACHE``,
    or sized to the fleet): room for every model's guardian and one runbook each, and 500 more (the
    budget, zone failovers, reconciliation, drains, drills, runbooks that joined another). A
    workflow pushed out replays its history on its next task. Guardians never close, so on a
    long-lived worker of a fleet past 1,000 models the SDK's default would be full of them. At
    1,000 models (a zone outage of 2,000 instances) the default and this size measured the same:
    the workflows active at once were fewer than 1,000 (docs/benchmarks.md)."""
    if settings.worker_workflow_cache is not None:
        return settings.worker_workflow_cache
    return max(SDK_DEFAULT_WORKFLOW_CACHE, 2 * len(policy.models) + 500)


def workflow_runner(settings: DrctlSettings) -> WorkflowRunner:
    """How the worker runs workflow code: unsandboxed unless ``DRCTL_WORKFLOW_SANDBOX`` (see the
    setting: the sandbox costs a new module import per workflow run; CI checks the code in it)."""
    return SandboxedWorkflowRunner() if settings.workflow_sandbox else UnsandboxedWorkflowRunner()


async def run_worker(settings: DrctlSettings, stop: asyncio.Event) -> None:
    policy = load_policy_file(settings.policy)
    platform = make_platform(settings, policy)
    for line in await platform.start():
        log.info("%s", line)
    tracing = setup_tracing("worker", settings.state_dir)
    log.info("traces: %s", tracing.destination)
    # The SDK's own metrics (task latencies, slots, polls) on their own port; 0: the default runtime.
    # The tracing interceptor on the client applies to the worker built on it (workflows, activities).
    client = await connect(
        settings, sdk_runtime(settings.host, settings.worker_sdk_metrics_port), tracing.interceptors()
    )
    worker = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=[
            *FailoverActivities(platform).all(),
            *ReconcileActivities(platform).all(),
            *IncidentActivities(platform).all(),
            *ZoneSwitchActivities(platform).all(),
            *DrillActivities(platform, settings, client).all(),
        ],
        graceful_shutdown_timeout=timedelta(seconds=5),
        # A recovery must not wait long for a crashed worker's sticky queue (default 10 s): after
        # this, the next workflow task goes to any worker, which replays the (bounded) history. A
        # recovery crosses three workflows (guardian, budget, runbook), each of which may sit in a
        # dead worker's sticky queue, so this is short (bench/worker_kill_bench.py).
        sticky_queue_schedule_to_start_timeout=timedelta(milliseconds=500),
        workflow_runner=workflow_runner(settings),
        max_cached_workflows=workflow_cache_size(policy, settings),
    )
    if settings.worker_creates_reconcile_schedule:
        await ensure_schedule_exists(client, policy, settings.task_queue)
    log.info("worker polling task queue %r on %s", settings.task_queue, settings.temporal_address)
    metrics = asyncio.create_task(
        run_worker_metrics(
            settings,
            client,
            platform,
            [workflow_type(w) for w in RUNBOOKS],
            workflow_type(FailoverWorkflow),
            stop,
        )
    )
    try:
        async with worker:
            await stop.wait()
    finally:
        if not stop.is_set():
            metrics.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await metrics
        await platform.close()
        tracing.shutdown()


async def ensure_schedule_exists(client: Client, policy: DRPolicy, task_queue: str) -> None:
    """The reconcile schedule, created if missing (``DRCTL_WORKER_CREATES_RECONCILE_SCHEDULE``).
    Without it, standbys a failover used up are never replaced: a failover's last step only
    triggers it. A Temporal that refuses (an API key without the right to create schedules) is
    logged, not fatal: the worker is still what runs every recovery."""
    try:
        done = await create_reconcile_schedule_if_missing(client, policy, task_queue)
    except RPCError as exc:
        log.error("could not create the Temporal Schedule %s: %s", RECONCILE_SCHEDULE_ID, exc)
        return
    log.info("reconcile schedule %s: %s", RECONCILE_SCHEDULE_ID, done)


def main(argv: Sequence[str] | None = None) -> None:
    run_service(
        run_worker,
        argv,
        prog="python -m drctl.workers.runbook_worker",
        description="The Temporal worker: runs drctl's runbook workflows and their activities.",
    )


if __name__ == "__main__":
    main()
