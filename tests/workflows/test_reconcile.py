"""ReconcileStandbysWorkflow on the time-skipping server with fake platform activities."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.activities.reconcile import applied_side_by_side, await_reconcile_pass
from drctl.payloads import (
    ActivityName,
    ChangeBatch,
    ChangeOutcomes,
    ErrorType,
    FleetSnapshot,
    Instance,
    InstanceChange,
    InstanceRef,
    ReconcileAction,
    ReconcileActionKind,
    ReconcilePlan,
    ReconcileRequest,
    ReconcileResult,
    Role,
    StepReport,
    ZoneNames,
)
from drctl.policies.loader import load_policy_file
from drctl.policies.reconcile import plan_pass
from drctl.policies.schema import DRPolicy
from drctl.workflows.reconcile import ReconcilePassWorkflow, ReconcileStandbysWorkflow
from tests.policies.test_reconcile import as_seen_on_drctl_up

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")


@dataclass
class FakePlatform:
    instances: dict[str, Instance] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    corrupt_models: set[str] = field(default_factory=set)
    """Models whose checkpoint fails its checksum until restored."""
    broken: set[str] = field(default_factory=set)
    """Instances whose create fails for good (the model does not load)."""
    busy: dict[str, str] = field(default_factory=dict)
    """Models with a recovery in flight, as the budget tells ``observe_fleet``."""
    hold: asyncio.Event | None = None
    """When set, creates wait for it (a pass that takes a while: instances loading)."""
    plan_dies_first: bool = False
    """The first attempt of the planning activity never answers (its worker died holding it)."""
    plan_attempts: list[tuple[int, datetime]] = field(default_factory=list)
    policy: DRPolicy = POLICY
    change_s: float = 0.0
    """How long each create and delete takes (real time), so that changes overlap."""
    timeline: list[tuple[str, str, str | None]] = field(default_factory=list)
    """("start" or "end", "create" or "delete", node) of every change, in order."""
    paced: bool = True
    batches: list[int] = field(default_factory=list)
    zones_failing_over: list[str] = field(default_factory=list)
    """Zones the budget says are failing over, until the pass waits for them."""
    """The size of each ``apply_changes`` batch."""
    """False: plans carry no pacing, as plans made before it did."""

    async def _change(self, kind: str, node: str | None) -> None:
        self.timeline.append(("start", kind, node))
        await asyncio.sleep(self.change_s)
        self.timeline.append(("end", kind, node))

    def activities(self) -> list[object]:
        platform = self

        @activity.defn(name=ActivityName.OBSERVE_FLEET)
        async def observe() -> FleetSnapshot:
            platform.calls.append("observe")
            return FleetSnapshot(
                policy=platform.policy.model_dump(mode="json", by_alias=True),
                instances=list(platform.instances.values()),
                busy_models=dict(platform.busy),
                zones_failing_over=list(platform.zones_failing_over),
            )

        @activity.defn(name=ActivityName.PLAN_RECONCILE)
        async def plan(request: ReconcileRequest) -> ReconcilePlan:
            info = activity.info()
            platform.plan_attempts.append((info.attempt, info.current_attempt_scheduled_time))
            if platform.plan_dies_first and info.attempt == 1:
                await asyncio.sleep(3600)  # a worker that died mid-plan: no answer, no heartbeat
            made = plan_pass(await observe(), request.models)
            return made if platform.paced else made.model_copy(update={"pacing": None})

        @activity.defn(name=ActivityName.CREATE_INSTANCE)
        async def create(change: InstanceChange) -> StepReport:
            a = change.action
            platform.calls.append(f"create {a.instance} {a.tier}")
            await platform._change("create", a.node)
            if platform.hold is not None:
                while not platform.hold.is_set():
                    activity.heartbeat()
                    await asyncio.sleep(0.05)
            if a.model in platform.corrupt_models and a.tier != Role.COLD:
                raise ApplicationError("checksum mismatch", type=ErrorType.CHECKPOINT_CORRUPT, non_retryable=True)
            if a.instance in platform.broken:
                raise ApplicationError("does not load", type=ErrorType.MODEL_LOAD_FAILED, non_retryable=True)
            platform.instances[a.instance] = Instance(
                id=a.instance, model=a.model, role=a.tier, gpu=a.gpu, node=a.node, zone=a.zone
            )
            return StepReport(detail="created")

        @activity.defn(name=ActivityName.RETIER_INSTANCE)
        async def retier(change: InstanceChange) -> StepReport:
            a = change.action
            platform.calls.append(f"retier {a.instance} {a.tier}")
            platform.instances[a.instance] = platform.instances[a.instance].model_copy(update={"role": a.tier})
            return StepReport(detail="retiered")

        @activity.defn(name=ActivityName.DELETE_INSTANCE)
        async def delete(change: InstanceChange) -> StepReport:
            platform.calls.append(f"delete {change.action.instance}")
            await platform._change("delete", change.action.node)
            platform.instances.pop(change.action.instance, None)
            return StepReport(detail="deleted")

        @activity.defn(name=ActivityName.RESTORE_CHECKPOINT)
        async def restore(ref: InstanceRef) -> StepReport:
            platform.calls.append(f"restore {ref.instance}")
            platform.corrupt_models.discard(ref.model)
            return StepReport(detail="restored")

        changes = {
            ReconcileActionKind.CREATE: create,
            ReconcileActionKind.RETIER: retier,
            ReconcileActionKind.DELETE: delete,
        }

        async def change(action: ReconcileAction) -> StepReport:
            made: StepReport = await changes[action.kind](InstanceChange(action=action))
            return made

        @activity.defn(name=ActivityName.APPLY_CHANGES)
        async def apply_changes(batch: ChangeBatch) -> ChangeOutcomes:
            platform.batches.append(len(batch.actions))
            return await applied_side_by_side(batch, change)

        @activity.defn(name=ActivityName.AWAIT_ZONE_FAILOVERS)
        async def await_zone_failovers(names: ZoneNames) -> StepReport:
            platform.calls.append(f"await {' '.join(names.zones)}")
            platform.zones_failing_over = []  # the zone failover handed its lease back
            return StepReport(detail=f"zone failover of {' '.join(names.zones)} ended", duration_ms=1500)

        return [
            observe,
            plan,
            create,
            retier,
            delete,
            apply_changes,
            restore,
            await_reconcile_pass,
            await_zone_failovers,
        ]


async def reconcile(env: WorkflowEnvironment, platform: FakePlatform, **request: object) -> ReconcileResult:
    queue = f"reconcile-{uuid.uuid4()}"
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[ReconcileStandbysWorkflow, ReconcilePassWorkflow],
        activities=platform.activities(),
    ):
        return await env.client.execute_workflow(
            ReconcileStandbysWorkflow.run,
            ReconcileRequest.model_validate(request),
            id=f"reconcile-{uuid.uuid4()}",
            task_queue=queue,
        )


async def test_builds_the_fleet_then_is_idempotent(time_skipping_env: WorkflowEnvironment) -> None:
    platform = FakePlatform()
    first = await reconcile(time_skipping_env, platform)
    assert len(first.applied) == 12 and first.failed == []
    roles = sorted((i.model, i.role.value) for i in platform.instances.values())
    assert roles.count(("llama-2-7b", "hot")) == 2 and roles.count(("gpt-4-8b", "cold")) == 2
    platform.calls.clear()
    second = await reconcile(time_skipping_env, platform)
    assert second.plan.actions == [] and second.applied == []
    assert platform.calls == ["observe"]


async def test_dry_run_plans_but_changes_nothing(time_skipping_env: WorkflowEnvironment) -> None:
    platform = FakePlatform()
    result = await reconcile(time_skipping_env, platform, dry_run=True)
    assert result.dry_run and len(result.plan.actions) == 12
    assert platform.calls == ["observe"] and platform.instances == {}


async def test_restores_lost_standbys_deletes_surplus_first(time_skipping_env: WorkflowEnvironment) -> None:
    platform = FakePlatform()
    await reconcile(time_skipping_env, platform)
    lost = [i.id for i in platform.instances.values() if i.model == "mistral-7b" and i.role in (Role.HOT, Role.WARM)]
    for instance_id in lost:
        del platform.instances[instance_id]
    platform.instances["gpt-4-8b-9"] = Instance(
        id="gpt-4-8b-9", model="gpt-4-8b", role=Role.COLD, gpu="gpu-node-3/0", node="gpu-node-3", zone="az-1"
    )
    platform.calls.clear()
    result = await reconcile(time_skipping_env, platform)
    kinds = [a.kind for a in result.plan.actions]
    assert kinds.count(ReconcileActionKind.CREATE) == 2 and kinds.count(ReconcileActionKind.DELETE) == 1
    assert platform.calls[1] == "delete gpt-4-8b-9"
    mistral = sorted(i.role.value for i in platform.instances.values() if i.model == "mistral-7b")
    assert mistral == ["cold", "hot", "serving", "warm"]


async def test_a_corrupt_checkpoint_is_restored_then_created_again(time_skipping_env: WorkflowEnvironment) -> None:
    platform = FakePlatform(corrupt_models={"llama-2-7b"})
    result = await reconcile(time_skipping_env, platform, models=["llama-2-7b"])
    assert result.failed == []
    restored = [c.split()[1] for c in platform.calls if c.startswith("restore")]
    # Creates run in parallel, so each one that hit the bad checkpoint restores it (idempotent) ...
    assert restored
    for instance in restored:
        # ... and is created again after its restore, and exists now.
        creates = [i for i, c in enumerate(platform.calls) if c.startswith(f"create {instance} ")]
        assert len(creates) == 2 and creates[0] < platform.calls.index(f"restore {instance}") < creates[1]
        assert instance in platform.instances
    assert sorted(i.role.value for i in platform.instances.values()) == ["cold", "hot", "hot", "serving"]


async def test_a_misplaced_standby_is_replaced_before_it_is_deleted(time_skipping_env: WorkflowEnvironment) -> None:
    """The drift seen on ``drctl up`` after a failover (standbys on the new serving node, every
    instance on GPU 0): each move creates the replacement, then deletes the misplaced standby; a
    few passes later the fleet is in line and a pass changes nothing."""
    platform = FakePlatform(instances={i.id: i for i in as_seen_on_drctl_up()})
    moved: dict[str, str] = {}
    for _ in range(5):
        platform.calls.clear()
        result = await reconcile(time_skipping_env, platform)
        assert result.failed == []
        moved |= result.plan.moves
        for new, old in result.plan.moves.items():
            create = platform.calls.index(f"create {new} {platform.instances[new].role}")
            assert create < platform.calls.index(f"delete {old}")
            assert old not in platform.instances
        if not result.plan.actions:
            break
    assert result.plan.actions == [] and platform.calls == ["observe"]
    assert "llama-2-7b-3" in moved.values() and len(moved) >= 4
    llama = {i.id: i for i in platform.instances.values() if i.model == "llama-2-7b"}
    serving_node = llama["llama-2-7b-1"].node
    assert [i.id for i in llama.values() if i.role.is_standby and i.node == serving_node] == []


async def test_a_move_whose_replacement_fails_keeps_the_standby(time_skipping_env: WorkflowEnvironment) -> None:
    platform = FakePlatform(instances={i.id: i for i in as_seen_on_drctl_up()})
    dry = await reconcile(time_skipping_env, platform, dry_run=True)
    new = next(n for n, old in dry.plan.moves.items() if old == "llama-2-7b-3")
    platform.broken.add(new)
    result = await reconcile(time_skipping_env, platform)
    assert "llama-2-7b-3" in platform.instances and new not in platform.instances
    assert "delete llama-2-7b-3" not in platform.calls
    assert any(line.startswith(f"kept llama-2-7b-3: its replacement {new}") for line in result.failed)


async def test_a_promotion_left_behind_is_cleaned_up_unless_a_recovery_is_in_flight(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """Seen: a create refused as stale (or a worker dying mid-promotion) left an instance
    ``promoting``, and reconcile skipped the model for ever, taking it for a failover still running."""
    platform = FakePlatform()
    await reconcile(time_skipping_env, platform)
    [hot, *_] = sorted(i.id for i in platform.instances.values() if i.model == "llama-2-7b" and i.role == Role.HOT)
    platform.instances[hot] = platform.instances[hot].model_copy(update={"role": Role.PROMOTING})

    platform.busy = {"llama-2-7b": "failover-llama-2-7b-llama-2-7b-0"}  # a recovery runs: hands off
    held = await reconcile(time_skipping_env, platform)
    assert [a for a in held.plan.actions if a.model == "llama-2-7b"] == []
    assert any("failover-llama-2-7b-llama-2-7b-0 in flight" in s for s in held.plan.skipped_models)

    platform.busy = {}  # nothing runs: the leftover goes, and a new hot standby takes its place
    platform.calls.clear()
    fixed = await reconcile(time_skipping_env, platform)
    assert f"delete {hot}" in platform.calls and hot not in platform.instances
    assert any(c.startswith("create ") and c.endswith(" hot") for c in platform.calls)
    hots = [i for i in platform.instances.values() if i.model == "llama-2-7b" and i.role == Role.HOT]
    assert len(hots) == 2 and fixed.failed == []


async def test_requests_that_overlap_make_their_passes_one_after_the_other(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """Seen (nemesis, seed 1, round 10): two runs at once both planned on the same fleet; the second
    deleted the first's loading standbys as leftovers and both created the same instance IDs. A
    request made while a pass runs waits for it, then makes its own pass on the fleet it left."""
    env = time_skipping_env
    platform = FakePlatform(hold=asyncio.Event())
    queue = f"reconcile-{uuid.uuid4()}"
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[ReconcileStandbysWorkflow, ReconcilePassWorkflow],
        activities=platform.activities(),
    ):
        first = await env.client.start_workflow(
            ReconcileStandbysWorkflow.run, ReconcileRequest(), id=f"first-{uuid.uuid4()}", task_queue=queue
        )
        for _ in range(200):  # the first pass is creating (its instances load until ``hold`` is set)
            if any(c.startswith("create ") for c in platform.calls):
                break
            await asyncio.sleep(0.05)
        second = await env.client.start_workflow(
            ReconcileStandbysWorkflow.run, ReconcileRequest(), id=f"second-{uuid.uuid4()}", task_queue=queue
        )
        await asyncio.sleep(1.0)
        assert platform.calls.count("observe") == 1, "the second pass planned while the first still ran"
        platform.hold.set()  # type: ignore[union-attr]
        built = await first.result()
        again = await second.result()

    creates = [c.split()[1] for c in platform.calls if c.startswith("create ")]
    assert len(creates) == len(set(creates)) == len(built.plan.actions) > 0  # no instance created twice
    assert not any(c.startswith("delete ") for c in platform.calls)
    assert platform.calls.count("observe") == 2 and again.plan.actions == [] and again.failed == []


async def test_a_worker_that_dies_while_planning_delays_the_pass_seconds_not_a_minute(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """The planning activity heartbeats and has a short heartbeat timeout: a worker killed while it
    plans is replaced by another attempt within seconds. With only the 60 s start-to-close timeout
    (found by the nemesis) the fleet stayed a standby short for a minute."""
    platform = FakePlatform(plan_dies_first=True)
    result = await reconcile(time_skipping_env, platform)
    assert result.failed == [] and len(result.applied) == 12
    (first, began), (second, retried) = platform.plan_attempts
    assert (first, second) == (1, 2)
    assert (retried - began).total_seconds() < 15


def peak(timeline: list[tuple[str, str, str | None]], kind: str, node: str | None = None) -> int:
    """The most changes of ``kind`` (on ``node``, if given) in flight at once."""
    now = most = 0
    for edge, what, where in timeline:
        if what == kind and (node is None or where == node):
            now += 1 if edge == "start" else -1
            most = max(most, now)
    return most


def surplus_cold(count: int) -> dict[str, Instance]:
    """Cold standbys of gpt-4-8b past what the policy wants: the next pass deletes them."""
    return {
        f"gpt-4-8b-{n}": Instance(
            id=f"gpt-4-8b-{n}", model="gpt-4-8b", role=Role.COLD, gpu="gpu-node-3/1", node="gpu-node-3", zone="az-1"
        )
        for n in range(10, 10 + count)
    }


async def test_a_pass_deletes_side_by_side_then_loads_at_most_its_pace_per_node(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """After a zone failover a pass has hundreds of deletes and creates: one delete at a time and
    four creates kept the fleet short of its standbys for tens of seconds at 1,000 instances. The
    policy's ``reconcile`` section paces them: ``maxParallelChanges`` in all, ``maxLoadsPerNode``
    of the loading ones on a node, every delete done before the first create."""
    policy = POLICY.model_copy(
        update={"reconcile": POLICY.reconcile.model_copy(update={"max_parallel_changes": 3, "max_loads_per_node": 2})}
    )
    platform = FakePlatform(policy=policy, change_s=0.2)
    built = await reconcile(time_skipping_env, platform)
    assert built.failed == [] and built.plan.pacing is not None and built.plan.pacing.parallel_changes == 3
    assert peak(platform.timeline, "create") == 3
    loading = [i for i in platform.instances.values() if i.role != Role.COLD]
    per_node = {node: peak(platform.timeline, "create", node) for node in {i.node for i in loading}}
    assert max(per_node.values()) == 2, per_node

    for standby in [i.id for i in platform.instances.values() if i.role in (Role.HOT, Role.WARM)]:
        del platform.instances[standby]
    platform.instances |= surplus_cold(5)
    platform.timeline.clear()
    platform.batches.clear()
    result = await reconcile(time_skipping_env, platform)
    assert result.failed == []
    kinds = [what for edge, what, _ in platform.timeline if edge == "start"]
    assert kinds.count("delete") == 5 and kinds.count("create") >= 3
    assert peak(platform.timeline, "delete") == 3
    assert platform.batches[:2] == [3, 2]  # the deletes, in batches of maxParallelChanges
    edges = [(edge, what) for edge, what, _ in platform.timeline]
    last_delete_end = len(edges) - 1 - edges[::-1].index(("end", "delete"))
    assert edges.index(("start", "create")) > last_delete_end


async def test_a_plan_made_before_its_pacing_deletes_one_at_a_time(time_skipping_env: WorkflowEnvironment) -> None:
    """A pass whose plan carries no pacing (recorded before it did) replays as it ran: deletes one
    by one, then four creates at a time, whatever the policy says now."""
    platform = FakePlatform(change_s=0.1, paced=False, instances=surplus_cold(5))
    result = await reconcile(time_skipping_env, platform)
    assert result.failed == [] and result.plan.pacing is None
    assert peak(platform.timeline, "delete") == 1
    assert peak(platform.timeline, "create") == 4


async def test_while_a_zone_fails_over_a_pass_deletes_then_waits_for_it_to_make_standbys(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """The zone's recoveries go first: the pass deletes what is surplus and makes the missing
    serving instance at once, but its new standbys only once the zone failover has handed its lease
    back, in the same pass (one pass waiting, not one planned after another beside it)."""
    platform = FakePlatform()
    await reconcile(time_skipping_env, platform)
    gone = {i.id: i.role for i in platform.instances.values() if i.model == "mistral-7b" and i.role != Role.COLD}
    for instance_id in gone:
        del platform.instances[instance_id]
    platform.instances |= surplus_cold(1)
    platform.calls.clear()
    platform.zones_failing_over = ["az-1"]
    result = await reconcile(time_skipping_env, platform)
    assert result.failed == []
    waited = platform.calls.index("await az-1")
    before, after = platform.calls[:waited], platform.calls[waited + 1 :]
    assert "delete gpt-4-8b-10" in before and after[0] == "observe"
    made_before = [c for c in before if c.startswith("create ")]
    assert made_before == [c for c in made_before if c.endswith(" serving")] and made_before
    assert sorted(c.split()[2] for c in after if c.startswith("create ")) == ["hot", "warm"]
    assert any(line.startswith("waited: zone failover of az-1 ended") for line in result.applied)
    assert result.waits == 1
    assert result.plan.after_zone_failover == [] and result.plan.skipped_models == []
    roles = sorted(i.role.value for i in platform.instances.values() if i.model == "mistral-7b")
    assert roles == ["cold", "hot", "serving", "warm"]
