"""The nemesis in CI: a few seeded rounds of faults and duplicate triggers on a real stack under load,
the invariants checked after each (``bench/chaos.py`` runs many more); the checks themselves shown
to fail on broken state; and the guardian bug the nemesis found, pinned on the time-skipping server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import (
    Interceptor,
    SignalChildWorkflowInput,
    Worker,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from drctl.activities.local import processes
from drctl.activities.local.platform import LocalPlatform
from drctl.payloads import (
    FailoverOutcome,
    FailoverRequest,
    FailureReport,
    GuardianState,
    IncidentState,
    Instance,
    ReconcileAction,
    ReconcileActionKind,
    Role,
    Trigger,
    guardian_workflow_id,
)
from drctl.policies.loader import load_policy_file
from drctl.settings import DrctlSettings
from drctl.temporal.incidents import guardian_state, report_failure, runbook_result
from drctl.workflows.budget import BudgetWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.guardian import ModelGuardianWorkflow
from tests.workflows.fakes import FakeFleet

# -- the guardian bug the nemesis found (seed 1, round 3) ------------------------------------------


class _LateChildSignals(WorkflowOutboundInterceptor):
    async def signal_child_workflow(self, input: SignalChildWorkflowInput) -> None:
        await workflow.sleep(timedelta(seconds=30))  # the runbook ends meanwhile
        await super().signal_child_workflow(input)


class _Inbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_LateChildSignals(outbound))


class LateChildSignals(Interceptor):
    """Every signal a workflow sends its child lands 30 s (skipped) late: after a quick child ended."""

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return _Inbound


def _report(instance: str, reporter: str) -> FailureReport:
    request = FailoverRequest(model="llama-2-7b", instance=instance, confirmed=True, trigger=Trigger.PROBE)
    return FailureReport(request=request, reporter=reporter)


async def test_a_runbook_that_ends_before_its_joined_signal_does_not_fail_the_guardian(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """A report joined an incident while it was queued; the guardian tells the runbook once it runs.
    A hot failover can end before that signal lands (on the real stack under load it did, between
    two of three signals): the guardian failed with ``ExternalWorkflowExecutionNotFound``, its
    incident stuck in the queue, and the model without a guardian."""
    fleet = FakeFleet.of(
        ("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.SERVING), ("llama-2-7b-2", Role.HOT),
        ("llama-2-7b-3", Role.HOT),
    )  # fmt: skip
    fleet.promote_gate = asyncio.Event()  # the first runbook holds, the second incident queues behind it
    queue = f"nemesis-{uuid.uuid4().hex[:8]}"
    client = time_skipping_env.client
    async with Worker(
        client,
        task_queue=queue,
        workflows=[ModelGuardianWorkflow, BudgetWorkflow, FailoverWorkflow],
        activities=fleet.activities(),
        interceptors=[LateChildSignals()],
    ):
        await report_failure(client, queue, _report("llama-2-7b-0", "prober"))
        await report_failure(client, queue, _report("llama-2-7b-1", "prober"))
        duplicate = await report_failure(client, queue, _report("llama-2-7b-1", "alert abc"))
        assert duplicate.joined and duplicate.state == IncidentState.QUEUED
        fleet.promote_gate.set()
        state = await _guardian_when(
            client, queue, lambda s: bool(s.queue) and s.queue[0].instance == "llama-2-7b-1" and bool(s.queue[0].run_id)
        )
        await asyncio.sleep(0.3)  # the second runbook ends; its joined signal waits on the skipped timer
        await time_skipping_env.sleep(60)
        state = await _guardian_when(client, queue, lambda s: len(s.recent) == 2)
        description = await client.get_workflow_handle(guardian_workflow_id("llama-2-7b", queue)).describe()
    assert description.status == WorkflowExecutionStatus.RUNNING
    assert [i.outcome for i in state.recent] == [FailoverOutcome.RECOVERED, FailoverOutcome.RECOVERED]
    assert state.recent[1].joined == ["alert abc"] and not state.queue


async def test_a_signal_during_a_hot_failover_does_not_run_it_again_on_a_changed_fleet(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """A report joins while the hot failover runs (its local activities inside one open workflow
    task). The task's completion is refused (``UnhandledCommand``: a new signal) and the task runs
    again: before the fix it listed the fleet the first run had already changed and ended
    ``already-ejected``, so the promotion that recovered the model was in no audit (nemesis seed 1,
    round 3). Now the listing is recorded before any change, and the second run finishes the same."""
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.HOT))
    fleet.promote_gate = asyncio.Event()
    queue = f"nemesis-{uuid.uuid4().hex[:8]}"
    client = time_skipping_env.client
    async with Worker(
        client,
        task_queue=queue,
        workflows=[ModelGuardianWorkflow, BudgetWorkflow, FailoverWorkflow],
        activities=fleet.activities(),
    ):
        await report_failure(client, queue, _report("llama-2-7b-0", "prober"))
        for _ in range(200):  # the runbook is in its promote step, its workflow task open
            if ("promote", "llama-2-7b-1") in fleet.calls:
                break
            await asyncio.sleep(0.02)
        duplicate = await report_failure(client, queue, _report("llama-2-7b-0", "alert abc"))
        assert duplicate.joined and duplicate.state == IncidentState.RUNNING  # the runbook was signalled
        fleet.promote_gate.set()
        state = await _guardian_when(client, queue, lambda s: len(s.recent) == 1)
        result = await runbook_result(client, state.recent[0])
    [incident] = state.recent
    assert incident.outcome == FailoverOutcome.RECOVERED, result.reason
    assert result.promoted == "llama-2-7b-1" and result.joined == ["alert abc"]
    assert fleet.instances["llama-2-7b-1"].role == Role.SERVING
    assert fleet.instances["llama-2-7b-2"].role == Role.HOT  # one failure, one promotion
    assert fleet.instances["llama-2-7b-0"].role == Role.FAILED


async def _guardian_when(
    client: Client, queue: str, ok: Callable[[GuardianState], bool], model: str = "llama-2-7b"
) -> GuardianState:
    state = None
    for _ in range(200):
        state = await guardian_state(client, queue, model)
        if state is not None and ok(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"the guardian never got there: {state}")


# -- the reconcile delete bug the nemesis found (seed 1, round 1) ------------------------------------


def _eds_ports(platform: LocalPlatform, model: str) -> set[int]:
    document = yaml.safe_load(platform.layout.eds_file(model).read_text())
    return {
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for locality in document["resources"][0]["endpoints"]
        for e in locality["lb_endpoints"]
    }


async def test_a_delete_cut_short_by_a_worker_crash_is_finished_by_its_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reconcile moves a misplaced hot standby: create the replacement, then delete the old one. The
    worker was killed inside the delete, after the registry forgot the instance and before the EDS
    file and the process followed; the retry found it "already gone", and Envoy kept a ghost hot
    standby (a third at priority 1, the policy wants two) whose process nothing would stop."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("models:\n  - name: alpha\n    hotStandby: 1\n")
    settings = DrctlSettings(policy=policy_file, state_dir=tmp_path / "state")
    platform = LocalPlatform(settings, load_policy_file(policy_file))
    pid = processes.spawn(["sleep", "60"], tmp_path / "standby.log")
    try:
        with platform.registry.edit() as instances:
            instances["alpha-1"] = Instance(
                id="alpha-1", model="alpha", role=Role.HOT, port=45678, pid=pid, lb_priority=1
            )
        platform.sync_load_balancer("alpha")
        assert _eds_ports(platform, "alpha") == {45678}
        delete = ReconcileAction(
            kind=ReconcileActionKind.DELETE, model="alpha", instance="alpha-1", tier=Role.HOT, epoch=0, reason="moved"
        )

        def worker_killed(model: str) -> None:
            raise RuntimeError("the worker died here")

        monkeypatch.setattr(platform, "sync_load_balancer", worker_killed)
        with pytest.raises(RuntimeError):
            await platform.delete_instance(delete)
        monkeypatch.undo()
        assert processes.is_alive(pid)
        await platform.delete_instance(delete)  # the activity's retry on the restarted worker

        assert "alpha-1" not in platform.registry.load()
        assert _eds_ports(platform, "alpha") == set()
        assert not processes.is_alive(pid)
    finally:
        processes.terminate(pid, grace_s=0.5)
        await platform.aclose()
