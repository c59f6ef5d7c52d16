"""Reconcile on a generated fleet of hundreds of models: the fast paths give the answers the plain
ones give, and what a pass records stays small (``bench/reconcile_bench.py`` times it)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.reconcile_bench import converge, policy_of, snapshot_of
from drctl.payloads import FleetSnapshot, Instance, ReconcileActionKind, Role
from drctl.policies.placement import STANDBY_JUDGED, PlacementEngine, assign_borrowed
from drctl.policies.placement_repair import dr_request, remarked
from drctl.policies.reconcile import (
    MAX_LISTED_VIOLATIONS,
    _CountsPlanner,
    current_allocations,
    listed,
    plan_pass,
    usable_inventory,
)
from drctl.policies.schema import DRPolicy, TenantCapability

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


def test_lowest_judged_are_the_lowest_penalties_cut_to_what_repair_judges() -> None:
    """``lowest_judged`` finds the two lowest judged penalties in one loop, without computing or
    sorting every GPU's full penalty; it must agree with ``penalty`` of each GPU, cut and sorted."""
    policy = policy_of(MODELS)
    fleet, _ = converge(policy)
    inventory = usable_inventory(policy)
    engine = PlacementEngine(inventory, current_allocations(policy, fleet), policy.gpu_pool, policy.tenants)
    serving_node = {i.model: i.node for i in fleet if i.role == Role.SERVING}
    serving_zone = {i.model: i.zone for i in fleet if i.role == Role.SERVING}
    checked = 0
    for model in policy.models[:15]:
        for tier in (Role.HOT, Role.COLD):
            request = dr_request(
                model, "", tier, frozenset({serving_node[model.name]}), frozenset({serving_zone[model.name]})
            )
            every = sorted(
                (engine.penalty(request, slot.id)[:STANDBY_JUDGED], slot.id)
                for slot in inventory
                if slot.memory >= model.gpu_memory
            )
            assert engine.lowest_judged(request, model.gpu_memory) == every[:2]
            assert engine.lowest_judged(request, model.gpu_memory, count=5) == every[:5]
            checked += 1
    assert checked == 30


def _zone_outage(policy: DRPolicy) -> FleetSnapshot:
    """The converged fleet as a zone failover of az-1 leaves it: az-1's serving instances failed,
    their hot standbys serving, az-1's standbys gone and its GPUs cordoned."""
    fleet, _ = converge(policy)
    after: list[Instance] = []
    for instance in fleet:
        standby_of_failed = instance.role == Role.HOT and any(
            i.model == instance.model and i.role == Role.SERVING and i.zone == "az-1" for i in fleet
        )
        if instance.zone == "az-1" and instance.role == Role.SERVING:
            after.append(instance.model_copy(update={"role": Role.FAILED, "lb_priority": None}))
        elif standby_of_failed:
            after.append(instance.model_copy(update={"role": Role.SERVING, "lb_priority": 0}))
        elif instance.zone != "az-1":
            after.append(instance)
    cordoned = [slot.id for slot in usable_inventory(policy) if slot.zone == "az-1"]
    return FleetSnapshot(policy=policy.model_dump(mode="json", by_alias=True), instances=after, cordoned_gpus=cordoned)


def _capped(policy: DRPolicy) -> DRPolicy:
    """Two tenants, the first capped below what it holds (it borrows), the second reclaimable;
    some critical models (they preempt)."""
    document = policy.model_dump(mode="json", by_alias=True)
    document["tenants"] = [
        {"name": "default", "weight": 5, "capability": {"gpus": 12}},
        {"name": "spare", "weight": 1, "reclaimable": True},
    ]
    for n, model in enumerate(document["models"]):
        model["tenant"] = "spare" if n % 3 == 0 else "default"
        model["priority"] = "critical" if n % 7 == 0 else "normal"
    return DRPolicy.model_validate(document)


@pytest.mark.parametrize("capped", [False, True], ids=["open", "capped"])
def test_one_engine_kept_across_a_pass_plans_what_an_engine_per_create_plans(
    capped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner keeps one placement engine up to date across a pass's creates; built afresh for
    every create (as ``place`` does), the plan is the same, create for create."""
    policy = policy_of(MODELS)
    policy = _capped(policy) if capped else policy
    kept_engine = _CountsPlanner._placement_engine

    def every_time(planner: _CountsPlanner) -> PlacementEngine:
        planner._engine = None
        return kept_engine(planner)

    for snapshot in (_zone_outage(policy), snapshot_of(policy, [])):
        kept = plan_pass(snapshot, None)
        assert len([a for a in kept.actions if a.kind == ReconcileActionKind.CREATE]) >= MODELS // 2
        with monkeypatch.context() as m:
            m.setattr(_CountsPlanner, "_placement_engine", every_time)
            assert plan_pass(snapshot, None) == kept


def test_borrowed_marks_derived_again_match_assign_borrowed_with_or_without_the_shortcut() -> None:
    """``remarked`` skips the sort when every tenant fits its caps whole and nothing is marked; its
    answer is ``assign_borrowed``'s either way."""
    policy = _capped(policy_of(MODELS))
    allocations = current_allocations(policy, converge(policy)[0])
    for caps in ({"gpus": 12}, {"gpus": 10_000}, {"memory": "1Ti"}, {"memory": "100Ti", "gpus": 10_000}):
        capped = policy.model_copy(
            update={"tenants": [t.model_copy(update={"capability": TenantCapability.model_validate(caps)})
                                if t.name == "default" else t for t in policy.tenants]}
        )  # fmt: skip
        unmarked = [replace(a, borrowed=False) for a in allocations]
        assert remarked(capped, unmarked) == assign_borrowed(unmarked, capped.tenants), caps
