"""DR placement: how much of the fleet one node, one GPU or one zone takes down, before and after
a zone failover.

    .venv/bin/python bench/spread_bench.py [--models 50 150 500] [--nodes 8] [--gpus 8] [--json]

For each size, a generated policy (1 serving + 1 hot standby per model, every fifth model also a
warm and a cold standby; ``--nodes`` nodes of ``--gpus`` 80 GiB GPUs, alternately in az-1 and
az-2, both active; instances sized so that the whole fleet fits in one zone) is brought to its
counts by the real planner (``plan_pass``, as the ``plan_reconcile`` activity runs it, creates
applied as the platform would). Then az-1 fails: every model serving there is served by the
standby its runbook would promote (``standby_candidates``, the standby zone first), az-1's
instances are gone, its GPUs cordoned, and the planner restores the counts in az-2. Reported, for
the fleet as first placed and as it stands after the zone failover:

- **node / GPU / zone**: the largest share of models that lose their serving instance when one
  node (one GPU, one zone) fails (every serving instance of a model on it);
- **loaded**: GPU memory of loaded instances (serving, hot) over the physical memory of the GPUs in
  use, and the GPUs in use;
- **passes**: reconcile passes until the plan is empty (a placement that repair keeps moving would
  not settle).

Pure planning, no processes: what placement decides, not how fast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reconcile_bench import apply_actions, model_documents
from drctl.payloads import FleetSnapshot, Instance, Role
from drctl.policies.placement import gpu_inventory
from drctl.policies.reconcile import plan_pass
from drctl.policies.schema import DRPolicy
from drctl.policies.sizes import parse_size
from drctl.policies.standby import standby_candidates

GPU_MEMORY_GIB = 80
LOADED = {Role.SERVING, Role.HOT}
DOWN_ZONE = "az-1"


def policy_of(models: int, nodes: int, gpus: int) -> DRPolicy:
    """``models`` models on ``nodes`` nodes of ``gpus`` GPUs, sized so the fleet fits in one zone."""
    instances = sum(2 + (2 if i % 5 == 0 else 0) for i in range(models))
    per_gpu = max(1, -(-instances // (nodes // 2 * gpus)))
    memory_gib = max(1, GPU_MEMORY_GIB // (per_gpu + 1))
    return DRPolicy.model_validate(
        {
            "models": model_documents(models, memory_gib, prefix="m"),
            "gpuPool": {
                "nodes": [
                    {"name": f"node-{n:02d}", "zone": f"az-{n % 2 + 1}", "gpus": gpus, "gpuMemory": "80Gi"}
                    for n in range(nodes)
                ]
            },
            "az_failover": {"activeZones": ["az-1", "az-2"]},
        }
    )


def settle(policy: DRPolicy, fleet: list[Instance], cordoned: list[str]) -> tuple[list[Instance], int]:
    """Reconcile passes (their actions applied as the platform would) until one plans nothing."""
    instances = {i.id: i for i in fleet}
    for passes in range(1, 20):
        snapshot = FleetSnapshot(
            policy=policy.model_dump(mode="json", by_alias=True),
            instances=list(instances.values()),
            cordoned_gpus=cordoned,
        )
        plan = plan_pass(snapshot, None)
        if not plan.actions:
            return list(instances.values()), passes
        apply_actions(instances, plan.actions)
    raise RuntimeError("reconciliation did not settle in 19 passes")


def zone_fails(fleet: list[Instance], zone: str) -> list[Instance]:
    """Every model serving in ``zone`` served by the standby its runbook would promote; the zone's
    instances gone."""
    by_model: dict[str, list[Instance]] = defaultdict(list)
    for i in fleet:
        by_model[i.model].append(i)
    left: list[Instance] = []
    for instances in by_model.values():
        promoted: set[str] = set()
        for failed in (i for i in instances if i.role == Role.SERVING and i.zone == zone):
            pick = next(
                (c for c in standby_candidates(instances, failed.id, None) if c.zone != zone and c.id not in promoted),
                None,
            )
            if pick is not None:
                promoted.add(pick.id)
        left += [
            i.model_copy(update={"role": Role.SERVING}) if i.id in promoted else i for i in instances if i.zone != zone
        ]
    return left


def exposure(fleet: list[Instance], models: int, key: str) -> float:
    """The largest share of models that lose every serving instance when one ``key`` (node, gpu,
    zone) fails."""
    serving: dict[str, set[str]] = defaultdict(set)
    for i in fleet:
        if i.role == Role.SERVING:
            serving[i.model].add(getattr(i, key) or "-")
    lost: Counter[str] = Counter()
    for domains in serving.values():
        if len(domains) == 1:
            lost[next(iter(domains))] += 1
    return max(lost.values(), default=0) / models


def loaded_share(policy: DRPolicy, fleet: list[Instance]) -> tuple[float, int]:
    memory = {m.name: parse_size(m.gpu_memory) for m in policy.models}
    used = {i.gpu for i in fleet if i.gpu}
    loaded = sum(memory[i.model] for i in fleet if i.role in LOADED)
    physical = sum(s.memory for s in gpu_inventory(policy.gpu_pool) if s.id in used)
    return (loaded / physical if physical else 0.0), len(used)


def figures(policy: DRPolicy, fleet: list[Instance], passes: int) -> dict[str, Any]:
    models = len(policy.models)
    loaded, gpus = loaded_share(policy, fleet)
    return {
        "node": round(exposure(fleet, models, "node"), 3),
        "gpu": round(exposure(fleet, models, "gpu"), 3),
        "zone": round(exposure(fleet, models, "zone"), 3),
        "loaded": round(loaded, 3),
        "gpus_used": gpus,
        "passes": passes,
    }


def measure(models: int, nodes: int, gpus: int) -> dict[str, Any]:
    policy = policy_of(models, nodes, gpus)
    fleet, passes = settle(policy, [], [])
    cordoned = [s.id for s in gpu_inventory(policy.gpu_pool) if s.zone == DOWN_ZONE]
    after, passes_after = settle(policy, zone_fails(fleet, DOWN_ZONE), cordoned)
    return {
        "models": models,
        "instances": len(fleet),
        "nodes": nodes,
        "placed": figures(policy, fleet, passes),
        "after_zone_failover": figures(policy, after, passes_after),
    }


def pct(share: float) -> str:
    return f"{share * 100:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[50, 150, 500])
    parser.add_argument("--nodes", type=int, default=8, help="nodes, alternately in az-1 and az-2 (default 8)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.nodes < 2 or args.nodes % 2:
        parser.error("--nodes must be even and at least 2 (half in each zone)")
    rows = [measure(models, args.nodes, args.gpus) for models in args.models]
    if args.json:
        print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
        return
    print("Largest share of models that lose their serving instance when one node / GPU / zone fails")
    print("| models (instances) | fleet | node | GPU | zone | loaded / physical (GPUs in use) | passes |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for label, key in (("as placed", "placed"), ("after az-1 failed over", "after_zone_failover")):
            f = row[key]
            print(
                f"| {row['models']} ({row['instances']}) | {label} | {pct(f['node'])} | {pct(f['gpu'])} | "
                f"{pct(f['zone'])} | {pct(f['loaded'])} ({f['gpus_used']}) | {f['passes']} |"
            )


if __name__ == "__main__":
    main()
