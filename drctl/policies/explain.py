"""What a policy implies, per model: instances per tier, GPU memory per zone, expected RTO per
failure, compared with the model's RTO target. Pure: ``drctl policy explain`` renders it.

The RTO figures are estimates from stated assumptions (``RtoAssumptions``), not measurements;
the hot figure is what ``bench/failover_bench.py`` measured on the local stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from drctl.payloads import Role
from drctl.policies.placement import LOADED_TIERS, serving_zones
from drctl.policies.reconcile import plan_reconcile, wanted_counts
from drctl.policies.schema import DRPolicy, ModelPolicy

GIB = 2**30


@dataclass(frozen=True)
class RtoAssumptions:
    hot_switch_s: float = 0.1
    """Hot standby: already loaded and registered; the runbook switches it (measured ~50 ms)."""
    wake_gib_per_s: float = 10.0
    """Warm standby: weights move from host to GPU memory (vLLM sleep level 1)."""
    cold_start_s: float = 5.0
    """Cold standby: process start before loading."""
    cold_load_gib_per_s: float = 2.0
    """Cold standby: weights read from the checkpoint store into the GPU."""
    detection_s: float = 1.0
    """Failure to runbook start (probe or alert); the detection issue measures it."""


@dataclass(frozen=True)
class FailureStep:
    failure: int
    """1 = the first serving instance lost, 2 = the next, ..."""
    tier: Role | None
    """The standby that takes over; None when nothing is left (an emergency instance is needed)."""
    expected_rto_s: float
    meets_target: bool


@dataclass
class ModelExplanation:
    name: str
    priority: str
    tenant: str
    rto_target: timedelta
    rpo_target: timedelta
    instances: dict[Role, int]
    memory_by_zone: dict[str, dict[str, int]] = field(default_factory=dict)
    """zone → {"loaded": bytes, "reserved": bytes} as placement lays the model out."""
    failures: list[FailureStep] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)
    outside_active_zones: list[str] = field(default_factory=list)
    """Serving instances placement puts outside the active zones (an active-passive policy with a
    standby zone), each with why no active zone could take it; empty when every one is inside."""


def tier_rto_s(policy: DRPolicy, model: ModelPolicy, tier: Role | None, a: RtoAssumptions) -> float:
    health_check = policy.load_balancer.health_check.interval.total_seconds()
    weights_gib = model.gpu_memory / GIB
    if tier == Role.HOT:
        return a.detection_s + a.hot_switch_s
    if tier == Role.WARM:
        return a.detection_s + weights_gib / a.wake_gib_per_s + health_check + a.hot_switch_s
    # Cold, or an emergency instance placed on the pool: start and load from the checkpoint.
    return a.detection_s + a.cold_start_s + weights_gib / a.cold_load_gib_per_s + health_check + a.hot_switch_s


def _zone_note(reason: str, zone: str) -> str:
    """The part of a create's reason where placement says why serving is outside the active zones."""
    start = reason.find(f"in zone {zone}, outside the active zones")
    if start < 0:
        return f"in zone {zone}, outside the active zones"
    end = reason.find("; ", start)
    return reason[start:] if end < 0 else reason[start:end]


def explain(policy: DRPolicy, assumptions: RtoAssumptions = RtoAssumptions()) -> list[ModelExplanation]:
    plan = plan_reconcile(policy, [])
    active = serving_zones(policy)
    explanations = []
    for model in policy.models:
        counts = wanted_counts(model)
        item = ModelExplanation(
            name=model.name,
            priority=model.priority.value,
            tenant=model.tenant,
            rto_target=model.rto,
            rpo_target=model.rpo,
            instances=counts,
        )
        for action in plan.actions:
            if action.model != model.name or action.zone is None:
                continue
            kind = "loaded" if action.tier.value in LOADED_TIERS else "reserved"
            zone = item.memory_by_zone.setdefault(action.zone, {"loaded": 0, "reserved": 0})
            zone[kind] += model.gpu_memory
        item.unplaced = [line for line in plan.unplaceable if line.startswith(f"{model.name}-")]
        item.outside_active_zones = [
            f"{action.instance}: {_zone_note(action.reason, action.zone)}"
            for action in plan.actions
            if action.model == model.name and action.tier == Role.SERVING and action.zone is not None
            if active and action.zone not in active
        ]
        standbys = [Role.HOT] * counts[Role.HOT] + [Role.WARM] * counts[Role.WARM] + [Role.COLD] * counts[Role.COLD]
        for n, tier in enumerate([*standbys, None], start=1):
            rto = tier_rto_s(policy, model, tier, assumptions)
            item.failures.append(FailureStep(n, tier, round(rto, 1), rto <= model.rto.total_seconds()))
        explanations.append(item)
    return explanations
