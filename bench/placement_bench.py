"""Placement benchmark: drctl's placement engine against the seed's scheduler (seed §2.2) on a generated fleet.

    .venv/bin/python bench/placement_bench.py [--gpus 1000 10000] [--refusals 50] [--repeats 5]
        [--sample 200] [--seed 7] [--json]

The fleet (deterministic for a ``--seed``): nodes of 8 GPUs spread over 3 zones, each node 40 or
80 GiB GPUs; overcommit 1.5; three tenants (memory and GPU caps of 50/30/20 % of the pool, all
reclaimable); one model per 20 GPUs, 7B/13B/34B/70B (14/26/68/140 GiB, capped at 80 GiB, the
largest GPU) in 40/30/20/10 %, priority critical/high/normal in 20/30/50 %, each with the seed's
tier counts for its priority (seed §4.1: critical 1 serving + 2 hot + 1 cold, high 1 + 1 hot +
1 warm + 1 cold, normal 1 + 1 warm + 2 cold). The request stream deploys the models one after
another (serving first, then standbys that protect the serving node) and starts over with another
replica of every model, forever; it is the same for both schedulers (the seed ignores tiers,
tenants and anti-affinity).

Measured per fleet size, side by side:

- **fill**: each scheduler takes the stream, applying every decision, until its ``--refusals``-th
  refusal: decisions per second of the whole fill (stateful: :class:`PlacementEngine`, and the
  seed's :class:`SeedPool`, which keeps its counters like the Go original), the utilisation reached
  (allocated / physical memory, loaded / physical), the refusals by kind, and the fragmentation:
  the fraction of the free memory (what a loaded request could still use on each GPU) that sits on
  GPUs where the median request of the stream does not fit.
- **decisions/s at half fill** (median of ``--repeats``): ``--sample`` requests of the stream,
  decided and not applied, on the state the engine reached half-way through its fill, by the
  stateless functions (``place`` and ``seed_place``: each call rebuilds from the allocation list)
  and by the stateful ones (``PlacementEngine.decide`` and ``SeedPool.select``).
- **emergency**: critical serving requests (``emergency=True``) on the full fleet, decided by the
  engine and not applied: decisions per second and how many found victims.

Progress goes to stderr; ``--json`` prints one JSON document instead of the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from drctl.policies.placement import (
    Allocation,
    GpuSlot,
    PlacementEngine,
    PlacementError,
    PlacementRequest,
    gpu_inventory,
    place,
)
from drctl.policies.schema import GpuNodePolicy, GpuPoolPolicy, Priority, TenantCapability, TenantPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.seed_scheduler import SeedPool, seed_place

GiB = 1024**3
GPUS_PER_NODE = 8
ZONES = ("az-1", "az-2", "az-3")
OVERCOMMIT = 1.5
MODEL_SIZES = ((7, 14), (13, 26), (34, 68), (70, 140))
"""(billions of parameters, GiB loaded)."""
SIZE_WEIGHTS = (40, 30, 20, 10)
PRIORITY_WEIGHTS = ((Priority.CRITICAL, 20), (Priority.HIGH, 30), (Priority.NORMAL, 50))
TIER_COUNTS = {
    Priority.CRITICAL: (("serving", 1), ("hot", 2), ("warm", 0), ("cold", 1)),
    Priority.HIGH: (("serving", 1), ("hot", 1), ("warm", 1), ("cold", 1)),
    Priority.NORMAL: (("serving", 1), ("hot", 0), ("warm", 1), ("cold", 2)),
}
"""The seed's dr-policy.yaml (§4.1) per priority, plus one serving instance."""
TENANT_SHARES = (("search", 50), ("chat", 30), ("batch", 20))


@dataclass(frozen=True)
class Model:
    name: str
    params_b: int
    memory: int
    priority: Priority
    tenant: str


@dataclass
class Fleet:
    gpus: int
    pool: GpuPoolPolicy
    inventory: list[GpuSlot]
    tenants: list[TenantPolicy]
    models: list[Model]
    seed: int

    @property
    def physical(self) -> int:
        return sum(s.memory for s in self.inventory)


def make_fleet(gpus: int, seed: int) -> Fleet:
    rng = random.Random(seed)
    nodes = [
        GpuNodePolicy(
            name=f"gpu-node-{n}",
            zone=ZONES[n % len(ZONES)],
            gpus=GPUS_PER_NODE,
            gpu_memory=rng.choice((40, 80)) * GiB,
        )
        for n in range(max(1, gpus // GPUS_PER_NODE))
    ]
    pool = GpuPoolPolicy(overcommit_ratio=OVERCOMMIT, nodes=nodes)
    inventory = gpu_inventory(pool)
    physical = sum(s.memory for s in inventory)
    tenants = [
        TenantPolicy(
            name=name,
            capability=TenantCapability(
                memory=int(physical * OVERCOMMIT * share / 100), gpus=len(inventory) * share // 100
            ),
            reclaimable=True,
        )
        for name, share in TENANT_SHARES
    ]
    largest = max(s.memory for s in inventory)
    models = []
    for m in range(max(3, len(inventory) // 20)):
        params, gib = rng.choices(MODEL_SIZES, weights=SIZE_WEIGHTS)[0]
        priority = rng.choices([p for p, _ in PRIORITY_WEIGHTS], weights=[w for _, w in PRIORITY_WEIGHTS])[0]
        tenant = rng.choices([t for t, _ in TENANT_SHARES], weights=[s for _, s in TENANT_SHARES])[0]
        models.append(Model(f"model-{m}-{params}b", params, min(gib * GiB, largest), priority, tenant))
    return Fleet(len(inventory), pool, inventory, tenants, models, seed)


@dataclass(frozen=True)
class Item:
    """One request of the stream, before anti-affinity is known."""

    model: Model
    tier: str
    instance: str


def stream(fleet: Fleet) -> Iterator[Item]:
    rng = random.Random(fleet.seed + 1)
    copies: Counter[str] = Counter()
    while True:
        order = list(fleet.models)
        rng.shuffle(order)
        for model in order:
            for tier, count in TIER_COUNTS[model.priority]:
                for _ in range(count):
                    yield Item(model, tier, f"{model.name}-{copies[model.name]}")
                    copies[model.name] += 1


def request_of(item: Item, serving_nodes: dict[str, set[str]], emergency: bool = False) -> PlacementRequest:
    protects = frozenset() if item.tier == "serving" else frozenset(serving_nodes.get(item.model.name, ()))
    return PlacementRequest(
        instance=item.instance,
        model=item.model.name,
        tenant=item.model.tenant,
        priority=item.model.priority,
        tier=item.tier,
        memory=item.model.memory,
        protects=protects,
        emergency=emergency,
    )


@dataclass
class Fill:
    scheduler: str
    decisions: int = 0
    seconds: float = 0.0
    refusals: Counter[str] = field(default_factory=Counter)
    first_refusal: str = ""
    allocated: int = 0
    loaded: int = 0
    allocations: int = 0
    borrowed: int = 0
    fragmentation: float = 0.0
    median_request: int = 0
    half_state: list[Allocation] = field(default_factory=list)
    half_decisions: int = 0

    @property
    def rate(self) -> float:
        return self.decisions / self.seconds if self.seconds else 0.0


def fragmentation(free: list[int], median: int) -> float:
    total = sum(f for f in free if f > 0)
    stranded = sum(f for f in free if 0 < f < median)
    return stranded / total if total else 0.0


def fill_engine(fleet: Fleet, refusals: int, half_at: int | None) -> tuple[Fill, PlacementEngine]:
    engine = PlacementEngine(fleet.inventory, [], fleet.pool, fleet.tenants)
    fill = Fill("drctl")
    serving_nodes: dict[str, set[str]] = {}
    sizes: list[int] = []
    started = time.perf_counter()
    for item in stream(fleet):
        if half_at is not None and fill.decisions == half_at:
            pause = time.perf_counter()
            fill.half_state = engine.allocations
            fill.half_decisions = fill.decisions
            started += time.perf_counter() - pause
        request = request_of(item, serving_nodes)
        sizes.append(request.memory)
        fill.decisions += 1
        try:
            placement = engine.decide(request)
        except PlacementError as exc:
            fill.refusals[exc.kind] += 1
            fill.first_refusal = fill.first_refusal or exc.reason
            if sum(fill.refusals.values()) >= refusals:
                break
            continue
        engine.apply(request, placement)
        if request.tier == "serving":
            serving_nodes.setdefault(request.model, set()).add(placement.gpu.node)
    fill.seconds = time.perf_counter() - started
    allocations = engine.allocations
    fill.allocations = len(allocations)
    fill.allocated = sum(a.memory for a in allocations)
    fill.loaded = sum(a.memory for a in allocations if a.loaded)
    fill.borrowed = sum(1 for a in allocations if a.borrowed)
    fill.median_request = int(statistics.median(sizes))
    use: dict[str, list[int]] = {}
    for a in allocations:
        pair = use.setdefault(a.gpu, [0, 0])
        pair[0] += a.memory if a.loaded else 0
        pair[1] += a.memory
    free = []
    for slot in fleet.inventory:
        loaded, total = use.get(slot.id, [0, 0])
        free.append(min(slot.memory - loaded, int(slot.memory * OVERCOMMIT) - total))
    fill.fragmentation = fragmentation(free, fill.median_request)
    return fill, engine


def fill_seed(fleet: Fleet, refusals: int) -> Fill:
    pool = SeedPool(fleet.inventory, [], fleet.pool)
    fill = Fill("seed")
    sizes: list[int] = []
    booked: Counter[str] = Counter()
    started = time.perf_counter()
    for item in stream(fleet):
        request = request_of(item, {})
        sizes.append(request.memory)
        fill.decisions += 1
        try:
            placement = pool.schedule(request)
        except PlacementError as exc:
            fill.refusals[exc.kind] += 1
            fill.first_refusal = fill.first_refusal or exc.reason
            if sum(fill.refusals.values()) >= refusals:
                break
            continue
        booked[placement.gpu.id] += request.memory
        fill.allocations += 1
        fill.allocated += request.memory
        if request.tier in ("serving", "hot", "promoting"):
            fill.loaded += request.memory
    fill.seconds = time.perf_counter() - started
    fill.median_request = int(statistics.median(sizes))
    free = [slot.memory - booked[slot.id] for slot in fleet.inventory]
    fill.fragmentation = fragmentation(free, fill.median_request)
    return fill


def timed(calls: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Median seconds of ``calls`` over the repeats, and what it returned."""
    durations = []
    result = 0
    for _ in range(repeats):
        started = time.perf_counter()
        result = calls()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations), result


def half_fill_rates(fleet: Fleet, fill: Fill, sample: int, repeats: int) -> dict[str, float]:
    """Decisions per second of each scheduler on the same state and the same requests (not applied)."""
    items = stream(fleet)
    for _ in range(fill.half_decisions):
        next(items)
    state = fill.half_state
    serving_nodes: dict[str, set[str]] = {}
    for a in state:
        if a.tier == "serving":
            serving_nodes.setdefault(a.model, set()).add(a.gpu.split("/")[0])
    requests = [request_of(next(items), serving_nodes) for _ in range(sample)]
    engine = PlacementEngine(fleet.inventory, state, fleet.pool, fleet.tenants)
    seed_pool = SeedPool(fleet.inventory, state, fleet.pool)

    # The stateless functions rebuild everything per call: time fewer of them.
    few = requests[: max(5, sample // 20)]
    rates = {}
    for name, decide, batch in (
        ("engine", engine.decide, requests),
        ("seed_pool", lambda r: seed_pool.select(r.model, r.memory), requests),
        ("place", lambda r: place(r, fleet.inventory, state, fleet.pool, fleet.tenants), few),
        ("seed_place", lambda r: seed_place(r, fleet.inventory, state, fleet.pool, fleet.tenants), few),
    ):
        seconds, _ = timed(deciding(decide, batch), repeats)
        rates[name] = len(batch) / seconds
    return rates


def deciding(decide: Callable[[PlacementRequest], object], batch: list[PlacementRequest]) -> Callable[[], int]:
    """A run of ``decide`` over the batch, returning how many were placed."""

    def calls() -> int:
        ok = 0
        for request in batch:
            try:
                decide(request)
                ok += 1
            except PlacementError:
                pass
        return ok

    return calls


def emergency_rate(fleet: Fleet, engine: PlacementEngine, sample: int, repeats: int) -> tuple[float, Counter[str]]:
    critical = [m for m in fleet.models if m.priority == Priority.CRITICAL] or fleet.models
    requests = [
        request_of(Item(critical[k % len(critical)], "serving", f"emergency-{k}"), {}, emergency=True)
        for k in range(sample)
    ]

    outcomes: Counter[str] = Counter()

    def calls() -> int:
        outcomes.clear()
        for request in requests:
            try:
                outcomes["preempting" if engine.decide(request).preempted else "plain"] += 1
            except PlacementError:
                outcomes["refused"] += 1
        return outcomes["preempting"]

    seconds, _ = timed(calls, repeats)
    return sample / seconds, outcomes


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def gib(size: int) -> str:
    return f"{size / GiB:,.0f} GiB"


def run_size(gpus: int, args: argparse.Namespace, log: Console) -> dict[str, Any]:
    fleet = make_fleet(gpus, args.seed)
    log.print(f"[{gpus} GPUs] {len(fleet.models)} models, {gib(fleet.physical)} physical; filling with the seed's…")
    seed = fill_seed(fleet, args.refusals)
    log.print(f"[{gpus} GPUs] seed: {seed.decisions} decisions in {seed.seconds:.1f} s; filling with drctl's…")
    mine, engine = fill_engine(fleet, args.refusals, half_at=seed.decisions // 2)
    log.print(f"[{gpus} GPUs] drctl: {mine.decisions} decisions in {mine.seconds:.1f} s; timing at half fill…")
    rates = half_fill_rates(fleet, mine, args.sample, args.repeats)
    emergencies = max(10, args.sample // 10)
    emergency, outcomes = emergency_rate(fleet, engine, emergencies, args.repeats)
    fills = {}
    for fill in (mine, seed):
        fills[fill.scheduler] = {
            "decisions": fill.decisions,
            "seconds": round(fill.seconds, 3),
            "decisions_per_s": round(fill.rate, 1),
            "allocations": fill.allocations,
            "borrowed": fill.borrowed,
            "allocated_over_physical": round(fill.allocated / fleet.physical, 4),
            "loaded_over_physical": round(fill.loaded / fleet.physical, 4),
            "refusals": dict(fill.refusals),
            "first_refusal": fill.first_refusal,
            "fragmentation": round(fill.fragmentation, 4),
            "median_request_gib": fill.median_request / GiB,
        }
    return {
        "gpus": fleet.gpus,
        "nodes": len(fleet.pool.nodes),
        "models": len(fleet.models),
        "physical_gib": fleet.physical // GiB,
        "fill": fills,
        "half_fill": {
            "allocations": len(mine.half_state),
            "decisions_per_s": {k: round(v, 1) for k, v in rates.items()},
        },
        "emergency": {"decisions_per_s": round(emergency, 1), "sample": emergencies, **outcomes},
    }


def print_tables(doc: dict[str, Any], console: Console) -> None:
    console.print(f"$ {doc['command']}")
    m = doc["machine"]
    console.print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['platform']}")
    console.print(
        f"fleet: nodes of {GPUS_PER_NODE} GPUs (40/80 GiB) over {len(ZONES)} zones, overcommit {OVERCOMMIT}, "
        f"seed {doc['seed']}; fill until {doc['refusals']} refusals; timings: median of {doc['repeats']}"
    )
    speed = Table(title="Decisions per second (higher is better)")
    speed.add_column("GPUs", justify="right")
    for col in ("drctl engine", "seed pool", "engine / seed", "place()", "seed_place()", "place / seed", "emergency"):
        speed.add_column(col, justify="right")
    for size in doc["sizes"]:
        r = size["half_fill"]["decisions_per_s"]
        speed.add_row(
            f"{size['gpus']:,}",
            f"{r['engine']:,.0f}",
            f"{r['seed_pool']:,.0f}",
            f"{r['engine'] / r['seed_pool']:.1f}x",
            f"{r['place']:,.1f}",
            f"{r['seed_place']:,.1f}",
            f"{r['place'] / r['seed_place']:.2f}x",
            f"{size['emergency']['decisions_per_s']:,.0f}",
        )
    console.print(speed)
    util = Table(title="Filling the fleet until the refusals (same request stream)")
    for col in (
        "GPUs",
        "scheduler",
        "decisions",
        "fill dec/s",
        "allocated/phys",
        "loaded/phys",
        "refusals",
        "borrowed",
        "fragmentation",
    ):
        util.add_column(col, justify="right" if col not in ("scheduler", "refusals") else "left")
    for size in doc["sizes"]:
        for name in ("drctl", "seed"):
            f = size["fill"][name]
            util.add_row(
                f"{size['gpus']:,}",
                name,
                f"{f['decisions']:,}",
                f"{f['decisions_per_s']:,.0f}",
                f"{f['allocated_over_physical']:.1%}",
                f"{f['loaded_over_physical']:.1%}",
                ", ".join(f"{k} {v}" for k, v in sorted(f["refusals"].items())),
                f"{f['borrowed']:,}",
                f"{f['fragmentation']:.1%}",
            )
    console.print(util)
    for size in doc["sizes"]:
        e = size["emergency"]
        console.print(
            f"{size['gpus']:,} GPUs: {size['models']} models; half fill = {size['half_fill']['allocations']:,} "
            f"allocations; {e['sample']} critical emergencies on the full fleet: {e.get('plain', 0)} placed as is, "
            f"{e.get('preempting', 0)} by preemption, {e.get('refused', 0)} refused; first refusal of the fill "
            f"(drctl): {size['fill']['drctl']['first_refusal']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--refusals", type=int, default=50, help="stop filling at this many refusals")
    parser.add_argument("--repeats", type=int, default=5, help="timings: median of this many runs")
    parser.add_argument("--sample", type=int, default=200, help="requests timed at half fill")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    log = Console(stderr=True)
    doc: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "bench/placement_bench.py", *sys.argv[1:]]),
        "machine": machine(),
        "seed": args.seed,
        "refusals": args.refusals,
        "repeats": args.repeats,
        "sizes": [run_size(g, args, log) for g in args.gpus],
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_tables(doc, Console(width=160))
    return 0


if __name__ == "__main__":
    sys.exit(main())
