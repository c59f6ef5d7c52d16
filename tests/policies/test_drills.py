"""Drills, the pure part: target choice, redundancy, buckets and verdicts."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from drctl.payloads import (
    DrillMeasurement,
    DrillScenario,
    InjectedFault,
    Instance,
    Role,
    drain_workflow_id,
    gpu_of_drain_workflow_id,
)
from drctl.policies.drills import (
    DrillNotReady,
    bucketize,
    choose_target,
    redundancy_missing,
    verdicts,
)
from drctl.policies.loader import load_policy_file
from drctl.policies.reconcile import plan_reconcile

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")


def full_fleet() -> list[Instance]:
    """What `drctl up` builds: the planner's placement from an empty fleet."""
    plan = plan_reconcile(POLICY, [])
    return [
        Instance(id=a.instance, model=a.model, role=a.tier, gpu=a.gpu, node=a.node, zone=a.zone) for a in plan.actions
    ]


def test_default_target_is_the_most_critical_models_serving_instance() -> None:
    fleet = full_fleet()
    target = choose_target(POLICY, fleet, [], DrillScenario.NODE_DOWN)
    serving = next(i for i in fleet if i.model == "llama-2-7b" and i.role == Role.SERVING)
    assert (target.model, target.instance, target.node, target.gpu) == (
        "llama-2-7b",
        serving.id,
        serving.node,
        serving.gpu,
    )
    assert target.policy_rto_ms == 10_000 and target.sla_rto_ms == 40_000  # node down: the seed's 40 s


def test_refuses_a_fleet_below_its_redundancy_and_unknown_models() -> None:
    fleet = [i for i in full_fleet() if not (i.model == "llama-2-7b" and i.role == Role.HOT)][:-1]
    with pytest.raises(DrillNotReady, match="not at its policy's redundancy"):
        choose_target(POLICY, fleet, [], DrillScenario.POD_CRASH, "llama-2-7b")
    with pytest.raises(DrillNotReady, match="unknown model 'nope'"):
        choose_target(POLICY, full_fleet(), [], DrillScenario.POD_CRASH, "nope")


def test_zone_outage_needs_the_serving_zone_to_be_active() -> None:
    fleet = full_fleet()
    serving = next(i for i in fleet if i.model == "mistral-7b" and i.role == Role.SERVING)
    moved = [i.model_copy(update={"zone": "az-3"}) if i.id == serving.id else i for i in fleet]
    with pytest.raises(DrillNotReady, match="not an active zone"):
        choose_target(POLICY, moved, [], DrillScenario.ZONE_OUTAGE, "mistral-7b")
    assert choose_target(POLICY, fleet, [], DrillScenario.ZONE_OUTAGE, "mistral-7b").zone == serving.zone


def test_redundancy_missing_names_what_is_missing() -> None:
    fleet = full_fleet()
    assert redundancy_missing(POLICY, fleet, "llama-2-7b") == []
    hot = next(i for i in fleet if i.model == "llama-2-7b" and i.role == Role.HOT)
    fewer = [i for i in fleet if i.id != hot.id]
    assert any("hot" in line for line in redundancy_missing(POLICY, fewer, "llama-2-7b"))
    serving = next(i for i in fleet if i.model == "llama-2-7b" and i.role == Role.SERVING)
    promoting = [i.model_copy(update={"role": Role.PROMOTING}) if i.id == serving.id else i for i in fleet]
    missing = redundancy_missing(POLICY, promoting, "llama-2-7b")
    assert missing[0] == "no serving instance" and any("promoted" in line for line in missing)


def test_bucketize_counts_per_100_ms_relative_to_the_fault() -> None:
    samples = [(9.95, True), (10.0, False), (10.05, True), (10.15, True), (10.16, False)]
    buckets = bucketize(samples, fault_at=10.0)
    assert [(b.t_ms, b.ok, b.failed) for b in buckets] == [(-100, 1, 0), (0, 1, 1), (100, 1, 1)]


def measurement(**figures: object) -> DrillMeasurement:
    fault = InjectedFault(injected_at=datetime(2026, 1, 1, tzinfo=UTC), detail="test")
    return DrillMeasurement.model_validate({"fault": fault, "recovered": True, **figures})


def test_verdicts_against_policy_seed_and_zero_failures() -> None:
    target = choose_target(POLICY, full_fleet(), [], DrillScenario.POD_CRASH)
    good = verdicts(target, measurement(detection_ms=20, switch_ms=40, rto_ms=60, requests=100), hot_standby=True)
    assert all(v.startswith("pass") for v in good.values()) and len(good) == 5
    bad = verdicts(
        target,
        measurement(detection_ms=2000, switch_ms=5000, rto_ms=7000, requests=100, failed_requests=3),
        hot_standby=True,
    )
    assert bad["rto vs policy"].startswith("pass")  # 7 s is within the policy's 10 s ...
    assert bad["rto vs seed"].startswith("FAIL")  # ... but not the seed's 6 s for a pod crash
    assert bad["detection vs seed"].startswith("FAIL") and bad["failed requests"].startswith("FAIL: 3 of 100")
    # Without a hot standby, failed requests are reported but not judged; no recovery is a failure.
    lost = verdicts(target, measurement(recovered=False), hot_standby=False)
    assert "failed requests" not in lost and lost["recovered"].startswith("FAIL")
    assert lost["rto vs policy"].startswith("FAIL: not measured")


def test_a_drained_gpu_is_read_back_from_its_workflow_id() -> None:
    for gpu in ("gpu-node-0/3", "a/0", "rack-7.node-12/15"):
        assert gpu_of_drain_workflow_id(drain_workflow_id(gpu)) == gpu
