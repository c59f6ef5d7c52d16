"""DR drills, the pure part: the seed's SLA table, choosing what a drill hits, when redundancy is
back, and how the figures compare with the policy and the seed.

A drill must hit a fleet that is at its policy's redundancy, or its figures would measure the
wrong thing (a failover onto a standby that is not there); :func:`choose_target` refuses otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from drctl.payloads import (
    DrillMeasurement,
    DrillScenario,
    DrillTarget,
    Instance,
    LoadBucket,
    ReconcileActionKind,
    Role,
)
from drctl.policies.reconcile import plan_reconcile
from drctl.policies.schema import DRPolicy

SEED_SLA_S: dict[DrillScenario, tuple[float, float, float]] = {
    DrillScenario.POD_CRASH: (1, 5, 6),
    DrillScenario.NODE_DOWN: (10, 30, 40),
    DrillScenario.GPU_FAILURE: (5, 30, 35),
    DrillScenario.ZONE_OUTAGE: (30, 60, 90),
    DrillScenario.MODEL_CORRUPTION: (1, 60, 61),
}
"""Seed §5.2: detection, switch and total RTO per failure type, in seconds."""

BUCKET_MS = 100


class DrillNotReady(ValueError):
    """The drill cannot run now; the message says why. Nothing was injected."""


class DrillImpossible(DrillNotReady):
    """The drill cannot run on this policy at all (waiting will not help)."""


def choose_target(
    policy: DRPolicy,
    instances: Sequence[Instance],
    cordoned: Iterable[str],
    scenario: DrillScenario,
    model: str | None = None,
) -> DrillTarget:
    """The model's serving instance and, per scenario, its node, GPU or zone."""
    name = model or sorted(policy.models, key=lambda m: (-m.priority.rank, m.name))[0].name
    if name not in policy.model_names:
        raise DrillImpossible(f"unknown model {name!r} (known: {', '.join(policy.model_names)})")
    missing = redundancy_missing(policy, instances, name, cordoned)
    if missing:
        raise DrillNotReady(f"{name} is not at its policy's redundancy ({'; '.join(missing)}); drill refused")
    serving = [i for i in instances if i.model == name and i.role == Role.SERVING]
    if len(serving) != 1:
        raise DrillNotReady(f"{name} has {len(serving)} serving instances; a drill needs exactly one")
    target = serving[0]
    if scenario in (DrillScenario.NODE_DOWN, DrillScenario.GPU_FAILURE) and not (target.node and target.gpu):
        raise DrillNotReady(f"{target.id} has no node/GPU recorded; {scenario} needs them")
    if scenario == DrillScenario.ZONE_OUTAGE:
        if target.zone not in policy.az_failover.active_zones:
            raise DrillImpossible(
                f"{target.id} serves from {target.zone}, not an active zone "
                f"({', '.join(policy.az_failover.active_zones)}); a zone outage drill needs one"
            )
        if len(policy.zones) < 2:
            raise DrillImpossible("the policy has one zone: there is nowhere to fail over to")
    detection, switch, rto = SEED_SLA_S[scenario]
    return DrillTarget(
        scenario=scenario,
        model=name,
        instance=target.id,
        node=target.node,
        gpu=target.gpu,
        zone=target.zone,
        policy_rto_ms=policy.model(name).rto.total_seconds() * 1000,
        sla_detection_ms=detection * 1000,
        sla_switch_ms=switch * 1000,
        sla_rto_ms=rto * 1000,
    )


def redundancy_missing(
    policy: DRPolicy, instances: Sequence[Instance], model: str, cordoned: Iterable[str] = ()
) -> list[str]:
    """What the model lacks against its policy (empty: redundancy is back): a serving instance,
    standbys still to create or re-tier, a promotion still running, or no room to place one."""
    plan = plan_reconcile(policy, instances, [model], cordoned)
    missing = [f"{a.kind} {a.tier} {a.instance}" for a in plan.actions if a.kind != ReconcileActionKind.DELETE]
    missing += plan.skipped_models + plan.unplaceable
    if not any(i.model == model and i.role == Role.SERVING for i in instances):
        missing.insert(0, "no serving instance")
    return missing


def bucketize(samples: Iterable[tuple[float, bool]], fault_at: float) -> list[LoadBucket]:
    """Requests per 100 ms slice, from ``(finished_at, ok)`` pairs (seconds, same clock as ``fault_at``)."""
    buckets: dict[int, LoadBucket] = {}
    for finished_at, ok in samples:
        t_ms = int((finished_at - fault_at) * 1000 // BUCKET_MS * BUCKET_MS)
        bucket = buckets.setdefault(t_ms, LoadBucket(t_ms=t_ms))
        if ok:
            bucket.ok += 1
        else:
            bucket.failed += 1
    return [buckets[t] for t in sorted(buckets)]


def ms_between(start: datetime, end: datetime | None) -> float | None:
    return None if end is None else round((end - start).total_seconds() * 1000, 1)


def verdicts(target: DrillTarget, measurement: DrillMeasurement, hot_standby: bool) -> dict[str, str]:
    """Each figure against its bar: RTO against the policy and the seed, detection and switch
    against the seed, failed requests against zero where a hot standby exists."""
    out: dict[str, str] = {}

    def check(name: str, value: float | None, limit: float, against: str) -> None:
        if value is None:
            out[name] = f"FAIL: not measured (no recovery within the drill's timeout) vs {against} {limit / 1000:g} s"
        elif value <= limit:
            out[name] = f"pass: {value / 1000:.2f} s ≤ {against} {limit / 1000:g} s"
        else:
            out[name] = f"FAIL: {value / 1000:.2f} s > {against} {limit / 1000:g} s"

    check("rto vs policy", measurement.rto_ms, target.policy_rto_ms, "the policy's rto")
    check("rto vs seed", measurement.rto_ms, target.sla_rto_ms, "the seed's")
    check("detection vs seed", measurement.detection_ms, target.sla_detection_ms, "the seed's")
    check("switch vs seed", measurement.switch_ms, target.sla_switch_ms, "the seed's")
    if hot_standby:
        failed = measurement.failed_requests
        out["failed requests"] = (
            f"pass: 0 of {measurement.requests}"
            if failed == 0
            else f"FAIL: {failed} of {measurement.requests} failed although a hot standby exists"
        )
    if not measurement.recovered:
        out["recovered"] = "FAIL: the runbook did not recover the model, or redundancy did not come back in time"
    return out
