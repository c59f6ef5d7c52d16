"""Each report of a failure is the root of its own trace, and the runbook it opens is in that trace —
also when the model's guardian was started by an earlier report (the guardian receives later reports
as Updates; before the ``guardian-runbook-in-report-trace`` patch their runbooks landed in the trace
of the report that had started the guardian). Real test server, the SDK's tracing interceptor as
drctl sets it up, spans kept in memory."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.payloads import FailoverOutcome, Role, failover_workflow_id, guardian_workflow_id
from drctl.telemetry.tracing import setup_tracing, span
from drctl.temporal.converter import drctl_data_converter
from drctl.temporal.incidents import report_failure, runbook_result, wait_closed
from drctl.workflows.budget import BudgetWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.guardian import ModelGuardianWorkflow
from tests.histories.before_patches import GuardianBeforeReportTrace
from tests.workflows.fakes import FakeFleet
from tests.workflows.test_guardian import report

MODEL = "llama-2-7b"


def in_workflow(spans: Sequence[ReadableSpan], workflow_id: str) -> list[ReadableSpan]:
    return [s for s in spans if (s.attributes or {}).get("temporalWorkflowID") == workflow_id]


def trace_of(s: ReadableSpan) -> int:
    assert s.context is not None
    return s.context.trace_id


async def two_reports(
    env: WorkflowEnvironment, tmp_path: Path, guardian: type
) -> tuple[list[ReadableSpan], str, int, int]:
    """The prober reports llama-2-7b-0 (starting the guardian); once that is recovered, an alert
    reports llama-2-7b-1. Each report under a root span of its own, as the prober and the alert
    receiver make them. Returns every span, the guardian's workflow id and the two roots' trace ids."""
    exporter = InMemorySpanExporter()
    tracing = setup_tracing("test", tmp_path, environ={}, exporter=exporter)
    client = Client(
        **{**env.client.config(), "data_converter": drctl_data_converter, "interceptors": tracing.interceptors()}
    )
    queue = f"trace-{uuid.uuid4().hex[:8]}"
    fleet = FakeFleet.of((f"{MODEL}-0", Role.SERVING), (f"{MODEL}-1", Role.HOT), (f"{MODEL}-2", Role.HOT))
    roots: list[int] = []
    try:
        async with Worker(
            client,
            task_queue=queue,
            workflows=[guardian, BudgetWorkflow, FailoverWorkflow],
            activities=fleet.activities(),
        ):
            for instance, reporter in ((f"{MODEL}-0", "prober"), (f"{MODEL}-1", "alert abc123")):
                with span(f"report by {reporter}", model=MODEL, instance=instance) as root:
                    ticket = await report_failure(client, queue, report(instance, reporter))
                roots.append(root.get_span_context().trace_id)
                incident = await asyncio.wait_for(wait_closed(client, queue, ticket), timeout=30)
                assert (await runbook_result(client, incident)).outcome == FailoverOutcome.RECOVERED
        assert tracing.provider is not None and tracing.provider.force_flush()
    finally:
        tracing.shutdown()
    first, second = roots
    assert first != second
    return list(exporter.get_finished_spans()), guardian_workflow_id(MODEL, queue), first, second


async def test_the_runbook_of_a_later_report_is_in_that_reports_trace(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    spans, guardian_id, first, second = await two_reports(time_skipping_env, tmp_path, ModelGuardianWorkflow)
    for instance, trace in ((f"{MODEL}-0", first), (f"{MODEL}-1", second)):
        runbook = in_workflow(spans, failover_workflow_id(MODEL, instance))
        names = {s.name for s in runbook}
        # The runbook ran and was traced: its run and its steps (the fake activities) are there...
        assert {"RunWorkflow:FailoverWorkflow", "RunActivity:promote_standby", "RunActivity:register_instance"} <= names
        # ...every one of its spans in the trace of the report that opened it.
        assert {trace_of(s) for s in runbook} == {trace}, (instance, sorted(names))
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in in_workflow(spans, guardian_id):
        by_name.setdefault(s.name, []).append(s)
    # The guardian handled each report in that report's trace, and started each child there.
    assert sorted(trace_of(s) for s in by_name["HandleUpdate:report"]) == sorted([first, second])
    assert sorted(trace_of(s) for s in by_name["ValidateUpdate:report"]) == sorted([first, second])
    assert sorted(trace_of(s) for s in by_name["StartChildWorkflow:FailoverWorkflow"]) == sorted([first, second])
    # The second report's client span is the parent of the guardian's start of the second runbook.
    [client_span] = [
        s for s in spans if s.name == "StartUpdateWithStartWorkflow:ModelGuardianWorkflow" and trace_of(s) == second
    ]
    [start_second] = [s for s in by_name["StartChildWorkflow:FailoverWorkflow"] if trace_of(s) == second]
    assert start_second.parent is not None and client_span.context is not None
    assert start_second.parent.span_id == client_span.context.span_id


async def test_before_the_patch_the_later_runbook_was_in_the_first_reports_trace(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """What the patch changes (and what a guardian started before it still does): the second
    runbook lands in the trace of the report that started the guardian."""
    spans, _, first, second = await two_reports(time_skipping_env, tmp_path, GuardianBeforeReportTrace)
    runbook = in_workflow(spans, failover_workflow_id(MODEL, f"{MODEL}-1"))
    assert runbook and {trace_of(s) for s in runbook} == {first}
    assert second not in {trace_of(s) for s in spans if s.name.startswith("RunActivity:")}
