"""ZoneFailoverWorkflow with fake activities: the zone's GPUs are cordoned, its serving instances
fail over (critical first), and with requireApproval nothing moves before the approve Update."""

from __future__ import annotations

import asyncio
import json
import uuid

from temporalio import activity
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.payloads import (
    ActivityName,
    CordonGpusRequest,
    FailoverOutcome,
    FailoverRequest,
    FailoverResult,
    FailureReport,
    Instance,
    LeaseKind,
    ReportBatch,
    Role,
    RunbookOutcomes,
    SearchAttr,
    StepReport,
    Trigger,
    ZoneApproval,
    ZoneFailoverRequest,
    ZoneFailoverResult,
    ZoneSwitchBatch,
    ZoneSwitchOutcomes,
    failover_workflow_id,
)
from drctl.temporal.incidents import RECORD_IDS, budget_state, report_failure
from drctl.workflows.budget import BudgetWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.guardian import ModelGuardianWorkflow
from drctl.workflows.zone import CORDON_HEARTBEAT, STEP_TIMEOUT, ZoneFailbackWorkflow, ZoneFailoverWorkflow
from tests.workflows.fakes import FakeFleet
from tests.workflows.test_guardian import budget_when


def fleet_across_zones() -> FakeFleet:
    def inst(iid: str, model: str, role: Role, zone: str) -> Instance:
        gpu = {"az-1": "gpu-node-0/0", "az-2": "gpu-node-1/0", "az-3": "gpu-node-2/0"}[zone]
        return Instance(
            id=iid, model=model, role=role, zone=zone, gpu=gpu, node=gpu.split("/")[0],
            lb_priority={Role.SERVING: 0, Role.HOT: 1}.get(role),
        )  # fmt: skip

    instances = [
        inst("gpt-4-8b-0", "gpt-4-8b", Role.SERVING, "az-1"),
        inst("gpt-4-8b-1", "gpt-4-8b", Role.HOT, "az-3"),
        inst("llama-2-7b-0", "llama-2-7b", Role.SERVING, "az-1"),
        inst("llama-2-7b-1", "llama-2-7b", Role.HOT, "az-3"),
        inst("mistral-7b-0", "mistral-7b", Role.SERVING, "az-2"),
        inst("mistral-7b-1", "mistral-7b", Role.HOT, "az-3"),
    ]
    return FakeFleet(instances={i.id: i for i in instances})


def warm_standbys(fleet: FakeFleet) -> FakeFleet:
    """The fleet with its hot standbys warm: a zone failover leaves their models to the guardians
    (its batch switches only to hot standbys)."""
    for iid, instance in fleet.instances.items():
        if instance.role == Role.HOT:
            fleet.instances[iid] = instance.model_copy(update={"role": Role.WARM, "lb_priority": None})
    return fleet


def hot_llama_2(zone: str, gpu: str) -> Instance:
    """A second hot standby of llama-2-7b, ``llama-2-7b-2``, on ``gpu`` in ``zone``."""
    return Instance(
        id="llama-2-7b-2", model="llama-2-7b", role=Role.HOT, zone=zone, gpu=gpu, node=gpu.split("/")[0], lb_priority=1
    )


def _with_extra_models(fleet: FakeFleet, count: int) -> FakeFleet:
    """``extra-N``: serving in az-1, a hot standby in az-3."""
    for n in range(count):
        model = f"extra-{n}"
        fleet.instances[f"{model}-0"] = Instance(
            id=f"{model}-0", model=model, role=Role.SERVING, zone="az-1", gpu="gpu-node-0/1", node="gpu-node-0",
            lb_priority=0,
        )  # fmt: skip
        fleet.instances[f"{model}-1"] = Instance(
            id=f"{model}-1", model=model, role=Role.HOT, zone="az-3", gpu="gpu-node-2/1", node="gpu-node-2",
            lb_priority=1,
        )  # fmt: skip
    return fleet


def zone_worker(client: Client, queue: str, activities: list[object]) -> Worker:
    """A worker of the zone failover's workflows over ``activities`` (a fleet's fakes, some swapped)."""
    return Worker(
        client,
        task_queue=queue,
        workflows=[ZoneFailoverWorkflow, FailoverWorkflow, ModelGuardianWorkflow, BudgetWorkflow],
        activities=activities,  # type: ignore[arg-type]
    )


async def run_zone(env: WorkflowEnvironment, fleet: FakeFleet, **request: object) -> ZoneFailoverResult:
    queue = f"zone-{uuid.uuid4()}"
    async with zone_worker(env.client, queue, fleet.activities()):
        return await env.client.execute_workflow(
            ZoneFailoverWorkflow.run,
            ZoneFailoverRequest.model_validate(request),
            id=f"zone-{uuid.uuid4()}",
            task_queue=queue,
        )


async def test_zone_serving_fails_over_critical_first_and_zone_gpus_are_cordoned(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = fleet_across_zones()
    fleet.policy = fleet.policy.model_copy(
        update={"az_failover": fleet.policy.az_failover.model_copy(update={"max_parallel_failovers": 1})}
    )
    result = await run_zone(time_skipping_env, fleet, zone="az-1", reason="zone down")
    assert sorted(result.moved) == ["gpt-4-8b-0 → gpt-4-8b-1 (recovered)", "llama-2-7b-0 → llama-2-7b-1 (recovered)"]
    assert result.failed == [] and result.pending == []
    assert {g.split("/")[0] for g in result.cordoned_gpus} == {"gpu-node-0", "gpu-node-3"}  # az-1 nodes
    promotes = [subject for step, subject in fleet.calls if step == "promote"]
    assert promotes[0] == "llama-2-7b-1"  # critical model first (one at a time in this policy)
    assert fleet.instances["mistral-7b-0"].role == Role.SERVING  # other zones untouched
    # Last: reconciliation, so standbys leave the cordoned zone now rather than at the next schedule.
    assert fleet.calls[-1][0] == "replenish" and result.reconcile == "triggered"
    # Asked once, by the zone failover: its runbooks leave it to it (one trigger each before).
    assert [step for step, _ in fleet.calls].count("replenish") == 1


async def test_approval_gate_holds_until_the_update(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = fleet_across_zones()
    fleet.policy = fleet.policy.model_copy(
        update={"az_failover": fleet.policy.az_failover.model_copy(update={"require_approval": True})}
    )
    queue = f"zone-{uuid.uuid4()}"
    async with zone_worker(time_skipping_env.client, queue, fleet.activities()):
        handle = await time_skipping_env.client.start_workflow(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone="az-2"), id=f"zone-{uuid.uuid4()}", task_queue=queue
        )
        for _ in range(50):
            progress = await handle.query(ZoneFailoverWorkflow.progress)
            if progress is not None and progress.pending:
                break
            await asyncio.sleep(0.05)
        assert not [c for c in fleet.calls if c[0] in ("cordon", "promote")], "nothing moves before approval"
        answer = await handle.execute_update(
            ZoneFailoverWorkflow.approve,
            ZoneApproval(approver="sre-on-call"),
        )
        assert answer == "approved by sre-on-call"
        result = await handle.result()
    assert result.approved_by == "sre-on-call"
    assert result.moved == ["mistral-7b-0 → mistral-7b-1 (recovered)"]


async def test_failback_returns_the_zone_to_placement_only_when_asked(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = fleet_across_zones()
    await run_zone(time_skipping_env, fleet, zone="az-1")
    assert fleet.cordoned and all(g.startswith(("gpu-node-0/", "gpu-node-3/")) for g in fleet.cordoned)
    queue = f"failback-{uuid.uuid4()}"
    async with Worker(
        time_skipping_env.client, task_queue=queue, workflows=[ZoneFailbackWorkflow], activities=fleet.activities()
    ):
        result = await time_skipping_env.client.execute_workflow(
            ZoneFailbackWorkflow.run, ZoneFailoverRequest(zone="az-1"), id=f"failback-{uuid.uuid4()}", task_queue=queue
        )
    assert fleet.cordoned == set() and len(result.uncordoned_gpus) == 8
    assert ("replenish", "llama-2-7b") in fleet.calls  # reconciliation asked to use the zone again
    assert fleet.instances["llama-2-7b-1"].role == Role.SERVING  # serving stays where it is


async def test_failback_plan_lists_the_gpus_it_would_return_and_changes_nothing(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = fleet_across_zones()
    await run_zone(time_skipping_env, fleet, zone="az-1")
    cordoned = set(fleet.cordoned)
    calls = len(fleet.calls)
    queue = f"failback-{uuid.uuid4()}"
    async with Worker(
        time_skipping_env.client, task_queue=queue, workflows=[ZoneFailbackWorkflow], activities=fleet.activities()
    ):
        result = await time_skipping_env.client.execute_workflow(
            ZoneFailbackWorkflow.run,
            ZoneFailoverRequest(zone="az-1", plan_only=True),
            id=f"failback-{uuid.uuid4()}",
            task_queue=queue,
        )
    assert fleet.cordoned == cordoned and len(cordoned) == 8  # nothing returned to placement
    assert not [c for c in fleet.calls[calls:] if c[0] in ("uncordon", "replenish")]
    assert result.uncordoned_gpus == [] and result.reconcile == ""
    assert result.plan[0].startswith("uncordon 8 GPU(s) of az-1: ")
    assert all(gpu in result.plan[0] for gpu in cordoned)
    assert result.plan[1].startswith("request reconciliation")


async def test_serving_moves_to_the_standby_zone_first(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = fleet_across_zones()
    # A second hot llama standby, in the other active zone, with the lower id: without the
    # preference it would be tried first.
    fleet.instances["llama-2-7b-1"] = fleet.instances["llama-2-7b-1"].model_copy(
        update={"zone": "az-2", "gpu": "gpu-node-1/0", "node": "gpu-node-1"}
    )
    fleet.instances["llama-2-7b-2"] = hot_llama_2("az-3", "gpu-node-2/0")
    result = await run_zone(time_skipping_env, fleet, zone="az-1", reason="zone down")
    assert "llama-2-7b-0 → llama-2-7b-2 (recovered)" in result.moved  # az-3, the policy's standbyZone


async def test_a_failover_of_the_standby_zone_prefers_the_active_zones(time_skipping_env: WorkflowEnvironment) -> None:
    """The zone checks watch the standby zone too (serving moves there after an active zone's
    failover). Failing it over, its own standbys (down with it) are not tried first: the active
    zones' are."""
    fleet = fleet_across_zones()
    assert fleet.policy.az_failover.standby_zone == "az-3"
    fleet.instances["llama-2-7b-0"] = fleet.instances["llama-2-7b-0"].model_copy(
        update={"zone": "az-3", "gpu": "gpu-node-2/1", "node": "gpu-node-2"}
    )
    fleet.instances["llama-2-7b-2"] = hot_llama_2("az-2", "gpu-node-1/1")
    result = await run_zone(time_skipping_env, fleet, zone="az-3", reason="standby zone down")
    # llama-2-7b-1 (hot, az-3) has the lower id and was the standby zone's: it is passed over.
    assert result.moved == ["llama-2-7b-0 → llama-2-7b-2 (recovered)"]
    plan = await run_zone(time_skipping_env, fleet_across_zones(), zone="az-3", plan_only=True)
    assert not [line for line in plan.plan if line.startswith("report ")]  # nothing serves in az-3 there


async def test_plan_lists_what_the_zone_failover_would_do_and_changes_nothing(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = fleet_across_zones()
    result = await run_zone(time_skipping_env, fleet, zone="az-1", reason="what if", plan_only=True)
    assert result.moved == [] and result.cordoned_gpus == []
    assert not fleet.cordoned and not any(step in ("promote", "cordon", "claim-epoch") for step, _ in fleet.calls)
    assert result.plan[0].startswith("cordon ") and "az-1" in result.plan[0]
    moves = [line for line in result.plan if line.startswith(("report ", "switch "))]
    assert moves == [
        "switch llama-2-7b-0 to llama-2-7b-1 (hot, az-3) in the zone's batch",  # critical first
        "switch gpt-4-8b-0 to gpt-4-8b-1 (hot, az-3) in the zone's batch",
    ]
    assert any("one zone-level lease for 2 runbook(s)" in line for line in result.plan)
    # A warm standby is loaded by the model's runbook: its guardian's.
    fleet = warm_standbys(fleet_across_zones())
    result = await run_zone(time_skipping_env, fleet, zone="az-1", reason="what if", plan_only=True)
    assert "report gpt-4-8b-0 to guardian-gpt-4-8b: promote gpt-4-8b-1 (warm, az-3)" in result.plan


async def test_a_zone_fails_over_under_one_lease_max_parallel_at_a_time(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """Five serving instances (and a standby) in the zone, their standbys warm (the guardians'
    path: the batch switches only to hot standbys): the zone failover takes one zone-level
    lease of two slots (``maxParallelFailovers``) for the five, reports and follows them in one
    activity, and two runbooks run at a time; the guardians ask the budget nothing (one grant in
    all, not five). The standby is left to reconciliation."""
    fleet = _with_extra_models(fleet_across_zones(), 3)
    warm_standbys(fleet)  # through the guardians (the batch switches to hot standbys only)
    # mistral serves from az-2; its second hot standby is in the failed zone: not the zone
    # failover's (reconciliation moves it), and mistral is not in the lease.
    fleet.instances["mistral-7b-2"] = Instance(
        id="mistral-7b-2", model="mistral-7b", role=Role.HOT, zone="az-1", gpu="gpu-node-0/2", node="gpu-node-0",
        lb_priority=1,
    )  # fmt: skip
    fleet.policy = fleet.policy.model_copy(
        update={"az_failover": fleet.policy.az_failover.model_copy(update={"max_parallel_failovers": 2})}
    )
    fleet.promote_gate = asyncio.Event()
    queue = f"zone-{uuid.uuid4()}"
    client = time_skipping_env.client
    async with zone_worker(client, queue, fleet.activities()):
        handle = await client.start_workflow(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone="az-1"), id=f"zone-{uuid.uuid4()}", task_queue=queue
        )
        held = await budget_when(client, queue, lambda s: len(s.running) == 1)
        (lease,) = held.running
        assert (lease.kind, lease.slots, lease.zone, lease.incident) == (LeaseKind.ZONE, 2, "az-1", handle.id)
        assert lease.covers == ["extra-0", "extra-1", "extra-2", "gpt-4-8b", "llama-2-7b"]
        assert held.waiting == []
        for _ in range(100):
            if len(promotes := [s for step, s in fleet.calls if step == "promote"]) >= 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a third runbook, were it let through, would have promoted by now
        assert len([s for step, s in fleet.calls if step == "promote"]) == 2
        # Started in order: the critical model, then the unranked ones by name (gpt-4-8b is not ranked).
        assert sorted(promotes) == ["extra-0-1", "llama-2-7b-1"]
        fleet.promote_gate.set()
        result = await handle.result()
        scheduled_events = [
            event.activity_task_scheduled_event_attributes
            async for event in handle.fetch_history_events()
            if event.HasField("activity_task_scheduled_event_attributes")
        ]
        scheduled = [attrs.activity_type.name for attrs in scheduled_events]
        (reported,) = [
            a.input.payloads[0] for a in scheduled_events if a.activity_type.name == ActivityName.REPORT_AND_AWAIT
        ]
        # The runbooks it opens say so in the audit (they read `alert` before).
        assert {r["request"]["trigger"] for r in json.loads(reported.data)["reports"]} == {Trigger.ZONE_FAILOVER}
        # Handed back before the zone failover asked for reconciliation (an Update, not a signal):
        # the budget holds it no more the moment the zone failover has ended.
        after = await budget_state(client, queue)
    assert after is not None and after.running == []
    assert len(result.moved) == 5 and result.failed == [] and result.pending == []
    assert fleet.instances["mistral-7b-2"].role == Role.HOT and fleet.instances["mistral-7b-0"].role == Role.SERVING
    assert scheduled.count(ActivityName.REQUEST_LEASE) == 1 and scheduled.count(ActivityName.REPORT_AND_AWAIT) == 1
    assert ActivityName.REPORT_FAILURE not in scheduled
    assert after.granted_total == 1 and after.waiting == []  # the zone's one lease, handed back


async def test_a_zone_failover_whose_report_activity_is_cut_short_recovers_each_instance_once(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """The worker running ``report_and_await`` dies after the first runbook has ended (here: its
    first attempt fails there). The retry reports the whole zone again: the recovered instance's
    report joins its closed incident, the other starts its runbook; nothing is promoted twice."""
    fleet = warm_standbys(fleet_across_zones())
    real = next(a for a in fleet.activities() if getattr(a, "__name__", "") == "report_and_await")

    @activity.defn(name=ActivityName.REPORT_AND_AWAIT)
    async def cut_short(batch: ReportBatch) -> RunbookOutcomes:
        if activity.info().attempt == 1:
            await real(batch.model_copy(update={"reports": batch.reports[:1]}))
            raise ApplicationError("the worker died")
        return await real(batch)

    queue = f"zone-{uuid.uuid4()}"
    activities = [a for a in fleet.activities() if getattr(a, "__name__", "") != "report_and_await"]
    async with zone_worker(time_skipping_env.client, queue, [*activities, cut_short]):
        result = await time_skipping_env.client.execute_workflow(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone="az-1"), id=f"zone-{uuid.uuid4()}", task_queue=queue
        )
        after = await budget_when(time_skipping_env.client, queue, lambda s: not s.running)
    assert sorted(result.moved) == ["gpt-4-8b-0 → gpt-4-8b-1 (recovered)", "llama-2-7b-0 → llama-2-7b-1 (recovered)"]
    promotes = [subject for step, subject in fleet.calls if step == "promote"]
    assert sorted(promotes) == ["gpt-4-8b-1", "llama-2-7b-1"]  # once each, across both attempts
    assert after.waiting == [] and after.granted_total == 1


async def test_the_zone_is_cordoned_in_one_activity_and_a_try_not_done_is_tried_again_within_seconds(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """The zone's GPUs are cordoned by one ``cordon_gpus`` activity. Its first try never ends (a
    task lost between the server and the worker, as one of 32 side-by-side cordons once was at
    1,000 instances): it does not heartbeat, so the next try runs after ``CORDON_HEARTBEAT``, not
    after the 30 s of a step, and the zone fails over."""
    fleet = fleet_across_zones()
    real = next(a for a in fleet.activities() if getattr(a, "__name__", "") == "cordon_all")

    @activity.defn(name=ActivityName.CORDON_GPUS)
    async def first_try_lost(request: CordonGpusRequest) -> StepReport:
        if activity.info().attempt == 1:
            await asyncio.Event().wait()
        return await real(request)  # type: ignore[operator]

    queue = f"zone-{uuid.uuid4()}"
    activities = [a for a in fleet.activities() if getattr(a, "__name__", "") != "cordon_all"]
    async with zone_worker(time_skipping_env.client, queue, [*activities, first_try_lost]):
        handle = await time_skipping_env.client.start_workflow(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone="az-1"), id=f"zone-{uuid.uuid4()}", task_queue=queue
        )
        result = await handle.result()
        history = await handle.fetch_history()
    assert sorted(result.moved) == ["gpt-4-8b-0 → gpt-4-8b-1 (recovered)", "llama-2-7b-0 → llama-2-7b-1 (recovered)"]
    assert (
        {g.split("/")[0] for g in fleet.cordoned}
        == {"gpu-node-0", "gpu-node-3"}
        == {g.split("/")[0] for g in result.cordoned_gpus}
    )
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert scheduled.count(ActivityName.CORDON_GPUS) == 1 and ActivityName.CORDON_GPU not in scheduled
    took = history.events[-1].event_time.ToDatetime() - history.events[0].event_time.ToDatetime()
    assert CORDON_HEARTBEAT <= took < STEP_TIMEOUT


async def _record_id(client: Client, zone_failover: str, model: str, instance: str, epoch: int) -> str:
    """The id of the record a zone failover's batch started for ``instance``: the model's usual
    runbook id, or the next free one (``start_switch_record``) when earlier tests took it."""
    plain = failover_workflow_id(model, instance)
    for workflow_id in [plain, f"{plain}-z{epoch}", *(f"{plain}-z{epoch}-{n}" for n in range(2, RECORD_IDS))]:
        described = await client.get_workflow_handle(workflow_id).describe()
        if (await described.memo()).get("switched_by") == zone_failover:
            return workflow_id
    raise AssertionError(f"no record of {instance} by {zone_failover}")


async def _scheduled(handle: object) -> list[str]:
    return [
        event.activity_task_scheduled_event_attributes.activity_type.name
        async for event in handle.fetch_history_events()  # type: ignore[attr-defined]
        if event.HasField("activity_task_scheduled_event_attributes")
    ]


async def test_hot_standbys_switch_in_one_batch_each_recorded_as_its_models_runbook(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """Every serving instance of the zone has a hot standby out of it: the zone failover plans and
    switches them in two activities, at most ``maxParallelSwitches`` at a time, critical first,
    reports nothing to a guardian, and each switch is a ``FailoverWorkflow`` in the audit (the
    model's usual runbook id, trigger ``zone-failover``, the batch's steps and epoch)."""
    fleet = _with_extra_models(fleet_across_zones(), 3)
    fleet.policy = fleet.policy.model_copy(
        update={
            "az_failover": fleet.policy.az_failover.model_copy(
                update={"max_parallel_switches": 2, "max_parallel_failovers": 1}
            )
        }
    )
    fleet.promote_gate = asyncio.Event()
    queue = f"zone-{uuid.uuid4()}"
    client = time_skipping_env.client
    async with zone_worker(client, queue, fleet.activities()):
        handle = await client.start_workflow(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone="az-1"), id=f"zone-{uuid.uuid4()}", task_queue=queue
        )
        for _ in range(100):
            if len([s for step, s in fleet.calls if step == "promote"]) >= 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a third switch, were it let through, would have promoted by now
        promotes = [s for step, s in fleet.calls if step == "promote"]
        assert sorted(promotes) == ["extra-0-1", "llama-2-7b-1"]  # two slots: the critical model first
        during = await handle.query(ZoneFailoverWorkflow.progress)
        assert during is not None and len(during.switching) == 5 and during.moved == []  # what it does now
        fleet.promote_gate.set()
        result = await handle.result()
        assert result.switching == []
        scheduled = await _scheduled(handle)
        record_id = await _record_id(client, handle.id, "llama-2-7b", "llama-2-7b-0", fleet.epochs["llama-2-7b"])
        record = await client.get_workflow_handle(record_id, result_type=FailoverResult).result()
        described = await client.get_workflow_handle(record_id).describe()
    assert len(result.moved) == 5 and result.failed == [] and result.pending == []
    assert "llama-2-7b-0 → llama-2-7b-1 (recovered)" in result.moved
    assert ActivityName.REPORT_AND_AWAIT not in scheduled and ActivityName.REPORT_FAILURE not in scheduled
    assert scheduled.count(ActivityName.PLAN_ZONE_SWITCH) == 1 and scheduled.count(ActivityName.SWITCH_ZONE_TO_HOT) == 1
    for model in ("gpt-4-8b", "llama-2-7b", "extra-0", "extra-1", "extra-2"):
        assert fleet.instances[f"{model}-0"].role == Role.FAILED
        assert fleet.instances[f"{model}-1"].role == Role.SERVING and fleet.instances[f"{model}-1"].lb_priority == 0
    # The record: recovered, hot, the batch's steps in the runbook's order (the last serving
    # instance ejected once its replacement serves), fenced by an epoch the batch claimed.
    assert record.outcome == FailoverOutcome.RECOVERED and record.promoted == "llama-2-7b-1"
    assert record.tier == Role.HOT and record.handled_by == handle.id and record.rto_ms is not None
    assert [s.step for s in record.steps] == ["pick", "promote", "load", "register", "verify", "eject"]
    assert record.epoch == fleet.epochs["llama-2-7b"]
    attrs = described.typed_search_attributes
    assert attrs.get(SearchAttributeKey.for_keyword(SearchAttr.TRIGGER)) == Trigger.ZONE_FAILOVER.value
    assert attrs.get(SearchAttributeKey.for_keyword(SearchAttr.OUTCOME)) == FailoverOutcome.RECOVERED.value
    assert fleet.calls[-1][0] == "replenish"


async def test_a_hot_standby_that_fails_its_switch_is_taken_out_and_its_model_goes_to_its_guardian(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """llama's hot standby in az-3 cannot be promoted: the batch takes it out (as the runbook
    takes out a standby that cannot take over) and leaves llama to its guardian, whose runbook
    promotes the next standby; gpt switches in the batch."""
    fleet = fleet_across_zones()
    fleet.instances["llama-2-7b-2"] = hot_llama_2("az-2", "gpu-node-1/1")
    fleet.broken.add("llama-2-7b-1")
    result = await run_zone(time_skipping_env, fleet, zone="az-1", reason="zone down")
    assert sorted(result.moved) == ["gpt-4-8b-0 → gpt-4-8b-1 (recovered)", "llama-2-7b-0 → llama-2-7b-2 (recovered)"]
    assert fleet.instances["llama-2-7b-1"].role == Role.FAILED  # taken out by the batch
    assert fleet.instances["llama-2-7b-2"].role == Role.SERVING
    assert [s for step, s in fleet.calls if step == "promote"].count("llama-2-7b-1") == 1  # not tried again


async def test_a_model_already_recovering_is_left_to_its_guardian(time_skipping_env: WorkflowEnvironment) -> None:
    """gpt-4-8b's runbook for another failure (in az-2) holds a lease when az-1 fails over: the
    batch leaves gpt-4-8b-0 to the guardian, which runs it after that runbook (one at a time per
    model: never two promotions of one standby); llama switches in the batch."""
    fleet = fleet_across_zones()
    fleet.instances["gpt-4-8b-2"] = Instance(
        id="gpt-4-8b-2", model="gpt-4-8b", role=Role.SERVING, zone="az-2", gpu="gpu-node-1/2", node="gpu-node-1",
        lb_priority=0,
    )  # fmt: skip
    fleet.instances["gpt-4-8b-3"] = Instance(
        id="gpt-4-8b-3", model="gpt-4-8b", role=Role.HOT, zone="az-2", gpu="gpu-node-1/3", node="gpu-node-1",
        lb_priority=1,
    )  # fmt: skip
    fleet.promote_gate, fleet.gated = asyncio.Event(), {"gpt-4-8b-1"}
    queue = f"zone-{uuid.uuid4()}"
    client = time_skipping_env.client
    async with zone_worker(client, queue, fleet.activities()):
        report = FailureReport(
            request=FailoverRequest(model="gpt-4-8b", instance="gpt-4-8b-2", confirmed=True, trigger=Trigger.PROBE),
            reporter="test",
        )
        await report_failure(client, queue, report)
        for _ in range(100):
            if ("promote", "gpt-4-8b-1") in fleet.calls:
                break
            await asyncio.sleep(0.05)
        assert ("promote", "gpt-4-8b-1") in fleet.calls  # that runbook holds gpt-4-8b now
        handle = await client.start_workflow(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone="az-1"), id=f"zone-{uuid.uuid4()}", task_queue=queue
        )
        for _ in range(100):
            if fleet.instances["llama-2-7b-1"].role == Role.SERVING:
                break
            await asyncio.sleep(0.05)
        assert fleet.instances["llama-2-7b-1"].role == Role.SERVING  # the batch did not wait for gpt
        assert fleet.instances["gpt-4-8b-0"].role == Role.SERVING  # left to gpt's guardian, still queued
        fleet.promote_gate.set()
        result = await handle.result()
        scheduled = await _scheduled(handle)
    assert sorted(result.moved) == ["gpt-4-8b-0 → gpt-4-8b-3 (recovered)", "llama-2-7b-0 → llama-2-7b-1 (recovered)"]
    assert scheduled.count(ActivityName.REPORT_AND_AWAIT) == 1
    promotes = [s for step, s in fleet.calls if step == "promote"]
    assert sorted(promotes) == ["gpt-4-8b-1", "gpt-4-8b-3", "llama-2-7b-1"]  # each once
    assert fleet.refused == []  # no step of either gpt runbook was fenced out


async def test_a_switch_batch_cut_short_switches_each_model_once_and_records_it_once(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """The worker running the batch dies after the first switch (here: its first attempt fails
    there). The retry finds that switch done (every step idempotent under the plan's epoch) and
    its record started: one promotion and one record per model."""
    fleet = fleet_across_zones()
    real = next(a for a in fleet.activities() if getattr(a, "__name__", "") == "switch_zone_to_hot")

    @activity.defn(name=ActivityName.SWITCH_ZONE_TO_HOT)
    async def cut_short(batch: ZoneSwitchBatch) -> ZoneSwitchOutcomes:
        if activity.info().attempt == 1:
            await real(batch.model_copy(update={"switches": batch.switches[:1]}))
            raise ApplicationError("the worker died")
        return await real(batch)

    queue = f"zone-{uuid.uuid4()}"
    activities = [a for a in fleet.activities() if getattr(a, "__name__", "") != "switch_zone_to_hot"]
    client = time_skipping_env.client
    async with zone_worker(client, queue, [*activities, cut_short]):
        zone_id = f"zone-{uuid.uuid4()}"
        result = await client.execute_workflow(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone="az-1"), id=zone_id, task_queue=queue
        )
        records = [
            await _record_id(client, zone_id, model, f"{model}-0", fleet.epochs[model])
            for model in ("gpt-4-8b", "llama-2-7b")
        ]
        for record_id in records:  # started once: a second start of the same id would have failed
            described = await client.get_workflow_handle(record_id).describe()
            assert (await described.memo())["switched_by"] == zone_id
    assert sorted(result.moved) == ["gpt-4-8b-0 → gpt-4-8b-1 (recovered)", "llama-2-7b-0 → llama-2-7b-1 (recovered)"]
    promotes = [subject for step, subject in fleet.calls if step == "promote"]
    assert sorted(promotes) == ["gpt-4-8b-1", "llama-2-7b-1"]  # once each: the retry's promote found it done
    assert len(set(records)) == 2
