"""The guardian's epoch claim lists the model, and the runbook it starts decides from that listing
(``FailoverRequest.listing``, recorded in the runbook's start) instead of listing again as a regular
activity of its own. Time-skipping server, fake platform."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from drctl.payloads import (
    ActivityName,
    FailoverOutcome,
    FailoverRequest,
    FailoverResult,
    FailureReport,
    Role,
    Trigger,
)
from drctl.temporal.incidents import report_failure
from tests.workflows.fakes import FakeFleet
from tests.workflows.test_guardian import guarded, report, result_of


async def scheduled_activities(client: Client, workflow_id: str) -> list[str]:
    return [name for name, _ in await scheduled_with_heartbeat(client, workflow_id)]


async def scheduled_with_heartbeat(client: Client, workflow_id: str) -> list[tuple[str, float]]:
    """Each regular activity the run scheduled, with its heartbeat timeout in seconds (0: none)."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return [
        (
            e.activity_task_scheduled_event_attributes.activity_type.name,
            e.activity_task_scheduled_event_attributes.heartbeat_timeout.ToTimedelta().total_seconds(),
        )
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


def list_step(result: FailoverResult) -> str:
    return next(s.detail for s in result.steps if s.step == "list")


async def test_the_runbook_decides_from_the_listing_claimed_with_its_epoch(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    async with guarded(time_skipping_env, fleet) as (client, queue):
        ticket = await report_failure(client, queue, report("llama-2-7b-0", "prober"))
        result = await result_of(client, queue, ticket)
        runbook = await client.get_workflow_handle(ticket.workflow_id).fetch_history()
        scheduled = await scheduled_activities(client, ticket.workflow_id)
    assert result.outcome == FailoverOutcome.RECOVERED and result.promoted == "llama-2-7b-1"
    assert list_step(result) == "listed with the epoch claim"
    assert ActivityName.LIST_INSTANCES not in scheduled  # the report uses regular activities: listed if it listed
    # The listing is in the runbook's start, so a replay decides from the same one.
    started = FailoverRequest.model_validate_json(
        runbook.events[0].workflow_execution_started_event_attributes.input.payloads[0].data
    )
    assert started.epoch == 1 and started.listing is not None
    assert [i.id for i in started.listing.instances] == ["llama-2-7b-0", "llama-2-7b-1"]
    # Listed once, after the epoch was claimed and before anything changed.
    steps = [name for name, _ in fleet.calls]
    assert steps.count("list") == 1 and steps.index("claim-epoch") < steps.index("list") < steps.index("promote")


async def test_a_listing_that_fails_at_the_claim_leaves_the_runbook_to_list(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    fleet.listing_at_claim_fails = True
    async with guarded(time_skipping_env, fleet) as (client, queue):
        ticket = await report_failure(client, queue, report("llama-2-7b-0", "prober"))
        result = await result_of(client, queue, ticket)
        scheduled = await scheduled_activities(client, ticket.workflow_id)
    assert result.outcome == FailoverOutcome.RECOVERED and result.promoted == "llama-2-7b-1"
    assert list_step(result) != "listed with the epoch claim"
    assert ActivityName.LIST_INSTANCES in scheduled


@pytest.mark.parametrize("confirmed", [True, False])
async def test_with_local_activities_only_a_confirm_probe_is_recorded_before_the_changes(
    time_skipping_env: WorkflowEnvironment, confirmed: bool
) -> None:
    """With the listing in its start and local activities, a report that established the failure
    (the prober's) runs every step in its first workflow task; one that must be confirmed (an
    alert's) probes as a regular activity, so the probe is in the history before anything changes
    and a task run again cannot see another answer."""
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    request = FailoverRequest(
        model="llama-2-7b", instance="llama-2-7b-0", trigger=Trigger.ALERT, confirmed=confirmed, local_activities=True
    )
    async with guarded(time_skipping_env, fleet) as (client, queue):
        ticket = await report_failure(client, queue, FailureReport(request=request, reporter="alert abc123"))
        result = await result_of(client, queue, ticket)
        scheduled = await scheduled_with_heartbeat(client, ticket.workflow_id)
    assert result.outcome == FailoverOutcome.RECOVERED and list_step(result) == "listed with the epoch claim"
    # The probe heartbeats: a worker that dies holding it costs a second, not the step's 10 s.
    assert scheduled == ([] if confirmed else [(ActivityName.PROBE_INSTANCE, 1.0)])


@pytest.mark.parametrize("replacement_healthy", [True, False])
async def test_a_report_from_before_the_instance_was_made_probes_it_first(
    time_skipping_env: WorkflowEnvironment, replacement_healthy: bool
) -> None:
    """The prober reported llama-2-7b-1 (a standby of a zone failing over) and the report waited;
    meanwhile reconciliation replaced it with a new llama-2-7b-1 elsewhere. The report is of the
    old one: the runbook probes the new one first and, healthy, leaves it alone (``false-alarm``);
    only a replacement that is down too is ejected. Before, the healthy replacement was ejected."""
    failed_at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    replacement = fleet.instances["llama-2-7b-1"]
    fleet.instances["llama-2-7b-1"] = replacement.model_copy(update={"created_at": failed_at + timedelta(seconds=5)})
    if replacement_healthy:
        fleet.healthy.add("llama-2-7b-1")
    request = FailoverRequest(
        model="llama-2-7b", instance="llama-2-7b-1", trigger=Trigger.PROBE, confirmed=True, failed_at=failed_at
    )
    async with guarded(time_skipping_env, fleet) as (client, queue):
        ticket = await report_failure(client, queue, FailureReport(request=request, reporter="prober"))
        result = await result_of(client, queue, ticket)
    probed = [instance for step, instance in fleet.calls if step == "probe"]
    assert probed == ["llama-2-7b-1"]
    if replacement_healthy:
        assert result.outcome == FailoverOutcome.FALSE_ALARM
        assert fleet.instances["llama-2-7b-1"].role == Role.HOT
    else:
        assert result.outcome == FailoverOutcome.STANDBY_EJECTED


async def test_a_report_of_the_instance_itself_is_not_probed_again(time_skipping_env: WorkflowEnvironment) -> None:
    """Made before the failure reported: the prober's report stands confirmed, nothing is probed."""
    failed_at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT))
    made = fleet.instances["llama-2-7b-0"].model_copy(update={"created_at": failed_at - timedelta(hours=1)})
    fleet.instances["llama-2-7b-0"] = made
    request = FailoverRequest(
        model="llama-2-7b", instance="llama-2-7b-0", trigger=Trigger.PROBE, confirmed=True, failed_at=failed_at
    )
    async with guarded(time_skipping_env, fleet) as (client, queue):
        ticket = await report_failure(client, queue, FailureReport(request=request, reporter="prober"))
        result = await result_of(client, queue, ticket)
    assert result.outcome == FailoverOutcome.RECOVERED and "probe" not in [step for step, _ in fleet.calls]
