"""One recovery per failure: every report goes through the model's guardian, every promotion is
fenced, and the budget delays (never drops) what does not fit. Time-skipping server, fake platform."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.payloads import (
    BudgetReset,
    BudgetState,
    ErrorType,
    FailoverOutcome,
    FailoverRequest,
    FailoverResult,
    FailureReport,
    IncidentState,
    IncidentTicket,
    Instance,
    Role,
    Trigger,
    budget_workflow_id,
    failover_workflow_id,
)
from drctl.temporal.incidents import (
    budget_state,
    guardian_state,
    report_failure,
    runbook_result,
    wait_closed,
    wait_running,
)
from drctl.workflows.budget import BudgetWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.guardian import ModelGuardianWorkflow
from tests.workflows.fakes import FakeFleet


@asynccontextmanager
async def guarded(env: WorkflowEnvironment, fleet: FakeFleet) -> AsyncIterator[tuple[Client, str]]:
    queue = f"guard-{uuid.uuid4().hex[:8]}"  # guardians and the budget are per task queue
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[ModelGuardianWorkflow, BudgetWorkflow, FailoverWorkflow],
        activities=fleet.activities(),
    ):
        yield env.client, queue


def report(instance: str, reporter: str, model: str = "llama-2-7b") -> FailureReport:
    # Regular activities: a promotion the test holds must not hold a (local-activity) workflow task.
    request = FailoverRequest(
        model=model, instance=instance, confirmed=True, trigger=Trigger.PROBE, local_activities=False
    )
    return FailureReport(request=request, reporter=reporter)


async def budget_when(client: Client, queue: str, ok: Callable[[BudgetState], bool]) -> BudgetState:
    """The budget once ``ok`` holds (its signals land a moment after the runbooks end)."""
    state = None
    for _ in range(200):
        state = await budget_state(client, queue)
        if state is not None and ok(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"the budget never got there: {state}")


async def result_of(client: Client, queue: str, ticket: IncidentTicket) -> FailoverResult:
    """The result of the ticket's runbook, once its guardian has closed the incident (the test
    server is shared: an earlier test's run under the same workflow id must not be read instead)."""
    incident = await asyncio.wait_for(wait_closed(client, queue, ticket), timeout=30)
    return await runbook_result(client, incident)


async def test_two_detectors_reporting_one_crash_promote_one_standby(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(
        ("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.WARM)
    )  # seen: the prober's runbook promoted the hot standby, the alert's the warm one
    fleet.promote_gate = asyncio.Event()  # hold the first promotion while the duplicates arrive
    async with guarded(time_skipping_env, fleet) as (client, queue):
        first = await report_failure(client, queue, report("llama-2-7b-0", "prober"))
        second = await report_failure(client, queue, report("llama-2-7b-0", "alert abc123"))
        third = await report_failure(client, queue, report("llama-2-7b-0", "cli ops@host"))
        fleet.promote_gate.set()
        result = await result_of(client, queue, first)
        late = await report_failure(client, queue, report("llama-2-7b-0", "alert abc123 (re-sent)"))

    assert not first.joined and second.joined and third.joined and late.joined
    assert first.workflow_id == second.workflow_id == failover_workflow_id("llama-2-7b", "llama-2-7b-0")
    assert result.outcome == FailoverOutcome.RECOVERED and result.promoted == "llama-2-7b-1"
    assert [s for s, _ in fleet.calls].count("promote") == 1
    assert fleet.instances["llama-2-7b-2"].role == Role.WARM  # the warm standby stays a standby
    assert result.epoch == 1 and result.joined == ["alert abc123", "cli ops@host"]
    assert late.state == "done" and late.outcome == FailoverOutcome.RECOVERED


async def test_a_direct_start_hands_the_failure_to_the_guardian(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.HOT))
    async with guarded(time_skipping_env, fleet) as (client, queue):
        # What the Temporal UI's Start Workflow form does: no epoch, any workflow id.
        direct = await client.execute_workflow(
            FailoverWorkflow.run,
            FailoverRequest(model="llama-2-7b", instance="llama-2-7b-0", reason="from the UI"),
            id=f"ui-{uuid.uuid4().hex[:6]}",
            task_queue=queue,
        )
        state = await guardian_state(client, queue, "llama-2-7b")
        assert state is not None
        incident = state.recent[0]  # the direct start waited for the runbook: the incident is closed
        handled = await client.get_workflow_handle(incident.workflow_id, result_type=FailoverResult).result()
    assert direct.outcome == FailoverOutcome.JOINED
    assert direct.handled_by == failover_workflow_id("llama-2-7b", "llama-2-7b-0")
    assert handled.outcome == FailoverOutcome.RECOVERED and handled.epoch is not None
    assert [s for s, _ in fleet.calls].count("promote") == 1
    assert state is not None and [i.outcome for i in state.recent] == [FailoverOutcome.RECOVERED]


@pytest.mark.parametrize(
    ("model", "instance"),
    [("llama-2-7b", "llama-2-7b-9"), ("no-such-model", "no-such-model-0")],
    ids=["unknown instance", "unknown model"],
)
async def test_a_direct_start_of_a_wrong_id_fails_at_once_and_reports_nothing(
    time_skipping_env: WorkflowEnvironment, model: str, instance: str
) -> None:
    """From the UI, a typo must fail the run with what is wrong, not open an incident whose runbook
    fails (the run ended ``joined``) or wait an hour on a guardian that failed (unknown model)."""
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    async with guarded(time_skipping_env, fleet) as (client, queue):
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(
                client.execute_workflow(
                    FailoverWorkflow.run,
                    FailoverRequest(model=model, instance=instance, reason="typo in the UI"),
                    id=f"ui-{uuid.uuid4().hex[:6]}",
                    task_queue=queue,
                ),
                timeout=30,
            )
        assert await guardian_state(client, queue, model) is None  # nothing reported
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == ErrorType.UNKNOWN_INSTANCE
    assert f"{model} has no instance {instance!r}" in cause.message
    assert [step for step, _ in fleet.calls] == ["list"]  # listed, nothing claimed or changed


async def test_two_failures_of_one_model_run_one_after_the_other_on_different_standbys(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = FakeFleet.of(
        ("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.SERVING), ("llama-2-7b-2", Role.HOT),
        ("llama-2-7b-3", Role.HOT),
    )  # fmt: skip
    async with guarded(time_skipping_env, fleet) as (client, queue):
        a = await report_failure(client, queue, report("llama-2-7b-0", "prober"))
        b = await report_failure(client, queue, report("llama-2-7b-1", "prober"))
        results = [await result_of(client, queue, a), await result_of(client, queue, b)]
    assert {r.promoted for r in results} == {"llama-2-7b-2", "llama-2-7b-3"}
    assert [r.epoch for r in results] == [1, 2]  # each runbook its own, growing epoch
    assert results[0].finished_at is not None and results[1].started_at >= results[0].finished_at


async def test_a_stale_epoch_changes_nothing(time_skipping_env: WorkflowEnvironment) -> None:
    """A runbook whose epoch a newer one superseded is refused at its next fenced step."""
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    fleet.epochs["llama-2-7b"] = 5  # a newer runbook claimed epoch 5 meanwhile
    async with guarded(time_skipping_env, fleet) as (client, queue):
        handle = await client.start_workflow(
            FailoverWorkflow.run,
            FailoverRequest(model="llama-2-7b", instance="llama-2-7b-0", confirmed=True, epoch=4),
            id=f"stale-{uuid.uuid4().hex[:6]}",
            task_queue=queue,
        )
        try:
            await handle.result()
            raise AssertionError("a stale runbook must not finish")
        except Exception as err:
            assert "stale" in str(err.__cause__ or err).lower() or "StaleEpoch" in repr(err.__cause__)
    assert fleet.refused and fleet.instances["llama-2-7b-1"].role == Role.HOT  # nothing promoted
    assert fleet.instances["llama-2-7b-0"].role == Role.SERVING


def spread_fleet(models: int) -> FakeFleet:
    instances: dict[str, Instance] = {}
    names = ["llama-2-7b", "mistral-7b", "gpt-4-8b"][:models]
    for name in names:
        for n, role in enumerate((Role.SERVING, Role.HOT)):
            iid = f"{name}-{n}"
            instances[iid] = Instance(
                id=iid, model=name, role=role, zone="az-1", lb_priority={Role.SERVING: 0, Role.HOT: 1}[role]
            )
    return FakeFleet(instances=instances)


async def test_the_zone_cap_delays_a_recovery_and_never_drops_it(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = spread_fleet(3)
    fleet.policy = fleet.policy.model_copy(
        update={"detection": fleet.policy.detection.model_copy(update={"max_failovers_per_zone": 1})}
    )
    fleet.promote_gate = asyncio.Event()
    async with guarded(time_skipping_env, fleet) as (client, queue):
        tickets = [
            await report_failure(client, queue, report(f"{m}-0", "prober", model=m))
            for m in ("llama-2-7b", "mistral-7b", "gpt-4-8b")
        ]
        state = await budget_when(client, queue, lambda s: len(s.running) == 1 and len(s.waiting) == 2)
        assert all("az-1" in why for why in state.why_waiting.values())
        fleet.promote_gate.set()
        results = [await result_of(client, queue, t) for t in tickets]
        final = await budget_when(client, queue, lambda s: not s.running and not s.waiting)
    assert [r.outcome for r in results] == [FailoverOutcome.RECOVERED] * 3  # all three, one at a time
    assert final.most_running_per_zone == 1 and final.granted_total == 3


async def test_the_breaker_trips_past_the_budget_and_a_person_resets_it(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = spread_fleet(3)
    fleet.policy = fleet.policy.model_copy(
        update={
            "detection": fleet.policy.detection.model_copy(update={"max_failovers_per_zone": 1}),
            "budget": fleet.policy.budget.model_copy(update={"trip_after_waiting": 1}),
        }
    )
    fleet.promote_gate = asyncio.Event()
    async with guarded(time_skipping_env, fleet) as (client, queue):
        tickets = [
            await report_failure(client, queue, report(f"{m}-0", "prober", model=m))
            for m in ("llama-2-7b", "mistral-7b", "gpt-4-8b")
        ]
        state = await budget_when(client, queue, lambda s: s.tripped is not None)
        assert state.tripped is not None and "2 recoveries waiting" in state.tripped
        fleet.promote_gate.set()
        first = await result_of(client, queue, tickets[0])
        held = await budget_when(client, queue, lambda s: not s.running)
        await asyncio.sleep(0.3)
        held = await budget_when(client, queue, lambda s: not s.running)
        assert len(held.waiting) == 2 and held.tripped  # manual mode: nothing more starts
        answer = await client.get_workflow_handle(budget_workflow_id(queue)).execute_update(
            "reset", BudgetReset(actor="ops", comment="checked the fleet"), result_type=str
        )
        results = [await result_of(client, queue, t) for t in tickets[1:]]
        final = await budget_when(client, queue, lambda s: not s.running and not s.waiting)
    assert first.outcome == FailoverOutcome.RECOVERED and "reset by ops" in answer
    assert [r.outcome for r in results] == [FailoverOutcome.RECOVERED] * 2  # delayed, not dropped
    assert final.tripped is None and any("ops" in line for line in final.resets)


async def test_a_report_for_another_model_is_refused(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    async with guarded(time_skipping_env, fleet) as (client, queue):
        opened = await report_failure(client, queue, report("llama-2-7b-0", "prober"))
        await result_of(client, queue, opened)  # leaves no run behind on the shared test server
        from temporalio.client import WithStartWorkflowOperation, WorkflowUpdateFailedError
        from temporalio.common import WorkflowIDConflictPolicy

        from drctl.payloads import GuardianState, guardian_workflow_id

        start = WithStartWorkflowOperation(
            ModelGuardianWorkflow.run,
            GuardianState(model="llama-2-7b"),
            id=guardian_workflow_id("llama-2-7b", queue),
            task_queue=queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        try:
            await client.execute_update_with_start_workflow(
                "report", report("mistral-7b-0", "typo", model="mistral-7b"), start_workflow_operation=start
            )
            raise AssertionError("the guardian of llama-2-7b must refuse a mistral-7b report")
        except WorkflowUpdateFailedError as err:
            assert "recovers llama-2-7b, not mistral-7b" in str(err.cause)


async def test_a_waiter_learns_the_run_before_it_ends_then_long_polls_its_result(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """``wait_running`` (what a zone failover's or a drain's wait uses) returns as soon as the
    incident's runbook has a run, while it still runs; the result then comes from the server's long
    poll, not from asking the guardian again and again."""
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    fleet.promote_gate = asyncio.Event()  # the runbook cannot end until the test lets it
    async with guarded(time_skipping_env, fleet) as (client, queue):
        ticket = await report_failure(client, queue, report("llama-2-7b-0", "zone failover"))
        incident = await asyncio.wait_for(wait_running(client, queue, ticket), timeout=30)
        assert incident.run_id is not None and incident.state == IncidentState.RUNNING
        fleet.promote_gate.set()
        result = await asyncio.wait_for(runbook_result(client, incident), timeout=30)
    assert result.outcome == FailoverOutcome.RECOVERED and result.promoted == "llama-2-7b-1"


async def test_reports_that_joined_before_the_runbook_started_are_in_its_start_not_signalled(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """mistral-7b's recovery waits for the budget (one per zone, llama-2-7b's runs) while two more
    reports of its failure join: its runbook lists them from its start input. Signalled right after
    the start instead, one could land while the runbook's one workflow task completed, and the
    server refused the completion (the task ran again)."""
    fleet = spread_fleet(2)
    fleet.policy = fleet.policy.model_copy(
        update={"detection": fleet.policy.detection.model_copy(update={"max_failovers_per_zone": 1})}
    )
    fleet.promote_gate = asyncio.Event()
    async with guarded(time_skipping_env, fleet) as (client, queue):
        await report_failure(client, queue, report("llama-2-7b-0", "prober"))
        waiting = await report_failure(client, queue, report("mistral-7b-0", "prober", model="mistral-7b"))
        await budget_when(client, queue, lambda s: len(s.running) == 1 and len(s.waiting) == 1)
        for reporter in ("alert abc123", "cli ops@host"):
            assert (await report_failure(client, queue, report("mistral-7b-0", reporter, model="mistral-7b"))).joined
        fleet.promote_gate.set()
        result = await result_of(client, queue, waiting)
        incident = await wait_closed(client, queue, waiting)
        history = await client.get_workflow_handle(incident.workflow_id, run_id=incident.run_id).fetch_history()
    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.joined == ["alert abc123", "cli ops@host"] and result.joined_total == 2
    assert not [e for e in history.events if e.HasField("workflow_execution_signaled_event_attributes")]


async def test_a_wait_on_a_guardian_that_failed_ends_with_why(
    time_skipping_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guardian that fails (here: its epoch claim refused, as for a model the platform does not
    know) still answers its query with the incident queued; a wait for that incident must end."""
    from drctl.activities.incidents import _followed
    from drctl.platforms import errors
    from drctl.temporal import incidents
    from tests.workflows.fakes import FakePlatform

    async def refused(self: FakePlatform, model: str) -> int:
        raise errors.unknown_model(model, ["llama-2-7b"])

    monkeypatch.setattr(FakePlatform, "claim_epoch", refused)
    monkeypatch.setattr(incidents, "GUARDIAN_LOOK_S", 0.2)
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    async with guarded(time_skipping_env, fleet) as (client, queue):
        ticket = await report_failure(client, queue, report("llama-2-7b-0", "cli ops@host"))
        with pytest.raises(ApplicationError) as ended:
            await asyncio.wait_for(wait_running(client, queue, ticket), timeout=30)
        # What a zone failover's batch follows: that ticket ends failed, the batch goes on.
        followed = await asyncio.wait_for(_followed(client, queue, ticket), timeout=30)
    assert followed.outcome == "failed" and "will not be run" in followed.detail
    assert ended.value.type == ErrorType.GUARDIAN_CLOSED and ended.value.non_retryable
    assert "is failed: the incident of llama-2-7b-0 it held will not be run" in ended.value.message
