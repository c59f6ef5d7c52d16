"""The seed's scheduler, the placement benchmark's reference, behaves as the seed describes."""

from __future__ import annotations

import pytest

from bench.seed_scheduler import seed_place
from drctl.policies.placement import PlacementError, gpu_inventory
from tests.policies.test_placement import alloc, pool_of, req


def test_seed_algorithm_reference() -> None:
    pool = pool_of(("a", "az-1", 2, 80), ratio=1.5)
    inventory = gpu_inventory(pool)
    # Emptiest GPU first (free ratio), first one on a tie.
    assert seed_place(req("m-1", 16), inventory, [], pool).gpu.id == "a/0"
    assert seed_place(req("m-1", 16), inventory, [alloc("x", "a/0", 8)], pool).gpu.id == "a/1"
    # +50 for a copy of the model beats any free ratio.
    assert seed_place(req("m-1", 16), inventory, [alloc("x", "a/0", 60, model="m")], pool).gpu.id == "a/0"
    # No per-GPU overcommit in the seed: 70 + 16 > 80 skips the GPU even for a cold reservation.
    state = [alloc("x", "a/0", 70), alloc("y", "a/1", 70)]
    with pytest.raises(PlacementError, match="no suitable GPU"):
        seed_place(req("m-1", 16, "cold"), inventory, state, pool)
    # The global check uses the ratio: 160 x 1.5 = 240 GiB.
    state = [alloc("x", "gone/0", 230)]
    with pytest.raises(PlacementError, match="insufficient memory"):
        seed_place(req("m-1", 16), inventory, state, pool)
