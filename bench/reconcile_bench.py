"""Reconcile at fleet scale: a pass over a fleet that already matches its policy.

    .venv/bin/python bench/reconcile_bench.py [--models 100 300 1000] [--repeats 5] [--json]

For each size, a generated policy (1 serving + 1 hot standby per model, every fifth model also a
warm and a cold standby; 16-GPU nodes in two zones, enough for the fleet) is brought to its counts
by the real planner (``plan_pass``, as the ``plan_reconcile`` activity runs it), each create
applied to the fleet as the platform would; then the pass with nothing to do is timed (the median of
``--repeats``), and what a pass records in its workflow history is weighed, before (the whole fleet
and policy: ``FleetSnapshot``) and after ``reconcile-plan-in-activity`` (the plan only), both as
drctl's data converter encodes them.

What this does not time: reading the fleet from a platform (a registry file, or the Kubernetes
API) and the workflow's own round trips, which do not grow with the number of models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drctl.payloads import FleetSnapshot, Instance, ReconcileAction, ReconcileActionKind, ReconcilePlan
from drctl.policies.reconcile import plan_pass
from drctl.policies.schema import DRPolicy
from drctl.temporal.converter import drctl_data_converter

GPUS_PER_NODE = 16
MODEL_MEMORY_GIB = 16
GPU_MEMORY_GIB = 80


def model_documents(models: int, memory_gib: int, prefix: str = "model-") -> list[dict[str, object]]:
    """The generated fleet's models: 1 serving + 1 hot standby each, every fifth model also a warm
    and a cold standby, ``memory_gib`` each."""
    return [
        {
            "name": f"{prefix}{i:04d}",
            "engine": "demo",
            "hotStandby": 1,
            "warmStandby": 1 if i % 5 == 0 else 0,
            "coldStandby": 1 if i % 5 == 0 else 0,
            "gpuMemory": f"{memory_gib}Gi",
        }
        for i in range(models)
    ]


def policy_of(models: int) -> DRPolicy:
    """``models`` models on enough 16-GPU nodes (two zones) for their instances, with room to spare."""
    instances = sum(2 + (2 if i % 5 == 0 else 0) for i in range(models))
    per_gpu = GPU_MEMORY_GIB // MODEL_MEMORY_GIB
    nodes = max(4, -(-instances * 3 // 2 // (GPUS_PER_NODE * per_gpu)))
    nodes += nodes % 2
    return DRPolicy.model_validate(
        {
            "models": model_documents(models, MODEL_MEMORY_GIB),
            "gpuPool": {
                "overcommitRatio": 1.5,
                "nodes": [
                    {"name": f"node-{n:03d}", "zone": f"az-{n % 2 + 1}", "gpus": GPUS_PER_NODE, "gpuMemory": "80Gi"}
                    for n in range(nodes)
                ],
            },
            "az_failover": {"activeZones": ["az-1", "az-2"]},
        }
    )


def snapshot_of(policy: DRPolicy, instances: list[Instance]) -> FleetSnapshot:
    return FleetSnapshot(policy=policy.model_dump(mode="json", by_alias=True), instances=instances)


def converge(policy: DRPolicy) -> tuple[list[Instance], int]:
    """The fleet the planner builds from nothing (creates applied as the platform would); passes taken."""
    instances: dict[str, Instance] = {}
    for passes in range(1, 10):
        plan = plan_pass(snapshot_of(policy, list(instances.values())), None)
        if not plan.actions:
            return list(instances.values()), passes
        apply_actions(instances, plan.actions)
    raise RuntimeError("the planner did not converge in 9 passes")


def apply_actions(instances: dict[str, Instance], actions: Sequence[ReconcileAction]) -> None:
    """A plan's actions applied to ``instances`` (id → instance) as the platform would."""
    for action in actions:
        if action.kind == ReconcileActionKind.DELETE:
            instances.pop(action.instance, None)
        else:
            instances[action.instance] = Instance(
                id=action.instance,
                model=action.model,
                role=action.tier,
                gpu=action.gpu,
                node=action.node,
                zone=action.zone,
                address=f"127.0.0.1:{20000 + len(instances)}",
            )


def encoded_size(value: Any) -> int:
    (payload,) = drctl_data_converter.payload_converter.to_payloads([value])
    return len(payload.data)


def measure(models: int, repeats: int) -> dict[str, Any]:
    policy = policy_of(models)
    began = time.perf_counter()
    fleet, passes = converge(policy)
    build_s = time.perf_counter() - began
    snapshot = snapshot_of(policy, fleet)
    times, plan = [], ReconcilePlan()
    for _ in range(repeats):
        began = time.perf_counter()
        plan = plan_pass(snapshot, None)
        times.append(time.perf_counter() - began)
    return {
        "models": models,
        "instances": len(fleet),
        "nodes": len(policy.gpu_pool.nodes),
        "passes_to_build": passes,
        "build_s": round(build_s, 2),
        "noop_plan_ms": round(statistics.median(times) * 1000, 1),
        "noop_actions": len(plan.actions),
        "violations": len(plan.violations),
        "history_bytes_before": encoded_size(snapshot),
        "history_bytes_after": encoded_size(plan),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(models, args.repeats) for models in args.models]
    if args.json:
        print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
        return
    print(f"A reconcile pass with nothing to do (median of {args.repeats}), {os.cpu_count()} CPUs")
    print("| models | instances | plan (no-op) | actions | recorded per pass: before → after |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['models']} | {r['instances']} | {r['noop_plan_ms']:.0f} ms | {r['noop_actions']} "
            f"| {r['history_bytes_before'] / 1024:.0f} KiB → {r['history_bytes_after']} B |"
        )


if __name__ == "__main__":
    main()
