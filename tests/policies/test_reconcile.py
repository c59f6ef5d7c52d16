"""The pure reconciliation planner: counts per tier back to the policy, placed by the rules."""

from __future__ import annotations

from pathlib import Path

from drctl.payloads import Instance, ReconcileAction, ReconcileActionKind, Role
from drctl.policies.loader import load_policy_file
from drctl.policies.reconcile import plan_reconcile
from drctl.policies.schema import DRPolicy

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")


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
    assert [(a.kind, a.instance, a.tier) for a in plan.actions] == [
        (ReconcileActionKind.CREATE, "llama-2-7b-4", Role.HOT)
    ]


def test_surplus_warm_becomes_missing_hot() -> None:
    fleet = fleet_from_scratch()
    hot = next(i for i in fleet if i.model == "mistral-7b" and i.role == Role.HOT)
    extra_warm = Instance(
        id="mistral-7b-9", model="mistral-7b", role=Role.WARM, gpu="gpu-node-2/3", node="gpu-node-2", zone="az-3"
    )
    fleet = [i for i in fleet if i.id != hot.id] + [extra_warm]
    plan = plan_reconcile(POLICY, fleet)
    assert [(a.kind, a.instance, a.tier) for a in plan.actions] == [
        (ReconcileActionKind.RETIER, "mistral-7b-9", Role.HOT)
    ]


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
    assert plan.actions == []
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
