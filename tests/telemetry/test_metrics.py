"""The worker's and the prober's Prometheus figures, without a stack."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from drctl.payloads import FailoverOutcome, FailoverResult, Instance, Role
from drctl.policies.loader import load_policy_file
from drctl.telemetry.metrics import (
    MODEL_KEY,
    OUTCOME_KEY,
    RTO_KEY,
    TIER_KEY,
    TRIGGER_KEY,
    ProberMetrics,
    RunbookWatcher,
    WorkerMetrics,
    sdk_runtime,
    serve,
)
from drctl.workers.stack import free_ports

POLICY = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"
NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_fleet_counts_against_the_policy() -> None:
    policy = load_policy_file(POLICY)
    model = policy.models[0]
    metrics = WorkerMetrics()
    instances = [Instance(id="a", model=model.name, role=Role.SERVING), Instance(id="b", model="gone", role=Role.HOT)]
    metrics.fleet(policy, instances)
    r = metrics.registry
    assert _value(r, "drctl_instances", model=model.name, role="serving") == 1
    assert _value(r, "drctl_instances", model=model.name, role="hot") == 0
    assert _value(r, "drctl_instances_wanted", model=model.name, role="serving") == model.replicas
    assert _value(r, "drctl_instances_wanted", model=model.name, role="hot") == model.hot_standby
    assert _value(r, "drctl_model_rto_target_seconds", model=model.name) == model.rto.total_seconds()
    assert _value(r, "drctl_instances", model="gone", role="hot") == 1


@dataclass
class FakeExecution:
    id: str
    run_id: str
    workflow_type: str
    status: WorkflowExecutionStatus
    close_time: datetime
    typed_search_attributes: TypedSearchAttributes


@dataclass
class FakeHandle:
    result_value: FailoverResult

    async def result(self, follow_runs: bool = True) -> FailoverResult:
        return self.result_value


@dataclass
class FakeClient:
    executions: list[FakeExecution]
    results: dict[str, FailoverResult] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)

    def list_workflows(self, query: str) -> AsyncIterator[FakeExecution]:
        self.queries.append(query)

        async def listing() -> AsyncIterator[FakeExecution]:
            for execution in self.executions:
                yield execution

        return listing()

    def get_workflow_handle(self, workflow_id: str, **_: Any) -> FakeHandle:
        return FakeHandle(self.results[workflow_id])


def _attrs(**values: Any) -> TypedSearchAttributes:
    keys = {"model": MODEL_KEY, "outcome": OUTCOME_KEY, "trigger": TRIGGER_KEY, "tier": TIER_KEY, "rto": RTO_KEY}
    return TypedSearchAttributes([SearchAttributePair(keys[k], v) for k, v in values.items()])  # type: ignore[misc]


async def test_closed_runbooks_are_counted_once_with_rto_and_detection() -> None:
    recovered = FakeExecution(
        "failover-m-a", "r1", "FailoverWorkflow", WorkflowExecutionStatus.COMPLETED, NOW,
        _attrs(model="m", outcome="recovered", trigger="probe", tier="hot", rto=12000),
    )  # fmt: skip
    terminated = FakeExecution(
        "failover-m-b", "r2", "FailoverWorkflow", WorkflowExecutionStatus.TERMINATED, NOW,
        _attrs(model="m", outcome="running", trigger="alert"),
    )  # fmt: skip
    before = FakeExecution(
        "drain-gpu-x", "r0", "DrainGpuWorkflow", WorkflowExecutionStatus.COMPLETED, NOW - timedelta(hours=1),
        _attrs(),
    )  # fmt: skip
    result = FailoverResult(
        model="m", instance="a", outcome=FailoverOutcome.RECOVERED, started_at=NOW, rto_ms=12000.0, switch_ms=2000.0
    )
    client = FakeClient([recovered, terminated, before], {"failover-m-a": result})
    metrics = WorkerMetrics()
    watcher = RunbookWatcher(
        client,  # type: ignore[arg-type]
        metrics,
        "drctl",
        ["FailoverWorkflow", "DrainGpuWorkflow"],
        "FailoverWorkflow",
        {"m": 10.0}.get,
        since=NOW - timedelta(minutes=1),
    )
    assert await watcher.poll(NOW) == 2
    assert await watcher.poll(NOW) == 0  # seen: never counted twice
    r = metrics.registry
    labels = {"type": "FailoverWorkflow", "model": "m"}
    assert _value(r, "drctl_runbooks_total", **labels, outcome="recovered", trigger="probe", tier="hot") == 1
    assert _value(r, "drctl_runbooks_total", **labels, outcome="terminated", trigger="alert", tier="") == 1
    assert _value(r, "drctl_failover_rto_seconds_sum", model="m") == 12.0
    assert _value(r, "drctl_failover_detection_seconds_sum", model="m") == 10.0
    assert _value(r, "drctl_failover_rto_over_target_total", model="m") == 1
    query = client.queries[0]
    assert "WorkflowType IN ('FailoverWorkflow', 'DrainGpuWorkflow')" in query
    assert "TaskQueue = 'drctl'" in query and "CloseTime >= '2025-01-01T11:59:00.000000Z'" in query


def test_serve_exposes_the_registry_and_port_zero_is_off() -> None:
    assert serve(CollectorRegistry(), "127.0.0.1", 0, "test") is None
    assert sdk_runtime("127.0.0.1", 0) is None
    metrics = ProberMetrics()
    metrics.zones({"az-1": "up", "az-2": "down"}, 3)
    [port] = free_ports(1)
    stop = serve(metrics.registry, "127.0.0.1", port, "test")
    assert stop is not None
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        stop()
    assert 'drctl_zone_verdict{verdict="down",zone="az-2"} 1.0' in body
    assert 'drctl_zone_verdict{verdict="up",zone="az-2"} 0.0' in body
    assert "drctl_zone_checks 3.0" in body


def test_a_busy_port_leaves_metrics_off_instead_of_failing() -> None:
    [port] = free_ports(1)
    first = serve(CollectorRegistry(), "127.0.0.1", port, "first")
    try:
        assert serve(CollectorRegistry(), "127.0.0.1", port, "second") is None
    finally:
        assert first is not None
        first()
