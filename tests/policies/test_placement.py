"""Placement on the shared GPU pool: capacity, anti-affinity, quotas, emergency preemption, best fit.

The property tests drive ``place_many`` with generated pools, tenants and request sequences, replay
each step here, and check every step against a brute-force oracle written from the rules in the
module's docstring (O(GPUs x allocations), no indexes), so the engine's indexes and incremental
bookkeeping are checked against a direct reading of the rules.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drctl.policies.placement import (
    LOADED_TIERS,
    RESERVED_TIERS,
    SERVING_TIERS,
    Allocation,
    GpuSlot,
    Placement,
    PlacementEngine,
    PlacementError,
    PlacementRequest,
    assign_borrowed,
    gpu_inventory,
    place,
    place_many,
    select_victims,
    victim_cost,
)
from drctl.policies.schema import GpuNodePolicy, GpuPoolPolicy, Priority, TenantCapability, TenantPolicy

GiB = 1024**3
TIERS = sorted(LOADED_TIERS | RESERVED_TIERS)
EXAMPLES = int(os.environ.get("DRCTL_PLACEMENT_EXAMPLES", "200"))
"""Examples per property; raise it for a thorough run (the default keeps the file well under 20 s)."""
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- generated scenarios ---------------------------------------------------------------------------


@dataclass
class Scenario:
    pool: GpuPoolPolicy
    tenants: list[TenantPolicy]
    requests: list[PlacementRequest]

    @property
    def inventory(self) -> list[GpuSlot]:
        return gpu_inventory(self.pool)


SIZES_GIB = [0, 1, 4, 8, 8, 14, 14, 16, 16, 26, 26, 32, 40, 40, 48, 68, 80, 90]
"""Request sizes, weighted toward what fits: 7B-70B models and a few that fit on no GPU."""

NODE = st.tuples(st.integers(0, 2), st.integers(1, 8), st.sampled_from([16, 24, 32, 40, 48, 64, 80]))
SMALL_NODE = st.tuples(st.integers(0, 2), st.integers(1, 2), st.sampled_from([16, 24, 32, 40, 48, 64, 80]))
TENANT = st.tuples(
    st.sampled_from([None, 0, 5, 10, 20, 20, 30, 30, 40, 50, 60]),  # memory cap, % of the pool's capacity
    st.sampled_from([None, None, None, 0, 1, 2, 3, 5, 10]),  # GPU cap
    st.sampled_from([True, True, False]),  # reclaimable
)
REQUEST = st.tuples(
    st.integers(0, 40),  # instance: sometimes re-places an earlier one
    st.integers(0, 4),  # model
    st.integers(0, 3),  # tenant; the last is one the policy does not list
    st.sampled_from(list(Priority)),
    st.sampled_from(TIERS),
    st.sampled_from(SIZES_GIB),
    st.sets(st.integers(0, 5), max_size=3),  # protects: node numbers
    st.booleans(),  # emergency (high and critical only)
)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    zones = draw(st.integers(1, 3))
    # Half of the pools are small, so that requests contend for them (borrowing, reclaim, emergencies).
    shapes = st.lists(NODE, min_size=1, max_size=6) | st.lists(SMALL_NODE, min_size=1, max_size=2)
    nodes = [
        GpuNodePolicy(name=f"node-{n}", zone=f"az-{z % zones + 1}", gpus=gpus, gpu_memory=size * GiB)
        for n, (z, gpus, size) in enumerate(draw(shapes))
    ]
    pool = GpuPoolPolicy(overcommit_ratio=draw(st.sampled_from([1.0, 1.25, 1.5, 2.0])), nodes=nodes)
    capacity = sum(n.gpus * n.gpu_memory for n in nodes) * pool.overcommit_ratio
    tenants = [
        TenantPolicy(
            name=f"t{k}",
            capability=TenantCapability(memory=None if mem is None else int(capacity * mem / 100), gpus=gpus),
            reclaimable=reclaimable,
        )
        for k, (mem, gpus, reclaimable) in enumerate(draw(st.lists(TENANT, min_size=1, max_size=3)))
    ]
    names = [t.name for t in tenants]
    requests = [
        PlacementRequest(
            instance=f"i{instance}",
            model=f"m{model}",
            tenant=names[tenant] if tenant < len(names) else "stranger",
            priority=priority,
            tier=tier,
            memory=size * GiB,
            protects=frozenset(nodes[n].name for n in protects if n < len(nodes)),
            emergency=emergency and priority != Priority.NORMAL,
        )
        for instance, model, tenant, priority, tier, size, protects, emergency in draw(
            st.lists(REQUEST, min_size=10, max_size=40)
        )
    ]
    return Scenario(pool, tenants, requests)


@dataclass
class Step:
    before: list[Allocation]
    """State the request saw (without an earlier allocation of the same instance)."""
    request: PlacementRequest
    result: Placement | PlacementError
    after: list[Allocation]


def run(scenario: Scenario) -> list[Step]:
    results, final = place_many(scenario.requests, scenario.inventory, [], scenario.pool, scenario.tenants)
    steps = []
    state: list[Allocation] = []
    for request, result in zip(scenario.requests, results, strict=True):
        before = [a for a in state if a.instance != request.instance]
        if isinstance(result, Placement):
            victims = {v.instance for v in result.preempted}
            state = [a for a in before if a.instance not in victims] + [result.allocation(request)]
        steps.append(Step(before, request, result, list(state)))
    assert sorted(final, key=lambda a: a.instance) == sorted(state, key=lambda a: a.instance)
    return steps


# -- the oracle: the rules, read directly ----------------------------------------------------------


def is_loaded(tier: str) -> bool:
    return tier not in RESERVED_TIERS


def cap_of(memory: int, ratio: float) -> int:
    return math.floor(memory * ratio)


def gpu_use(allocs: Sequence[Allocation], gpu: str) -> tuple[int, int]:
    on = [a for a in allocs if a.gpu == gpu]
    return sum(a.memory for a in on if is_loaded(a.tier)), sum(a.memory for a in on)


def fits(allocs: Sequence[Allocation], request: PlacementRequest, slot: GpuSlot, scenario: Scenario) -> bool:
    ratio = scenario.pool.overcommit_ratio
    pool_cap = cap_of(sum(s.memory for s in scenario.inventory), ratio)
    if sum(a.memory for a in allocs) + request.memory > pool_cap:
        return False
    loaded, total = gpu_use(allocs, slot.id)
    if total + request.memory > cap_of(slot.memory, ratio):
        return False
    return not is_loaded(request.tier) or loaded + request.memory <= slot.memory


def leftover(allocs: Sequence[Allocation], request: PlacementRequest, slot: GpuSlot, ratio: float) -> int:
    loaded, total = gpu_use(allocs, slot.id)
    oc_left = cap_of(slot.memory, ratio) - total - request.memory
    return min(slot.memory - loaded - request.memory, oc_left) if is_loaded(request.tier) else oc_left


def policy_of(tenants: Sequence[TenantPolicy], name: str) -> TenantPolicy | None:
    return next((t for t in tenants if t.name == name), None)


def own_usage(allocs: Sequence[Allocation], tenant: str) -> tuple[int, set[str]]:
    mine = [a for a in allocs if a.tenant == tenant and not a.borrowed]
    return sum(a.memory for a in mine), {a.gpu for a in mine if is_loaded(a.tier)}


def borrowed_footprint(allocs: Sequence[Allocation], tenant: str) -> tuple[int, set[str]]:
    mine = [a for a in allocs if a.tenant == tenant and a.borrowed]
    own_gpus = own_usage(allocs, tenant)[1]
    return sum(a.memory for a in mine), {a.gpu for a in mine if is_loaded(a.tier)} - own_gpus


def quota(allocs: Sequence[Allocation], tenants: Sequence[TenantPolicy], request: PlacementRequest, gpu: str) -> str:
    """'own' (within cap), 'borrowed' or 'no' for the request on ``gpu``."""
    policy = policy_of(tenants, request.tenant)
    cap_mem = policy.capability.memory if policy else None
    cap_gpus = policy.capability.gpus if policy else None
    if cap_mem is None and cap_gpus is None:
        return "own"
    loaded = is_loaded(request.tier)
    own_mem, own_gpus = own_usage(allocs, request.tenant)
    if (cap_mem is None or own_mem + request.memory <= cap_mem) and (
        cap_gpus is None or not loaded or gpu in own_gpus or len(own_gpus) + 1 <= cap_gpus
    ):
        return "own"
    lend_mem = lend_gpus = used_mem = used_gpus = 0
    for other in tenants:
        if other.name == request.tenant or not other.reclaimable:
            continue
        mem, gpus = own_usage(allocs, other.name)
        if other.capability.memory is not None:
            lend_mem += max(0, other.capability.memory - mem)
        if other.capability.gpus is not None:
            lend_gpus += max(0, other.capability.gpus - len(gpus))
    for name in {a.tenant for a in allocs}:
        borrower = policy_of(tenants, name)
        if borrower is None:
            continue
        mem, gpus = borrowed_footprint(allocs, name)
        if borrower.capability.memory is not None:
            used_mem += mem
        if borrower.capability.gpus is not None:
            used_gpus += len(gpus)
    if cap_mem is not None and used_mem + request.memory > lend_mem:
        return "no"
    mine = {a.gpu for a in allocs if a.tenant == request.tenant and is_loaded(a.tier)}
    if cap_gpus is not None and loaded and gpu not in mine and used_gpus + 1 > lend_gpus:
        return "no"
    return "borrowed"


def penalty_of(
    allocs: Sequence[Allocation], request: PlacementRequest, slot: GpuSlot, inventory: Sequence[GpuSlot]
) -> tuple[int, ...]:
    """Anti-affinity, then DR spread, as the rules say (see ``PlacementEngine.penalty``)."""
    node_of = {s.id: s.node for s in inventory}
    key = (int(slot.node in request.protects), int(slot.zone in request.avoid_zones))
    if not request.spread:
        return key
    serving = [a for a in allocs if a.tier in SERVING_TIERS and a.gpu in node_of]
    on = [a for a in allocs if a.gpu == slot.id]
    if request.tier in SERVING_TIERS:
        on_node = sum(1 for a in serving if node_of[a.gpu] == slot.node)
        return (*key, on_node, sum(1 for a in serving if a.gpu == slot.id), int(bool(on)))
    # Standbys of the request's class: cold with cold, hot and warm together.
    kind = request.tier == "cold"
    standbys = [a for a in allocs if a.tier not in SERVING_TIERS and a.gpu in node_of and (a.tier == "cold") == kind]
    zone_of = {s.id: s.zone for s in inventory}
    return (
        *key,
        int(any(a.tier in SERVING_TIERS for a in on)),
        int(any(a.model == request.model for a in on)),
        sum(1 for a in allocs if a.model == request.model and zone_of.get(a.gpu) == slot.zone),
        sum(1 for a in standbys if node_of[a.gpu] == slot.node),
        sum(1 for a in standbys if a.gpu == slot.id),
    )


def plain_options(step: Step, scenario: Scenario) -> dict[str, tuple[tuple[object, ...], bool]]:
    """Every GPU the request fits on without preemption → (its rank by the documented order, borrowed)."""
    request, allocs = step.request, step.before
    if request.memory > max(s.memory for s in scenario.inventory):
        return {}
    zone_of = {s.id: s.zone for s in scenario.inventory}
    options = {}
    for slot in scenario.inventory:
        if not fits(allocs, request, slot, scenario):
            continue
        mode = quota(allocs, scenario.tenants, request, slot.id)
        if mode == "no":
            continue
        zone_count = sum(1 for a in allocs if a.model == request.model and zone_of.get(a.gpu) == slot.zone)
        copies = sum(1 for a in allocs if a.model == request.model and a.gpu == slot.id)
        rank = (
            penalty_of(allocs, request, slot, scenario.inventory),
            mode == "borrowed",
            zone_count,
            leftover(allocs, request, slot, scenario.pool.overcommit_ratio),
            -copies,
            (slot.node, slot.index),
        )
        options[slot.id] = (rank, mode == "borrowed")
    return options


def check_capacity(allocs: Sequence[Allocation], scenario: Scenario) -> None:
    ratio = scenario.pool.overcommit_ratio
    inventory = scenario.inventory
    assert sum(a.memory for a in allocs) <= sum(s.memory for s in inventory) * ratio
    for slot in inventory:
        loaded, total = gpu_use(allocs, slot.id)
        assert loaded <= slot.memory, f"{slot.id}: {loaded} loaded > {slot.memory} physical"
        assert total <= slot.memory * ratio, f"{slot.id}: {total} allocated > {slot.memory} x {ratio}"


# -- properties ------------------------------------------------------------------------------------


@PROPERTY
@given(scenarios())
def test_capacity_never_exceeded(scenario: Scenario) -> None:
    """Rule 1: per GPU loaded ≤ physical, loaded + reserved ≤ physical x ratio; pool ≤ total x ratio."""
    for step in run(scenario):
        check_capacity(step.after, scenario)
        largest = max(s.memory for s in scenario.inventory)
        if step.request.memory > largest:
            assert isinstance(step.result, PlacementError)
            assert step.result.kind == "too-large"
            assert "largest GPU" in step.result.reason


@PROPERTY
@given(scenarios())
def test_plain_placement_is_the_best_feasible_gpu(scenario: Scenario) -> None:
    """Rules 2 and 5: without preemption, the chosen GPU is the first of every feasible GPU by (not on a
    protected node, within cap, fewest of the model in the zone, least left free, model cached, order).
    So a protected node is taken only when no other node fits, and a refusal means nothing fits."""
    for step in run(scenario):
        options = plain_options(step, scenario)
        result = step.result
        if isinstance(result, PlacementError):
            assert not options, f"{step.request} refused ({result.reason}) though {sorted(options)} fit"
            assert result.kind in PlacementError.KINDS and result.reason
            continue
        if result.preempted:
            assert not options, f"preempted for {step.request.instance} though {sorted(options)} fit"
            continue
        assert result.gpu.id in options, f"{result.gpu.id} does not fit {step.request}"
        best = min(options.values())
        assert options[result.gpu.id] == best
        assert result.borrowed == best[1]
        if result.gpu.node in step.request.protects:
            assert all(rank[0][0] for rank, _ in options.values()), "a protected node while another node fits"


@st.composite
def spread_scenarios(draw: st.DrawFn) -> Scenario:
    """Scenarios whose requests ask for DR spread and avoid some zones (as reconciliation does)."""
    scenario = draw(scenarios())
    zones = sorted({n.zone for n in scenario.pool.nodes})
    requests = [
        replace(
            r,
            spread=draw(st.booleans()),
            avoid_zones=frozenset(draw(st.sets(st.sampled_from(zones), max_size=2))),
        )
        for r in scenario.requests
    ]
    return Scenario(scenario.pool, scenario.tenants, requests)


@PROPERTY
@given(spread_scenarios())
def test_spread_placement_is_the_best_feasible_gpu(scenario: Scenario) -> None:
    """With ``spread`` and ``avoid_zones``: the chosen GPU is the first feasible one by (penalty: a
    protected node, an avoided zone, then serving instances on the node and the GPU and a busy GPU
    for a serving request, a serving instance or the model on the GPU, then standbys on the node and
    the GPU for a standby; within cap;
    fewest of the model in the zone; least left free; model cached; order). ``penalty`` agrees
    with the rules on every GPU, and a fresh ``place`` agrees with the incremental engine."""
    for step in run(scenario):
        options = plain_options(step, scenario)
        result = step.result
        engine = PlacementEngine(scenario.inventory, step.before, scenario.pool, scenario.tenants)
        for slot in scenario.inventory:
            assert engine.penalty(step.request, slot.id) == penalty_of(
                step.before, step.request, slot, scenario.inventory
            )
        try:
            again: Placement | PlacementError = place(
                step.request, scenario.inventory, step.before, scenario.pool, scenario.tenants
            )
        except PlacementError as exc:
            again = exc
        if isinstance(result, PlacementError):
            assert not options and isinstance(again, PlacementError), f"{step.request} refused though {options} fit"
            continue
        assert again == result
        if result.preempted:
            assert not options
            continue
        assert options[result.gpu.id] == min(options.values())


@PROPERTY
@given(scenarios())
def test_quota_caps_and_borrowing(scenario: Scenario) -> None:
    """Rule 3: own usage stays within every cap; a borrowed placement was over its cap and within what
    reclaimable tenants lend; an uncapped tenant never borrows."""
    for step in run(scenario):
        for tenant in scenario.tenants:
            mem, gpus = own_usage(step.after, tenant.name)
            if tenant.capability.memory is not None:
                assert mem <= tenant.capability.memory
            if tenant.capability.gpus is not None:
                assert len(gpus) <= tenant.capability.gpus
        result = step.result
        if not isinstance(result, Placement):
            continue
        victims = {v.instance for v in result.preempted}
        remaining = [a for a in step.before if a.instance not in victims]
        expected = quota(remaining, scenario.tenants, step.request, result.gpu.id)
        assert expected == ("borrowed" if result.borrowed else "own")
        policy = policy_of(scenario.tenants, step.request.tenant)
        if policy is None or (policy.capability.memory is None and policy.capability.gpus is None):
            assert not result.borrowed


@PROPERTY
@given(scenarios())
def test_preemption_only_reclaim_or_strictly_lower_emergency(scenario: Scenario) -> None:
    """Rules 3 and 4: a non-emergency request preempts only other tenants' borrowed allocations, for a
    capped tenant within its cap; an emergency preempts those or strictly lower priority, never equal or
    higher. Victims sit on the chosen GPU and each one is needed."""
    for step in run(scenario):
        result, request = step.result, step.request
        if not isinstance(result, Placement) or not result.preempted:
            continue
        if result.reason.startswith("reclaimed"):
            assert all(v.borrowed and v.tenant != request.tenant for v in result.preempted)
            assert not result.borrowed
            policy = policy_of(scenario.tenants, request.tenant)
            assert policy is not None
            assert policy.capability.memory is not None or policy.capability.gpus is not None
        else:
            assert result.reason.startswith("emergency")
            assert request.emergency, f"{request} preempted {result.preempted}"
            assert all(v.priority.rank < request.priority.rank for v in result.preempted)
            assert_least_important_victims(step, result, scenario)
        by_id = {a.instance: a for a in step.before}
        slot = result.gpu
        for victim in result.preempted:
            assert by_id[victim.instance] == victim
            assert victim.gpu == slot.id
            # Irreducible: keeping any one victim, the request no longer fits.
            others = {v.instance for v in result.preempted if v != victim}
            kept = [a for a in step.before if a.instance not in others]
            assert not fits(kept, request, slot, scenario), f"{victim.instance} was preempted for nothing"


def assert_least_important_victims(step: Step, result: Placement, scenario: Scenario) -> None:
    """No other GPU the emergency could take (quota permitting) costs less: (off the protected nodes,
    victim cost, number of victims) of the choice is the minimum over the pool."""
    request = step.request
    ratio = scenario.pool.overcommit_ratio
    over = (
        sum(a.memory for a in step.before) + request.memory - cap_of(sum(s.memory for s in scenario.inventory), ratio)
    )

    def rank(slot: GpuSlot, victims: Sequence[Allocation]) -> tuple[object, ...]:
        return (slot.node in request.protects, victim_cost(victims), len(victims))

    chosen = rank(result.gpu, result.preempted)
    for slot in scenario.inventory:
        loaded, total = gpu_use(step.before, slot.id)
        need_loaded = max(0, loaded + request.memory - slot.memory) if is_loaded(request.tier) else 0
        need_total = max(0, total + request.memory - cap_of(slot.memory, ratio), over)
        eligible = [a for a in step.before if a.gpu == slot.id and a.priority.rank < request.priority.rank]
        victims = select_victims(eligible, need_loaded, need_total)
        if not victims:
            continue
        gone = {v.instance for v in victims}
        if quota([a for a in step.before if a.instance not in gone], scenario.tenants, request, slot.id) == "no":
            continue
        assert chosen <= rank(slot, victims), f"{slot.id} would cost less than {result.gpu.id}"


@PROPERTY
@given(scenarios())
def test_place_agrees_with_place_many_and_ignores_input_order(scenario: Scenario) -> None:
    """Each step: a fresh ``place`` on the state before it (shuffled inventory and allocations) decides
    exactly what the incremental engine of ``place_many`` decided."""
    shuffle = random.Random(len(scenario.requests))  # deterministic per example
    for step in run(scenario):
        inventory = scenario.inventory
        allocations = list(step.before)
        shuffle.shuffle(inventory)
        shuffle.shuffle(allocations)
        try:
            again: Placement | PlacementError = place(
                step.request, inventory, allocations, scenario.pool, scenario.tenants
            )
        except PlacementError as exc:
            again = exc
        if isinstance(step.result, PlacementError):
            assert isinstance(again, PlacementError)
            assert (again.kind, again.reason) == (step.result.kind, step.result.reason)
        else:
            assert again == step.result


@settings(max_examples=max(300, EXAMPLES), deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(list(Priority)), st.booleans(), st.integers(0, 40)),
        max_size=10,
    ),
    st.integers(0, 120),
    st.integers(0, 160),
)
def test_select_victims_is_minimal(items: list[tuple[Priority, bool, int]], need_loaded: int, need_total: int) -> None:
    """The victim set frees enough, is irreducible, and no other set costs less (brute force)."""
    eligible = [
        Allocation(f"v{k}", "m", "t", p, "serving" if loaded else "cold", mem, "g")
        for k, (p, loaded, mem) in enumerate(items)
    ]

    def enough(chosen: Sequence[Allocation]) -> bool:
        return sum(a.memory for a in chosen if a.loaded) >= need_loaded and sum(a.memory for a in chosen) >= need_total

    victims = select_victims(eligible, need_loaded, need_total)
    subsets = [[a for k, a in enumerate(eligible) if mask >> k & 1] for mask in range(1 << len(eligible))]
    feasible = [s for s in subsets if enough(s)]
    if victims is None:
        assert not feasible
        return
    assert enough(victims)
    for v in victims:
        assert not enough([a for a in victims if a != v])
    best = min((victim_cost(s), len(s)) for s in feasible)
    assert (victim_cost(victims), len(victims)) == best


# -- examples --------------------------------------------------------------------------------------


def pool_of(*nodes: tuple[str, str, int, int], ratio: float = 1.5) -> GpuPoolPolicy:
    return GpuPoolPolicy(
        overcommit_ratio=ratio,
        nodes=[GpuNodePolicy(name=n, zone=z, gpus=g, gpu_memory=m * GiB) for n, z, g, m in nodes],
    )


def req(
    instance: str,
    memory_gib: float,
    tier: str = "serving",
    *,
    model: str = "m",
    tenant: str = "default",
    priority: Priority = Priority.NORMAL,
    protects: frozenset[str] = frozenset(),
    emergency: bool = False,
) -> PlacementRequest:
    return PlacementRequest(instance, model, tenant, priority, tier, int(memory_gib * GiB), protects, emergency)


def alloc(
    instance: str,
    gpu: str,
    memory_gib: float,
    tier: str = "serving",
    *,
    model: str = "other",
    tenant: str = "default",
    priority: Priority = Priority.NORMAL,
    borrowed: bool = False,
) -> Allocation:
    return Allocation(instance, model, tenant, priority, tier, int(memory_gib * GiB), gpu, borrowed)


DEFAULT = [TenantPolicy(name="default")]


def test_inventory_from_the_policy() -> None:
    pool = pool_of(("a", "az-1", 2, 80), ("b", "az-2", 1, 40))
    assert gpu_inventory(pool) == [
        GpuSlot("a/0", "a", "az-1", 0, 80 * GiB),
        GpuSlot("a/1", "a", "az-1", 1, 80 * GiB),
        GpuSlot("b/0", "b", "az-2", 0, 40 * GiB),
    ]
    assert len(gpu_inventory(GpuPoolPolicy())) == 16  # the seed's pool: 4 nodes x 4 GPUs


def test_anti_affinity_with_one_node_falls_back_to_it() -> None:
    pool = pool_of(("only", "az-1", 2, 80))
    inventory = gpu_inventory(pool)
    placement = place(req("m-1", 16, "hot", protects=frozenset({"only"})), inventory, [], pool, DEFAULT)
    assert placement.gpu.node == "only"
    assert "protected node only" in placement.reason


def test_anti_affinity_avoids_the_protected_node_even_when_it_fits_tighter() -> None:
    pool = pool_of(("a", "az-1", 1, 40), ("b", "az-1", 1, 80))
    inventory = gpu_inventory(pool)
    placement = place(req("m-1", 30, "hot", protects=frozenset({"a"})), inventory, [], pool, DEFAULT)
    assert placement.gpu.id == "b/0"
    assert place(req("m-1", 30, "hot"), inventory, [], pool, DEFAULT).gpu.id == "a/0"


def test_spreads_a_model_across_zones_before_packing() -> None:
    pool = pool_of(("a", "az-1", 2, 80), ("b", "az-2", 1, 80))
    inventory = gpu_inventory(pool)
    existing = [alloc("m-0", "a/0", 60, model="m")]
    # a/0 would be the tightest fit, but az-1 already holds the model.
    assert place(req("m-1", 16, "hot"), inventory, existing, pool, DEFAULT).gpu.id == "b/0"
    # With one zone there is nothing to spread: best fit wins.
    one_zone = pool_of(("a", "az-1", 2, 80), ("b", "az-1", 1, 80))
    assert place(req("m-1", 16, "hot"), gpu_inventory(one_zone), existing, one_zone, DEFAULT).gpu.id == "a/0"


def test_best_fit_picks_the_tighter_gpu() -> None:
    pool = pool_of(("big", "az-1", 1, 80), ("small", "az-1", 1, 40))
    inventory = gpu_inventory(pool)
    assert place(req("m-1", 30), inventory, [], pool, DEFAULT).gpu.id == "small/0"
    # Loaded fit counts the overcommitted room too: small/0 holds 30 GiB of reservations, so a 35 GiB
    # serving instance would push it past 40 x 1.5 = 60 GiB; big/0 takes it.
    reserved = [alloc("w", "small/0", 30, "warm")]
    assert place(req("m-1", 35), inventory, reserved, pool, DEFAULT).gpu.id == "big/0"
    # A reservation fits the overcommitted capacity: 40 GiB physical, 60 GiB with the ratio.
    assert place(req("m-1", 30, "cold"), inventory, reserved, pool, DEFAULT).gpu.id == "small/0"


def test_model_already_on_the_gpu_breaks_a_tie() -> None:
    pool = pool_of(("a", "az-1", 2, 80))
    inventory = gpu_inventory(pool)
    existing = [alloc("x", "a/0", 10, "cold", model="other"), alloc("y", "a/1", 10, "cold", model="m")]
    placement = place(req("m-1", 16, "cold"), inventory, existing, pool, DEFAULT)
    assert placement.gpu.id == "a/1"


def test_loaded_tiers_never_overcommit_a_gpu() -> None:
    pool = pool_of(("a", "az-1", 1, 80), ratio=2.0)
    inventory = gpu_inventory(pool)
    results, _ = place_many(
        [req("m-1", 60), req("m-2", 30, "hot"), req("m-3", 30, "warm"), req("m-4", 71, "cold")],
        inventory,
        [],
        pool,
        DEFAULT,
    )
    assert isinstance(results[0], Placement)
    assert isinstance(results[1], PlacementError) and results[1].kind == "capacity"
    assert "loaded capacity" in results[1].reason
    assert isinstance(results[2], Placement)  # reservations use the overcommitted 160 GiB
    assert isinstance(results[3], PlacementError)  # 60 + 30 + 71 > 160


def test_request_bigger_than_any_gpu_is_refused_clearly() -> None:
    pool = pool_of(("a", "az-1", 4, 40), ratio=3.0)
    with pytest.raises(PlacementError) as caught:
        place(req("m-1", 41, "cold"), gpu_inventory(pool), [], pool, DEFAULT)
    assert caught.value.kind == "too-large"
    assert caught.value.reason == (
        "m-1 needs 41 GiB but the largest GPU of the pool has 40 GiB: it fits on no GPU, in any tier"
    )


def test_full_pool_and_unknown_tier_are_named() -> None:
    pool = pool_of(("a", "az-1", 1, 80), ratio=1.0)
    inventory = gpu_inventory(pool)
    full = [alloc("x", "a/0", 80)]
    with pytest.raises(PlacementError) as caught:
        place(req("m-1", 8, "cold"), inventory, full, pool, DEFAULT)
    assert caught.value.kind == "capacity"
    assert "the pool is full: 80 GiB of 80 GiB allocated (80 GiB x overcommit 1)" in caught.value.reason
    with pytest.raises(PlacementError) as caught:
        place(req("m-1", 8, "lukewarm"), inventory, [], pool, DEFAULT)
    assert caught.value.kind == "invalid" and "unknown tier 'lukewarm'" in caught.value.reason
    with pytest.raises(PlacementError, match="no GPUs"):
        place(req("m-1", 8), [], [], pool, DEFAULT)


def test_non_emergency_never_preempts() -> None:
    pool = pool_of(("a", "az-1", 1, 80), ratio=1.0)
    full = [alloc("x", "a/0", 80, "cold", priority=Priority.NORMAL)]
    with pytest.raises(PlacementError) as caught:
        place(req("m-1", 16, priority=Priority.CRITICAL), gpu_inventory(pool), full, pool, DEFAULT)
    assert caught.value.kind == "capacity"


def test_emergency_never_preempts_equal_priority() -> None:
    pool = pool_of(("a", "az-1", 2, 80), ratio=1.0)
    inventory = gpu_inventory(pool)
    full = [
        alloc("x", "a/0", 80, priority=Priority.CRITICAL),
        alloc("y", "a/1", 80, "cold", priority=Priority.CRITICAL),
    ]
    request = req("m-1", 16, priority=Priority.CRITICAL, emergency=True)
    with pytest.raises(PlacementError) as caught:
        place(request, inventory, full, pool, DEFAULT)
    assert "emergency: preempting allocations of lower priority than critical would free room on no GPU" in (
        caught.value.reason
    )
    # A high-priority emergency cannot preempt critical either.
    with pytest.raises(PlacementError):
        place(replace(request, priority=Priority.HIGH), inventory, full, pool, DEFAULT)


def test_emergency_takes_the_least_important_victims() -> None:
    pool = pool_of(("a", "az-1", 1, 80), ("b", "az-1", 1, 80), ratio=1.0)
    inventory = gpu_inventory(pool)
    state = [
        alloc("high-cold", "a/0", 40, "cold", priority=Priority.HIGH),
        alloc("high-hot", "a/0", 40, "hot", priority=Priority.HIGH),
        alloc("normal-serving", "b/0", 60, "serving", priority=Priority.NORMAL),
        alloc("normal-cold", "b/0", 10, "cold", priority=Priority.NORMAL),
        alloc("normal-warm", "b/0", 10, "warm", priority=Priority.NORMAL),
    ]
    # A 20 GiB reservation: normal before high, and two reserved before one loaded within normal.
    crit = Priority.CRITICAL
    placement = place(req("m-1", 20, "cold", priority=crit, emergency=True), inventory, state, pool, DEFAULT)
    assert placement.gpu.id == "b/0"
    assert [v.instance for v in placement.preempted] == ["normal-cold", "normal-warm"]
    assert "emergency (critical)" in placement.reason and "normal-cold" in placement.reason
    # A loaded 30 GiB needs loaded memory freed: the normal serving instance, not a high one.
    placement = place(req("m-1", 30, priority=crit, emergency=True), inventory, state, pool, DEFAULT)
    assert [v.instance for v in placement.preempted] == ["normal-serving"]
    # Strictly lower only: a high emergency may take normal victims, never high ones.
    placement = place(req("m-1", 30, "cold", priority=Priority.HIGH, emergency=True), inventory, state, pool, DEFAULT)
    assert {v.priority for v in placement.preempted} == {Priority.NORMAL}


TENANTS = [
    TenantPolicy(name="small", capability=TenantCapability(memory=40 * GiB)),
    TenantPolicy(name="big", capability=TenantCapability(memory=120 * GiB), reclaimable=True),
]


def test_borrowing_unused_capacity_of_a_reclaimable_tenant() -> None:
    pool = pool_of(("a", "az-1", 2, 80), ratio=1.0)
    inventory = gpu_inventory(pool)
    results, state = place_many(
        [req("s-0", 30, tenant="small"), req("s-1", 30, tenant="small")], inventory, [], pool, TENANTS
    )
    first, second = results
    assert isinstance(first, Placement) and not first.borrowed
    assert isinstance(second, Placement) and second.borrowed
    assert "borrowed" in second.reason
    assert [a.borrowed for a in state] == [False, True]
    # Not reclaimable: nothing to borrow, and the error says so.
    closed = [TENANTS[0], replace_tenant(TENANTS[1], reclaimable=False)]
    with pytest.raises(PlacementError) as caught:
        place(req("s-1", 30, tenant="small"), inventory, state[:1], pool, closed)
    assert caught.value.kind == "quota"
    assert "tenant 'small' uses memory 30 GiB of 40 GiB, +30 GiB would exceed it" in caught.value.reason
    assert "reclaimable tenants have 0 B of memory left to lend" in caught.value.reason


def replace_tenant(tenant: TenantPolicy, **changes: object) -> TenantPolicy:
    return tenant.model_copy(update=changes)


def test_quota_reclaim_preempts_only_borrowed_allocations() -> None:
    pool = pool_of(("a", "az-1", 2, 80), ratio=1.0)
    inventory = gpu_inventory(pool)
    state = [
        alloc("s-own", "a/0", 40, tenant="small", priority=Priority.CRITICAL),
        alloc("s-borrowed", "a/0", 40, tenant="small", borrowed=True, priority=Priority.CRITICAL),
        alloc("b-own", "a/1", 80, tenant="big"),
    ]
    placement = place(req("b-1", 30, tenant="big"), inventory, state, pool, TENANTS)
    assert [v.instance for v in placement.preempted] == ["s-borrowed"]
    assert placement.gpu.id == "a/0" and not placement.borrowed
    assert placement.reason.startswith("reclaimed borrowed capacity")
    # Without a borrowed allocation there is nothing to reclaim: what small holds within its cap stays.
    state = [state[0], alloc("other", "a/0", 40, tenant="default"), state[2]]
    with pytest.raises(PlacementError) as caught:
        place(req("b-1", 30, tenant="big"), inventory, state, pool, TENANTS)
    assert "reclaiming other tenants' borrowed allocations would free room on no GPU" in caught.value.reason


def test_gpu_cap_counts_distinct_gpus_of_loaded_allocations() -> None:
    pool = pool_of(("a", "az-1", 2, 80), ("b", "az-2", 2, 80))
    inventory = gpu_inventory(pool)
    one_gpu = [TenantPolicy(name="t", capability=TenantCapability(gpus=1), reclaimable=False)]
    results, _ = place_many(
        [
            req("t-0", 20, tenant="t", model="m0"),
            req("t-1", 20, "hot", tenant="t", model="m1"),  # stays on its one GPU
            req("t-2", 60, "cold", tenant="t", model="m0"),  # spreads to az-2: reservations pin no GPU
            req("t-3", 60, "hot", tenant="t", model="m3"),  # does not fit on its one GPU: refused
            req("t-4", 40, "serving", tenant="t", model="m4"),  # fits on it exactly
        ],
        inventory,
        [],
        pool,
        one_gpu,
    )
    assert [r.gpu.id if isinstance(r, Placement) else r.kind for r in results] == [
        "a/0",
        "a/0",
        "b/0",
        "quota",
        "a/0",
    ]
    assert isinstance(results[3], PlacementError)
    assert "GPUs 1 of 1" in results[3].reason


def test_borrowed_gpus_are_counted_once() -> None:
    pool = pool_of(("a", "az-1", 3, 80), ratio=1.0)
    inventory = gpu_inventory(pool)
    tenants = [
        TenantPolicy(name="t", capability=TenantCapability(gpus=1)),
        TenantPolicy(name="lender", capability=TenantCapability(gpus=1), reclaimable=True),
        TenantPolicy(name="hog", capability=TenantCapability(gpus=1), reclaimable=False),
    ]
    results, _ = place_many(
        [
            req("t-0", 70, tenant="t"),  # a/0, within its one GPU
            req("t-1", 60, tenant="t"),  # a/1, borrowing the lender's unused GPU
            req("t-2", 20, tenant="t"),  # on a/1 too: borrowed, and no second GPU is needed for it
            req("t-3", 40, tenant="t"),  # a/2 would need a second borrowed GPU: none left
        ],
        inventory,
        [],
        pool,
        tenants,
    )
    assert [(r.gpu.id, r.borrowed) if isinstance(r, Placement) else r.kind for r in results] == [
        ("a/0", False),
        ("a/1", True),
        ("a/1", True),
        "quota",
    ]
    # An emergency may free room on the GPU the tenant already borrows (no new GPU needed there), but
    # not on a GPU it would have to borrow anew: the lender's one GPU is lent out already.
    crit = Priority.CRITICAL
    crowded = [
        alloc("t-0", "a/0", 70, tenant="t", priority=crit),
        alloc("t-1", "a/1", 60, tenant="t", priority=crit, borrowed=True),
        alloc("n", "a/1", 20, tenant="hog"),
        alloc("l", "a/2", 80, tenant="lender"),
    ]
    placement = place(req("t-9", 20, tenant="t", priority=crit, emergency=True), inventory, crowded, pool, tenants)
    assert (placement.gpu.id, placement.borrowed) == ("a/1", True)
    assert [v.instance for v in placement.preempted] == ["n"]


def test_replacing_an_instance_frees_its_own_capacity_first() -> None:
    pool = pool_of(("a", "az-1", 1, 80), ratio=1.0)
    inventory = gpu_inventory(pool)
    state = [alloc("m-0", "a/0", 70, "warm", model="m")]
    placement = place(req("m-0", 70, "hot"), inventory, state, pool, DEFAULT)  # warm → hot in place
    assert placement.gpu.id == "a/0" and not placement.preempted
    _, after = place_many([req("m-0", 70, "hot")], inventory, state, pool, DEFAULT)
    assert [(a.instance, a.tier) for a in after] == [("m-0", "hot")]


def test_duplicate_allocations_are_refused() -> None:
    pool = pool_of(("a", "az-1", 1, 80))
    with pytest.raises(PlacementError, match="allocated twice"):
        PlacementEngine(gpu_inventory(pool), [alloc("x", "a/0", 1), alloc("x", "a/0", 1)], pool, DEFAULT)


def test_assign_borrowed_rederives_the_marks() -> None:
    state = [
        alloc("s-cold", "a/0", 30, "cold", tenant="small"),
        alloc("s-serving", "a/1", 30, tenant="small", priority=Priority.CRITICAL),
        alloc("b", "a/1", 30, tenant="big"),
    ]
    marked = assign_borrowed(state, TENANTS)
    assert [(a.instance, a.borrowed) for a in marked] == [("s-cold", True), ("s-serving", False), ("b", False)]
    assert assign_borrowed(marked, TENANTS) == marked


# -- DR spread and zone anti-affinity --------------------------------------------------------------


def spread(instance: str, memory_gib: float, tier: str = "serving", **kwargs: object) -> PlacementRequest:
    return replace(req(instance, memory_gib, tier, **kwargs), spread=True)  # type: ignore[arg-type]


def test_spread_puts_a_serving_instance_on_the_node_with_the_fewest_serving_then_an_empty_gpu() -> None:
    pool = pool_of(("a", "az-1", 2, 80), ("b", "az-1", 2, 80))
    inventory = gpu_inventory(pool)
    existing = [alloc("x-0", "a/0", 16), alloc("y-1", "b/0", 16, "cold", model="y")]
    # Best fit packs beside x-0; spread takes node b, and there the empty GPU, not y's standby's.
    assert place(req("z-0", 16), inventory, existing, pool, DEFAULT).gpu.id == "a/0"
    placement = place(spread("z-0", 16), inventory, existing, pool, DEFAULT)
    assert placement.gpu.id == "b/1"
    # Every node serves: the GPU without a serving instance beats the one with.
    existing.append(alloc("w-0", "b/1", 16))
    assert place(spread("z-0", 16), inventory, existing, pool, DEFAULT).gpu.id == "a/1"


def test_spread_keeps_a_standby_off_serving_gpus_and_off_its_own_model() -> None:
    pool = pool_of(("a", "az-1", 3, 80))
    inventory = gpu_inventory(pool)
    existing = [alloc("x-0", "a/0", 16), alloc("m-1", "a/1", 16, "cold", model="m")]
    assert place(req("m-2", 16, "hot"), inventory, existing, pool, DEFAULT).gpu.id == "a/0"  # best fit
    assert place(spread("m-2", 16, "hot"), inventory, existing, pool, DEFAULT).gpu.id == "a/2"
    # Only serving GPUs have room: it goes there, and says so.
    full = [*existing, alloc("y-0", "a/2", 80, "serving"), alloc("z-0", "a/1", 80, "hot", model="z")]
    placement = place(spread("m-2", 16, "hot"), inventory, full, pool, DEFAULT)
    assert placement.gpu.id == "a/0" and "beside a serving instance" in placement.reason


def test_a_model_s_standbys_spread_over_the_zones_before_the_fleet_s_standbys_balance() -> None:
    """Node b holds none of the fleet's hot standbys, c three: m's first hot standby goes to b, and
    its second to c, in another zone, although b still holds fewer of the fleet's. (With the
    fleet's balance first, both went to b: one node, one zone, both of m's standbys.)"""
    pool = pool_of(("a", "az-1", 2, 80), ("b", "az-2", 2, 80), ("c", "az-3", 2, 80))
    inventory = gpu_inventory(pool)
    fleet = [alloc("m-0", "a/0", 16, model="m")] + [
        alloc(f"x{n}-1", f"c/{n % 2}", 16, "hot", model=f"x{n}") for n in range(3)
    ]
    away = replace(spread("m-1", 16, "hot", protects=frozenset({"a"})), avoid_zones=frozenset({"az-1"}))
    first = place(away, inventory, fleet, pool, DEFAULT)
    assert first.gpu.node == "b"
    fleet.append(first.allocation(away))
    second = replace(away, instance="m-2")
    assert place(second, inventory, fleet, pool, DEFAULT).gpu.node == "c"


def test_avoided_zones_are_left_while_another_zone_fits() -> None:
    pool = pool_of(("a", "az-1", 1, 80), ("b", "az-1", 1, 80), ("c", "az-2", 1, 40))
    inventory = gpu_inventory(pool)
    away = replace(req("m-1", 16, "hot", protects=frozenset({"a"})), avoid_zones=frozenset({"az-1"}))
    assert place(away, inventory, [], pool, DEFAULT).gpu.id == "c/0"
    # No room in az-2: the other node of az-1 it is, said.
    placement = place(away, inventory, [alloc("big", "c/0", 40)], pool, DEFAULT)
    assert placement.gpu.id == "b/0" and "in zone az-1" in placement.reason


def test_penalty_judges_an_instance_where_it_stands_without_itself() -> None:
    pool = pool_of(("a", "az-1", 2, 80), ("b", "az-2", 2, 80))
    engine = PlacementEngine(
        gpu_inventory(pool),
        [alloc("m-0", "a/0", 16, model="m"), alloc("m-1", "a/0", 16, "cold", model="m")],
        pool,
        DEFAULT,
    )
    here = replace(spread("m-1", 16, "cold", protects=frozenset({"a"})), avoid_zones=frozenset({"az-1"}))
    # On the serving node and zone, beside a serving instance (its own model's, which counts once);
    # no other standby on the node or the GPU (its own allocation left out).
    assert engine.penalty(here, "a/0") == (1, 1, 1, 1, 1, 0, 0)  # m-0 in az-1 too
    assert engine.penalty(here, "a/1") == (1, 1, 0, 0, 1, 0, 0)
    assert engine.penalty(here, "b/0") == (0, 0, 0, 0, 0, 0, 0)
    # Another model's cold standby on b/0: node b and GPU b/0 count it, b/1 only by its node; a hot
    # one counts for hot and warm standbys, not for a cold one.
    engine.add(alloc("x-1", "b/0", 16, "cold", model="x"))
    engine.add(alloc("y-1", "b/1", 16, "hot", model="y"))
    assert engine.penalty(here, "b/0") == (0, 0, 0, 0, 0, 1, 1)
    assert engine.penalty(here, "b/1") == (0, 0, 0, 0, 0, 1, 0)
    warm = replace(here, tier="warm")
    assert engine.penalty(warm, "b/0") == (0, 0, 0, 0, 0, 1, 0)
    assert engine.penalty(warm, "b/1") == (0, 0, 0, 0, 0, 1, 1)
    with pytest.raises(PlacementError, match="not in the inventory"):
        engine.penalty(here, "z/9")
