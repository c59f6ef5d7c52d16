"""The pure reconciliation planner: counts per tier back to the policy, placed by the rules."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from drctl.payloads import FleetSnapshot, Instance, ReconcileAction, ReconcileActionKind, ReconcilePlan, Role
from drctl.policies.loader import load_policy_file
from drctl.policies.placement import GpuSlot, gpu_inventory
from drctl.policies.reconcile import MAX_MOVES_PER_MODEL, MAX_MOVES_PER_PASS, plan_pass, plan_reconcile, wanted_counts
from drctl.policies.schema import DRPolicy, Priority

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")
EXAMPLES = int(os.environ.get("DRCTL_RECONCILE_EXAMPLES", "150"))
"""Examples of the repair property; raise it for a thorough run."""


def apply(instances: list[Instance], actions: list[ReconcileAction]) -> list[Instance]:
    """What the activities would leave behind."""
    by_id = {i.id: i for i in instances}
    for a in actions:
        if a.kind == ReconcileActionKind.DELETE:
            by_id.pop(a.instance, None)
        else:
            by_id[a.instance] = Instance(id=a.instance, model=a.model, role=a.tier, gpu=a.gpu, node=a.node, zone=a.zone)
    return list(by_id.values())


def counts(instances: list[Instance], model: str) -> dict[Role, int]:
    out: dict[Role, int] = {}
    for i in instances:
        if i.model == model:
            out[i.role] = out.get(i.role, 0) + 1
    return out


def fleet_from_scratch(policy: DRPolicy = POLICY) -> list[Instance]:
    return apply([], plan_reconcile(policy, []).actions)


def test_from_empty_creates_every_tier_the_policy_asks_for() -> None:
    plan = plan_reconcile(POLICY, [])
    assert plan.unplaceable == [] and plan.skipped_models == []
    fleet = apply([], plan.actions)
    assert counts(fleet, "llama-2-7b") == {Role.SERVING: 1, Role.HOT: 2, Role.COLD: 1}
    assert counts(fleet, "mistral-7b") == {Role.SERVING: 1, Role.HOT: 1, Role.WARM: 1, Role.COLD: 1}
    assert counts(fleet, "gpt-4-8b") == {Role.SERVING: 1, Role.WARM: 1, Role.COLD: 2}
    # Critical first: llama's instances are planned (and numbered) before the others.
    assert plan.actions[0].model == "llama-2-7b"
    assert {a.instance for a in plan.actions if a.model == "llama-2-7b"} == {f"llama-2-7b-{n}" for n in range(4)}


def test_standbys_avoid_the_serving_instance_node() -> None:
    fleet = fleet_from_scratch()
    for model in POLICY.model_names:
        serving_nodes = {i.node for i in fleet if i.model == model and i.role == Role.SERVING}
        standby_nodes = {i.node for i in fleet if i.model == model and i.role != Role.SERVING}
        assert serving_nodes and not (serving_nodes & standby_nodes), model


def test_second_run_changes_nothing() -> None:
    fleet = fleet_from_scratch()
    assert plan_reconcile(POLICY, fleet).actions == []


def test_lost_hot_and_warm_are_recreated_with_new_ids() -> None:
    fleet = fleet_from_scratch()
    gone = {i.id for i in fleet if i.model == "mistral-7b" and i.role in (Role.HOT, Role.WARM)}
    remaining = [i for i in fleet if i.id not in gone]
    plan = plan_reconcile(POLICY, remaining)
    created = [(a.kind, a.tier) for a in plan.actions]
    assert sorted(created) == sorted([(ReconcileActionKind.CREATE, Role.HOT), (ReconcileActionKind.CREATE, Role.WARM)])
    assert not {a.instance for a in plan.actions} & gone
    assert plan_reconcile(POLICY, apply(remaining, plan.actions)).actions == []


def test_failed_instances_are_ignored_and_ids_never_reused() -> None:
    fleet = fleet_from_scratch()
    # A failover promoted llama-2-7b-1 and failed llama-2-7b-0.
    fleet = [
        i.model_copy(update={"role": Role.FAILED}) if i.id == "llama-2-7b-0"
        else i.model_copy(update={"role": Role.SERVING}) if i.id == "llama-2-7b-1"
        else i
        for i in fleet
    ]  # fmt: skip
    plan = plan_reconcile(POLICY, fleet)
    assert (ReconcileActionKind.CREATE, "llama-2-7b-4", Role.HOT) == (
        plan.actions[0].kind,
        plan.actions[0].instance,
        plan.actions[0].tier,
    )
    assert "llama-2-7b-0" not in {a.instance for a in plan.actions}
    # The cold standby shared the node of llama-2-7b-1, serving now: it moves, under a new id too.
    assert plan.moves == {"llama-2-7b-5": "llama-2-7b-3", **{k: v for k, v in plan.moves.items() if "llama" not in k}}
    assert plan_reconcile(POLICY, apply(fleet, plan.actions)).actions == []


def test_surplus_warm_becomes_missing_hot() -> None:
    fleet = fleet_from_scratch()
    hot = next(i for i in fleet if i.model == "mistral-7b" and i.role == Role.HOT)
    extra_warm = Instance(
        id="mistral-7b-9", model="mistral-7b", role=Role.WARM, gpu="gpu-node-2/3", node="gpu-node-2", zone="az-3"
    )
    fleet = [i for i in fleet if i.id != hot.id] + [extra_warm]
    plan = plan_reconcile(POLICY, fleet)
    # The surplus warm standby becomes the missing hot one (no new instance to load)...
    assert (ReconcileActionKind.RETIER, "mistral-7b-9", Role.HOT) == (
        plan.actions[0].kind,
        plan.actions[0].instance,
        plan.actions[0].tier,
    )
    # ... and, standing in az-3 with two more of mistral while az-1 has none, it moves there: a
    # model's standbys spread over the zones (placement repair judges that too).
    assert plan.moves == {"mistral-7b-10": "mistral-7b-9"}
    assert next(a for a in plan.actions if a.instance == "mistral-7b-10").zone == "az-1"


def test_surplus_is_deleted_newest_first() -> None:
    fleet = fleet_from_scratch() + [
        Instance(id="gpt-4-8b-7", model="gpt-4-8b", role=Role.COLD, gpu="gpu-node-1/0", node="gpu-node-1"),
        Instance(id="gpt-4-8b-8", model="gpt-4-8b", role=Role.COLD, gpu="gpu-node-1/0", node="gpu-node-1"),
    ]
    plan = plan_reconcile(POLICY, fleet)
    assert [(a.kind, a.instance) for a in plan.actions] == [
        (ReconcileActionKind.DELETE, "gpt-4-8b-8"),
        (ReconcileActionKind.DELETE, "gpt-4-8b-7"),
    ]


def test_model_with_a_promotion_in_flight_is_left_alone() -> None:
    fleet = [
        i.model_copy(update={"role": Role.PROMOTING}) if i.id == "llama-2-7b-1" else i for i in fleet_from_scratch()
    ]
    fleet = [i for i in fleet if i.id != "llama-2-7b-2"]
    plan = plan_reconcile(POLICY, fleet)
    assert [a for a in plan.actions if a.model == "llama-2-7b"] == []
    # Other models may move a standby away from the GPU of the instance being promoted; nothing else.
    assert {a.instance for a in plan.actions} == {*plan.moves, *plan.moves.values()}
    assert plan.skipped_models and plan.skipped_models[0].startswith("llama-2-7b")


def test_only_selected_models() -> None:
    plan = plan_reconcile(POLICY, [], models=["gpt-4-8b"])
    assert {a.model for a in plan.actions} == {"gpt-4-8b"}


def test_what_does_not_fit_is_reported_not_dropped_silently() -> None:
    tiny = POLICY.model_copy(
        update={"gpu_pool": POLICY.gpu_pool.model_copy(update={"nodes": POLICY.gpu_pool.nodes[:1]})}
    )
    big = [m.model_copy(update={"gpu_memory": 70 * 2**30}) for m in POLICY.models]
    tiny = tiny.model_copy(update={"models": big})
    plan = plan_reconcile(tiny, [])
    assert plan.unplaceable, plan
    assert all("(" in line for line in plan.unplaceable)


def test_standbys_on_cordoned_gpus_are_moved_elsewhere() -> None:
    fleet = fleet_from_scratch()
    cordoned = sorted({i.gpu for i in fleet if i.zone == "az-3" and i.gpu})
    plan = plan_reconcile(POLICY, fleet, cordoned=cordoned)
    stranded = {i.id for i in fleet if i.gpu in cordoned and i.role.is_standby}
    assert stranded and {a.instance for a in plan.actions if a.kind == ReconcileActionKind.DELETE} == stranded
    created = [a for a in plan.actions if a.kind == ReconcileActionKind.CREATE]
    assert len(created) == len(stranded) and all(a.gpu not in cordoned for a in created)
    after = apply(fleet, plan.actions)
    assert plan_reconcile(POLICY, after, cordoned=cordoned).actions == []


def test_two_serving_instances_mid_switch_over_are_left_alone() -> None:
    """A failover registered the warm standby at priority 0 and waits for it to verify before it
    ejects the failed instance: reconciling then must not delete the newcomer as "surplus"."""
    fleet = [
        i.model_copy(update={"role": Role.SERVING, "lb_priority": 0})
        if i.model == "gpt-4-8b" and i.role == Role.WARM
        else i
        for i in fleet_from_scratch()
    ]
    plan = plan_reconcile(POLICY, fleet)
    assert [a for a in plan.actions if a.model == "gpt-4-8b"] == []
    assert any(s.startswith("gpt-4-8b:") and "switching over" in s for s in plan.skipped_models)


# -- placement repair: anti-affinity and spread ---------------------------------------------------
#
# After failovers a fleet drifts: a promoted standby serves on a node where other standbys of its
# model sit, and the old best fit stacked every instance on GPU 0 of a node. Reconcile must see it,
# say it, and move standbys (create the replacement first, delete the misplaced one after), never a
# serving instance, a few per pass, and stop: a second pass over its result does nothing.

SLOTS = {s.id: s for s in gpu_inventory(POLICY.gpu_pool)}


def at(instance_id: str, role: Role, gpu: str, slots: dict[str, GpuSlot] = SLOTS) -> Instance:
    model = instance_id.rsplit("-", 1)[0]
    slot = slots[gpu]
    return Instance(id=instance_id, model=model, role=role, gpu=gpu, node=slot.node, zone=slot.zone)


def as_seen_on_drctl_up() -> list[Instance]:
    """The old best-fit layout (every instance on GPU 0 of a node) after llama's serving instance
    failed and its hot standby llama-2-7b-1 took over, on the node of llama-2-7b-3."""
    return [
        at("llama-2-7b-0", Role.FAILED, "gpu-node-0/0"),
        at("llama-2-7b-1", Role.SERVING, "gpu-node-1/0"),
        at("llama-2-7b-2", Role.HOT, "gpu-node-2/0"),
        at("llama-2-7b-3", Role.COLD, "gpu-node-1/0"),
        at("mistral-7b-0", Role.SERVING, "gpu-node-0/0"),
        at("mistral-7b-1", Role.HOT, "gpu-node-1/0"),
        at("mistral-7b-2", Role.WARM, "gpu-node-2/0"),
        at("mistral-7b-3", Role.COLD, "gpu-node-1/0"),
        at("gpt-4-8b-0", Role.SERVING, "gpu-node-0/0"),
        at("gpt-4-8b-1", Role.WARM, "gpu-node-1/0"),
        at("gpt-4-8b-2", Role.COLD, "gpu-node-2/0"),
        at("gpt-4-8b-3", Role.COLD, "gpu-node-1/0"),
    ]


def workflow_steps(instances: list[Instance], plan: ReconcilePlan) -> list[list[Instance]]:
    """The fleet after each step, in the order ReconcileStandbysWorkflow applies the plan: plain
    deletes, then plain creates and re-tiers, then each move: its create, then its delete."""
    moved_out = set(plan.moves.values())
    deletes = {a.instance: a for a in plan.actions if a.kind == ReconcileActionKind.DELETE}
    order = [a for a in plan.actions if a.kind == ReconcileActionKind.DELETE and a.instance not in moved_out]
    order += [a for a in plan.actions if a.kind != ReconcileActionKind.DELETE and a.instance not in plan.moves]
    for a in plan.actions:
        if a.kind == ReconcileActionKind.CREATE and a.instance in plan.moves:
            order += [a, deletes[plan.moves[a.instance]]]
    assert sorted(a.instance for a in order) == sorted(a.instance for a in plan.actions)
    steps = [instances]
    for action in order:
        steps.append(apply(steps[-1], [action]))
    return steps


def standby_counts(instances: list[Instance]) -> dict[tuple[str, Role], int]:
    out: dict[tuple[str, Role], int] = {}
    for i in instances:
        if i.role.is_standby:
            out[i.model, i.role] = out.get((i.model, i.role), 0) + 1
    return out


def check_moves(policy: DRPolicy, instances: list[Instance], plan: ReconcilePlan) -> None:
    """Moves are create-then-delete pairs of one model and tier; a serving instance is never
    touched; a few per model and pass; and while the moves run, no model has fewer standbys of a
    tier than when they started."""
    creates = [a for a in plan.actions if a.kind == ReconcileActionKind.CREATE]
    by_id = {i.id: i for i in instances} | {i.id: i for i in apply([], creates)}  # and the ones it creates
    serving = {i.id for i in instances if i.role == Role.SERVING}
    assert not serving & {a.instance for a in plan.actions if a.kind == ReconcileActionKind.DELETE}
    position = {(a.kind, a.instance): n for n, a in enumerate(plan.actions)}
    retiered = {a.instance: a.tier for a in plan.actions if a.kind == ReconcileActionKind.RETIER}
    per_model: dict[str, int] = {}
    for new, old in plan.moves.items():
        create = plan.actions[position[ReconcileActionKind.CREATE, new]]
        assert position[ReconcileActionKind.CREATE, new] < position[ReconcileActionKind.DELETE, old]
        tier = retiered.get(old, by_id[old].role)
        assert tier.is_standby and (create.model, create.tier) == (by_id[old].model, tier)
        assert new not in {i.id for i in instances} and create.gpu != by_id[old].gpu
        per_model[create.model] = per_model.get(create.model, 0) + 1
    assert all(n <= MAX_MOVES_PER_MODEL for n in per_model.values()) and len(plan.moves) <= MAX_MOVES_PER_PASS
    steps = workflow_steps(instances, plan)
    first_move = len(steps) - 1 - 2 * len(plan.moves)
    before = standby_counts(steps[first_move])
    for step in steps[first_move:]:
        now = standby_counts(step)
        assert all(now.get(key, 0) >= n for key, n in before.items()), (before, now)


def check_capacity(policy: DRPolicy, instances: list[Instance]) -> None:
    slots = {s.id: s for s in gpu_inventory(policy.gpu_pool)}
    for gpu, slot in slots.items():
        on = [policy.model(i.model).gpu_memory for i in instances if i.gpu == gpu and i.role != Role.FAILED]
        loaded = [
            policy.model(i.model).gpu_memory
            for i in instances
            if i.gpu == gpu and i.role in (Role.SERVING, Role.HOT, Role.PROMOTING)
        ]
        assert sum(loaded) <= slot.memory and sum(on) <= slot.memory * policy.gpu_pool.overcommit_ratio, gpu


def misplaced(policy: DRPolicy, instances: list[Instance], cordoned: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Standbys against the rules where the pool has a place (room or not) that keeps them,
    read directly: on a node (or else a zone) of its model's serving instances while a usable GPU
    big enough sits elsewhere; on a GPU with a serving instance while another GPU has none."""
    usable = [s for s in gpu_inventory(policy.gpu_pool) if s.id not in cordoned]
    out = []
    for s in instances:
        if not s.role.is_standby or s.gpu not in {u.id for u in usable}:
            continue
        size = policy.model(s.model).gpu_memory
        serving = [i for i in instances if i.model == s.model and i.role == Role.SERVING]
        nodes, zones = {i.node for i in serving}, {i.zone for i in serving}
        serving_gpus = {i.gpu for i in instances if i.role == Role.SERVING}
        fits = [u for u in usable if u.memory >= size]
        if s.node in nodes and any(u.node not in nodes for u in fits):
            out.append(s.id)
        elif s.node not in nodes and s.zone in zones and any(u.zone not in zones for u in fits):
            out.append(s.id)
        elif (
            s.gpu in serving_gpus
            and s.zone not in zones
            and any(u.id not in serving_gpus and u.node not in nodes and u.zone not in zones for u in fits)
        ):
            out.append(s.id)
    return out


def test_drift_seen_on_drctl_up_is_reported_and_repaired() -> None:
    fleet = as_seen_on_drctl_up()
    assert "llama-2-7b-3" in misplaced(POLICY, fleet)
    plan = plan_reconcile(POLICY, fleet)
    check_moves(POLICY, fleet, plan)
    # Never "in line": the standby on the serving node is said, and moved off that node and zone.
    said = [v for v in plan.violations if v.startswith("llama-2-7b-3 ")]
    assert said and "node of serving llama-2-7b-1 (gpu-node-1)" in said[0] and "moved to" in said[0]
    new = next(n for n, old in plan.moves.items() if old == "llama-2-7b-3")
    create = next(a for a in plan.actions if a.instance == new)
    assert create.node != "gpu-node-1" and create.zone != "az-2"
    # Serving instances stacked on gpu-node-0/0 are reported, never moved.
    assert any("mistral-7b-0" in v and "gpt-4-8b-0" in v and "stacked" in v for v in plan.violations)
    # A few moves per pass; the passes converge, and the fleet ends in line with the rules.
    for _ in range(6):
        fleet = apply(fleet, plan.actions)
        check_capacity(POLICY, fleet)
        plan = plan_reconcile(POLICY, fleet)
        check_moves(POLICY, fleet, plan)
        if not plan.actions:
            break
    assert plan.actions == []
    assert misplaced(POLICY, fleet) == []
    assert counts(fleet, "llama-2-7b") == {Role.FAILED: 1, Role.SERVING: 1, Role.HOT: 2, Role.COLD: 1}
    assert not [v for v in plan.violations if "standby" in v]
    assert {i.id for i in fleet if i.role == Role.SERVING} == {"llama-2-7b-1", "mistral-7b-0", "gpt-4-8b-0"}


def test_moves_are_bounded_per_model_and_per_pass() -> None:
    policy = small_policy(
        [("a", "az-1", 4, 80), ("b", "az-2", 4, 80)], [{"name": "m", "hotStandby": 2, "coldStandby": 2}]
    )
    slots = {s.id: s for s in gpu_inventory(policy.gpu_pool)}
    fleet = [at("m-0", Role.SERVING, "a/0", slots)]
    fleet += [at(f"m-{n}", Role.HOT if n < 3 else Role.COLD, f"a/{n}", slots) for n in (1, 2, 3)]
    fleet += [at("m-4", Role.COLD, "b/0", slots)]
    plan = plan_reconcile(policy, fleet)
    check_moves(policy, fleet, plan)
    assert plan.moves == {"m-5": "m-1", "m-6": "m-2"}
    assert [v for v in plan.violations if "move budget" in v and v.startswith("m-3 ")]
    fleet = apply(fleet, plan.actions)
    plan = plan_reconcile(policy, fleet)
    assert plan.moves == {"m-7": "m-3"} and plan.violations[0].startswith("m-3 ")
    assert plan_reconcile(policy, apply(fleet, plan.actions)).actions == []


def test_from_scratch_spreads_serving_instances_and_keeps_standbys_off_their_gpus() -> None:
    fleet = fleet_from_scratch()
    serving = [i for i in fleet if i.role == Role.SERVING]
    assert len({i.node for i in serving}) == len(serving)  # one node failure takes one model's serving
    serving_gpus = {i.gpu for i in serving}
    assert not [i.id for i in fleet if i.role.is_standby and i.gpu in serving_gpus]
    assert misplaced(POLICY, fleet) == []
    assert plan_reconcile(POLICY, fleet).violations == []


def test_replicas_of_one_model_go_to_different_nodes_and_zones() -> None:
    two = POLICY.model_copy(update={"models": [m.model_copy(update={"replicas": 2}) for m in POLICY.models]})
    fleet = fleet_from_scratch(two)
    for model in two.model_names:
        serving = [i for i in fleet if i.model == model and i.role == Role.SERVING]
        assert len(serving) == 2 and serving[0].node != serving[1].node and serving[0].zone != serving[1].zone
    assert plan_reconcile(two, fleet).actions == []


def small_policy(
    nodes: list[tuple[str, str, int, int]],
    models: list[dict[str, object]],
    tenants: list[dict[str, object]] | None = None,
    **pool: object,
) -> DRPolicy:
    return DRPolicy.model_validate(
        {
            "models": models,
            "gpuPool": {
                "nodes": [{"name": n, "zone": z, "gpus": g, "gpuMemory": f"{m}Gi"} for n, z, g, m in nodes],
                **pool,
            },
            "tenants": tenants or [{"name": "default"}],
        }
    )


def test_zone_anti_affinity_where_the_pool_allows() -> None:
    model = [{"name": "m", "coldStandby": 1, "gpuMemory": "16Gi"}]
    spread = small_policy([("a", "az-1", 1, 80), ("b", "az-1", 1, 80), ("c", "az-2", 1, 80)], model)
    slots = {s.id: s for s in gpu_inventory(spread.gpu_pool)}
    fleet = [at("m-0", Role.SERVING, "a/0", slots), at("m-1", Role.COLD, "b/0", slots)]
    plan = plan_reconcile(spread, fleet)
    assert plan.moves == {"m-2": "m-1"} and next(a for a in plan.actions if a.instance == "m-2").zone == "az-2"
    assert "zone" in plan.violations[0]
    assert plan_reconcile(spread, apply(fleet, plan.actions)).actions == []
    # One zone: another node is all the pool allows, and the standby has it.
    one_zone = small_policy([("a", "az-1", 1, 80), ("b", "az-1", 1, 80)], model)
    plan = plan_reconcile(one_zone, fleet)
    assert plan.actions == [] and plan.violations == []


def test_no_room_elsewhere_means_no_move_and_no_churn() -> None:
    models = [{"name": "m", "hotStandby": 1, "gpuMemory": "40Gi"}, {"name": "big", "gpuMemory": "80Gi"}]
    policy = small_policy([("a", "az-1", 2, 80), ("b", "az-2", 1, 80)], models)
    slots = {s.id: s for s in gpu_inventory(policy.gpu_pool)}
    # m's hot standby shares node a with m's serving instance; node b is full (big serves there).
    fleet = [
        at("big-0", Role.SERVING, "b/0", slots),
        at("m-0", Role.SERVING, "a/0", slots),
        at("m-1", Role.HOT, "a/1", slots),
    ]
    for _ in range(3):
        plan = plan_reconcile(policy, fleet)
        assert plan.actions == []
        assert len(plan.violations) == 1 and plan.violations[0].startswith("m-1 ")
        assert "not moved" in plan.violations[0] and "no better place has room" in plan.violations[0]
        fleet = apply(fleet, plan.actions)
    # Room appears (a bigger pool): the standby moves, once.
    roomy = small_policy([("a", "az-1", 2, 80), ("b", "az-2", 2, 80)], models)
    plan = plan_reconcile(roomy, fleet)
    assert plan.moves == {"m-2": "m-1"} and plan_reconcile(roomy, apply(fleet, plan.actions)).actions == []


def test_a_single_node_pool_has_nothing_to_repair() -> None:
    policy = small_policy([("a", "az-1", 1, 80)], [{"name": "m", "hotStandby": 1, "coldStandby": 1}])
    fleet = fleet_from_scratch(policy)
    plan = plan_reconcile(policy, fleet)
    assert plan.actions == [] and plan.violations == []


def test_standby_beside_another_models_serving_instance_moves_to_a_gpu_without_one() -> None:
    models = [{"name": "x"}, {"name": "y", "hotStandby": 1}]
    policy = small_policy([("a", "az-1", 2, 80), ("b", "az-2", 2, 80)], models)
    slots = {s.id: s for s in gpu_inventory(policy.gpu_pool)}
    fleet = [
        at("x-0", Role.SERVING, "a/0", slots),
        at("y-0", Role.SERVING, "b/0", slots),
        at("y-1", Role.HOT, "a/0", slots),
    ]
    plan = plan_reconcile(policy, fleet)
    assert plan.moves == {"y-2": "y-1"}
    assert next(a for a in plan.actions if a.instance == "y-2").gpu == "a/1"
    assert "beside serving x-0" in plan.violations[0]


def test_a_move_respects_cordons_and_tenant_quotas() -> None:
    models = [{"name": "m", "hotStandby": 1, "gpuMemory": "16Gi", "tenant": "t"}]
    nodes = [("a", "az-1", 2, 80), ("b", "az-2", 1, 80)]
    capped = small_policy(nodes, models, [{"name": "t", "capability": {"memory": "32Gi"}}])
    slots = {s.id: s for s in gpu_inventory(capped.gpu_pool)}
    fleet = [at("m-0", Role.SERVING, "a/0", slots), at("m-1", Role.HOT, "a/1", slots)]
    # The tenant is at its cap: the replacement (created before the old one goes) would exceed it.
    plan = plan_reconcile(capped, fleet)
    assert plan.actions == [] and "not moved" in plan.violations[0] and "cap" in plan.violations[0]
    # Within the cap, but b's only GPU is cordoned: nowhere better to go, so nothing to say.
    roomy = small_policy(nodes, models, [{"name": "t"}])
    plan = plan_reconcile(roomy, fleet, cordoned=["b/0"])
    assert plan.actions == [] and plan.violations == []
    plan = plan_reconcile(roomy, fleet)
    assert plan.moves == {"m-2": "m-1"}


def test_a_model_switching_over_is_not_repaired() -> None:
    fleet = as_seen_on_drctl_up()
    fleet = [i.model_copy(update={"role": Role.SERVING}) if i.id == "llama-2-7b-0" else i for i in fleet]
    plan = plan_reconcile(POLICY, fleet)
    assert not [a for a in plan.actions if a.model == "llama-2-7b"]
    assert not [v for v in plan.violations if v.startswith("llama-2-7b-")]


def test_serving_replicas_sharing_a_node_are_reported_not_moved() -> None:
    policy = small_policy([("a", "az-1", 2, 80), ("b", "az-2", 2, 80)], [{"name": "m", "replicas": 2}])
    slots = {s.id: s for s in gpu_inventory(policy.gpu_pool)}
    fleet = [at("m-0", Role.SERVING, "a/0", slots), at("m-1", Role.SERVING, "a/1", slots)]
    plan = plan_reconcile(policy, fleet)
    assert plan.actions == []
    assert plan.violations == ["serving m-0, m-1 of m share node a (reconcile never moves a serving instance)"]


# -- the property: stable, bounded, never below its standby counts, never silent --------------------

NODE = st.tuples(st.integers(0, 2), st.integers(1, 3), st.sampled_from([16, 24, 40, 80]))
MODEL = st.tuples(
    st.sampled_from([8, 16, 16, 24]),  # GiB
    st.integers(1, 2),  # replicas
    st.integers(0, 2),  # hot
    st.integers(0, 1),  # warm
    st.integers(0, 2),  # cold
    st.sampled_from(list(Priority)),
)


@st.composite
def drifted_fleets(draw: st.DrawFn) -> tuple[DRPolicy, list[Instance], list[str]]:
    """A random pool and policy, and a fleet laid out at random within capacity (as drift leaves
    it: stacked, on serving nodes, short or over its counts), with a few GPUs cordoned."""
    zones = draw(st.integers(1, 3))
    nodes = [
        (f"n{k}", f"az-{z % zones + 1}", g, m)
        for k, (z, g, m) in enumerate(draw(st.lists(NODE, min_size=1, max_size=4)))
    ]
    models = [
        {
            "name": f"m{k}",
            "gpuMemory": f"{mem}Gi",
            "replicas": r,
            "hotStandby": h,
            "warmStandby": w,
            "coldStandby": c,
            "priority": p.value,
        }
        for k, (mem, r, h, w, c, p) in enumerate(draw(st.lists(MODEL, min_size=1, max_size=3)))
    ]
    # Sometimes a second tenant, capped (a share of the pool), owns some of the models.
    cap = draw(st.sampled_from([None, None, 30, 60]))
    tenants: list[dict[str, object]] = [{"name": "default"}]
    if cap is not None:
        pool_gib = sum(g * m for _n, _z, g, m in nodes)
        tenants.append({"name": "t", "capability": {"memory": f"{pool_gib * cap // 100}Gi"}})
        for model in models:
            model["tenant"] = draw(st.sampled_from(["default", "t"]))
    policy = small_policy(nodes, models, tenants, overcommitRatio=draw(st.sampled_from([1.0, 1.5])))
    slots = gpu_inventory(policy.gpu_pool)
    loaded = dict.fromkeys((s.id for s in slots), 0)
    total = dict.fromkeys((s.id for s in slots), 0)
    fleet: list[Instance] = []
    for model in policy.models:
        n = 0
        for role, want in wanted_counts(model).items():
            for _ in range(draw(st.integers(max(0, want - 1), want + 1))):
                fits = [
                    s
                    for s in slots
                    if total[s.id] + model.gpu_memory <= s.memory * policy.gpu_pool.overcommit_ratio
                    and (role not in (Role.SERVING, Role.HOT) or loaded[s.id] + model.gpu_memory <= s.memory)
                ]
                if not fits:
                    continue
                slot = draw(st.sampled_from(fits))
                total[slot.id] += model.gpu_memory
                if role in (Role.SERVING, Role.HOT):
                    loaded[slot.id] += model.gpu_memory
                fleet.append(
                    Instance(
                        id=f"{model.name}-{n}", model=model.name, role=role, gpu=slot.id, node=slot.node, zone=slot.zone
                    )
                )
                n += 1
    cordoned = draw(st.lists(st.sampled_from([s.id for s in slots]), max_size=2, unique=True))
    return policy, fleet, cordoned


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drifted_fleets())
def test_repair_is_stable_bounded_and_never_silent(case: tuple[DRPolicy, list[Instance], list[str]]) -> None:
    policy, fleet, cordoned = case
    plan = plan_reconcile(policy, fleet, cordoned=cordoned)
    event(f"moves: {min(len(plan.moves), 3)}{'+' if len(plan.moves) > 3 else ''}")
    event(f"violations reported: {bool(plan.violations)}")
    check_moves(policy, fleet, plan)
    for step in workflow_steps(fleet, plan):
        check_capacity(policy, step)  # the replacement fits beside the standby it replaces
    assert not {a.gpu for a in plan.actions if a.kind != ReconcileActionKind.DELETE} & set(cordoned)
    # Never silent: a standby the rules call misplaced once the plan is applied is said, with why.
    after = apply(fleet, plan.actions)
    skipped = {s.split(":")[0] for s in plan.skipped_models}
    for instance_id in misplaced(policy, after, set(cordoned)):
        if instance_id.rsplit("-", 1)[0] not in skipped:
            assert any(v.startswith(f"{instance_id} ") for v in plan.violations), (instance_id, plan)
    # Stable: unless the budget or a reclaim left work for later, a second pass does nothing ...
    again = plan_reconcile(policy, after, cordoned=cordoned)
    deferred = any("move budget" in v for v in plan.violations) or any(a.preempts for a in plan.actions)
    if not deferred:
        assert again.actions == [], (plan, again)
    # ... and in every case the passes settle, without oscillating.
    seen = {frozenset((i.id, i.role, i.gpu) for i in after)}
    for _ in range(8):
        if not again.actions:
            break
        check_moves(policy, after, again)
        after = apply(after, again.actions)
        state = frozenset((i.id, i.role, i.gpu) for i in after)
        assert state not in seen
        seen.add(state)
        again = plan_reconcile(policy, after, cordoned=cordoned)
    assert again.actions == []


def test_a_pass_does_not_plan_the_models_with_a_recovery_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Their actions would be dropped: planning them only cost CPU (seconds per pass at 1,000
    instances in a zone failover, when every model is busy) and reserved capacity for nothing."""
    from drctl.policies import reconcile

    fleet = fleet_from_scratch()
    gone = {i.id for i in fleet if i.role == Role.HOT}
    snapshot = FleetSnapshot(
        policy=POLICY.model_dump(by_alias=True),
        instances=[i for i in fleet if i.id not in gone],
        busy_models={"llama-2-7b": "zone-failover-az-1"},
    )
    planned: list[Sequence[str] | None] = []

    def spy(policy: DRPolicy, instances: Sequence[Instance], models: Sequence[str] | None = None, *rest: object):  # type: ignore[no-untyped-def]
        planned.append(models)
        return plan_reconcile(policy, instances, models, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(reconcile, "plan_reconcile", spy)
    plan = reconcile.plan_pass(snapshot, None)
    assert planned == [[m for m in POLICY.model_names if m != "llama-2-7b"]]
    assert {a.model for a in plan.actions} == {"mistral-7b"}  # the one other model that lost a hot standby
    assert "llama-2-7b: zone-failover-az-1 in flight" in plan.skipped_models


LOST = [("mistral-7b", Role.HOT), ("gpt-4-8b", Role.SERVING)]


def test_while_a_zone_fails_over_a_pass_deletes_and_creates_serving_but_no_standby() -> None:
    """The zone's recoveries go first: no new standby, nor a delete that makes room for one, until
    its failover's lease is handed back; a missing serving instance is still made, and a dead
    standby still deleted."""
    fleet = fleet_from_scratch()
    lost = {next(i.id for i in fleet if (i.model, i.role) == model_role) for model_role in LOST}
    surplus = next(i for i in fleet if (i.model, i.role) == ("llama-2-7b", Role.COLD))
    fleet = [i for i in fleet if i.id not in lost] + [surplus.model_copy(update={"id": "llama-2-7b-9"})]
    snapshot = FleetSnapshot(policy=POLICY.model_dump(mode="json", by_alias=True), instances=fleet)
    usual = plan_pass(snapshot, None)
    first = plan_pass(snapshot.model_copy(update={"zones_failing_over": ["az-1"]}), None)

    def made(plan: ReconcilePlan) -> set[tuple[str, Role]]:
        return {(a.model, a.tier) for a in plan.actions if a.kind != ReconcileActionKind.DELETE}

    assert ("mistral-7b", Role.HOT) in made(usual) and ("gpt-4-8b", Role.SERVING) in made(usual)
    assert made(first) == {("gpt-4-8b", Role.SERVING)}

    def deleted(plan: ReconcilePlan) -> set[str]:
        return {a.instance for a in plan.actions if a.kind == ReconcileActionKind.DELETE}

    assert "llama-2-7b-9" in deleted(first) and deleted(first) <= deleted(usual)
    assert any("failover of zone az-1" in line for line in first.skipped_models)
    assert first.pacing == usual.pacing and first.pacing is not None


def test_a_new_instance_is_never_named_after_a_deleted_one() -> None:
    """llama-2-7b's highest instance (its second hot standby) was deleted: the replacement is named
    past it where the platform remembers it, not after it."""
    fleet = fleet_from_scratch()
    last = max((i for i in fleet if i.model == "llama-2-7b"), key=lambda i: int(i.id.rsplit("-", 1)[1]))
    assert last.role != Role.SERVING
    remaining = [i for i in fleet if i.id != last.id]
    forgetful = [a.instance for a in plan_reconcile(POLICY, remaining, ["llama-2-7b"]).actions]
    assert forgetful == [last.id]  # without the record: the deleted id again
    remembered = plan_reconcile(POLICY, remaining, ["llama-2-7b"], highest_indexes={"llama-2-7b": 3})
    assert [a.instance for a in remembered.actions] == ["llama-2-7b-4"]
    snapshot = FleetSnapshot(
        policy=POLICY.model_dump(mode="json", by_alias=True), instances=remaining, highest_indexes={"llama-2-7b": 3}
    )
    assert [a.instance for a in plan_pass(snapshot, ["llama-2-7b"]).actions] == ["llama-2-7b-4"]
