"""The drill's activities: choose a target, inject the fault under load and measure the recovery,
restore what was injected, and write the report.

A drill runs on a platform that offers fault injection (``Platform.fault_injector()``): the local
platform does (processes, node agents and checkpoints are on this machine); on Kubernetes it is
opt-in (:mod:`drctl.platforms.kubernetes.faults`: pods deleted, Nodes cordoned, tainted and marked
NotReady, Xids through the node agent DaemonSet, a serving pod's own copy of the weights corrupted
through ``pods/exec``), and ``drill_prepare`` refuses with how to opt in where it is off, or with
why where the platform cannot inject the scenario, before any load is sent.

The recovery is measured from the outside: the load generator's answers (through the load
balancer: ``DRCTL_DRILL_LB_URL``, on a cluster the model's Service, else the local stack's Envoy),
and the runbooks the fault started as Temporal records them (workflow start times and the
failover's own step timings). Temporal's timestamps and this process's clock are the same
machine's clock on the local platform; on a cluster they are two machines' clocks, so the figures
are off by their skew (NTP keeps it to milliseconds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from drctl.activities.load import LoadGenerator, Sample, StreamSample
from drctl.payloads import (
    ActivityName,
    DrillMeasurement,
    DrillPlan,
    DrillReport,
    DrillReportRequest,
    DrillRequest,
    DrillRestore,
    DrillScenario,
    DrillTarget,
    ErrorType,
    FailoverOutcome,
    FailoverResult,
    InjectedFault,
    ReconcileResult,
    RunbookMark,
    drain_workflow_id,
    failover_workflow_id,
    gpu_of_drain_workflow_id,
    zone_failover_workflow_id,
)
from drctl.platforms.base import Platform
from drctl.policies.drills import (
    DrillImpossible,
    DrillNotReady,
    bucketize,
    choose_target,
    ms_between,
    redundancy_missing,
    verdicts,
)
from drctl.settings import DrctlSettings, StateLayout
from drctl.temporal.refs import workflow_type
from drctl.workflows.drain import DrainGpuWorkflow
from drctl.workflows.reconcile import ReconcileStandbysWorkflow
from drctl.workflows.zone import ZoneFailoverWorkflow

POLL_S = 0.1

T = TypeVar("T")


KUBERNETES_OPT_IN = (
    "fault injection on a cluster is opt-in and off: apply the deploy/kubernetes/drills component (the Role "
    "and ClusterRole that let the worker delete pods, exec into them, and cordon, taint and mark Nodes "
    "NotReady) and set "
    "DRCTL_KUBERNETES_FAULT_INJECTION=true for the worker (docs/deploy.md, “Drills on a cluster”)"
)


def not_ready(why: str) -> ApplicationError:
    return ApplicationError(why, type=ErrorType.DRILL_NOT_READY, non_retryable=True)


def no_fault_injection(platform: str) -> str:
    """Why a platform without a fault injector cannot drill, and how to change that where one can."""
    if platform == "kubernetes":
        return KUBERNETES_OPT_IN
    return f"this platform ({platform}) cannot inject faults: drills run on the local platform and on Kubernetes"


class DrillActivities:
    def __init__(self, platform: Platform, settings: DrctlSettings, client: Client) -> None:
        self.platform = platform
        self.settings = settings
        self.client = client
        self.layout = StateLayout(settings.state_dir)

    def all(self) -> list[Any]:
        return [self.drill_prepare, self.drill_run, self.drill_restore, self.drill_report]

    # -- prepare ---------------------------------------------------------------------------------

    @activity.defn(name=ActivityName.DRILL_PREPARE)
    async def drill_prepare(self, request: DrillRequest) -> DrillTarget:
        injector = self.platform.fault_injector()
        if injector is None:
            raise not_ready(no_fault_injection(self.settings.platform))
        refused = injector.refusal(request.scenario)
        if refused is not None:
            raise not_ready(refused)
        deadline = time.monotonic() + request.ready_wait_s
        while True:
            policy = await self.platform.current_policy()
            try:
                return choose_target(
                    policy,
                    await self.platform.all_instances(),
                    await self.platform.cordoned_gpus(),
                    request.scenario,
                    request.model,
                )
            except DrillNotReady as exc:
                if isinstance(exc, DrillImpossible) or time.monotonic() >= deadline:
                    raise not_ready(str(exc)) from exc
                activity.heartbeat({"phase": f"waiting for the fleet: {exc}"})
                await asyncio.sleep(0.5)

    # -- run: load, inject, observe ----------------------------------------------------------------

    @activity.defn(name=ActivityName.DRILL_RUN)
    async def drill_run(self, plan: DrillPlan) -> DrillMeasurement:
        """Not retried (a fault is injected once). Whatever breaks after the injection began is
        reported in the measurement, with the fault as far as it went, so the workflow restores it."""
        request, target = plan.request, plan.target
        load = LoadGenerator(self.settings.drill_load_url(target.model), target.model, request.rps)
        load.start()
        heartbeat = _Heartbeat()
        fault = InjectedFault(injected_at=datetime.now(UTC))
        fault_mono = injected_mono = time.monotonic()
        measurement = DrillMeasurement(fault=fault, recovered=False)
        try:
            await heartbeat.sleep(request.baseline_s, "baseline load")
            fault.injected_at, fault_mono = datetime.now(UTC), time.monotonic()
            heartbeat.fault = fault
            await self._inject(target, fault)
            injected_mono = time.monotonic()
            activity.heartbeat({"phase": "injected", "fault": fault.model_dump(mode="json")})
            measurement = await self._observe(request, target, fault, heartbeat)
            await heartbeat.sleep(request.tail_s, "tail load")
        except Exception as exc:
            activity.logger.exception("drill run broke off")
            measurement.error = f"{type(exc).__name__}: {exc}"
        finally:
            samples = await load.stop()
        measurement.buckets = bucketize(((s.sent_at, s.ok) for s in samples), fault_mono)
        after = [s for s in samples if s.sent_at >= fault_mono]
        measurement.requests = len(after)
        measurement.failed_requests = sum(1 for s in samples if not s.ok and s.sent_at >= injected_mono)
        measurement.lost_in_flight = sum(1 for s in samples if not s.ok and s.sent_at < injected_mono)
        measurement.worst_latency_ms = max((round(s.latency_s * 1000, 1) for s in after if s.ok), default=None)
        measurement.notes += _failure_summary(samples, fault_mono)
        _count_streams(measurement, load.stream_samples, fault_mono, injected_mono)
        return measurement

    async def _inject(self, target: DrillTarget, fault: InjectedFault) -> None:
        injector = self.platform.fault_injector()
        if injector is None:
            raise RuntimeError("this platform cannot inject faults")
        await injector.inject(target, fault)

    async def _observe(
        self, request: DrillRequest, target: DrillTarget, fault: InjectedFault, heartbeat: _Heartbeat
    ) -> DrillMeasurement:
        """Poll until the serving instance's failover ended and the model's redundancy is back (and,
        for a zone outage, the zone failover ended), or the drill's timeout."""
        t0 = fault.injected_at
        deadline = time.monotonic() + request.timeout_s
        failover_id = failover_workflow_id(target.model, target.instance)
        result: FailoverResult | None = None
        zone_done = target.scenario != DrillScenario.ZONE_OUTAGE
        redundancy_at: datetime | None = None
        missing: list[str] = []
        phase = "waiting for the failover"
        policy = await self.platform.current_policy()
        while time.monotonic() < deadline:
            if result is None:
                result = await self._failover_result(failover_id, t0)
            if not zone_done:
                zone_done = await self._completed_since(zone_failover_workflow_id(target.zone or ""), t0)
            if result is not None and zone_done:
                missing = redundancy_missing(
                    policy, await self.platform.all_instances(), target.model, await self.platform.cordoned_gpus()
                )
                if not missing:
                    redundancy_at = datetime.now(UTC)
                    break
                phase = f"waiting for redundancy: {'; '.join(missing)}"
            elif result is not None:
                phase = "waiting for the zone failover (zone checks, then the workflow)"
            await heartbeat.sleep(POLL_S, phase)
        measurement = DrillMeasurement(fault=fault, recovered=False)
        if result is None:
            measurement.notes.append(f"{failover_id} did not finish within {request.timeout_s:g}s")
        elif redundancy_at is None:
            measurement.notes.append(f"redundancy not back within {request.timeout_s:g}s: {'; '.join(missing)}")
        await self._figures(measurement, target, t0, result, redundancy_at, heartbeat)
        return measurement

    async def _failover_result(self, workflow_id: str, since: datetime) -> FailoverResult | None:
        """The failover of the target once every run of it since the fault has finished: the run that
        recovered it, else the latest. (Two detectors can each start one: the zone failover's child
        recovers it, then the prober's run finds it already ejected.)"""
        query = f"WorkflowId = '{workflow_id}' AND StartTime >= '{(since - timedelta(seconds=1)).isoformat()}'"
        runs = [wf async for wf in self.client.list_workflows(query)]
        if not runs or any(wf.status == WorkflowExecutionStatus.RUNNING for wf in runs):
            return None
        results: list[FailoverResult] = []
        for wf in sorted(runs, key=lambda wf: wf.start_time):
            if wf.status == WorkflowExecutionStatus.COMPLETED:
                handle = self.client.get_workflow_handle(wf.id, run_id=wf.run_id, result_type=FailoverResult)
                results.append(await handle.result())
        recovered = [r for r in results if r.outcome == FailoverOutcome.RECOVERED]
        return recovered[0] if recovered else (results[-1] if results else None)

    async def _completed_since(self, workflow_id: str, since: datetime) -> bool:
        """Whether ``workflow_id``'s latest run started after ``since`` and has completed."""
        try:
            info = await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError:
            return False
        return info.start_time >= since - timedelta(seconds=1) and info.status == WorkflowExecutionStatus.COMPLETED

    async def _figures(
        self,
        m: DrillMeasurement,
        target: DrillTarget,
        t0: datetime,
        result: FailoverResult | None,
        redundancy_at: datetime | None,
        heartbeat: _Heartbeat,
    ) -> None:
        starts: dict[str, datetime] = {}
        since = (t0 - timedelta(seconds=1)).isoformat()
        async for wf in self.client.list_workflows(f"StartTime >= '{since}'"):
            starts[wf.id] = wf.start_time
            m.runbooks.append(f"{wf.workflow_type} {wf.id}")
            if wf.workflow_type == workflow_type(ZoneFailoverWorkflow):
                m.zones_failed_over.append(wf.id.removeprefix(zone_failover_workflow_id("")))
            if wf.workflow_type == workflow_type(DrainGpuWorkflow):
                m.gpus_drained.append(gpu_of_drain_workflow_id(wf.id))
            m.marks.append(
                RunbookMark(
                    runbook=wf.id,
                    step=f"{wf.workflow_type} started",
                    at_ms=ms_between(t0, wf.start_time) or 0,
                    duration_ms=0,
                )
            )
            if wf.workflow_type == workflow_type(ReconcileStandbysWorkflow):
                handle = self.client.get_workflow_handle(wf.id, run_id=wf.run_id, result_type=ReconcileResult)
                try:
                    outcome = await heartbeat.wait(handle.result(), 30, f"waiting for {wf.id}'s result")
                except Exception as exc:  # still running, failed: say so rather than guess
                    m.notes.append(f"{wf.id}: no result ({type(exc).__name__})")
                    continue
                m.notes += [f"{wf.id}: {line}" for line in outcome.applied if line.startswith("restore")]
                m.notes += [f"{wf.id} failed: {line}" for line in outcome.failed]
        causes = [failover_workflow_id(target.model, target.instance)]
        if target.gpu:
            causes.append(drain_workflow_id(target.gpu))
        if target.zone:
            causes.append(zone_failover_workflow_id(target.zone))
        detected = min((starts[c] for c in causes if c in starts), default=None)
        if target.scenario == DrillScenario.ZONE_OUTAGE and target.zone:
            m.zone_failover_ms = ms_between(t0, starts.get(zone_failover_workflow_id(target.zone)))
        m.detection_ms = ms_between(t0, detected)
        if result is not None:
            m.promoted, m.promoted_tier = result.promoted, (result.tier.value if result.tier else None)
            for step in result.steps:
                m.marks.append(
                    RunbookMark(
                        runbook=result.instance,
                        step=step.step,
                        at_ms=ms_between(t0, step.started_at) or 0,
                        duration_ms=step.duration_ms,
                        ok=step.ok,
                    )
                )
            verify = [s for s in result.steps if s.step == "verify" and s.ok]
            if result.outcome == FailoverOutcome.RECOVERED and verify and detected is not None:
                served_at = verify[-1].started_at + timedelta(milliseconds=verify[-1].duration_ms)
                m.rto_ms = ms_between(t0, served_at)
                m.switch_ms = ms_between(detected, served_at)
            m.recovered = result.outcome == FailoverOutcome.RECOVERED and redundancy_at is not None
        m.redundancy_ms = ms_between(t0, redundancy_at)
        m.marks.sort(key=lambda mark: mark.at_ms)

    # -- restore ----------------------------------------------------------------------------------

    @activity.defn(name=ActivityName.DRILL_RESTORE)
    async def drill_restore(self, fault: InjectedFault) -> DrillRestore:
        """Undo exactly what was injected; idempotent (retried until it succeeds)."""
        injector = self.platform.fault_injector()
        if injector is None:
            return DrillRestore(detail=["nothing to restore: this platform injects no faults"])
        return await injector.restore(fault)

    # -- report ------------------------------------------------------------------------------------

    @activity.defn(name=ActivityName.DRILL_REPORT)
    async def drill_report(self, request: DrillReportRequest) -> DrillReport:
        from drctl.activities.drill_report import write_report

        policy = await self.platform.current_policy()
        hot = policy.model(request.target.model).hot_standby > 0
        report = DrillReport(
            drill_id=request.drill_id,
            scenario=request.target.scenario,
            target=request.target,
            measurement=request.measurement,
            restore=request.restore,
            error=request.error,
        )
        if request.measurement is not None:
            report.verdicts = verdicts(request.target, request.measurement, hot)
        report.passed = (
            request.error is None
            and bool(report.verdicts)
            and all(v.startswith("pass") for v in report.verdicts.values())
        )
        folder = self.layout.root / "drills" / request.drill_id
        report.files = await asyncio.to_thread(write_report, report, folder)
        return report


class _Heartbeat:
    """Heartbeats carry the fault once it is injected: if this worker dies mid-drill, the workflow
    finds it in the activity's last heartbeat details and restores it all the same."""

    def __init__(self) -> None:
        self.fault: InjectedFault | None = None

    def beat(self, phase: str) -> None:
        details: dict[str, Any] = {"phase": phase}
        if self.fault is not None:
            details["fault"] = self.fault.model_dump(mode="json")
        activity.heartbeat(details)

    async def sleep(self, seconds: float, phase: str) -> None:
        end = time.monotonic() + seconds
        while True:
            self.beat(phase)
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.5))

    async def wait(self, awaitable: Awaitable[T], timeout_s: float, phase: str) -> T:
        """``awaitable``'s result, heartbeating while it comes: a wait longer than the heartbeat
        timeout (a reconcile still loading a standby) must not look like a lost run. Raises
        ``TimeoutError`` after ``timeout_s``."""
        task = asyncio.ensure_future(awaitable)
        end = time.monotonic() + timeout_s
        try:
            while not task.done():
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{phase}: no answer within {timeout_s:g}s")
                self.beat(phase)
                await asyncio.wait({task}, timeout=min(left, 0.5))
            return task.result()
        finally:
            task.cancel()


def _failure_summary(samples: list[Sample], fault_at: float, first: int = 10) -> list[str]:
    """Failed requests by status, and the first few: when sent (from the fault), how long, why."""
    failed = [s for s in samples if not s.ok]
    if not failed:
        return []
    by_status: dict[str, int] = {}
    for s in failed:
        by_status[str(s.status)] = by_status.get(str(s.status), 0) + 1
    lines = [f"failed requests by status: {by_status}"]
    lines += [
        f"failed request sent at {(s.sent_at - fault_at) * 1000:+.0f} ms, after {s.latency_s * 1000:.0f} ms: "
        f"{s.status} {s.error}".rstrip()
        for s in failed[:first]
    ]
    return lines


def _count_streams(m: DrillMeasurement, streams: list[StreamSample], fault_at: float, injected_at: float) -> None:
    """The streams' share: cut at the fault, failed after it, and served by the replacement."""
    open_at_fault = [s for s in streams if s.opened_at < injected_at and s.ended_at >= fault_at]
    after = [s for s in streams if s.opened_at >= injected_at]
    m.streams_cut = sum(1 for s in open_at_fault if not s.completed)
    m.streams = len(after)
    m.streams_failed = sum(1 for s in after if not s.completed)
    m.streams_by_replacement = sum(1 for s in after if s.completed and m.promoted and s.served_by == m.promoted)
    failed = [s for s in after if not s.completed][:3]
    m.notes += [
        f"stream opened {(s.opened_at - fault_at) * 1000:+.0f} ms from the fault ended after {s.chunks} chunk(s): "
        f"{s.status} {s.error}".rstrip()
        for s in failed
    ]
