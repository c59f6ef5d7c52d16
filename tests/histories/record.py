"""Record the histories that ``test_replay.py`` replays: representative runs of every workflow.

    make histories                      # or: .venv/bin/python -m tests.histories.record

Each scenario runs the real workflow classes with the fake activities of ``tests/workflows`` on a
local Temporal dev server (``temporal server start-dev``, the server ``drctl up`` runs), and writes
the history of each run it names with ``WorkflowHistory.to_json()`` (the format of
``temporal workflow show --output json``) to ``tests/histories/<name>.json``; ``manifest.json``
maps each file to its workflow ID and type and says what the run did.

Re-record only after an *intended* change to a workflow made behind ``workflow.patched``, never
to make a replay failure go away: that failure means workflows running in production would fail
the same way (docs/workflows.md). ``python -m tests.histories.record failover-hot drain`` records
only the scenarios named; entries of other histories in ``manifest.json`` are kept while their file
exists (a history kept from before a patch, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python tests/histories/record.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opentelemetry.sdk.trace import TracerProvider
from temporalio.client import Client, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.payloads import (
    BudgetReset,
    DrainGpuRequest,
    DrillRequest,
    DrillScenario,
    FailoverRequest,
    FailureReport,
    LeaseKind,
    LeaseRelease,
    LeaseRequest,
    ReconcileRequest,
    Role,
    Trigger,
    ZoneApproval,
    ZoneFailoverRequest,
    budget_workflow_id,
    failover_workflow_id,
    guardian_workflow_id,
    reconcile_pass_workflow_id,
)
from drctl.telemetry.tracing import DrctlTracingInterceptor
from drctl.temporal.converter import drctl_data_converter
from drctl.temporal.incidents import guardian_state, hand_back_lease, report_failure, request_lease, wait_closed
from drctl.temporal.search_attributes import dev_server_flags
from drctl.workers.binaries import find_binary
from drctl.workers.runbook_worker import WORKFLOWS
from drctl.workflows.budget import (
    FAILED_OVER_ZONE_COVERS,
    GONE_INSTANCE_WAITS,
    GRANTS_SIDE_BY_SIDE,
    ZONE_COVERS_ZONE,
    ZONE_FAILOVER_FIRST,
)
from drctl.workflows.drain import DrainGpuWorkflow
from drctl.workflows.drill import DrillWorkflow
from drctl.workflows.failover import DIRECT_START_CHECKS_INPUT, FailoverWorkflow
from drctl.workflows.guardian import JOINED_IN_START, RUNBOOK_IN_REPORT_TRACE
from drctl.workflows.reconcile import ONE_PASS_AT_A_TIME, PLAN_IN_ACTIVITY, ReconcileStandbysWorkflow
from drctl.workflows.zone import BATCHED, CORDON_AT_ONCE, ONE_LEASE, SWITCH_IN_BATCH, ZoneFailoverWorkflow
from tests.histories import REPLAY_QUEUE_PREFIX, workflow_type
from tests.histories.before_patches import (
    BEFORE_PATCHES,
    BudgetBeforeFailedOverZoneCovers,
    BudgetBeforeGoneInstanceWaits,
    BudgetBeforeGrantsSideBySide,
    BudgetBeforeZoneCoversZone,
    BudgetBeforeZoneFailoverFirst,
    FailoverBeforeActiveZones,
    FailoverBeforeDirectStartChecksInput,
    FailoverBeforeGoneInstanceSettles,
    FailoverBeforeListingAsActivity,
    FailoverBeforeStandbyReplenishes,
    FailoverBeforeZoneFailoverReplenishesOnce,
    GuardianBeforeJoinedInStart,
    GuardianBeforeReportTrace,
    ReconcileBeforeOnePassAtATime,
    ReconcilePassBeforePlanInActivity,
    ZoneFailoverBeforeBatched,
    ZoneFailoverBeforeCordonAtOnce,
    ZoneFailoverBeforeOneLease,
    ZoneFailoverBeforeSwitchInBatch,
)
from tests.workflows.fakes import FakeFleet
from tests.workflows.test_drain import on
from tests.workflows.test_drill import FakeDrill
from tests.workflows.test_failover_zones import listing_with_serving_zones, two_hot_standbys
from tests.workflows.test_guardian import budget_when, report, spread_fleet
from tests.workflows.test_reconcile import FakePlatform
from tests.workflows.test_zone import fleet_across_zones, warm_standbys

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
MODEL = "llama-2-7b"


@dataclass
class Recorded:
    """One run to write: ``<name>.json`` holds the history of workflow ``workflow_id``."""

    name: str
    workflow_id: str
    about: str
    before_patch: str = ""
    """The ``workflow.patched`` id this run started before (recorded with ``before_patches.py``)."""


Scenario = Callable[[Client, str], Awaitable[list[Recorded]]]


@asynccontextmanager
async def worker(
    client: Client, queue: str, activities: Sequence[Any], old: Sequence[type] = ()
) -> AsyncIterator[None]:
    """A worker of the current workflows; ``old``: workflows as they were before a patch, each in
    place of the current workflow of its name (``before_patches.py``)."""
    names = {workflow_type(cls) for cls in old}
    workflows = [*old, *(cls for cls in WORKFLOWS if workflow_type(cls) not in names)]
    async with Worker(client, task_queue=queue, workflows=workflows, activities=activities):
        yield


# -- failover: one FailoverWorkflow run per standby tier and failure path ---------------------------


def failover_scenario(
    name: str,
    about: str,
    fleet: FakeFleet,
    *,
    local_activities: bool = True,
    plan_only: bool = False,
    old: Sequence[type] = (),
    instance: str = f"{MODEL}-0",
    trigger: Trigger = Trigger.MANUAL,
    confirmed: bool = False,
    activities: Callable[[FakeFleet], Sequence[Any]] = FakeFleet.activities,
) -> Scenario:
    async def run(client: Client, queue: str) -> list[Recorded]:
        wf_id = f"failover-{name}"
        async with worker(client, queue, activities(fleet), old):
            with contextlib.suppress(WorkflowFailureError):  # a run recorded failing (before a patch)
                await client.execute_workflow(
                    FailoverWorkflow.run,
                    FailoverRequest(
                        model=MODEL,
                        instance=instance,
                        trigger=trigger,
                        confirmed=confirmed,
                        reason="recorded history",
                        local_activities=local_activities,
                        plan_only=plan_only,
                        epoch=None if plan_only else 1,
                    ),
                    id=wf_id,
                    task_queue=queue,
                )
        before = next((patch for patch, cls in BEFORE_PATCHES.items() if cls in old), "")
        return [Recorded(f"failover-{name}", wf_id, about, before)]

    return run


def fleet_of(
    *specs: tuple[str, Role], broken: Sequence[str] = (), corrupt: Sequence[str] = (), healthy: Sequence[str] = ()
) -> FakeFleet:
    """A fleet of MODEL's instances ``MODEL-<n>``; ``healthy``: those the confirm probe finds well."""
    fleet = FakeFleet.of(*((f"{MODEL}-{n}", role) for n, role in specs))
    fleet.healthy.update(f"{MODEL}-{n}" for n in healthy)
    fleet.broken.update(f"{MODEL}-{n}" for n in broken)
    fleet.corrupt.update(f"{MODEL}-{n}" for n in corrupt)
    return fleet


def no_room() -> FakeFleet:
    fleet = fleet_of(("0", Role.SERVING), ("1", Role.COLD), broken=["1"])
    huge = [m.model_copy(update={"gpu_memory": 1024 * 2**30}) for m in fleet.policy.models]
    fleet.policy = fleet.policy.model_copy(update={"models": huge})
    return fleet


FAILOVERS: dict[str, Scenario] = {
    "failover-gone": failover_scenario(
        "gone",
        "the prober's report of an instance reconciliation has removed since: already-ejected",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT)),
        instance=f"{MODEL}-7",
        trigger=Trigger.PROBE,
        confirmed=True,
    ),
    "failover-gone-before-patch": failover_scenario(
        "gone-before-patch",
        "the same, on a run started before failover-gone-instance-settles: fails UnknownInstance",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT)),
        instance=f"{MODEL}-7",
        trigger=Trigger.PROBE,
        confirmed=True,
        old=[FailoverBeforeGoneInstanceSettles],
    ),
    "failover-hot": failover_scenario(
        "hot",
        "hot standby promoted, local activities (the default); the last serving instance ejected after verify",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT), ("2", Role.COLD)),
    ),
    "failover-hot-regular": failover_scenario(
        "hot-regular",
        "hot standby promoted, every step a regular activity",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT), ("2", Role.COLD)),
        local_activities=False,
    ),
    "failover-warm": failover_scenario(
        "warm",
        "another instance still serves: eject first, then the warm standby is promoted and loaded",
        fleet_of(("0", Role.SERVING), ("1", Role.SERVING), ("2", Role.WARM)),
    ),
    "failover-cold": failover_scenario(
        "cold",
        "the hot standby fails to promote (ejected), the cold one is promoted and loaded",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT), ("2", Role.COLD), broken=["1"]),
    ),
    "failover-emergency": failover_scenario(
        "emergency",
        "no standby works: an emergency instance is placed, created and verified",
        fleet_of(("0", Role.SERVING), ("1", Role.COLD), broken=["1"]),
    ),
    "failover-no-standby": failover_scenario(
        "no-standby",
        "no standby works and no room for an emergency instance: ends no-standby, regular activities",
        no_room(),
        local_activities=False,
    ),
    "failover-restored-checkpoint": failover_scenario(
        "restored-checkpoint",
        "the cold standby's checkpoint fails its checksum: restored, loaded again, promoted",
        fleet_of(("0", Role.SERVING), ("1", Role.COLD), corrupt=["1"]),
    ),
    "failover-hot-before-patch": failover_scenario(
        "hot-before-patch",
        "as failover-hot, started before the failover-listing-as-activity patch (the listing a local activity)",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT), ("2", Role.COLD)),
        old=[FailoverBeforeListingAsActivity],
    ),
    "failover-active-zone": failover_scenario(
        "active-zone",
        "active-passive policy, serving in az-2 fails: the hot standby in active az-1 is promoted, not az-3's",
        two_hot_standbys(),
        activities=listing_with_serving_zones,
    ),
    "failover-active-zone-before-patch": failover_scenario(
        "active-zone-before-patch",
        "the same, on a run started before failover-prefers-active-zones: the standby zone's hot standby (by id)",
        two_hot_standbys(),
        activities=listing_with_serving_zones,
        old=[FailoverBeforeActiveZones],
    ),
    "failover-standby-ejected": failover_scenario(
        "standby-ejected",
        "a hot standby failed: ejected, reconciliation asked to replace it",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT)),
        instance=f"{MODEL}-1",
    ),
    "failover-standby-ejected-before-patch": failover_scenario(
        "standby-ejected-before-patch",
        "the same, on a run started before failover-standby-ejected-replenishes: ejected, nothing asked",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT)),
        instance=f"{MODEL}-1",
        old=[FailoverBeforeStandbyReplenishes],
    ),
    "failover-zone-failover": failover_scenario(
        "zone-failover",
        "reported by a zone failover (confirmed): hot standby promoted; reconciliation left to the zone failover",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT)),
        trigger=Trigger.ZONE_FAILOVER,
        confirmed=True,
    ),
    "failover-zone-failover-before-patch": failover_scenario(
        "zone-failover-before-patch",
        "the same, on a run started before failover-zone-failover-replenishes-once: it triggers reconciliation",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT)),
        trigger=Trigger.ZONE_FAILOVER,
        confirmed=True,
        old=[FailoverBeforeZoneFailoverReplenishesOnce],
    ),
    "failover-false-alarm": failover_scenario(
        "false-alarm",
        "the confirm probe finds the instance healthy: nothing changes",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT), healthy=["0"]),
    ),
    "failover-plan": failover_scenario(
        "plan",
        "plan_only: the same decisions, the steps listed, nothing run",
        fleet_of(("0", Role.SERVING), ("1", Role.HOT), ("2", Role.COLD)),
        plan_only=True,
    ),
}


# -- guardian and budget -------------------------------------------------------------------------


async def guardian_joined(client: Client, queue: str) -> list[Recorded]:
    """Three reports of one crash while the promotion is held: one incident, two joined."""
    fleet = fleet_of(("0", Role.SERVING), ("1", Role.HOT), ("2", Role.WARM))
    fleet.promote_gate = asyncio.Event()
    async with worker(client, queue, fleet.activities()):
        first = await report_failure(client, queue, report(f"{MODEL}-0", "prober"))
        await report_failure(client, queue, report(f"{MODEL}-0", "alert abc123"))
        await report_failure(client, queue, report(f"{MODEL}-0", "cli ops@host"))
        fleet.promote_gate.set()
        incident = await asyncio.wait_for(wait_closed(client, queue, first), timeout=30)
        await report_failure(client, queue, report(f"{MODEL}-0", "alert abc123 (re-sent)"))
        await budget_when(client, queue, lambda s: not s.running)
    return [
        Recorded(
            "guardian-joined",
            guardian_workflow_id(MODEL, queue),
            "ModelGuardianWorkflow (still running): one incident from three reports, a fourth after it closed",
        ),
        Recorded(
            "guardian-joined-runbook", incident.workflow_id, "the guardian's child FailoverWorkflow, joined twice"
        ),
        Recorded("guardian-joined-budget", budget_workflow_id(queue), "BudgetWorkflow (still running): one lease"),
    ]


async def guardian_direct_start(client: Client, queue: str) -> list[Recorded]:
    """A FailoverWorkflow started without an epoch (the UI) hands the failure to the guardian."""
    fleet = fleet_of(("0", Role.SERVING), ("1", Role.HOT), ("2", Role.HOT))
    async with worker(client, queue, fleet.activities()):
        await client.execute_workflow(
            FailoverWorkflow.run,
            FailoverRequest(model=MODEL, instance=f"{MODEL}-0", reason="from the UI"),
            id="failover-direct-start",
            task_queue=queue,
        )
        state = await guardian_state(client, queue, MODEL)
        assert state is not None and state.recent, state
        await budget_when(client, queue, lambda s: not s.running)
    return [
        Recorded("failover-direct-start", "failover-direct-start", "started directly: reports, follows, ends joined"),
        Recorded("guardian-direct-start", guardian_workflow_id(MODEL, queue), "the guardian that ran it"),
        Recorded("guardian-direct-start-runbook", state.recent[0].workflow_id, "the runbook the guardian started"),
    ]


async def direct_start_before_checks(client: Client, queue: str) -> list[Recorded]:
    """``guardian_direct_start`` on a run started before failover-direct-start-checks-input."""
    fleet = fleet_of(("0", Role.SERVING), ("1", Role.HOT))
    async with worker(client, queue, fleet.activities(), [FailoverBeforeDirectStartChecksInput]):
        await client.execute_workflow(
            FailoverWorkflow.run,
            FailoverRequest(model=MODEL, instance=f"{MODEL}-0", reason="from the UI"),
            id="failover-direct-start-before-checks",
            task_queue=queue,
        )
        await budget_when(client, queue, lambda s: not s.running)
    return [
        Recorded(
            "failover-direct-start-before-checks",
            "failover-direct-start-before-checks",
            "the same, on a run started before failover-direct-start-checks-input: reports without listing",
            DIRECT_START_CHECKS_INPUT,
        )
    ]


async def two_incidents(client: Client, queue: str, old: Sequence[type] = ()) -> None:
    """Two failures of the model, each from its own report: the second after the first recovered."""
    fleet = fleet_of(("0", Role.SERVING), ("1", Role.HOT), ("2", Role.HOT))
    async with worker(client, queue, fleet.activities(), old):
        for instance, reporter in ((f"{MODEL}-0", "prober"), (f"{MODEL}-1", "alert abc123")):
            ticket = await report_failure(client, queue, report(instance, reporter))
            await asyncio.wait_for(wait_closed(client, queue, ticket), timeout=30)
        await budget_when(client, queue, lambda s: not s.running)


async def guardian_report_trace(client: Client, queue: str) -> list[Recorded]:
    """Two incidents, each recovered in the trace of its report (recorded with tracing on, so the
    reports' Updates and the children's starts carry trace headers)."""
    tracer = TracerProvider().get_tracer("record")  # recording spans, exported nowhere
    traced = Client(**{**client.config(), "interceptors": [DrctlTracingInterceptor(tracer)]})
    await two_incidents(traced, queue)
    return [
        Recorded(
            "guardian-report-trace",
            guardian_workflow_id(MODEL, queue),
            "ModelGuardianWorkflow (still running), traced: two incidents, each recovered in its report's trace",
        )
    ]


async def guardian_before_trace_patch(client: Client, queue: str) -> list[Recorded]:
    """A guardian started before the guardian-runbook-in-report-trace patch: two incidents."""
    await two_incidents(client, queue, old=[GuardianBeforeReportTrace])
    return [
        Recorded(
            "guardian-before-trace-patch",
            guardian_workflow_id(MODEL, queue),
            "ModelGuardianWorkflow started before the guardian-runbook-in-report-trace patch: two incidents",
            RUNBOOK_IN_REPORT_TRACE,
        )
    ]


async def joined_while_waiting(client: Client, queue: str, old: Sequence[type] = ()) -> str:
    """mistral-7b's recovery waits for the budget (one per zone; llama-2-7b's runs) while two more
    reports of its failure join; then both recover. Returns mistral-7b's runbook's workflow id."""
    fleet = spread_fleet(2)
    fleet.policy = fleet.policy.model_copy(
        update={"detection": fleet.policy.detection.model_copy(update={"max_failovers_per_zone": 1})}
    )
    fleet.promote_gate = asyncio.Event()
    async with worker(client, queue, fleet.activities(), old):
        await report_failure(client, queue, report("llama-2-7b-0", "prober"))
        waiting = await report_failure(client, queue, report("mistral-7b-0", "prober", model="mistral-7b"))
        await budget_when(client, queue, lambda s: len(s.running) == 1 and len(s.waiting) == 1)
        for reporter in ("alert abc123", "cli ops@host"):
            await report_failure(client, queue, report("mistral-7b-0", reporter, model="mistral-7b"))
        fleet.promote_gate.set()
        incident = await asyncio.wait_for(wait_closed(client, queue, waiting), timeout=30)
        await budget_when(client, queue, lambda s: not s.running and not s.waiting)
    return incident.workflow_id


async def guardian_joined_in_start(client: Client, queue: str) -> list[Recorded]:
    """Reports that joined before the runbook started go into its start input."""
    runbook = await joined_while_waiting(client, queue)
    return [
        Recorded(
            "guardian-joined-in-start",
            guardian_workflow_id("mistral-7b", queue),
            "ModelGuardianWorkflow (still running): two reports joined while the budget held it, in the start",
        ),
        Recorded("guardian-joined-in-start-runbook", runbook, "the runbook, started with the two joined reports"),
    ]


async def guardian_before_joined_patch(client: Client, queue: str) -> list[Recorded]:
    """``guardian_joined_in_start`` on a guardian started before the guardian-joined-in-start patch."""
    await joined_while_waiting(client, queue, old=[GuardianBeforeJoinedInStart])
    return [
        Recorded(
            "guardian-before-joined-patch",
            guardian_workflow_id("mistral-7b", queue),
            "ModelGuardianWorkflow started before the guardian-joined-in-start patch: joined reports signalled",
            JOINED_IN_START,
        )
    ]


async def budget_tripped(client: Client, queue: str) -> list[Recorded]:
    """Three models fail in one zone with one recovery per zone allowed and a breaker that trips
    past one waiting: one runs, the breaker trips, a person resets it, the other two run."""
    await three_failures_in_one_zone(client, queue)
    return [
        Recorded("budget-tripped", budget_workflow_id(queue), "BudgetWorkflow (still running): zone cap, trip, reset"),
        Recorded(
            "budget-tripped-guardian",
            guardian_workflow_id("mistral-7b", queue),
            "a guardian whose recovery waited for the budget (lease_granted signal)",
        ),
    ]


async def budget_before_zone_patch(client: Client, queue: str) -> list[Recorded]:
    """``budget_tripped`` on a budget started before the budget-zone-covers-zone patch."""
    await three_failures_in_one_zone(client, queue, old=[BudgetBeforeZoneCoversZone])
    return [
        Recorded(
            "budget-before-zone-patch",
            budget_workflow_id(queue),
            "BudgetWorkflow started before the budget-zone-covers-zone patch: zone cap, trip, reset",
            ZONE_COVERS_ZONE,
        )
    ]


async def budget_before_grants_patch(client: Client, queue: str) -> list[Recorded]:
    """``budget_tripped`` on a budget started before the budget-grants-side-by-side patch."""
    await three_failures_in_one_zone(client, queue, old=[BudgetBeforeGrantsSideBySide])
    return [
        Recorded(
            "budget-before-grants-patch",
            budget_workflow_id(queue),
            "BudgetWorkflow started before the budget-grants-side-by-side patch: zone cap, trip, reset",
            GRANTS_SIDE_BY_SIDE,
        )
    ]


async def report_around_zone_lease(
    client: Client,
    queue: str,
    old: Sequence[type] = (),
    instance: str = "mistral-7b-1",
    after_hand_back: bool = False,
) -> str:
    """A zone failover takes its lease for az-1; the prober reports ``instance`` (another model's:
    its standby in az-1, or one the platform no longer has) while the lease runs, or once it has
    been handed back (``after_hand_back``); the recovery runs. The incident's runbook id."""
    fleet = spread_fleet(2)
    lease_id = "zone-failover-az-1"
    zone_lease = LeaseRequest(
        holder=lease_id, incident=lease_id, model="", zone="az-1", kind=LeaseKind.ZONE, slots=2,
        covers=[MODEL], max_parallel_zone=2,
    )  # fmt: skip
    prober_report = report(instance, "prober", model="mistral-7b")
    async with worker(client, queue, fleet.activities(), old):
        assert await request_lease(client, queue, zone_lease)
        if after_hand_back:
            await hand_back_lease(client, queue, LeaseRelease(incident=lease_id))
            ticket = await report_failure(client, queue, prober_report)
        else:
            ticket = await report_failure(client, queue, prober_report)
            await budget_when(client, queue, lambda s: bool(s.waiting) or s.granted_total >= 2)  # held, or granted
            await hand_back_lease(client, queue, LeaseRelease(incident=lease_id))
        await asyncio.wait_for(wait_closed(client, queue, ticket), timeout=30)
        await budget_when(client, queue, lambda s: not s.running and not s.waiting)
    return ticket.workflow_id


async def budget_zone_failover_first(client: Client, queue: str) -> list[Recorded]:
    runbook = await report_around_zone_lease(client, queue)
    return [
        Recorded(
            "budget-zone-failover-first",
            budget_workflow_id(queue),
            "BudgetWorkflow (still running): a standby's recovery in az-1 waits for az-1's failover lease",
        ),
        Recorded(
            "guardian-claimed-listing",
            guardian_workflow_id("mistral-7b", queue),
            "ModelGuardianWorkflow (still running): the epoch claim lists the model for the runbook",
        ),
        Recorded("failover-claimed-listing", runbook, "FailoverWorkflow deciding from the listing in its start"),
    ]


async def budget_before_failover_first_patch(client: Client, queue: str) -> list[Recorded]:
    """``budget_zone_failover_first`` on a budget started before the budget-zone-failover-first patch."""
    await report_around_zone_lease(client, queue, old=[BudgetBeforeZoneFailoverFirst])
    return [
        Recorded(
            "budget-before-failover-first-patch",
            budget_workflow_id(queue),
            "BudgetWorkflow started before the budget-zone-failover-first patch: the standby's recovery runs at once",
            ZONE_FAILOVER_FIRST,
        )
    ]


async def budget_failed_over_zone_covers(client: Client, queue: str) -> list[Recorded]:
    await report_around_zone_lease(client, queue, after_hand_back=True)
    return [
        Recorded(
            "budget-failed-over-zone-covers",
            budget_workflow_id(queue),
            "BudgetWorkflow (still running): a standby's recovery in az-1 after its failover, as the zone's",
        )
    ]


async def budget_before_failed_over_patch(client: Client, queue: str) -> list[Recorded]:
    """``budget_failed_over_zone_covers`` on a budget started before the budget-failed-over-zone-covers patch."""
    await report_around_zone_lease(client, queue, old=[BudgetBeforeFailedOverZoneCovers], after_hand_back=True)
    return [
        Recorded(
            "budget-before-failed-over-patch",
            budget_workflow_id(queue),
            "BudgetWorkflow started before the budget-failed-over-zone-covers patch: instance-level again",
            FAILED_OVER_ZONE_COVERS,
        )
    ]


async def budget_gone_instance_waits(client: Client, queue: str) -> list[Recorded]:
    await report_around_zone_lease(client, queue, instance="mistral-7b-9")
    return [
        Recorded(
            "budget-gone-instance-waits",
            budget_workflow_id(queue),
            "BudgetWorkflow (still running): a gone instance's recovery waits for az-1's failover lease",
        )
    ]


async def budget_before_gone_instance_patch(client: Client, queue: str) -> list[Recorded]:
    """``budget_gone_instance_waits`` on a budget started before the budget-gone-instance-waits patch."""
    await report_around_zone_lease(client, queue, old=[BudgetBeforeGoneInstanceWaits], instance="mistral-7b-9")
    return [
        Recorded(
            "budget-before-gone-instance-patch",
            budget_workflow_id(queue),
            "BudgetWorkflow started before the budget-gone-instance-waits patch: granted beside the lease",
            GONE_INSTANCE_WAITS,
        )
    ]


async def three_failures_in_one_zone(client: Client, queue: str, old: Sequence[type] = ()) -> None:
    fleet = spread_fleet(3)
    fleet.policy = fleet.policy.model_copy(
        update={
            "detection": fleet.policy.detection.model_copy(update={"max_failovers_per_zone": 1}),
            "budget": fleet.policy.budget.model_copy(update={"trip_after_waiting": 1}),
        }
    )
    fleet.promote_gate = asyncio.Event()
    models = ("llama-2-7b", "mistral-7b", "gpt-4-8b")
    async with worker(client, queue, fleet.activities(), old):
        tickets = [await report_failure(client, queue, report(f"{m}-0", "prober", model=m)) for m in models]
        await budget_when(client, queue, lambda s: s.tripped is not None)
        fleet.promote_gate.set()
        await asyncio.wait_for(wait_closed(client, queue, tickets[0]), timeout=30)
        await budget_when(client, queue, lambda s: not s.running)
        await client.get_workflow_handle(budget_workflow_id(queue)).execute_update(
            "reset", BudgetReset(actor="ops", comment="checked the fleet"), result_type=str
        )
        for ticket in tickets[1:]:
            await asyncio.wait_for(wait_closed(client, queue, ticket), timeout=30)
        await budget_when(client, queue, lambda s: not s.running and not s.waiting)


# -- reconcile, drain, zone, drill ---------------------------------------------------------------


async def reconcile(client: Client, queue: str) -> list[Recorded]:
    """Build the example policy's fleet from nothing, one model's checkpoint corrupt at first; the
    plan without its pacing (as plans were made before it): one activity per change."""
    platform = FakePlatform(corrupt_models={"mistral-7b"}, paced=False)
    async with worker(client, queue, platform.activities()):
        await client.execute_workflow(
            ReconcileStandbysWorkflow.run, ReconcileRequest(), id="reconcile-standbys", task_queue=queue
        )
        await client.execute_workflow(
            ReconcileStandbysWorkflow.run, ReconcileRequest(dry_run=True), id="reconcile-dry-run", task_queue=queue
        )
    return [
        Recorded("reconcile-standbys", "reconcile-standbys", "ReconcileStandbysWorkflow: its pass as a child"),
        Recorded(
            "reconcile-pass",
            reconcile_pass_workflow_id(queue),
            "ReconcilePassWorkflow: deletes, parallel creates, a corrupt checkpoint restored",
        ),
        Recorded("reconcile-dry-run", "reconcile-dry-run", "ReconcileStandbysWorkflow dry run: plans in line"),
    ]


async def reconcile_batched(client: Client, queue: str) -> list[Recorded]:
    """Build the example policy's fleet from nothing while a zone fails over: the serving instances
    at once, then (the failover over) the standbys in batches, one model's checkpoint corrupt."""
    platform = FakePlatform(corrupt_models={"mistral-7b"}, zones_failing_over=["az-1"])
    async with worker(client, queue, platform.activities()):
        await client.execute_workflow(
            ReconcileStandbysWorkflow.run, ReconcileRequest(), id="reconcile-batched", task_queue=queue
        )
    return [
        Recorded(
            "reconcile-pass-batched",
            reconcile_pass_workflow_id(queue),
            "ReconcilePassWorkflow: serving made, a zone failover awaited, standbys in batches, a checkpoint restored",
        )
    ]


async def failover_report_before_instance(client: Client, queue: str) -> list[Recorded]:
    """A prober's report of a standby made after the failure reported (its id reused): probed first."""
    failed_at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    fleet = FakeFleet.of((f"{MODEL}-0", Role.SERVING), (f"{MODEL}-1", Role.HOT))
    made = fleet.instances[f"{MODEL}-1"].model_copy(update={"created_at": failed_at + timedelta(seconds=5)})
    fleet.instances[f"{MODEL}-1"] = made
    fleet.healthy.add(f"{MODEL}-1")
    request = FailoverRequest(
        model=MODEL, instance=f"{MODEL}-1", trigger=Trigger.PROBE, confirmed=True, failed_at=failed_at
    )
    async with worker(client, queue, fleet.activities()):
        ticket = await report_failure(client, queue, FailureReport(request=request, reporter="prober"))
        await asyncio.wait_for(wait_closed(client, queue, ticket), timeout=30)
    return [
        Recorded(
            "failover-report-before-instance",
            ticket.workflow_id,
            "FailoverWorkflow: a report from before its instance was made, probed first (false-alarm)",
        )
    ]


async def reconcile_before_patch(client: Client, queue: str) -> list[Recorded]:
    """A run started before the reconcile-one-pass-at-a-time patch: the pass in line, no child."""
    platform = FakePlatform()
    async with worker(client, queue, platform.activities(), old=[ReconcileBeforeOnePassAtATime]):
        await client.execute_workflow(
            ReconcileStandbysWorkflow.run, ReconcileRequest(), id="reconcile-before-patch", task_queue=queue
        )
    return [
        Recorded(
            "reconcile-before-patch",
            "reconcile-before-patch",
            "ReconcileStandbysWorkflow started before the reconcile-one-pass-at-a-time patch: its pass in line",
            ONE_PASS_AT_A_TIME,
        )
    ]


async def reconcile_before_plan_patch(client: Client, queue: str) -> list[Recorded]:
    """A pass started before the reconcile-plan-in-activity patch: the fleet observed, then planned
    in the workflow."""
    platform = FakePlatform()
    async with worker(client, queue, platform.activities(), old=[ReconcilePassBeforePlanInActivity]):
        await client.execute_workflow(
            ReconcileStandbysWorkflow.run, ReconcileRequest(), id="reconcile-standbys", task_queue=queue
        )
    return [
        Recorded(
            "reconcile-pass-before-plan-patch",
            reconcile_pass_workflow_id(queue),
            "ReconcilePassWorkflow started before the reconcile-plan-in-activity patch: plans in the workflow",
            PLAN_IN_ACTIVITY,
        )
    ]


async def drain(client: Client, queue: str) -> list[Recorded]:
    bad = "gpu-node-0/0"
    instances = (
        on(bad, f"{MODEL}-0", Role.SERVING),
        on(bad, f"{MODEL}-1", Role.HOT),
        on("gpu-node-1/0", f"{MODEL}-2", Role.HOT),
        on("gpu-node-2/0", f"{MODEL}-3", Role.COLD),
    )
    fleet = FakeFleet(instances={i.id: i for i in instances})
    async with worker(client, queue, fleet.activities()):
        await client.execute_workflow(
            DrainGpuWorkflow.run, DrainGpuRequest(gpu=bad, reason="Xid 79"), id="drain-gpu", task_queue=queue
        )
        await budget_when(client, queue, lambda s: not s.running)
    return [Recorded("drain-gpu", "drain-gpu", "DrainGpuWorkflow: cordon, delete the standby, fail over the serving")]


async def zone_with_approval(client: Client, queue: str) -> list[Recorded]:
    await approve_zone_failover(client, queue)
    return [
        Recorded(
            "zone-failover-approval",
            "zone",
            "ZoneFailoverWorkflow: waits for the approve Update, switches two to their hot standbys in its batch",
        ),
        Recorded(
            "failover-switch-record",
            failover_workflow_id("llama-2-7b", "llama-2-7b-0"),
            "FailoverWorkflow recording a switch the zone failover's batch made (one task, no activity)",
        ),
    ]


async def zone_warm_standbys(client: Client, queue: str) -> list[Recorded]:
    """``zone_with_approval`` with warm standbys: nothing to switch in the batch, both instances
    reported to their guardians under the zone failover's lease."""
    await approve_zone_failover(client, queue, warm=True)
    return [
        Recorded(
            "zone-failover-warm",
            "zone",
            "ZoneFailoverWorkflow: warm standbys, so no switch in its batch: both through their guardians",
        ),
        Recorded(
            "guardian-under-zone-lease",
            guardian_workflow_id("llama-2-7b", queue),
            "ModelGuardianWorkflow (still running): a report under the zone failover's lease, no budget asked",
        ),
    ]


def zone_before(name: str, old: type, patch: str, what: str) -> Scenario:
    """``zone_with_approval`` on a run started before ``patch``, by ``old`` (the workflow as it
    was), recorded as ``name``."""

    async def scenario(client: Client, queue: str) -> list[Recorded]:
        await approve_zone_failover(client, queue, old=[old])
        return [Recorded(name, "zone", f"ZoneFailoverWorkflow started before the {patch} patch: {what}", patch)]

    return scenario


async def approve_zone_failover(client: Client, queue: str, old: Sequence[type] = (), warm: bool = False) -> None:
    fleet = warm_standbys(fleet_across_zones()) if warm else fleet_across_zones()
    fleet.policy = fleet.policy.model_copy(
        update={"az_failover": fleet.policy.az_failover.model_copy(update={"require_approval": True})}
    )
    async with worker(client, queue, fleet.activities(), old):
        handle = await client.start_workflow(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone="az-1", reason="zone down"), id="zone", task_queue=queue
        )
        for _ in range(200):
            progress = await handle.query(ZoneFailoverWorkflow.progress)
            if progress is not None and progress.pending:
                break
            await asyncio.sleep(0.05)
        await handle.execute_update(ZoneFailoverWorkflow.approve, ZoneApproval(approver="sre-on-call"))
        result = await handle.result()
        assert len(result.moved) == 2 and not result.failed, result
        await budget_when(client, queue, lambda s: not s.running)


async def drill(client: Client, queue: str) -> list[Recorded]:
    gpu = FakeDrill()
    node = FakeDrill(zones_failed_over=["az-2"], gpus_drained=["gpu-node-1/0"])
    async with worker(client, queue, [*gpu.activities()]):
        await client.execute_workflow(
            DrillWorkflow.run, DrillRequest(scenario=DrillScenario.GPU_FAILURE), id="drill-gpu", task_queue=queue
        )
    async with worker(client, queue, [*node.activities()]):
        await client.execute_workflow(
            DrillWorkflow.run, DrillRequest(scenario=DrillScenario.NODE_DOWN), id="drill-node", task_queue=queue
        )
    return [
        Recorded("drill-gpu", "drill-gpu", "DrillWorkflow gpu-failure: run, restore, uncordon, reconcile, report"),
        Recorded("drill-node", "drill-node", "DrillWorkflow node-down: a zone failed back (child), a GPU uncordoned"),
        Recorded("drill-node-failback", "zone-failback-az-2-drill-node", "ZoneFailbackWorkflow, the drill's child"),
    ]


SCENARIOS: dict[str, Scenario] = {
    **FAILOVERS,
    "guardian-joined": guardian_joined,
    "guardian-direct-start": guardian_direct_start,
    "direct-start-before-checks": direct_start_before_checks,
    "guardian-report-trace": guardian_report_trace,
    "guardian-before-trace-patch": guardian_before_trace_patch,
    "guardian-joined-in-start": guardian_joined_in_start,
    "guardian-before-joined-patch": guardian_before_joined_patch,
    "budget-tripped": budget_tripped,
    "budget-before-zone-patch": budget_before_zone_patch,
    "budget-before-grants-patch": budget_before_grants_patch,
    "budget-zone-failover-first": budget_zone_failover_first,
    "budget-before-failover-first-patch": budget_before_failover_first_patch,
    "budget-failed-over-zone-covers": budget_failed_over_zone_covers,
    "budget-before-failed-over-patch": budget_before_failed_over_patch,
    "budget-gone-instance-waits": budget_gone_instance_waits,
    "budget-before-gone-instance-patch": budget_before_gone_instance_patch,
    "reconcile": reconcile,
    "reconcile-batched": reconcile_batched,
    "failover-report-before-instance": failover_report_before_instance,
    "reconcile-before-patch": reconcile_before_patch,
    "reconcile-before-plan-patch": reconcile_before_plan_patch,
    "drain": drain,
    "zone-approval": zone_with_approval,
    "zone-warm-standbys": zone_warm_standbys,
    "zone-before-switch-in-batch": zone_before(
        "zone-failover-before-switch-in-batch", ZoneFailoverBeforeSwitchInBatch, SWITCH_IN_BATCH, "all via guardians"
    ),
    "zone-before-cordon-at-once": zone_before(
        "zone-failover-before-cordon-at-once", ZoneFailoverBeforeCordonAtOnce, CORDON_AT_ONCE, "a cordon per GPU"
    ),
    "zone-before-batched": zone_before(
        "zone-failover-before-batched", ZoneFailoverBeforeBatched, BATCHED, "approve, move two one by one"
    ),
    "zone-before-one-lease": zone_before(
        "zone-failover-before-one-lease", ZoneFailoverBeforeOneLease, ONE_LEASE, "approve, a lease per instance"
    ),
    "drill": drill,
}


async def record(only: Sequence[str] = ()) -> dict[str, dict[str, str]]:
    """Run the scenarios (all, or those named) on a fresh dev server; write their histories."""
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"no scenario {', '.join(unknown)}; there are: {', '.join(SCENARIOS)}")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        data_converter=drctl_data_converter,
        dev_server_extra_args=[*dev_server_flags(), "--log-level", "error"],
        ui=False,
    )
    # Entries of histories not recorded here (a scenario not run, a history kept from before a
    # patch: docs/workflows.md) stay as long as their file does.
    kept = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    manifest: dict[str, dict[str, str]] = {k: v for k, v in kept.items() if (HERE / f"{k}.json").exists()}
    try:
        for key, scenario in SCENARIOS.items():
            if only and key not in only:
                continue
            began = time.monotonic()
            queue = f"{REPLAY_QUEUE_PREFIX}{key}"
            for rec in await asyncio.wait_for(scenario(env.client, queue), timeout=60):
                history = await env.client.get_workflow_handle(rec.workflow_id).fetch_history()
                (HERE / f"{rec.name}.json").write_text(history.to_json() + "\n")
                started = history.events[0].workflow_execution_started_event_attributes
                manifest[rec.name] = {
                    "workflow_id": rec.workflow_id,
                    "workflow_type": started.workflow_type.name,
                    "task_queue": started.task_queue.name,
                    "about": rec.about,
                } | ({"before_patch": rec.before_patch} if rec.before_patch else {})
            print(f"{key}: {time.monotonic() - began:.1f} s")
    finally:
        await env.shutdown()
    MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    return manifest


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # not the fakes' expected failures, logged as warnings
    logging.getLogger("temporalio").setLevel(logging.CRITICAL)
    began = time.monotonic()
    manifest = asyncio.run(record(sys.argv[1:]))
    print(f"{len(manifest)} histories in {HERE} ({time.monotonic() - began:.1f} s)", flush=True)
    sys.stderr.flush()
    # Skip the interpreter's finalization: the SDK's core threads, still alive then, sometimes abort
    # it ("PyGILState_Release: thread state ... must be current"), exiting 134 after all was written.
    os._exit(0)


if __name__ == "__main__":
    main()
