"""Prometheus metrics of the runbook worker and the health prober (``deploy/prometheus/`` scrapes them).

The worker's figures, on ``DRCTL_WORKER_METRICS_PORT`` (9464; 0: off):

============================================== ==========================================================
metric                                         source
============================================== ==========================================================
``drctl_runbooks_total{type,outcome,trigger,   every runbook run that closed since the worker started, from
tier,model}``                                  visibility: the ``DrctlOutcome``/``DrctlTrigger``/``DrctlTier``
                                               search attributes the runbooks set, else the run's status
``drctl_failover_rto_seconds{model}``          a recovered failover's ``FailoverResult.rto_ms`` (histogram)
``drctl_failover_detection_seconds{model}``    its ``rto_ms - switch_ms``: failure to runbook start (histogram)
``drctl_failover_rto_over_target_total{model}`` failovers whose RTO was above the policy's ``rto``
``drctl_instances{model,role}``                the platform's instances by role (``platform.all_instances``)
``drctl_instances_wanted{model,role}``         the policy's: ``replicas`` serving, ``hotStandby``…
``drctl_model_rto_target_seconds{model}``      the policy's ``rto`` per model
``drctl_budget_tripped``                       1 while the blast-radius breaker is tripped (the budget's
                                               ``state`` query); ``drctl_budget_running``/``_waiting``
``drctl_telemetry_errors_total{source}``       reads that failed (visibility, result, fleet, budget)
============================================== ==========================================================

Why visibility and not a workflow interceptor: a workflow's result exists only inside the workflow
sandbox, where metrics are side effects that replays repeat (``is_replaying`` does not cover a
worker that crashes between the last task and its completion) and where ``prometheus_client``
would have to be passed through the sandbox; an activity interceptor never sees a workflow's end.
The runbooks already publish outcome, trigger, tier and RTO as search attributes for ``drctl audit``,
so the worker lists the runs closed since its last look (every :data:`POLL_S`), once per run (by
run id, over a look-back window that covers visibility's lag), and reads the result of a recovered
failover only (one history read per failover) for its detection time. Nothing in the workflows
changes and a replay can never count twice. Runs that closed before the worker started are not
counted: a restarted worker's counters start from zero, as Prometheus expects of a counter.
Every worker of a deployment sees the same runs: with several workers, aggregate with ``max``
across them, not ``sum`` (the shipped rules do).

The serving and standby counts are read from the platform every :data:`FLEET_POLL_S` (the local
registry file, or one list of pods): the reconcile pass's observation happens inside a workflow and
only every 30 s, while the platform is the source it reads itself.

The Temporal SDK's own metrics (task latencies, slots, poll results, ``temporal_workflow_completed``)
come from the SDK's Prometheus exporter on ``DRCTL_WORKER_SDK_METRICS_PORT`` (9465): see
:func:`sdk_runtime`.

The prober's, on ``DRCTL_PROBER_METRICS_PORT`` (9466): see :class:`ProberMetrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server
from temporalio.client import Client, WorkflowExecution
from temporalio.common import SearchAttributeKey
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from drctl.payloads import BudgetState, FailoverOutcome, FailoverResult, Instance, Role, SearchAttr, budget_workflow_id
from drctl.platforms.base import Platform
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings

log = logging.getLogger("drctl.telemetry")

POLL_S = 5.0
"""How often the worker lists the runbooks that closed."""
FLEET_POLL_S = 10.0
"""How often the worker reads the fleet and the budget."""
LOOKBACK = timedelta(minutes=10)
"""Runs that closed this long ago are still looked for (visibility is eventually consistent)."""

RTO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
DETECTION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300)
COUNTED_ROLES = (Role.SERVING, Role.HOT, Role.WARM, Role.COLD, Role.PROMOTING, Role.FAILED)

MODEL_KEY = SearchAttributeKey.for_keyword(SearchAttr.MODEL)
TRIGGER_KEY = SearchAttributeKey.for_keyword(SearchAttr.TRIGGER)
OUTCOME_KEY = SearchAttributeKey.for_keyword(SearchAttr.OUTCOME)
TIER_KEY = SearchAttributeKey.for_keyword(SearchAttr.TIER)
RTO_KEY = SearchAttributeKey.for_int(SearchAttr.RTO_MS)


def serve(registry: CollectorRegistry, host: str, port: int, what: str) -> Callable[[], None] | None:
    """Serve ``registry`` on ``http://host:port/metrics`` from a thread; returns how to stop it.
    Port 0 is off; a port that cannot be bound is logged and metrics stay off: a monitoring port
    must never keep a DR process from running."""
    if not port:
        return None
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("%s metrics: cannot listen on %s:%d (%s); metrics are off", what, host, port, exc)
        return None
    log.info("%s metrics on http://%s:%d/metrics", what, host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)

    return stop


def sdk_runtime(host: str, port: int) -> Runtime | None:
    """A Temporal runtime exporting the SDK's own metrics to Prometheus on ``host:port`` (counters
    with ``_total``, durations in seconds); None when ``port`` is 0 or cannot be bound."""
    if not port:
        return None
    config = PrometheusConfig(bind_address=f"{host}:{port}", counters_total_suffix=True, durations_as_seconds=True)
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=config))
    except Exception as exc:  # the core raises a plain RuntimeError/ValueError on a busy port
        log.error("Temporal SDK metrics: cannot listen on %s:%d (%s); they are off", host, port, exc)
        return None


# -- the worker -----------------------------------------------------------------------------------------


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.runbooks = Counter(
            "drctl_runbooks",
            "Runbook runs that closed, by workflow type, outcome, trigger, standby tier and model",
            ["type", "outcome", "trigger", "tier", "model"],
            registry=r,
        )
        self.rto = Histogram(
            "drctl_failover_rto_seconds",
            "Failure to replacement verified, of recovered failovers",
            ["model"],
            buckets=RTO_BUCKETS,
            registry=r,
        )
        self.detection = Histogram(
            "drctl_failover_detection_seconds",
            "Failure to failover runbook start (RTO minus the switch), of recovered failovers",
            ["model"],
            buckets=DETECTION_BUCKETS,
            registry=r,
        )
        self.over_target = Counter(
            "drctl_failover_rto_over_target",
            "Recovered failovers whose RTO was above the policy's",
            ["model"],
            registry=r,
        )
        self.instances = Gauge("drctl_instances", "Instances on the platform by role", ["model", "role"], registry=r)
        self.wanted = Gauge(
            "drctl_instances_wanted",
            "Instances the policy wants by role (serving, hot, warm, cold)",
            ["model", "role"],
            registry=r,
        )
        self.rto_target = Gauge("drctl_model_rto_target_seconds", "The policy's RTO per model", ["model"], registry=r)
        self.budget_tripped = Gauge("drctl_budget_tripped", "1 while the blast-radius breaker is tripped", registry=r)
        self.budget_running = Gauge("drctl_budget_running", "Recoveries holding a budget lease", registry=r)
        self.budget_waiting = Gauge("drctl_budget_waiting", "Recoveries waiting for the budget", registry=r)
        self.errors = Counter(
            "drctl_telemetry_errors", "Reads for these metrics that failed, by source", ["source"], registry=r
        )
        self.last_poll = Gauge(
            "drctl_telemetry_last_poll_timestamp_seconds",
            "When each source was last read successfully",
            ["source"],
            registry=r,
        )
        for source in ("visibility", "result", "fleet", "budget"):
            self.errors.labels(source)

    def fleet(self, policy: DRPolicy, instances: Iterable[Instance]) -> None:
        """Set the instance counts, wanted and actual, of every model of ``policy`` and ``instances``."""
        counts: dict[tuple[str, str], int] = {}
        for instance in instances:
            key = (instance.model, instance.role.value)
            counts[key] = counts.get(key, 0) + 1
        self.instances.clear()
        self.wanted.clear()
        self.rto_target.clear()
        for model in policy.models:
            wanted = {
                Role.SERVING: model.replicas,
                Role.HOT: model.hot_standby,
                Role.WARM: model.warm_standby,
                Role.COLD: model.cold_standby,
            }
            for role, count in wanted.items():
                self.wanted.labels(model.name, role.value).set(count)
            for role in COUNTED_ROLES:
                self.instances.labels(model.name, role.value).set(counts.pop((model.name, role.value), 0))
            self.rto_target.labels(model.name).set(model.rto.total_seconds())
        for (model_name, role_name), count in counts.items():  # models the policy no longer has
            self.instances.labels(model_name, role_name).set(count)

    def budget(self, state: BudgetState) -> None:
        self.budget_tripped.set(1 if state.tripped else 0)
        self.budget_running.set(len(state.running))
        self.budget_waiting.set(len(state.waiting))


def outcome_of(execution: WorkflowExecution) -> str:
    """The runbook's own outcome (``DrctlOutcome``) when it set one, else its status (``completed``…).
    A run that ended without its final outcome (terminated, timed out) says ``running``: its status
    is the truth then."""
    outcome = execution.typed_search_attributes.get(OUTCOME_KEY)
    if outcome and outcome != FailoverOutcome.RUNNING.value:
        return outcome
    status = execution.status
    return status.name.lower() if status is not None else "unknown"


@dataclass
class RunbookWatcher:
    """Counts the runbook runs that close, from visibility (see the module's docstring)."""

    client: Client
    metrics: WorkerMetrics
    task_queue: str
    types: Sequence[str]
    failover_type: str
    rto_target_s: Callable[[str], float | None]
    """The policy's RTO of a model, in seconds (None: not in the policy)."""
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    """Runs that closed before this are not counted (the worker's start)."""
    seen: dict[str, datetime] = field(default_factory=dict)
    """Run id → close time, of the runs already counted (within the look-back window)."""

    def query(self, now: datetime) -> str:
        after = max(self.since, now - LOOKBACK)
        types = ", ".join(f"'{t}'" for t in self.types)
        return (
            f"WorkflowType IN ({types}) AND TaskQueue = '{self.task_queue}' "
            f"AND ExecutionStatus != 'Running' AND CloseTime >= '{_rfc3339(after)}'"
        )

    async def poll(self, now: datetime | None = None) -> int:
        """Count the runs that closed since the last look; returns how many were new."""
        now = now or datetime.now(UTC)
        new = 0
        async for execution in self.client.list_workflows(self.query(now)):
            if execution.run_id in self.seen:
                continue
            closed = execution.close_time or now
            self.seen[execution.run_id] = closed
            if closed < self.since:
                continue
            await self.record(execution)
            new += 1
        horizon = now - LOOKBACK - timedelta(minutes=1)
        self.seen = {run: closed for run, closed in self.seen.items() if closed >= horizon}
        return new

    async def record(self, execution: WorkflowExecution) -> None:
        attrs = execution.typed_search_attributes
        model = attrs.get(MODEL_KEY) or ""
        outcome = outcome_of(execution)
        self.metrics.runbooks.labels(
            execution.workflow_type, outcome, attrs.get(TRIGGER_KEY) or "", attrs.get(TIER_KEY) or "", model
        ).inc()
        if execution.workflow_type != self.failover_type or outcome != FailoverOutcome.RECOVERED.value:
            return
        rto_s = detection_s = None
        try:
            handle = self.client.get_workflow_handle(execution.id, run_id=execution.run_id, result_type=FailoverResult)
            result = await handle.result(follow_runs=False)
            model = result.model or model
            if result.rto_ms is not None:
                rto_s = result.rto_ms / 1000
                if result.switch_ms is not None:
                    detection_s = max(0.0, result.rto_ms - result.switch_ms) / 1000
        except Exception as exc:
            self.metrics.errors.labels("result").inc()
            log.warning("cannot read the result of %s (%s): RTO from its search attribute", execution.id, exc)
            rto_ms = attrs.get(RTO_KEY)
            rto_s = None if rto_ms is None else rto_ms / 1000
        if rto_s is not None:
            self.metrics.rto.labels(model).observe(rto_s)
            target = self.rto_target_s(model)
            if target is not None and rto_s > target:
                self.metrics.over_target.labels(model).inc()
        if detection_s is not None:
            self.metrics.detection.labels(model).observe(detection_s)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def every(
    seconds: float, stop: asyncio.Event, step: Callable[[], Any], metrics: WorkerMetrics, source: str
) -> None:
    """Run ``step`` (a coroutine function) every ``seconds`` until ``stop``; a failure is counted
    and logged once per streak, never raised."""
    failing = False
    while not stop.is_set():
        try:
            await step()
        except Exception as exc:
            metrics.errors.labels(source).inc()
            if not failing:
                log.warning("metrics: cannot read %s (%s); trying again every %.0fs", source, exc, seconds)
            failing = True
        else:
            metrics.last_poll.labels(source).set(time.time())
            failing = False
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        except TimeoutError:
            pass


async def run_worker_metrics(
    settings: DrctlSettings,
    client: Client,
    platform: Platform,
    types: Sequence[str],
    failover_type: str,
    stop: asyncio.Event,
    metrics: WorkerMetrics | None = None,
) -> None:
    """Serve the worker's metrics and keep them current until ``stop`` (nothing when the port is 0)."""
    metrics = metrics or WorkerMetrics()
    close = serve(metrics.registry, settings.host, settings.worker_metrics_port, "worker")
    if close is None:
        return
    targets: dict[str, float] = {}
    watcher = RunbookWatcher(client, metrics, settings.task_queue, types, failover_type, targets.get)
    budget = client.get_workflow_handle(budget_workflow_id(settings.task_queue))

    async def read_fleet() -> None:
        policy = await platform.current_policy()
        targets.clear()
        targets.update({m.name: m.rto.total_seconds() for m in policy.models})
        metrics.fleet(policy, await platform.all_instances())

    async def read_budget() -> None:
        metrics.budget(await budget.query("state", result_type=BudgetState))

    try:
        await asyncio.gather(
            every(POLL_S, stop, watcher.poll, metrics, "visibility"),
            every(FLEET_POLL_S, stop, read_fleet, metrics, "fleet"),
            every(FLEET_POLL_S, stop, read_budget, metrics, "budget"),
        )
    finally:
        await asyncio.to_thread(close)


# -- the prober -----------------------------------------------------------------------------------------


class ProberMetrics:
    """The health prober's figures (``DRCTL_PROBER_METRICS_PORT``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.probes = Counter(
            "drctl_probes",
            "Probes by model, instance and result (healthy, unhealthy, exited: the process is gone)",
            ["model", "instance", "result"],
            registry=r,
        )
        self.detections = Counter(
            "drctl_prober_detections",
            "Instances confirmed down, by what the prober did (reported, held (flapping))",
            ["model", "action"],
            registry=r,
        )
        self.reported = Counter(
            "drctl_prober_failures_reported", "Failures the models' guardians accepted", ["model"], registry=r
        )
        self.report_errors = Counter(
            "drctl_prober_report_errors", "Reports that did not get through (tried again)", registry=r
        )
        self.unreported = Gauge(
            "drctl_prober_unreported_failures", "Confirmed failures not yet accepted by a guardian", registry=r
        )
        self.held_for_zone_failover = Gauge(
            "drctl_prober_failures_held_for_zone_failover",
            "Confirmed failures held while the zone failover the prober started for their zone runs",
            registry=r,
        )
        self.last_tick = Gauge(
            "drctl_prober_last_tick_timestamp_seconds", "When the prober last went round its instances", registry=r
        )
        self.zone_verdict = Gauge(
            "drctl_zone_verdict",
            "1 for each zone's current verdict (up, down, unknown), 0 for the others",
            ["zone", "verdict"],
            registry=r,
        )
        self.zone_checks = Gauge("drctl_zone_checks", "Zone health checks done since the prober started", registry=r)

    def zones(self, verdicts: dict[str, str], checks: int) -> None:
        for zone, verdict in verdicts.items():
            for name in ("up", "down", "unknown"):
                self.zone_verdict.labels(zone, name).set(1 if verdict == name else 0)
        self.zone_checks.set(checks)
