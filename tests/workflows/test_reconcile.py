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

from drctl.activities.reconcile import await_reconcile_pass
from drctl.payloads import (
    ActivityName,
    ErrorType,
    FleetSnapshot,
    Instance,
    InstanceChange,
    InstanceRef,
    ReconcileActionKind,
    ReconcilePlan,
    ReconcileRequest,
    ReconcileResult,
    Role,
    StepReport,
)
from drctl.policies.loader import load_policy_file
from drctl.policies.reconcile import plan_pass
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

    def activities(self) -> list[object]:
        platform = self

        @activity.defn(name=ActivityName.OBSERVE_FLEET)
        async def observe() -> FleetSnapshot:
            platform.calls.append("observe")
            return FleetSnapshot(
                policy=POLICY.model_dump(mode="json", by_alias=True),
                instances=list(platform.instances.values()),
                busy_models=dict(platform.busy),
            )

        @activity.defn(name=ActivityName.PLAN_RECONCILE)
        async def plan(request: ReconcileRequest) -> ReconcilePlan:
            info = activity.info()
            platform.plan_attempts.append((info.attempt, info.current_attempt_scheduled_time))
            if platform.plan_dies_first and info.attempt == 1:
                await asyncio.sleep(3600)  # a worker that died mid-plan: no answer, no heartbeat
            return plan_pass(await observe(), request.models)

        @activity.defn(name=ActivityName.CREATE_INSTANCE)
        async def create(change: InstanceChange) -> StepReport:
            a = change.action
            platform.calls.append(f"create {a.instance} {a.tier}")
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
            platform.instances.pop(change.action.instance, None)
            return StepReport(detail="deleted")

        @activity.defn(name=ActivityName.RESTORE_CHECKPOINT)
        async def restore(ref: InstanceRef) -> StepReport:
            platform.calls.append(f"restore {ref.instance}")
            platform.corrupt_models.discard(ref.model)
            return StepReport(detail="restored")

        return [observe, plan, create, retier, delete, restore, await_reconcile_pass]


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
