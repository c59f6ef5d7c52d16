"""Placement of model instances and standbys on the shared GPU pool (seed §2).

Pure and deterministic: a decision is a function of (request, inventory, allocations, pool, tenants)
only, so a workflow can compute it and a dry run shows the same answer.

Capacity model
    Every allocation sits on one GPU. *Loaded* tiers (serving, hot, promoting) hold weights in GPU
    memory; *reserved* tiers (warm, cold) hold a reservation that is only real once promoted. So:

    - per GPU, loaded memory never exceeds the GPU's physical memory;
    - per GPU, loaded + reserved never exceeds ``memory x overcommit_ratio`` (the overcommitted
      capacity; rounded down to a byte);
    - over the pool, all allocations (all tiers, also those on GPUs no longer in the inventory) never
      exceed ``Σ memory x overcommit_ratio`` (the seed's global check);
    - a request bigger than the largest GPU is refused for every tier: a reservation that can never
      be loaded on its GPU cannot be promoted there.

Tenant quotas (``TenantPolicy.capability``; ``None`` = no cap in that dimension)
    A tenant's **own usage** counts its allocations with ``borrowed=False``:

    - ``memory`` = the sum of their memory, every tier (a reservation reserves capacity too);
    - ``gpus``   = the number of distinct GPUs on which it has at least one *loaded* allocation
      (reservations are overcommitted and pin no GPU).

    A placement is **within cap** when own usage plus the request stays within every cap of the tenant.
    Otherwise the whole allocation is **borrowed** (``Allocation.borrowed=True``; it then counts in
    no own usage but in the borrowed totals), which is allowed only when, in every dimension the
    borrowing tenant is capped in, ``borrowed in use + the request ≤ lendable``, where

    - *lendable* = Σ over the *other* tenants that are ``reclaimable`` and capped in that dimension of
      ``max(0, cap - own usage)``;
    - *borrowed in use* = Σ over tenants capped in that dimension of their borrowed footprint
      (memory of their borrowed allocations; GPUs holding their borrowed loaded allocations and none
      of their own).

    A tenant without any cap never borrows. A tenant not in ``tenants`` is treated as uncapped and
    lends nothing. When a capped tenant's request is within its cap but nothing fits, borrowed
    allocations of *other* tenants are reclaimed (preempted): allocations held within their owner's
    cap never are. A borrowed allocation stays marked borrowed until it is re-placed; use
    :func:`assign_borrowed` to re-derive the marks from the current caps (e.g. after a restart that
    lost them).

Choice among GPUs, in order
    1. no preemption before any preemption (plain fit → quota reclaim → emergency);
    2. anti-affinity: not on a node in ``request.protects`` while another node fits; then (without
       preemption) zone roles: a serving (or promoting) request with ``request.serving_zones`` (the
       active zones of an active-passive policy, :func:`serving_zones`) not outside them while a GPU
       in them fits; then not in a zone in ``request.avoid_zones``, and with ``request.spread`` DR
       spread: the lowest :meth:`PlacementEngine.penalty`, compared as a whole (a serving instance:
       the fewest serving instances on the node, then on the GPU, then an empty GPU; a standby: a
       GPU without a serving instance, then without its own model). Requests with none of these
       fields set rank exactly as before (best fit packs); the planner sets them. (With preemption,
       the zone roles rank right after the cost of the victims, rule 4.);
    3. within the tenant's cap before borrowed capacity;
    4. (preemption only) the least important victims: victim sets compare by their number of victims
       per class, most important class first (critical loaded, critical reserved, high loaded, high
       reserved, normal loaded, normal reserved), so lower priority goes first and, within a
       priority, reservations before loaded instances; then fewest victims, then least memory freed;
    5. zone spread: the zone with the fewest allocations of the model (DR: standbys must survive a
       zone outage, so spreading beats packing; with one zone this is a no-op);
    6. best fit: the least free memory left on the GPU after placement, measured on the capacity the
       tier uses (loaded: ``min(physical free, overcommitted free)``; reserved: overcommitted free);
    7. the model already on the GPU (more copies first, as the seed's +50 per copy);
    8. GPU order (node name, then index).

:class:`PlacementEngine` holds the state with its indexes (usage per GPU and tenant; free capacity
sorted per zone; allocations per model and per GPU) and updates them incrementally, so with the
sorted indexes a decision costs about O(log G) plus the candidates it has to skip, instead of a scan
of every GPU and allocation. :func:`place` builds one for a single decision (and scans, as sorting
would not pay off); :func:`place_many` reuses one for a sequence; callers that decide many times
over a changing state (reconciliation) should keep one and :meth:`~PlacementEngine.apply`.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter

from drctl.policies.schema import DRPolicy, GpuPoolPolicy, Priority, TenantPolicy

LOADED_TIERS = frozenset({"serving", "hot", "promoting"})
"""Tiers that occupy physical GPU memory."""
RESERVED_TIERS = frozenset({"warm", "cold"})
"""Tiers that only reserve capacity; they count against the overcommitted capacity."""
SERVING_TIERS = frozenset({"serving", "promoting"})
"""Tiers that take (or are about to take) traffic: what DR spread keeps apart."""
TIERS = LOADED_TIERS | RESERVED_TIERS

_RANK = {p: p.rank for p in Priority}
"""``Priority.rank`` without building its dict on every call (hot paths)."""
# Victim classes, most important first: (priority rank, loaded?).
_RANKS = sorted({p.rank for p in Priority}, reverse=True)
_CLASSES: tuple[tuple[int, bool], ...] = tuple((rank, loaded) for rank in _RANKS for loaded in (True, False))
_CLASS_POS = {c: i for i, c in enumerate(_CLASSES)}
_CLASSES_UP = tuple(reversed(_CLASSES))
"""Least important first."""
_CLASS_UP_POS = {c: i for i, c in enumerate(_CLASSES_UP)}


def format_size(size: int) -> str:
    """``80 GiB``, ``13.5 GiB``, ``512 MiB``, ``0 B``: sizes in reasons."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(size) >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


def overcommitted(memory: int, ratio: float) -> int:
    """Capacity of ``memory`` under the overcommit ratio, rounded down to a byte."""
    return math.floor(memory * ratio)


# -- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSlot:
    """One GPU of the pool."""

    id: str
    """``{node}/{index}``"""
    node: str
    zone: str
    index: int
    memory: int
    """Physical memory in bytes."""


def serving_zones(policy: DRPolicy) -> frozenset[str]:
    """The zones serving instances belong in (``PlacementRequest.serving_zones``): the active zones
    of an active-passive policy that names its standby zone. The zone health checker watches only
    the active zones, and a zone failover moves serving to the standby zone, so serving elsewhere is
    outside every zone check. Empty (every zone alike) when the policy has no active zones or names
    no standby zone: ``activeZones`` left unset reads as its default (``[az-1]``), which cannot be
    told from one written out once the policy has travelled as data, so only a policy that
    declares the passive side too gets zone roles."""
    failover = policy.az_failover
    if failover.standby_zone is None or not failover.active_zones:
        return frozenset()
    return frozenset(failover.active_zones)


def gpu_inventory(pool: GpuPoolPolicy) -> list[GpuSlot]:
    """The GPUs the policy declares, node by node (``discover`` is the caller's business: pass the
    discovered inventory to :func:`place` instead)."""
    return [
        GpuSlot(id=f"{node.name}/{index}", node=node.name, zone=node.zone, index=index, memory=node.gpu_memory)
        for node in pool.nodes
        for index in range(node.gpus)
    ]


@dataclass(frozen=True)
class Allocation:
    """Capacity one instance holds on one GPU."""

    instance: str
    model: str
    tenant: str
    priority: Priority
    tier: str
    memory: int
    gpu: str
    borrowed: bool = False
    """Placed on capacity lent by other tenants (over its tenant's cap); reclaimable by them."""

    @property
    def loaded(self) -> bool:
        """Anything not a reservation counts as loaded (a conservative reading of unknown tiers)."""
        return self.tier not in RESERVED_TIERS


@dataclass(frozen=True)
class PlacementRequest:
    instance: str
    model: str
    tenant: str
    priority: Priority
    tier: str
    memory: int
    protects: frozenset[str] = frozenset()
    """Nodes of the instances this one stands by for (anti-affinity)."""
    emergency: bool = False
    """Critical failover: may preempt allocations of strictly lower priority when nothing fits."""
    avoid_zones: frozenset[str] = frozenset()
    """Zones of the instances this one stands by for: avoided, after ``protects``, while another
    zone fits (a zone outage then spares the standby)."""
    spread: bool = False
    """DR spread over failure domains (see :meth:`PlacementEngine.penalty`): a serving instance
    prefers the nodes and GPUs with the fewest serving instances of the fleet, then an empty GPU; a
    standby prefers a GPU without a serving instance and without another instance of its model, a
    zone with the fewest of its model, then the node and the GPU with the fewest standbys of its
    class. Without it, best fit packs
    (the seed's behaviour)."""
    serving_zones: frozenset[str] = frozenset()
    """Zones where serving belongs (:func:`serving_zones`: an active-passive policy's active zones).
    A serving (or promoting) request is placed outside them only when no GPU in them can take it
    (after ``protects``: replicas of one model still never share a node while another node fits);
    the reason then says so. Empty, or a standby's request: every zone alike."""

    @property
    def loaded(self) -> bool:
        return self.tier in LOADED_TIERS

    @property
    def zoned(self) -> frozenset[str]:
        """The zones this request must prefer: ``serving_zones`` for a serving request, else none."""
        return self.serving_zones if self.tier in SERVING_TIERS else frozenset()

    def outside(self, zone: str) -> bool:
        """In a zone where this (serving) request does not belong, per ``serving_zones``."""
        zoned = self.zoned
        return bool(zoned) and zone not in zoned


@dataclass(frozen=True)
class Placement:
    gpu: GpuSlot
    preempted: tuple[Allocation, ...] = ()
    """Allocations to remove first (quota reclaim or emergency), least important first."""
    borrowed: bool = False
    reason: str = ""

    def allocation(self, request: PlacementRequest) -> Allocation:
        return Allocation(
            instance=request.instance,
            model=request.model,
            tenant=request.tenant,
            priority=request.priority,
            tier=request.tier,
            memory=request.memory,
            gpu=self.gpu.id,
            borrowed=self.borrowed,
        )


class PlacementError(ValueError):
    """Nothing fits; ``reason`` says why and ``kind`` classifies it."""

    KINDS = ("invalid", "too-large", "capacity", "quota")

    def __init__(self, reason: str, kind: str = "capacity") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind

    def __reduce__(self) -> tuple[type[PlacementError], tuple[str, str]]:
        return PlacementError, (self.reason, self.kind)  # keeps ``kind`` through pickling


# -- bookkeeping -----------------------------------------------------------------------------------


@dataclass
class _TenantUse:
    own_mem: int = 0
    bor_mem: int = 0
    own_gpus: dict[str, int] = field(default_factory=dict)
    """GPU → number of own (not borrowed) loaded allocations on it."""
    bor_gpus: dict[str, int] = field(default_factory=dict)
    """GPU → number of borrowed loaded allocations on it."""
    bor_only: int = 0
    """GPUs in ``bor_gpus`` and not in ``own_gpus``: the borrowed GPU footprint."""


@dataclass(frozen=True)
class _TenantNumbers:
    own_mem: int
    own_gpus: int
    bor_mem: int
    bor_gpus: int


@dataclass(frozen=True)
class _Candidate:
    key: tuple[object, ...]
    slot: GpuSlot
    victims: tuple[Allocation, ...]
    borrowed: bool
    leftover: int


def standby_class(tier: str) -> str:
    """What DR spread counts a standby as: ``promotable`` (hot or warm: a failover promotes these
    first, and they serve where they stand) or ``cold`` (a reservation, promoted only when no hot
    or warm one works). Standbys spread within their class: two hot or warm standbys of different
    models on one GPU would serve from it together after their zone's failover."""
    return "cold" if tier == "cold" else "promotable"


STANDBY_JUDGED = 6
"""How many leading components of a standby's penalty (:meth:`PlacementEngine.penalty`) placement
repair judges a standby by: anti-affinity, avoided zone, beside a serving instance, beside its own
model, its model's other instances in the zone, standbys of its class (:func:`standby_class`) on
its node. So repair spreads a model's standbys over the zones, and standbys back
over the nodes after a zone comes back (a failback: while the zone was cordoned its standbys all
went elsewhere); a standby moves for balance only to a node with fewer of its class by more than
:data:`~drctl.policies.placement_repair.BALANCE_SLACK`. The last component (standbys of its class
on its GPU) only chooses where a new standby goes: within a node, moving a loaded standby would
reload it for little."""


@dataclass
class _SpreadUse:
    """What DR spread counts (built on the first ``spread`` decision, then kept up to date)."""

    serving: list[int]
    """GPU ordinal → serving (or promoting) allocations on it."""
    count: list[int]
    """GPU ordinal → allocations on it, every tier."""
    node_serving: dict[str, int] = field(default_factory=dict)
    """node → serving (or promoting) allocations on its GPUs."""
    node_standby: dict[tuple[str, str], int] = field(default_factory=dict)
    """(:func:`standby_class`, node) → standby allocations of that class on its GPUs: what a zone
    failover turns into serving there."""
    gpu_standby: dict[tuple[str, int], int] = field(default_factory=dict)
    """(:func:`standby_class`, GPU ordinal) → standby allocations of that class on it."""


@dataclass
class _ModelUse:
    zones: dict[str, int] = field(default_factory=dict)
    """zone → allocations of the model there."""
    gpus: dict[str, dict[int, int]] = field(default_factory=dict)
    """zone → GPU ordinal → copies of the model on it."""


class PlacementEngine:
    """The pool's state, indexed for fast decisions; :meth:`decide` then :meth:`apply`.

    Loading costs O(allocations + GPUs). What a single decision does not need is built on first use
    and then kept up to date: the per-model maps (for the requested model only), the allocations
    per GPU (preemption), and with ``index=True`` the free capacity of every GPU sorted per zone,
    which turns the search from a scan of every GPU into a binary search (O(G log G) to build, paid
    back after a few decisions; :func:`place` decides once and scans instead).
    """

    def __init__(
        self,
        inventory: Sequence[GpuSlot],
        allocations: Iterable[Allocation],
        pool: GpuPoolPolicy,
        tenants: Sequence[TenantPolicy],
        *,
        index: bool = True,
    ) -> None:
        self.ratio = pool.overcommit_ratio
        self._slots = sorted(inventory, key=attrgetter("node", "index", "id"))
        self._ord: dict[str, int] = {slot.id: i for i, slot in enumerate(self._slots)}
        if len(self._ord) != len(self._slots):
            ids = [slot.id for slot in self._slots]
            twice = sorted({gpu for gpu in ids if ids.count(gpu) > 1})
            raise PlacementError(f"GPU(s) listed twice in the inventory: {', '.join(twice)}", "invalid")
        n = len(self._slots)
        self._mem = [s.memory for s in self._slots]
        self._zone_of = [s.zone for s in self._slots]
        ratio = self.ratio
        self._cap = [math.floor(m * ratio) for m in self._mem]  # overcommitted(), inlined
        self._loaded = [0] * n
        self._total = [0] * n
        self.physical = sum(self._mem)
        self.pool_cap = overcommitted(self.physical, self.ratio)
        self.largest = max(self._mem, default=0)
        self.zones = sorted(set(self._zone_of))
        self._tenants: dict[str, TenantPolicy] = {}
        for tenant in tenants:
            self._tenants.setdefault(tenant.name, tenant)
        self._use: dict[str, _TenantUse] = {}
        self._allocs: dict[str, Allocation] = {}
        self._models: dict[str, _ModelUse] = {}
        self._models_complete = False
        """Every model with an allocation has its entry in ``_models`` (see :meth:`_model`)."""
        """Built per model on first use."""
        self._by_gpu: list[dict[str, Allocation]] | None = None
        """Built on the first preemption, with ``_class_mem``."""
        self._class_mem: list[list[int]] = []
        """Per victim class (least important first), the memory of that class on each GPU."""
        self._spread: _SpreadUse | None = None
        """Built on the first ``spread`` decision."""
        self._want_index = index
        self._eff_idx: dict[str, list[tuple[int, int]]] | None = None
        """Per zone, (free for a loaded request, ordinal), sorted; built on the first decision."""
        self._oc_idx: dict[str, list[tuple[int, int]]] = {}
        """Per zone, (free for a reservation, ordinal), sorted."""
        self.allocated = 0
        # Bulk load: only what every decision needs (usage per GPU and per tenant).
        allocs, ords, loaded, total, uses = self._allocs, self._ord, self._loaded, self._total, self._use
        for a in allocations:
            if a.instance in allocs:
                raise PlacementError(f"instance {a.instance} is allocated twice", "invalid")
            if a.memory < 0:
                raise PlacementError(f"allocation of {a.instance} has negative memory", "invalid")
            allocs[a.instance] = a
            i = ords.get(a.gpu)
            if a.tier in RESERVED_TIERS:
                use = uses.get(a.tenant)
                if use is None:
                    use = uses[a.tenant] = _TenantUse()
                if a.borrowed:
                    use.bor_mem += a.memory
                else:
                    use.own_mem += a.memory
                if i is not None:
                    total[i] += a.memory
            else:
                self._account_tenant(a, 1)
                if i is not None:
                    total[i] += a.memory
                    loaded[i] += a.memory
        self.allocated = sum(a.memory for a in allocs.values())

    # -- state ----------------------------------------------------------------------------------

    @property
    def allocations(self) -> list[Allocation]:
        return list(self._allocs.values())

    def slot(self, gpu: str) -> GpuSlot | None:
        i = self._ord.get(gpu)
        return None if i is None else self._slots[i]

    def _eff_free(self, i: int) -> int:
        return min(self._mem[i] - self._loaded[i], self._cap[i] - self._total[i])

    def _oc_free(self, i: int) -> int:
        return self._cap[i] - self._total[i]

    def _frees(self, loaded: bool) -> list[int]:
        """Free capacity of every GPU for a loaded request or a reservation."""
        if loaded:
            return [
                min(m - u, c - t) for m, u, c, t in zip(self._mem, self._loaded, self._cap, self._total, strict=True)
            ]
        return [c - t for c, t in zip(self._cap, self._total, strict=True)]

    def _ensure_index(self) -> None:
        if self._eff_idx is not None:
            return
        eff: dict[str, list[tuple[int, int]]] = {z: [] for z in self.zones}
        oc: dict[str, list[tuple[int, int]]] = {z: [] for z in self.zones}
        for i, (e, o) in enumerate(zip(self._frees(True), self._frees(False), strict=True)):
            zone = self._zone_of[i]
            eff[zone].append((e, i))
            oc[zone].append((o, i))
        for z in self.zones:
            eff[z].sort()
            oc[z].sort()
        self._eff_idx, self._oc_idx = eff, oc

    def _model(self, model: str) -> _ModelUse:
        use = self._models.get(model)
        if use is None:
            if not self._models_complete:
                # Every model's use in one pass over the allocations (one scan per model would be
                # models x allocations: 2.4 million steps at 1,000 models); kept current since.
                fresh: dict[str, _ModelUse] = {}
                for a in self._allocs.values():
                    if a.model not in self._models:
                        self._account_model(fresh.setdefault(a.model, _ModelUse()), a, 1)
                self._models.update(fresh)
                self._models_complete = True
            use = self._models.setdefault(model, _ModelUse())
        return use

    def _spread_use(self) -> _SpreadUse:
        if self._spread is None:
            self._spread = _SpreadUse(serving=[0] * len(self._slots), count=[0] * len(self._slots))
            for a in self._allocs.values():
                self._account_spread(self._spread, a, 1)
        return self._spread

    def _account_spread(self, spread: _SpreadUse, a: Allocation, sign: int) -> None:
        i = self._ord.get(a.gpu)
        if i is None:
            return
        spread.count[i] += sign
        node = self._slots[i].node
        if a.tier in SERVING_TIERS:
            spread.serving[i] += sign
            spread.node_serving[node] = spread.node_serving.get(node, 0) + sign
        else:
            key = (standby_class(a.tier), node)
            spread.node_standby[key] = spread.node_standby.get(key, 0) + sign
            at = (standby_class(a.tier), i)
            spread.gpu_standby[at] = spread.gpu_standby.get(at, 0) + sign

    def _gpu_allocs(self) -> list[dict[str, Allocation]]:
        if self._by_gpu is None:
            self._by_gpu = [{} for _ in self._slots]
            self._class_mem = [[0] * len(self._slots) for _ in _CLASSES_UP]
            for a in self._allocs.values():
                i = self._ord.get(a.gpu)
                if i is not None:
                    self._by_gpu[i][a.instance] = a
                    self._class_mem[_CLASS_UP_POS[(_RANK[a.priority], a.loaded)]][i] += a.memory
        return self._by_gpu

    def add(self, a: Allocation) -> None:
        if a.instance in self._allocs:
            raise PlacementError(f"instance {a.instance} is allocated twice", "invalid")
        if a.memory < 0:
            raise PlacementError(f"allocation of {a.instance} has negative memory", "invalid")
        self._allocs[a.instance] = a
        self._account(a, +1)

    def remove(self, instance: str) -> Allocation:
        a = self._allocs.pop(instance)
        self._account(a, -1)
        return a

    def _account_tenant(self, a: Allocation, sign: int) -> None:
        use = self._use.get(a.tenant)
        if use is None:
            use = self._use[a.tenant] = _TenantUse()
        if a.borrowed:
            use.bor_mem += sign * a.memory
        else:
            use.own_mem += sign * a.memory
        if a.tier in RESERVED_TIERS:
            return
        mine, other = (use.bor_gpus, use.own_gpus) if a.borrowed else (use.own_gpus, use.bor_gpus)
        before = mine.get(a.gpu, 0)
        after = before + sign
        if after:
            mine[a.gpu] = after
        else:
            del mine[a.gpu]
        if (before == 0) != (after == 0):  # the GPU entered or left this set
            entered = 1 if after else -1
            if a.borrowed and a.gpu not in other:
                use.bor_only += entered
            elif not a.borrowed and a.gpu in other:
                use.bor_only -= entered

    def _account_model(self, use: _ModelUse, a: Allocation, sign: int) -> None:
        i = self._ord.get(a.gpu)
        if i is None:
            return
        zone = self._zone_of[i]
        use.zones[zone] = use.zones.get(zone, 0) + sign
        per_zone = use.gpus.setdefault(zone, {})
        copies = per_zone.get(i, 0) + sign
        if copies:
            per_zone[i] = copies
        else:
            del per_zone[i]

    def _account(self, a: Allocation, sign: int) -> None:
        self.allocated += sign * a.memory
        self._account_tenant(a, sign)
        model = self._models.get(a.model)
        if model is None and self._models_complete:
            model = self._models[a.model] = _ModelUse()
        if model is not None:
            self._account_model(model, a, sign)
        if self._spread is not None:
            self._account_spread(self._spread, a, sign)
        i = self._ord.get(a.gpu)
        if i is None:
            return  # a GPU gone from the inventory: counts globally and in quotas only
        if self._by_gpu is not None:
            if sign > 0:
                self._by_gpu[i][a.instance] = a
            else:
                del self._by_gpu[i][a.instance]
            self._class_mem[_CLASS_UP_POS[(_RANK[a.priority], a.loaded)]][i] += sign * a.memory
        d_loaded = sign * a.memory if a.loaded else 0
        if self._eff_idx is None:
            self._loaded[i] += d_loaded
            self._total[i] += sign * a.memory
            return
        zone = self._zone_of[i]
        for idx, old in ((self._eff_idx[zone], self._eff_free(i)), (self._oc_idx[zone], self._oc_free(i))):
            del idx[bisect_left(idx, (old, i))]
        self._loaded[i] += d_loaded
        self._total[i] += sign * a.memory
        insort(self._eff_idx[zone], (self._eff_free(i), i))
        insort(self._oc_idx[zone], (self._oc_free(i), i))

    def apply(self, request: PlacementRequest, placement: Placement) -> Allocation:
        """Remove the preempted allocations (and an earlier allocation of the same instance), add the new one."""
        for victim in placement.preempted:
            if victim.instance in self._allocs:
                self.remove(victim.instance)
        if request.instance in self._allocs:
            self.remove(request.instance)
        allocation = placement.allocation(request)
        self.add(allocation)
        return allocation

    @contextmanager
    def _without(self, instance: str) -> Iterator[None]:
        """The request replaces an earlier allocation of the same instance: decide as if it were gone."""
        existing = self._allocs.get(instance)
        if existing is None:
            yield
            return
        self.remove(instance)
        try:
            yield
        finally:
            self.add(existing)

    # -- quotas ---------------------------------------------------------------------------------

    def _caps(self, tenant: str) -> tuple[int | None, int | None]:
        policy = self._tenants.get(tenant)
        if policy is None:
            return None, None
        return policy.capability.memory, policy.capability.gpus

    def _numbers(self, tenant: str, victims: Sequence[Allocation] = ()) -> _TenantNumbers:
        use = self._use.get(tenant) or _TenantUse()
        own_mem, bor_mem, own_gpus, bor_gpus = use.own_mem, use.bor_mem, len(use.own_gpus), use.bor_only
        mine = [v for v in victims if v.tenant == tenant]
        for v in mine:
            if v.borrowed:
                bor_mem -= v.memory
            else:
                own_mem -= v.memory
        for gpu in {v.gpu for v in mine if v.loaded}:
            own_before = use.own_gpus.get(gpu, 0)
            bor_before = use.bor_gpus.get(gpu, 0)
            own_after = own_before - sum(1 for v in mine if v.gpu == gpu and v.loaded and not v.borrowed)
            bor_after = bor_before - sum(1 for v in mine if v.gpu == gpu and v.loaded and v.borrowed)
            bor_gpus += int(bor_after > 0 and own_after == 0) - int(bor_before > 0 and own_before == 0)
            own_gpus -= int(own_before > 0 and own_after == 0)
        return _TenantNumbers(own_mem, own_gpus, bor_mem, bor_gpus)

    def _borrow_room(self, tenant: str, victims: Sequence[Allocation] = ()) -> tuple[int, int]:
        """(memory, GPUs) other tenants lend and nobody borrows yet; negative when over-borrowed."""
        lend_mem = lend_gpus = used_mem = used_gpus = 0
        for name, policy in self._tenants.items():
            if name == tenant or not policy.reclaimable:
                continue
            cap_mem, cap_gpus = policy.capability.memory, policy.capability.gpus
            if cap_mem is None and cap_gpus is None:
                continue
            numbers = self._numbers(name, victims)
            if cap_mem is not None:
                lend_mem += max(0, cap_mem - numbers.own_mem)
            if cap_gpus is not None:
                lend_gpus += max(0, cap_gpus - numbers.own_gpus)
        for name in self._use:
            cap_mem, cap_gpus = self._caps(name)
            if cap_mem is None and cap_gpus is None:
                continue
            numbers = self._numbers(name, victims)
            if cap_mem is not None:
                used_mem += numbers.bor_mem
            if cap_gpus is not None:
                used_gpus += numbers.bor_gpus
        return lend_mem - used_mem, lend_gpus - used_gpus

    def _membership(self, tenant: str, gpu: str, victims: Sequence[Allocation]) -> tuple[bool, bool]:
        """Whether the tenant has own / borrowed loaded allocations on ``gpu`` once victims are gone."""
        use = self._use.get(tenant) or _TenantUse()
        own = use.own_gpus.get(gpu, 0)
        bor = use.bor_gpus.get(gpu, 0)
        for v in victims:
            if v.tenant == tenant and v.gpu == gpu and v.loaded:
                if v.borrowed:
                    bor -= 1
                else:
                    own -= 1
        return own > 0, bor > 0

    def quota_mode(self, request: PlacementRequest, gpu: str, victims: Sequence[Allocation] = ()) -> bool | None:
        """False: within the tenant's cap on ``gpu``; True: only on borrowed capacity; None: not allowed."""
        cap_mem, cap_gpus = self._caps(request.tenant)
        if cap_mem is None and cap_gpus is None:
            return False
        numbers = self._numbers(request.tenant, victims)
        on_own, on_bor = self._membership(request.tenant, gpu, victims) if request.loaded else (True, True)
        if (cap_mem is None or numbers.own_mem + request.memory <= cap_mem) and (
            cap_gpus is None or on_own or numbers.own_gpus + 1 <= cap_gpus
        ):
            return False
        room_mem, room_gpus = self._borrow_room(request.tenant, victims)
        if cap_mem is not None and request.memory > room_mem:
            return None
        if cap_gpus is not None and not (on_own or on_bor) and room_gpus < 1:
            return None
        return True

    # -- searching ------------------------------------------------------------------------------

    def _zone_groups(self, model: str) -> list[list[str]]:
        """Zones grouped by how many allocations of the model they hold, fewest first."""
        counts = self._model(model).zones
        groups: dict[int, list[str]] = {}
        for zone in self.zones:
            groups.setdefault(counts.get(zone, 0), []).append(zone)
        return [groups[c] for c in sorted(groups)]

    def _free(self, i: int, loaded: bool) -> int:
        return self._eff_free(i) if loaded else self._oc_free(i)

    def _copies(self, model: str, i: int) -> int:
        return self._model(model).gpus.get(self._zone_of[i], {}).get(i, 0)

    def _search_zone(self, request: PlacementRequest, zone: str, excluded: frozenset[str]) -> tuple[int, int] | None:
        """Best (free, ordinal) in one zone by (leftover, most copies of the model, GPU order)."""
        assert self._eff_idx is not None
        index = self._eff_idx[zone] if request.loaded else self._oc_idx[zone]
        m = request.memory
        slots = self._slots
        first: tuple[int, int] | None = None
        pos = bisect_left(index, (m, -1))
        while pos < len(index):
            entry = index[pos]
            if not (excluded and slots[entry[1]].node in excluded):
                first = entry
                break
            pos += 1
        if first is None:
            return None
        free, i = first
        if pos + 1 == len(index) or index[pos + 1][0] != free:
            return first  # no other GPU leaves the same: no tie to break
        # Ties: the GPU with the most copies of the model, then the first; look through whichever
        # is shorter, the tied entries or the GPUs of the zone that hold the model.
        best = (-self._copies(request.model, i), i)
        holders = self._model(request.model).gpus.get(zone, {})
        if not holders:
            return first
        end = bisect_left(index, (free + 1, -1), pos)
        if end - pos <= len(holders):
            for k in range(pos + 1, end):
                j = index[k][1]
                copies = holders.get(j, 0)
                if copies > -best[0] and not (excluded and slots[j].node in excluded):
                    best = (-copies, j)
        else:
            for j, copies in holders.items():
                if (-copies, j) < best and self._free(j, request.loaded) == free:
                    if not (excluded and slots[j].node in excluded):
                        best = (-copies, j)
        return free, best[1]

    def _search_all(self, request: PlacementRequest, excluded: frozenset[str], frees: list[int] | None) -> int | None:
        if self._eff_idx is not None:
            for group in self._zone_groups(request.model):
                found = [f for f in (self._search_zone(request, z, excluded) for z in group) if f is not None]
                if found:
                    return min(found, key=lambda f: (f[0], -self._copies(request.model, f[1]), f[1]))[1]
            return None
        # No index: one pass over every GPU, same order of preference.
        assert frees is not None
        m = request.memory
        candidates = [i for i, f in enumerate(frees) if f >= m]
        if excluded:
            slots = self._slots
            candidates = [i for i in candidates if slots[i].node not in excluded]
        if not candidates:
            return None
        model = self._model(request.model)
        if model.zones and len(self.zones) > 1:
            zone_of = self._zone_of
            present = {zone_of[i] for i in candidates}
            fewest = min(model.zones.get(z, 0) for z in present)
            spread = {z for z in present if model.zones.get(z, 0) == fewest}
            if len(spread) < len(present):
                candidates = [i for i in candidates if zone_of[i] in spread]
        tightest = min(frees[i] for i in candidates)
        tied = [i for i in candidates if frees[i] == tightest]
        # Ties: most copies of the model, then GPU order (``tied`` is in GPU order).
        if len(tied) == 1 or not model.gpus:
            return tied[0]
        ties = set(tied)
        cached = [(-c, i) for per_zone in model.gpus.values() for i, c in per_zone.items() if i in ties]
        return min(cached)[1] if cached else tied[0]

    def _search_set(self, request: PlacementRequest, gpus: Iterable[str], excluded: frozenset[str]) -> int | None:
        zone_counts = self._model(request.model).zones
        best: tuple[int, int, int, int] | None = None
        for gpu in gpus:
            i = self._ord.get(gpu)
            if i is None or (excluded and self._slots[i].node in excluded):
                continue
            free = self._free(i, request.loaded)
            if free < request.memory:
                continue
            key = (zone_counts.get(self._zone_of[i], 0), free, -self._copies(request.model, i), i)
            if best is None or key < best:
                best = key
        return None if best is None else best[3]

    def _plain(self, request: PlacementRequest) -> tuple[int, bool, bool] | None:
        """(GPU ordinal, borrowed, on a protected node) of the best placement without preemption."""
        if self.allocated + request.memory > self.pool_cap:
            return None
        # borrow_all: None no borrowing; True anywhere; False only on GPUs it holds, own or borrowed
        mem_within, gpu_room, borrow_all, use = self._quota_rule(request)
        passes = [request.protects, frozenset()] if request.protects else [frozenset()]
        frees = None if self._eff_idx is not None else self._frees(request.loaded)
        for excluded in passes:
            if mem_within:
                found = (
                    self._search_all(request, excluded, frees)
                    if gpu_room
                    else self._search_set(request, list(use.own_gpus), excluded)
                )
                if found is not None:
                    return found, False, self._slots[found].node in request.protects
            if borrow_all is not None:
                found = (
                    self._search_all(request, excluded, frees)
                    if borrow_all
                    else self._search_set(request, [*use.own_gpus, *use.bor_gpus], excluded)
                )
                if found is not None:
                    return found, True, self._slots[found].node in request.protects
        return None

    def _quota_rule(self, request: PlacementRequest) -> tuple[bool, bool, bool | None, _TenantUse]:
        """(within the memory cap, room for one more GPU, borrowing: None none / True anywhere /
        False only on GPUs the tenant already holds, the tenant's use), as :meth:`_plain` reads them."""
        cap_mem, cap_gpus = self._caps(request.tenant)
        use = self._use.get(request.tenant) or _TenantUse()
        capped = cap_mem is not None or cap_gpus is not None
        mem_within = cap_mem is None or use.own_mem + request.memory <= cap_mem
        gpu_room = cap_gpus is None or not request.loaded or len(use.own_gpus) + 1 <= cap_gpus
        borrow_all: bool | None = None
        if capped and not (mem_within and gpu_room):
            room_mem, room_gpus = self._borrow_room(request.tenant)
            if cap_mem is None or request.memory <= room_mem:
                borrow_all = cap_gpus is None or not request.loaded or room_gpus >= 1
        return mem_within, gpu_room, borrow_all, use

    def _plain_ranked(self, request: PlacementRequest) -> tuple[int, bool, tuple[int, ...]] | None:
        """(GPU ordinal, borrowed, penalty) of the best placement without preemption, for requests
        with ``avoid_zones``, ``spread`` or (serving) ``serving_zones``: one scan of every GPU, ranked
        by (on a protected node, outside the serving zones, penalty, borrowed, the model's
        allocations in the zone, leftover, most copies of the model, GPU order): the same order as
        :meth:`_plain` with the penalty in place of "on a protected node". (Outside the serving
        zones is no part of the penalty, whose layout placement repair reads; without
        ``serving_zones`` it is 0 everywhere and the order is the penalty's.)"""
        m = request.memory
        if self.allocated + m > self.pool_cap:
            return None
        mem_within, gpu_room, borrow_all, use = self._quota_rule(request)
        model = self._model(request.model)
        zones = model.zones
        copies = {i: c for per_zone in model.gpus.values() for i, c in per_zone.items()}
        protects, avoid = request.protects, request.avoid_zones
        spread = self._spread_use() if request.spread else None
        serving = request.tier in SERVING_TIERS
        kind = standby_class(request.tier)
        zoned = request.zoned
        slots, zone_of = self._slots, self._zone_of
        best: tuple[int, int, tuple[int, ...], bool, int, int, int, int] | None = None
        for i, free in enumerate(self._frees(request.loaded)):
            if free < m:
                continue
            slot = slots[i]
            if mem_within and (gpu_room or slot.id in use.own_gpus):
                borrowed = False
            elif borrow_all or (borrow_all is False and (slot.id in use.own_gpus or slot.id in use.bor_gpus)):
                borrowed = True
            else:
                continue
            # The penalty, as _penalty computes it (inlined: this loop runs for every GPU).
            penalty: tuple[int, ...] = (int(slot.node in protects), int(slot.zone in avoid))
            if spread is not None:
                if serving:
                    on_node = spread.node_serving.get(slot.node, 0)
                    penalty = (*penalty, on_node, spread.serving[i], int(spread.count[i] > 0))
                else:
                    penalty = (
                        *penalty,
                        int(spread.serving[i] > 0),
                        int(copies.get(i, 0) > 0),
                        zones.get(zone_of[i], 0),
                        spread.node_standby.get((kind, slot.node), 0),
                        spread.gpu_standby.get((kind, i), 0),
                    )
            outside = int(bool(zoned) and slot.zone not in zoned)
            key = (penalty[0], outside, penalty, borrowed, zones.get(zone_of[i], 0), free - m, -copies.get(i, 0), i)
            if best is None or key < best:
                best = key
        return None if best is None else (best[7], best[3], best[2])

    def penalty(self, request: PlacementRequest, gpu: str) -> tuple[int, ...]:
        """How far ``gpu`` is from where the request belongs, compared lexicographically (lower is
        better, all zeros is as good as it gets), on the pool as it is without an allocation of the
        request's own instance (so an existing instance can be judged where it stands):

        1. on a node in ``protects`` (anti-affinity); 2. in a zone in ``avoid_zones``;
        then with ``spread``, for a serving (or promoting) request: 3. serving instances on the GPU's
        node, 4. serving instances on the GPU, 5. the GPU holds anything; for a standby: 3. the GPU
        holds a serving instance, 4. the GPU holds another instance of the request's model, 5. the
        request's model's instances in the GPU's zone (its standbys spread over the zones before
        anything else is balanced), 6. standbys of the request's class (:func:`standby_class`: hot
        and warm, or cold) on the GPU's node, 7. standbys of its class on the GPU. (6 and 7:
        standbys become serving where they stand when their serving peers' zone fails, hot and warm
        ones first. Packed by best fit, a
        zone failover of 500 models left 75 % of them serving from one node of the surviving zone
        and 40 from one GPU.)
        """
        i = self._ord.get(gpu)
        if i is None:
            raise PlacementError(f"GPU {gpu} is not in the inventory", "invalid")
        with self._without(request.instance):
            return self._penalty(request, i)

    def lowest_judged(
        self, request: PlacementRequest, memory: int, count: int = 2
    ) -> list[tuple[tuple[int, ...], str]]:
        """The ``count`` lowest (judged penalty, GPU id) of the GPUs of at least ``memory``, lowest
        first: a standby's :meth:`penalty` cut to its first :data:`STANDBY_JUDGED` components, what
        placement repair judges it by. One loop over the pool and a partial sort (``heapq``):
        repair asks this of every model with a standby it might move (at 1,000 models, most)."""
        with self._without(request.instance):
            protects, avoid, kind = request.protects, request.avoid_zones, standby_class(request.tier)
            spread = self._spread_use()
            serving, node_standby = spread.serving, spread.node_standby
            use = self._model(request.model)
            gpus, in_zone = use.gpus, use.zones
            zone_of = self._zone_of
            ranked = (
                (
                    (
                        int(slot.node in protects),
                        int(slot.zone in avoid),
                        int(serving[i] > 0),
                        int(gpus.get(zone_of[i], {}).get(i, 0) > 0),
                        in_zone.get(zone_of[i], 0),
                        node_standby.get((kind, slot.node), 0),
                    ),
                    slot.id,
                )
                for i, slot in enumerate(self._slots)
                if slot.memory >= memory
            )
            return heapq.nsmallest(count, ranked)

    def _penalty(self, request: PlacementRequest, i: int) -> tuple[int, ...]:
        slot = self._slots[i]
        key = (int(slot.node in request.protects), int(slot.zone in request.avoid_zones))
        if not request.spread:
            return key
        spread = self._spread_use()
        if request.tier in SERVING_TIERS:
            return (*key, spread.node_serving.get(slot.node, 0), spread.serving[i], int(spread.count[i] > 0))
        return (
            *key,
            int(spread.serving[i] > 0),
            int(self._copies(request.model, i) > 0),
            self._model(request.model).zones.get(slot.zone, 0),
            spread.node_standby.get((standby_class(request.tier), slot.node), 0),
            spread.gpu_standby.get((standby_class(request.tier), i), 0),
        )

    def _zone_note(self, request: PlacementRequest, slot: GpuSlot) -> str:
        """A serving request placed outside its serving zones: said, and why no GPU in them took it."""
        if not request.outside(slot.zone):
            return ""
        zoned = request.zoned
        m = request.memory
        room = [i for i, s in enumerate(self._slots) if s.zone in zoned and self._free(i, request.loaded) >= m]
        if not any(s.zone in zoned for s in self._slots):
            why = "the pool has no GPU there"
        elif not room:
            why = f"no GPU there has {format_size(m)} free"
        elif all(self._slots[i].node in request.protects for i in room):
            why = f"every node there with room already serves {request.model}"
        else:
            why = f"the GPUs there with room are beyond tenant {request.tenant!r}'s quota"
        return f"; in zone {slot.zone}, outside the active zones ({', '.join(sorted(zoned))}): {why}"

    def _penalty_notes(self, request: PlacementRequest, slot: GpuSlot, penalty: tuple[int, ...]) -> str:
        """Why the chosen GPU is not perfect: each part of its penalty, said."""
        notes = []
        if penalty[0]:
            notes.append(f"on protected node {slot.node}: no other node fits")
        if len(penalty) > 1 and penalty[1]:
            notes.append(f"in zone {slot.zone} of the instances it stands by for: no other zone fits")
        if len(penalty) > 2 and request.tier in SERVING_TIERS:
            if penalty[2]:
                notes.append(f"node {slot.node} already has {penalty[2]} serving instance(s): no node with fewer fits")
            elif penalty[4]:
                notes.append("no empty GPU fits")
        elif len(penalty) > 2:
            if penalty[2]:
                notes.append("beside a serving instance: no GPU without one fits")
            if penalty[3]:
                notes.append(f"beside another instance of {request.model}: no other GPU fits")
        return "".join(f"; {note}" for note in notes)

    # -- preemption -----------------------------------------------------------------------------

    def _needs(self, request: PlacementRequest, i: int) -> tuple[int, int]:
        """Loaded and total memory that must be freed on GPU ``i`` for the request to fit."""
        m = request.memory
        need_loaded = max(0, self._loaded[i] + m - self._mem[i]) if request.loaded else 0
        need_total = max(0, self._total[i] + m - self._cap[i], self.allocated + m - self.pool_cap)
        return need_loaded, need_total

    def _reclaiming(self, request: PlacementRequest) -> _Candidate | None:
        """Best GPU after reclaiming other tenants' borrowed allocations, for a request within its cap."""
        best: _Candidate | None = None
        for i, held in enumerate(self._gpu_allocs()):
            if not held:
                continue
            eligible = [a for a in held.values() if a.borrowed and a.tenant != request.tenant]
            if eligible:
                candidate = self._preempt_on(request, i, eligible, reclaim=True)
                if candidate is not None and (best is None or candidate.key < best.key):
                    best = candidate
        return best

    def _emergency(self, request: PlacementRequest) -> _Candidate | None:
        """Best GPU after preempting strictly lower-priority allocations.

        The cost of a victim set is lexicographic, most important class first, so only the GPUs
        whose least important sufficient class is the lowest over the pool can win: the per-class
        sums find that class for every GPU in a few passes, and victims are chosen on those GPUs only
        (then the next class up, when the quota refuses all of them).
        """
        by_gpu = self._gpu_allocs()
        rank = _RANK[request.priority]
        allowed = [k for k, (r, _) in enumerate(_CLASSES_UP) if r < rank]
        m = request.memory
        over = self.allocated + m - self.pool_cap
        need_total = [max(0, t + m - c, over) for t, c in zip(self._total, self._cap, strict=True)]
        if request.loaded:
            need_loaded = [max(0, u + m - mem) for u, mem in zip(self._loaded, self._mem, strict=True)]
        else:
            need_loaded = [0] * len(need_total)
        # GPUs with room already were refused by the plain search for their quota: no victims help.
        pending = [i for i, held in enumerate(by_gpu) if held and (need_total[i] or need_loaded[i])]
        freed_loaded = [0] * len(need_total)
        freed_total = [0] * len(need_total)
        tops: list[list[int]] = []
        for k in allowed:
            column = self._class_mem[k]
            if _CLASSES_UP[k][1]:
                for i in pending:
                    freed_loaded[i] += column[i]
            for i in pending:
                freed_total[i] += column[i]
            enough = [i for i in pending if freed_loaded[i] >= need_loaded[i] and freed_total[i] >= need_total[i]]
            tops.append(enough)
            if enough:
                done = set(enough)
                pending = [i for i in pending if i not in done]
        protects = request.protects
        for protected in (False, True) if protects else (False,):
            for gpus in tops:
                best: _Candidate | None = None
                for i in gpus:
                    if (self._slots[i].node in protects) != protected:
                        continue
                    eligible = [a for a in by_gpu[i].values() if _RANK[a.priority] < rank]
                    candidate = self._preempt_on(request, i, eligible, reclaim=False)
                    if candidate is not None and (best is None or candidate.key < best.key):
                        best = candidate
                if best is not None:
                    return best
        return None

    def _preempt_on(
        self, request: PlacementRequest, i: int, eligible: list[Allocation], reclaim: bool
    ) -> _Candidate | None:
        need_loaded, need_total = self._needs(request, i)
        if need_loaded == 0 and need_total == 0:
            return None  # fits without preemption: the plain search refused it for its quota
        victims = select_victims(eligible, need_loaded, need_total)
        if victims is None:
            return None
        slot = self._slots[i]
        mode = self.quota_mode(request, slot.id, victims)
        if mode is None or (reclaim and mode):
            return None
        freed = sum(v.memory for v in victims)
        freed_loaded = sum(v.memory for v in victims if v.loaded)
        oc_left = self._cap[i] - (self._total[i] - freed) - request.memory
        leftover = (
            min(slot.memory - (self._loaded[i] - freed_loaded) - request.memory, oc_left) if request.loaded else oc_left
        )
        key = (
            slot.node in request.protects,
            victim_cost(victims),
            request.outside(slot.zone),
            len(victims),
            freed,
            mode,
            self._model(request.model).zones.get(slot.zone, 0),
            leftover,
            -self._copies(request.model, i),
            i,
        )
        return _Candidate(key, slot, victims, mode, leftover)

    # -- deciding -------------------------------------------------------------------------------

    def decide(self, request: PlacementRequest) -> Placement:
        """Where the request goes; raises :class:`PlacementError` saying why when nothing fits."""
        self._validate(request)
        if self._want_index:
            self._ensure_index()
        with self._without(request.instance):
            return self._decide(request)

    def _validate(self, request: PlacementRequest) -> None:
        if request.tier not in TIERS:
            raise PlacementError(
                f"{request.instance}: unknown tier {request.tier!r} (expected one of {', '.join(sorted(TIERS))})",
                "invalid",
            )
        if request.memory < 0:
            raise PlacementError(f"{request.instance}: negative memory {request.memory}", "invalid")
        if not self._slots:
            raise PlacementError("the GPU pool has no GPUs", "capacity")
        if request.memory > self.largest:
            raise PlacementError(
                f"{request.instance} needs {format_size(request.memory)} but the largest GPU of the pool has "
                f"{format_size(self.largest)}: it fits on no GPU, in any tier",
                "too-large",
            )

    def _decide(self, request: PlacementRequest) -> Placement:
        m = request.memory
        what = "loaded" if request.loaded else "overcommitted"
        if request.spread or request.avoid_zones or request.zoned:
            plain = self._plain_ranked(request)
        else:
            found = self._plain(request)
            plain = None if found is None else (found[0], found[1], (int(found[2]),))
        if plain is not None:
            i, borrowed, penalty = plain
            slot = self._slots[i]
            leftover = self._free(i, request.loaded) - m
            reason = f"{request.tier} on {slot.id} (zone {slot.zone}): best fit, leaves {format_size(leftover)} {what}"
            if borrowed:
                reason += f"; on capacity borrowed from reclaimable tenants ({self._cap_text(request.tenant)})"
            reason += self._zone_note(request, slot) + self._penalty_notes(request, slot, penalty)
            return Placement(gpu=slot, borrowed=borrowed, reason=reason)
        notes: list[str] = []
        cap_mem, cap_gpus = self._caps(request.tenant)
        own_mem = self._numbers(request.tenant).own_mem
        if (cap_mem is not None or cap_gpus is not None) and (cap_mem is None or own_mem + m <= cap_mem):
            candidate = self._reclaiming(request)
            if candidate is not None:
                return self._preempted(request, candidate, "reclaimed borrowed capacity")
            notes.append("reclaiming other tenants' borrowed allocations would free room on no GPU")
        if request.emergency:
            candidate = self._emergency(request)
            if candidate is not None:
                return self._preempted(request, candidate, f"emergency ({request.priority})")
            notes.append(
                f"emergency: preempting allocations of lower priority than {request.priority} would free room on no GPU"
            )
        raise self._failure(request, notes)

    def _preempted(self, request: PlacementRequest, candidate: _Candidate, why: str) -> Placement:
        slot = candidate.slot
        victims = ", ".join(f"{v.instance} ({v.priority} {v.tier}, {format_size(v.memory)})" for v in candidate.victims)
        reason = f"{why}: {request.tier} on {slot.id} (zone {slot.zone}) after preempting {victims}"
        if candidate.borrowed:
            reason += "; on borrowed capacity"
        if slot.node in request.protects:
            reason += f"; on protected node {slot.node}: no other node fits"
        if request.outside(slot.zone):
            reason += f"; in zone {slot.zone}, outside the active zones ({', '.join(sorted(request.zoned))})"
        return Placement(gpu=slot, preempted=candidate.victims, borrowed=candidate.borrowed, reason=reason)

    def _cap_text(self, tenant: str) -> str:
        cap_mem, cap_gpus = self._caps(tenant)
        numbers = self._numbers(tenant)
        parts = []
        if cap_mem is not None:
            parts.append(f"memory {format_size(numbers.own_mem)} of {format_size(cap_mem)}")
        if cap_gpus is not None:
            parts.append(f"GPUs {numbers.own_gpus} of {cap_gpus}")
        return f"tenant {tenant!r} uses " + ", ".join(parts)

    def _failure(self, request: PlacementRequest, notes: list[str]) -> PlacementError:
        m = request.memory
        tail = "".join(f"; {note}" for note in notes)
        head = f"{request.instance} ({request.tier}, {format_size(m)})"
        if self.allocated + m > self.pool_cap:
            return PlacementError(
                f"{head}: the pool is full: {format_size(self.allocated)} of {format_size(self.pool_cap)} allocated "
                f"({format_size(self.physical)} x overcommit {self.ratio:g}){tail}",
                "capacity",
            )
        fitting = [i for i in range(len(self._slots)) if self._free(i, request.loaded) >= m]
        if not fitting:
            most = max(range(len(self._slots)), key=lambda i: (self._free(i, request.loaded), -i))
            what = "loaded capacity (physical, and overcommitted)" if request.loaded else "overcommitted capacity"
            return PlacementError(
                f"{head}: no GPU has {format_size(m)} of free {what}; the most free is "
                f"{format_size(max(0, self._free(most, request.loaded)))} on {self._slots[most].id}{tail}",
                "capacity",
            )
        room_mem, room_gpus = self._borrow_room(request.tenant)
        cap_mem, cap_gpus = self._caps(request.tenant)
        lend = []
        if cap_mem is not None:
            lend.append(f"{format_size(max(0, room_mem))} of memory")
        if cap_gpus is not None and request.loaded:
            lend.append(f"{max(0, room_gpus)} GPU(s)")
        return PlacementError(
            f"{head}: over its tenant's cap and nothing left to borrow: {self._cap_text(request.tenant)}, "
            f"+{format_size(m)} would exceed it on every GPU with room ({len(fitting)}), and reclaimable tenants "
            f"have {' and '.join(lend) or 'nothing'} left to lend{tail}",
            "quota",
        )


def victim_cost(victims: Iterable[Allocation]) -> tuple[int, ...]:
    """How much a set of victims hurts, compared lexicographically: the number of victims per class,
    most important class first (critical loaded, critical reserved, high loaded, …)."""
    counts = [0] * len(_CLASSES)
    for v in victims:
        counts[_CLASS_POS[(_RANK[v.priority], v.loaded)]] += 1
    return tuple(counts)


def select_victims(eligible: Sequence[Allocation], need_loaded: int, need_total: int) -> tuple[Allocation, ...] | None:
    """The least important allocations whose removal frees ``need_loaded`` loaded and ``need_total``
    memory in all; None when even all of them do not.

    Minimises :func:`victim_cost`: it finds the least important class that, with every class below
    it, frees enough; takes the fewest (largest) victims of that class that still suffice with all
    lower classes; and repeats for each lower class. The result is irreducible: without any one of
    its victims it would not free enough.
    """
    classes = _CLASSES_UP
    members: list[list[Allocation]] = [[] for _ in classes]
    for a in eligible:
        members[_CLASS_UP_POS[(_RANK[a.priority], a.tier not in RESERVED_TIERS)]].append(a)
    below_loaded = [0]
    below_total = [0]
    for c, group in zip(classes, members, strict=True):
        size = sum(a.memory for a in group)
        below_total.append(below_total[-1] + size)
        below_loaded.append(below_loaded[-1] + (size if c[1] else 0))
    top = next(
        (k for k in range(len(classes)) if below_loaded[k + 1] >= need_loaded and below_total[k + 1] >= need_total),
        None,
    )
    if top is None:
        return None
    for group in members[: top + 1]:
        group.sort(key=lambda a: (-a.memory, a.instance))
    chosen: list[Allocation] = []
    fixed_loaded = fixed_total = 0
    for j in range(top, -1, -1):
        is_loaded = classes[j][1]
        base_loaded = fixed_loaded + below_loaded[j]
        base_total = fixed_total + below_total[j]
        taken = 0
        for a in members[j]:
            if base_loaded + (taken if is_loaded else 0) >= need_loaded and base_total + taken >= need_total:
                break
            chosen.append(a)
            taken += a.memory
        fixed_total += taken
        if is_loaded:
            fixed_loaded += taken
    return tuple(chosen)


def assign_borrowed(allocations: Iterable[Allocation], tenants: Sequence[TenantPolicy]) -> list[Allocation]:
    """Re-derive the ``borrowed`` marks from the caps: per tenant, its most important allocations
    (priority, then loaded before reserved, then instance) are within its cap as long as they fit;
    the rest are borrowed. For callers that lost the marks, or to give capacity back to the owner
    after deletions. Order is preserved."""
    policies: dict[str, TenantPolicy] = {}
    for tenant in tenants:
        policies.setdefault(tenant.name, tenant)
    items = list(allocations)
    order = sorted(range(len(items)), key=lambda k: (-_RANK[items[k].priority], not items[k].loaded, items[k].instance))
    own_mem: dict[str, int] = {}
    own_gpus: dict[str, set[str]] = {}
    marks = [False] * len(items)
    for k in order:
        a = items[k]
        policy = policies.get(a.tenant)
        if policy is None:
            continue
        cap_mem, cap_gpus = policy.capability.memory, policy.capability.gpus
        mem = own_mem.get(a.tenant, 0)
        gpus = own_gpus.setdefault(a.tenant, set())
        fits_mem = cap_mem is None or mem + a.memory <= cap_mem
        fits_gpus = cap_gpus is None or not a.loaded or a.gpu in gpus or len(gpus) + 1 <= cap_gpus
        if fits_mem and fits_gpus:
            own_mem[a.tenant] = mem + a.memory
            if a.loaded:
                gpus.add(a.gpu)
        else:
            marks[k] = True
    return [
        a
        if a.borrowed == marks[k]
        else Allocation(a.instance, a.model, a.tenant, a.priority, a.tier, a.memory, a.gpu, borrowed=marks[k])
        for k, a in enumerate(items)
    ]


# -- the public functions ---------------------------------------------------------------------------


def place(
    request: PlacementRequest,
    inventory: Sequence[GpuSlot],
    allocations: Sequence[Allocation],
    pool: GpuPoolPolicy,
    tenants: Sequence[TenantPolicy],
) -> Placement:
    """Where ``request`` goes on the pool as ``allocations`` occupy it (see the module's rules).

    An allocation with the request's instance id is treated as replaced (re-placing an instance).
    Raises :class:`PlacementError` with the precise reason when nothing fits.
    """
    return PlacementEngine(inventory, allocations, pool, tenants, index=False).decide(request)


def place_many(
    requests: Iterable[PlacementRequest],
    inventory: Sequence[GpuSlot],
    allocations: Sequence[Allocation],
    pool: GpuPoolPolicy,
    tenants: Sequence[TenantPolicy],
) -> tuple[list[Placement | PlacementError], list[Allocation]]:
    """Place requests one after another, each seeing the ones before (preempted allocations removed).

    Returns one result per request (a :class:`Placement` or the :class:`PlacementError`) and the
    allocations afterwards.
    """
    engine = PlacementEngine(inventory, allocations, pool, tenants)
    results: list[Placement | PlacementError] = []
    for request in requests:
        try:
            placement = engine.decide(request)
        except PlacementError as exc:
            results.append(exc)
            continue
        engine.apply(request, placement)
        results.append(placement)
    return results, engine.allocations
