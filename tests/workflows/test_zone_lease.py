"""Reports under a zone failover's lease (``FailureReport.lease``): the guardian starts the runbook
without asking the budget, answers once the run has started, and takes over what of its model
waits for the budget. Time-skipping server, fake platform."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.testing import WorkflowEnvironment

from drctl.payloads import FailoverOutcome, FailureReport, IncidentState, LeaseKind, LeaseRelease, LeaseRequest, Role
from drctl.temporal.incidents import guardian_state, hand_back_lease, report_failure, request_lease
from tests.workflows.fakes import FakeFleet
from tests.workflows.test_guardian import budget_when, guarded, report, result_of, spread_fleet

LEASE = "zone-failover-az-1"


def under_lease(instance: str, model: str = "llama-2-7b") -> FailureReport:
    leased = report(instance, "zone-failover-az-1", model=model)
    return leased.model_copy(update={"lease": LEASE, "zone_level": True})


def az1_failover_lease() -> LeaseRequest:
    """The lease a zone failover of az-1 takes for its whole zone (llama-2-7b serves there)."""
    return LeaseRequest(
        holder=LEASE, incident=LEASE, model="", zone="az-1", kind=LeaseKind.ZONE, slots=2,
        covers=["llama-2-7b"], max_parallel_zone=2,
    )  # fmt: skip


def tripping(fleet: FakeFleet) -> FakeFleet:
    """A budget whose breaker trips at the first waiting recovery: an instance-level report waits
    for a person, so whatever runs did not come from the budget."""
    fleet.policy = fleet.policy.model_copy(
        update={
            "detection": fleet.policy.detection.model_copy(update={"max_failovers_per_zone": 0}),
            "budget": fleet.policy.budget.model_copy(update={"trip_after_waiting": 0}),
        }
    )
    return fleet


async def test_a_report_under_a_zone_lease_takes_over_a_recovery_waiting_for_the_budget(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = tripping(spread_fleet(1))
    async with guarded(time_skipping_env, fleet) as (client, queue):
        waiting = await report_failure(client, queue, report("llama-2-7b-0", "prober"))
        tripped = await budget_when(client, queue, lambda s: s.tripped is not None and len(s.waiting) == 1)
        assert tripped.running == []
        leased = await report_failure(client, queue, under_lease("llama-2-7b-0"))
        assert leased.joined and leased.run_id is not None  # answered once the run had started
        result = await result_of(client, queue, waiting)
        after = await budget_when(client, queue, lambda s: not s.waiting)
        state = await guardian_state(client, queue, "llama-2-7b")
    assert result.outcome == FailoverOutcome.RECOVERED and result.promoted == "llama-2-7b-1"
    assert after.granted_total == 0 and after.running == []  # never granted; its request handed back
    assert state is not None and state.recent[-1].lease == LEASE and state.recent[-1].asked_budget


async def test_a_lease_covers_the_incidents_queued_ahead_of_its_own(time_skipping_env: WorkflowEnvironment) -> None:
    """The prober reported the model's standby (in the failing zone) first; it waits for a person.
    The zone failover's report of the serving instance queues behind it: without the lease
    covering the incident ahead, neither would ever run (the zone failover waits for its runbook)."""
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.HOT))
    fleet = tripping(FakeFleet({i: one.model_copy(update={"zone": "az-1"}) for i, one in fleet.instances.items()}))
    async with guarded(time_skipping_env, fleet) as (client, queue):
        standby = await report_failure(client, queue, report("llama-2-7b-1", "prober"))
        await budget_when(client, queue, lambda s: s.tripped is not None)
        serving = await asyncio.wait_for(report_failure(client, queue, under_lease("llama-2-7b-0")), timeout=30)
        assert not serving.joined and serving.run_id is not None
        results = [await result_of(client, queue, standby), await result_of(client, queue, serving)]
        after = await budget_when(client, queue, lambda s: not s.waiting)
        state = await guardian_state(client, queue, "llama-2-7b")
    assert [r.outcome for r in results] == [FailoverOutcome.STANDBY_EJECTED, FailoverOutcome.RECOVERED]
    assert results[1].promoted == "llama-2-7b-2"  # one after the other: the ejected standby is not picked
    assert after.granted_total == 0 and after.tripped is not None  # the breaker still waits for a person
    assert state is not None and [i.lease for i in state.recent] == [LEASE, LEASE]
    assert all(i.state == IncidentState.DONE for i in state.recent)


@pytest.mark.parametrize(
    ("instance", "why", "outcome"),
    [
        # mistral-7b's standby in az-1.
        (
            "mistral-7b-1",
            "the failover of zone az-1 goes first (its lease is running)",
            FailoverOutcome.STANDBY_EJECTED,
        ),
        # One reconciliation has deleted (a standby of the failing zone): it has no zone to be held
        # by, and waits all the same; its runbook then ends already-ejected.
        ("mistral-7b-9", "its instance is gone: the failover of zone az-1 goes first", FailoverOutcome.ALREADY_EJECTED),
    ],
    ids=["standby-in-the-zone", "instance-gone"],
)
async def test_the_prober_s_reports_in_a_zone_wait_while_its_failover_s_lease_runs(
    time_skipping_env: WorkflowEnvironment, instance: str, why: str, outcome: FailoverOutcome
) -> None:
    """A zone failover holds its lease for az-1 (covering llama-2-7b); the prober reports another
    model's instance. Its recovery waits, tripping nothing, until the lease is handed back, then runs."""
    fleet = spread_fleet(2)
    async with guarded(time_skipping_env, fleet) as (client, queue):
        assert await request_lease(client, queue, az1_failover_lease())
        ticket = await report_failure(client, queue, report(instance, "prober", model="mistral-7b"))
        held = await budget_when(client, queue, lambda s: bool(s.why_waiting))
        assert held.why_waiting == {ticket.workflow_id: why}
        assert [w.incident for w in held.waiting] == [ticket.workflow_id]
        assert held.tripped is None
        await hand_back_lease(client, queue, LeaseRelease(incident=LEASE))
        result = await asyncio.wait_for(result_of(client, queue, ticket), timeout=30)
    assert result.outcome == outcome


async def test_the_zone_s_reports_after_its_failover_ended_run_as_zone_level_and_trip_nothing(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """A zone failover of az-1 hands its lease back; then the prober's reports of the zone's
    standbys arrive (it reports a zone's instances one after another: at 1,000 instances the last
    came ~40 s after the outage). They still count as the zone's: the per-zone cap (0 here) holds
    none back and the breaker (tripping at the first waiting recovery) does not trip. Before, they
    waited for a person to reset the breaker, and their models for their standbys."""
    fleet = tripping(spread_fleet(2))
    async with guarded(time_skipping_env, fleet) as (client, queue):
        assert await request_lease(client, queue, az1_failover_lease())
        await hand_back_lease(client, queue, LeaseRelease(incident=LEASE))
        standbys = [
            await report_failure(client, queue, report(f"{model}-1", "prober", model=model))
            for model in ("llama-2-7b", "mistral-7b")
        ]
        results = [await asyncio.wait_for(result_of(client, queue, t), timeout=30) for t in standbys]
        after = await budget_when(client, queue, lambda s: not s.running and not s.waiting)
    assert [r.outcome for r in results] == [FailoverOutcome.STANDBY_EJECTED] * 2
    assert after.tripped is None and list(after.failed_over) == ["az-1"]
    assert after.granted_total == 3  # the zone's lease, then each standby's (as zone-level)
