"""Reconcile on a generated fleet of hundreds of models: the fast paths give the answers the plain
ones give, and what a pass records stays small (``bench/reconcile_bench.py`` times it)."""

from __future__ import annotations

from bench.reconcile_bench import converge, policy_of, snapshot_of
from drctl.payloads import Role
from drctl.policies.placement import PlacementEngine
from drctl.policies.placement_repair import dr_request
from drctl.policies.reconcile import MAX_LISTED_VIOLATIONS, current_allocations, listed, plan_pass, usable_inventory

MODELS = 120


def test_a_converged_fleet_plans_nothing_and_lists_its_drift_briefly() -> None:
    policy = policy_of(MODELS)
    fleet, passes = converge(policy)
    assert passes <= 3
    assert len(fleet) == sum(m.replicas + m.hot_standby + m.warm_standby + m.cold_standby for m in policy.models)
    plan = plan_pass(snapshot_of(policy, fleet), None)
    assert plan.actions == []
    assert len(plan.violations) <= MAX_LISTED_VIOLATIONS + 1


def test_listed_keeps_the_first_lines_and_counts_the_rest() -> None:
    lines = [f"line {i}" for i in range(25)]
    assert listed(lines[:3]) == lines[:3]
    assert listed(lines, limit=20) == [*lines[:20], "... and 5 more like these"]


def test_penalties_of_every_gpu_match_the_penalty_of_each() -> None:
    """``penalties`` computes every GPU's penalty in one loop; it must agree with ``penalty``."""
    policy = policy_of(MODELS)
    fleet, _ = converge(policy)
    inventory = usable_inventory(policy)
    engine = PlacementEngine(inventory, current_allocations(policy, fleet), policy.gpu_pool, policy.tenants)
    serving_node = {i.model: i.node for i in fleet if i.role == Role.SERVING}
    serving_zone = {i.model: i.zone for i in fleet if i.role == Role.SERVING}
    checked = 0
    for model in policy.models[:15]:
        for tier in (Role.SERVING, Role.HOT, Role.COLD):
            nodes = frozenset({serving_node[model.name]} if tier != Role.SERVING else set())
            zones = frozenset({serving_zone[model.name]} if tier != Role.SERVING else set())
            request = dr_request(model, f"{model.name}-x", tier, nodes, zones)
            fast = engine.penalties(request)
            assert [slot.id for _, slot in fast] == [slot.id for slot in inventory]
            for penalty, slot in fast:
                assert penalty == engine.penalty(request, slot.id), (model.name, tier, slot.id)
                checked += 1
    assert checked == 15 * 3 * len(inventory)
