"""The seed's GPU scheduler (``GPUPool.ScheduleModel``, seed §2.2), kept as the benchmarks' reference.

Not production code: ``bench/placement_bench.py`` measures :class:`drctl.policies.placement.PlacementEngine`
against it side by side, and ``tests/bench/test_seed_scheduler.py`` pins its behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from drctl.policies.placement import (
    Allocation,
    GpuSlot,
    Placement,
    PlacementError,
    PlacementRequest,
    format_size,
)
from drctl.policies.schema import GpuPoolPolicy, TenantPolicy


class SeedPool:
    """The seed's ``GPUPool.ScheduleModel`` (§2.2), faithfully.

    Global check ``total x overcommit - allocated ≥ required``; then per GPU skip when
    ``total - used - reserved < required``; score = 50 per copy of the model already on the GPU
    (the seed's loop adds 50 for each matching entry of ``ActiveModels``) + free ratio x 50; the
    first GPU with the highest score wins. What the seed leaves open, read here as: ``used +
    reserved`` of a GPU is the memory of every allocation on it (the scheduler books every tier as
    ``ReservedMemory``), ``ActiveModels`` lists the model of each allocation, GPUs are visited in
    inventory order (Go's map order is random), and tiers, tenants and anti-affinity are ignored
    (the seed has none). So per GPU it never overcommits: only the global check uses the ratio.
    """

    def __init__(self, inventory: Sequence[GpuSlot], allocations: Iterable[Allocation], pool: GpuPoolPolicy) -> None:
        self.slots = list(inventory)
        self.ratio = pool.overcommit_ratio
        self.total_memory = sum(s.memory for s in self.slots)
        self.allocated = 0
        self._ord = {s.id: i for i, s in enumerate(self.slots)}
        self._mem = [s.memory for s in self.slots]
        self._booked = [0] * len(self.slots)
        self._models: dict[str, dict[int, int]] = {}
        """model → GPU position → entries in ``ActiveModels``."""
        for a in allocations:
            self.book(a.model, a.memory, a.gpu)

    def book(self, model: str, memory: int, gpu: str) -> None:
        self.allocated += memory
        i = self._ord.get(gpu)
        if i is not None:
            self._booked[i] += memory
            copies = self._models.setdefault(model, {})
            copies[i] = copies.get(i, 0) + 1

    def select(self, model: str, memory: int) -> GpuSlot:
        available_pool = int(self.total_memory * self.ratio) - self.allocated
        if memory > available_pool:
            raise PlacementError(
                f"insufficient memory: needs {format_size(memory)}, the pool has {format_size(available_pool)} left",
                "capacity",
            )
        copies = self._models.get(model, {})
        best = -1
        best_score = -1.0
        mem, booked = self._mem, self._booked
        for i in range(len(mem)):
            available = mem[i] - booked[i]
            if available < memory:
                continue
            score = available / mem[i] * 50
            if copies:
                score += 50 * copies.get(i, 0)
            if score > best_score:
                best_score = score
                best = i
        if best < 0:
            raise PlacementError(f"no suitable GPU for {format_size(memory)}", "capacity")
        return self.slots[best]

    def schedule(self, request: PlacementRequest) -> Placement:
        slot = self.select(request.model, request.memory)
        self.book(request.model, request.memory, slot.id)
        return Placement(gpu=slot, reason="seed score: cached model +50, free ratio x 50")


def seed_place(
    request: PlacementRequest,
    inventory: Sequence[GpuSlot],
    allocations: Sequence[Allocation],
    pool: GpuPoolPolicy,
    tenants: Sequence[TenantPolicy] = (),
) -> Placement:
    """The seed's algorithm (see :class:`SeedPool`) with :func:`place`'s signature; ``tenants`` is unused."""
    pool_state = SeedPool(inventory, allocations, pool)
    slot = pool_state.select(request.model, request.memory)
    return Placement(gpu=slot, reason="seed score: cached model +50, free ratio x 50")
