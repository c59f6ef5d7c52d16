"""FailoverWorkflow logic on the time-skipping test server, with fake activities swapped in by name."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.payloads import (
    AlertResolved,
    FailoverOutcome,
    FailoverRequest,
    FailoverResult,
    Role,
    Trigger,
    failover_workflow_id,
)
from drctl.workflows.failover import FailoverWorkflow
from tests.workflows.fakes import FakeFleet

BOTH_MODES = pytest.mark.parametrize("local_activities", [True, False], ids=["local-activities", "regular-activities"])


@asynccontextmanager
async def worker_for(env: WorkflowEnvironment, fleet: FakeFleet) -> AsyncIterator[tuple[Client, str]]:
    queue = f"test-{uuid.uuid4()}"
    async with Worker(env.client, task_queue=queue, workflows=[FailoverWorkflow], activities=fleet.activities()):
        yield env.client, queue


async def run_failover(
    env: WorkflowEnvironment, fleet: FakeFleet, instance: str = "llama-2-7b-0", local_activities: bool = True
) -> FailoverResult:
    async with worker_for(env, fleet) as (client, queue):
        return await client.execute_workflow(
            FailoverWorkflow.run,
            FailoverRequest(
                model="llama-2-7b", instance=instance, reason="test", local_activities=local_activities, epoch=1
            ),
            id=f"{failover_workflow_id('llama-2-7b', instance)}-{uuid.uuid4().hex[:6]}",
            task_queue=queue,
        )


@BOTH_MODES
async def test_happy_path_promotes_hot_standby_and_ejects_after_verify(
    time_skipping_env: WorkflowEnvironment, local_activities: bool
) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.COLD))
    result = await run_failover(time_skipping_env, fleet, local_activities=local_activities)

    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.promoted == "llama-2-7b-1"
    assert result.tier == Role.HOT
    # The failed instance was the only one serving: it is ejected only once the standby serves.
    assert result.eject_deferred
    assert fleet.steps() == [
        "probe:llama-2-7b-0",
        "list:llama-2-7b",
        "promote:llama-2-7b-1",
        "load:llama-2-7b-1",
        "register:llama-2-7b-1",
        "verify:llama-2-7b-1",
        "eject:llama-2-7b-0",
        "replenish:llama-2-7b",
    ]
    assert [s.step for s in result.steps] == [
        "confirm", "list", "pick", "promote", "load", "register", "verify", "eject", "replenish",
    ]  # fmt: skip
    assert all(s.ok for s in result.steps)
    assert result.rto_ms is not None and result.switch_ms is not None
    # Activity-reported time: probe 1 + list 0 + promote 3 + load 4 + register 5 + verify 6 + eject 2
    # + replenish 0.5.
    assert sum(s.activity_ms or 0 for s in result.steps) == 21.5


@pytest.mark.parametrize("failed_ago_s", [-3600.0, 120.0])
async def test_rto_counts_from_the_failure_unless_it_is_dated_after_the_runbook(
    time_skipping_env: WorkflowEnvironment, failed_ago_s: float
) -> None:
    """An alert's ``startsAt`` an hour in the future (a client's clock, or a lie) counted an RTO of
    0 ms; a failure two minutes old counts its two minutes."""
    from datetime import UTC, timedelta

    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    # The server's clock, not this machine's: earlier tests on the session's time-skipping server
    # may have skipped it years ahead (seen: ten), and a wall-clock "in an hour" was then long past.
    failed_at = (await time_skipping_env.get_current_time()).astimezone(UTC) - timedelta(seconds=failed_ago_s)
    async with worker_for(time_skipping_env, fleet) as (client, queue):
        result = await client.execute_workflow(
            FailoverWorkflow.run,
            FailoverRequest(model="llama-2-7b", instance="llama-2-7b-0", reason="test", epoch=1, failed_at=failed_at),
            id=f"rto-{uuid.uuid4().hex[:6]}",
            task_queue=queue,
        )
    assert result.outcome == FailoverOutcome.RECOVERED and result.rto_ms is not None and result.switch_ms is not None
    if failed_ago_s < 0:
        assert result.rto_ms == result.switch_ms > 0  # from the runbook's start
    else:
        assert result.rto_ms >= failed_ago_s * 1000


async def test_eject_first_when_another_instance_still_serves(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.SERVING), ("llama-2-7b-2", Role.WARM))
    result = await run_failover(time_skipping_env, fleet)

    assert result.outcome == FailoverOutcome.RECOVERED
    assert not result.eject_deferred
    assert fleet.steps()[2] == "eject:llama-2-7b-0"
    assert result.tier == Role.WARM
    assert fleet.instances["llama-2-7b-0"].role == Role.FAILED


async def test_false_alarm_touches_nothing(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    fleet.healthy.add("llama-2-7b-0")
    result = await run_failover(time_skipping_env, fleet)

    assert result.outcome == FailoverOutcome.FALSE_ALARM
    assert fleet.steps() == ["probe:llama-2-7b-0"]
    assert fleet.instances["llama-2-7b-0"].role == Role.SERVING


@BOTH_MODES
async def test_promote_fails_then_next_standby(time_skipping_env: WorkflowEnvironment, local_activities: bool) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.WARM))
    fleet.broken.add("llama-2-7b-1")
    result = await run_failover(time_skipping_env, fleet, local_activities=local_activities)

    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.promoted == "llama-2-7b-2"
    assert result.tier == Role.WARM
    assert "promote:llama-2-7b-1" in fleet.steps()
    # The broken standby is taken out so nobody tries it again.
    assert fleet.instances["llama-2-7b-1"].role == Role.FAILED
    assert [s.ok for s in result.steps if s.step == "promote"] == [False, True]


@BOTH_MODES
async def test_no_standby_left_places_an_emergency_instance(
    time_skipping_env: WorkflowEnvironment, local_activities: bool
) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.COLD))
    fleet.broken.add("llama-2-7b-1")
    result = await run_failover(time_skipping_env, fleet, local_activities=local_activities)

    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.emergency and result.tier is None and result.promoted == "llama-2-7b-2"
    assert fleet.instances["llama-2-7b-2"].role == Role.SERVING and fleet.instances["llama-2-7b-2"].gpu
    steps = [s.step for s in result.steps]
    assert steps[-6:] == ["observe", "place", "emergency", "verify", "eject", "replenish"]
    # Ejected only once the emergency instance served (last-instance safety).
    assert fleet.instances["llama-2-7b-0"].role == Role.FAILED


@BOTH_MODES
async def test_no_standby_and_no_room_keeps_last_instance_registered(
    time_skipping_env: WorkflowEnvironment, local_activities: bool
) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.COLD))
    fleet.broken.add("llama-2-7b-1")
    huge = [m.model_copy(update={"gpu_memory": 1024 * 2**30}) for m in fleet.policy.models]
    fleet.policy = fleet.policy.model_copy(update={"models": huge})
    result = await run_failover(time_skipping_env, fleet, local_activities=local_activities)

    assert result.outcome == FailoverOutcome.NO_STANDBY
    place = next(s for s in result.steps if s.step == "place")
    assert not place.ok and "llama-2-7b-2" in place.detail
    # Last-instance safety: nothing replaced it, so it was never ejected.
    assert "eject:llama-2-7b-0" not in fleet.steps()
    assert fleet.instances["llama-2-7b-0"].role == Role.SERVING
    assert fleet.instances["llama-2-7b-0"].lb_priority == 0


async def test_unknown_instance_fails_without_side_effects(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    with pytest.raises(WorkflowFailureError):
        await run_failover(time_skipping_env, fleet, instance="llama-2-7b-9")
    assert [c[0] for c in fleet.calls] == ["probe"]


@pytest.mark.parametrize("trigger", [Trigger.PROBE, Trigger.MANUAL])
async def test_a_detectors_report_of_an_instance_gone_since_settles(
    time_skipping_env: WorkflowEnvironment, trigger: Trigger
) -> None:
    """The prober reported a standby of a dead zone; by the time its runbook lists the fleet,
    reconciliation has replaced it. That ends ``already-ejected``, not as a failed runbook; a
    manual start naming an instance that does not exist still fails."""
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    request = FailoverRequest(model="llama-2-7b", instance="llama-2-7b-9", trigger=trigger, confirmed=True, epoch=1)
    async with worker_for(time_skipping_env, fleet) as (client, queue):
        run = client.execute_workflow(FailoverWorkflow.run, request, id=f"gone-{uuid.uuid4()}", task_queue=queue)
        if trigger == Trigger.MANUAL:
            with pytest.raises(WorkflowFailureError):
                await run
            return
        result = await run
    assert result.outcome == FailoverOutcome.ALREADY_EJECTED
    assert "no longer exists" in result.reason
    assert [c[0] for c in fleet.calls] == ["list"]  # nothing changed


async def test_duplicate_start_joins_the_running_failover(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    fleet.promote_gate = asyncio.Event()
    wf_id = f"{failover_workflow_id('llama-2-7b', 'llama-2-7b-0')}-{uuid.uuid4().hex[:6]}"
    # Regular activities, so the promote held open by the gate is not a local activity (see below).
    request = FailoverRequest(model="llama-2-7b", instance="llama-2-7b-0", local_activities=False, epoch=1)
    async with worker_for(time_skipping_env, fleet) as (client, queue):
        first = await client.start_workflow(
            FailoverWorkflow.run, request, id=wf_id, task_queue=queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )  # fmt: skip
        second = await client.start_workflow(
            FailoverWorkflow.run, request, id=wf_id, task_queue=queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )  # fmt: skip
        assert second.result_run_id == first.result_run_id
        fleet.promote_gate.set()
        result = await second.result()
    assert result.outcome == FailoverOutcome.RECOVERED
    assert [c for c in fleet.calls if c[0] == "promote"] == [("promote", "llama-2-7b-1")]


async def test_invalid_input_fails_the_run_instead_of_retrying_forever(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING))
    async with worker_for(time_skipping_env, fleet) as (client, queue):
        handle = await client.start_workflow(
            "FailoverWorkflow", {"model": "llama-2-7b"}, id=f"bad-input-{uuid.uuid4()}", task_queue=queue
        )
        with pytest.raises(WorkflowFailureError) as info:
            await asyncio.wait_for(handle.result(), timeout=30)
    assert "instance" in str(info.value.cause)
    assert fleet.calls == []


async def test_second_failover_of_an_ejected_instance_does_nothing(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.HOT))
    first = await run_failover(time_skipping_env, fleet)
    assert first.outcome == FailoverOutcome.RECOVERED
    fleet.calls.clear()
    second = await run_failover(time_skipping_env, fleet)
    assert second.outcome == FailoverOutcome.ALREADY_EJECTED
    assert [c[0] for c in fleet.calls] == ["probe", "list"]
    assert fleet.instances["llama-2-7b-2"].role == Role.HOT


async def test_failed_standby_is_ejected_without_promoting_another(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.HOT))
    result = await run_failover(time_skipping_env, fleet, instance="llama-2-7b-1")
    assert result.outcome == FailoverOutcome.STANDBY_EJECTED
    # ... and reconciliation is asked to replace it at once, not at its next scheduled pass.
    assert fleet.steps() == ["probe:llama-2-7b-1", "list:llama-2-7b", "eject:llama-2-7b-1", "replenish:llama-2-7b"]
    assert fleet.instances["llama-2-7b-0"].role == Role.SERVING
    assert fleet.instances["llama-2-7b-2"].role == Role.HOT


async def test_resolved_alert_is_recorded_and_the_probe_still_decides(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    fleet.promote_gate = asyncio.Event()
    async with worker_for(time_skipping_env, fleet) as (client, queue):
        handle = await client.start_workflow(
            FailoverWorkflow.run,
            # Regular activities: a local activity held open across the signal can be re-run when the
            # time-skipping server jumps past the workflow task timeout, which muddles the fake's state.
            FailoverRequest(
                model="llama-2-7b", instance="llama-2-7b-0", trigger=Trigger.ALERT, local_activities=False, epoch=1
            ),
            id=f"alert-{uuid.uuid4()}",
            task_queue=queue,
        )
        await handle.signal(FailoverWorkflow.alert_resolved, AlertResolved(fingerprint="abc123"))
        fleet.promote_gate.set()
        result = await handle.result()
    assert result.alert_resolved == AlertResolved(fingerprint="abc123")
    # The instance was dead at confirm: the failover went ahead regardless of the resolution.
    assert result.outcome == FailoverOutcome.RECOVERED


@BOTH_MODES
async def test_corrupt_checkpoint_is_restored_and_loaded_again(
    time_skipping_env: WorkflowEnvironment, local_activities: bool
) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.COLD))
    fleet.corrupt.add("llama-2-7b-1")
    result = await run_failover(time_skipping_env, fleet, local_activities=local_activities)

    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.promoted == "llama-2-7b-1"
    assert fleet.steps()[2:7] == [
        "promote:llama-2-7b-1",
        "load:llama-2-7b-1",
        "restore:llama-2-7b-1",
        "load:llama-2-7b-1",
        "register:llama-2-7b-1",
    ]
    steps = [(s.step, s.ok) for s in result.steps]
    assert steps[3:7] == [("promote", True), ("load", False), ("restore-checkpoint", True), ("load", True)]


async def test_load_failure_other_than_a_checksum_is_not_restored(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.COLD), ("llama-2-7b-2", Role.COLD))
    fleet.broken.add("llama-2-7b-1")
    result = await run_failover(time_skipping_env, fleet)
    assert result.promoted == "llama-2-7b-2"
    assert not [c for c in fleet.calls if c[0] == "restore"]


async def test_a_hung_hot_standby_is_given_up_after_the_short_check(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.HOT))
    fleet.hung.add("llama-2-7b-1")
    result = await run_failover(time_skipping_env, fleet)
    assert result.outcome == FailoverOutcome.RECOVERED and result.promoted == "llama-2-7b-2"
    loads = [s for s in result.steps if s.step == "load"]
    assert [s.ok for s in loads] == [False, True]
    assert loads[0].duration_ms < 10_000  # one short try, not a model load's timeout
    assert ("eject", "llama-2-7b-1") in fleet.calls  # the hung standby is taken out


async def test_plan_runs_the_same_decisions_and_changes_nothing(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.COLD))
    before = dict(fleet.instances)
    async with worker_for(time_skipping_env, fleet) as (client, queue):
        result = await client.execute_workflow(
            FailoverWorkflow.run,
            FailoverRequest(model="llama-2-7b", instance="llama-2-7b-0", plan_only=True),
            id=f"plan-{uuid.uuid4().hex[:6]}",
            task_queue=queue,
        )
    assert result.outcome == FailoverOutcome.PLANNED
    assert result.plan == [
        "promote llama-2-7b-1",
        "load llama-2-7b-1",
        "register llama-2-7b-1",
        "verify llama-2-7b-1",
        "eject llama-2-7b-0",  # deferred: the last serving instance
    ]
    assert fleet.instances == before  # nothing changed
    assert [step for step, _ in fleet.calls] == ["probe", "list"]  # reads only


async def test_a_plan_for_a_healthy_instance_is_a_plan_in_the_audit(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    fleet.healthy.add("llama-2-7b-0")
    async with worker_for(time_skipping_env, fleet) as (client, queue):
        result = await client.execute_workflow(
            FailoverWorkflow.run,
            FailoverRequest(model="llama-2-7b", instance="llama-2-7b-0", plan_only=True),
            id=f"plan-{uuid.uuid4().hex[:6]}",
            task_queue=queue,
        )
    assert result.outcome == FailoverOutcome.PLANNED and result.reason.startswith("would end false-alarm")
