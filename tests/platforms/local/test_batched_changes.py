"""The local platform's batched changes (``create_instances``, ``delete_instances``): many creates or
deletes with two registry writes and one EDS write per model, each change fenced and failing on
its own. Real pooled instances and real HTTP; no Temporal or Envoy (the EDS files are written)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError

from drctl.payloads import ErrorType, Instance, ReconcileAction, ReconcileActionKind, Role
from drctl.platforms.base import BatchedChanges
from drctl.platforms.local import envoy, processes
from drctl.platforms.local.platform import LocalPlatform
from tests.platforms.local.test_pooled_instances import POLICY, PooledFleet, fleet  # noqa: F401

WRITES = "writes"


def counted(platform: LocalPlatform, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often ``platform`` writes its registry, and each model's EDS file, from now on."""
    count: Counter[str] = Counter()
    write, sync = platform.registry._write, platform.sync_load_balancer

    def counted_write(*args: Any) -> None:
        count[WRITES] += 1
        write(*args)

    def counted_sync(model: str) -> None:
        count[model] += 1
        sync(model)

    monkeypatch.setattr(platform.registry, "_write", counted_write)
    monkeypatch.setattr(platform, "sync_load_balancer", counted_sync)
    return count


def action(
    kind: ReconcileActionKind, instance: str, tier: Role, near: Instance, epoch: int | None = None
) -> ReconcileAction:
    return ReconcileAction(
        kind=kind,
        model=instance.rsplit("-", 1)[0],
        instance=instance,
        tier=tier,
        gpu=near.gpu,
        node=near.node,
        zone=near.zone,
        epoch=epoch,
    )


@pytest.fixture()
async def platform(fleet: PooledFleet) -> AsyncIterator[LocalPlatform]:  # noqa: F811
    made = fleet.platform()
    try:
        yield made
    finally:
        await made.close()


async def test_a_batch_of_creates_writes_the_registry_twice_and_one_refused_change_fails_alone(
    platform: LocalPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(platform, BatchedChanges)
    near = platform.registry.load()["alpha-0"].to_instance()
    await platform.claim_epoch("beta")  # beta's epoch is 1 now: a create at 0 is stale
    count = counted(platform, monkeypatch)
    create = ReconcileActionKind.CREATE
    actions = [
        action(create, "alpha-9", Role.HOT, near),
        action(create, "beta-9", Role.HOT, near, epoch=0),
        action(create, "alpha-8", Role.WARM, near),
        action(create, "alpha-7", Role.COLD, near),
        action(create, "gamma-1", Role.HOT, near),
        action(create, "beta-8", Role.HOT, near, epoch=1),
    ]
    results = dict(
        zip([a.instance for a in actions], await platform.create_instances(actions, lambda *_: None, 4), strict=True)
    )

    assert isinstance(results["alpha-9"], str) and results["alpha-9"].startswith("hot alpha-9 on ")
    assert isinstance(results["beta-8"], str) and results["beta-8"].startswith("hot beta-8 on ")
    assert isinstance(results["alpha-8"], str) and results["alpha-8"].startswith("warm alpha-8 on ")
    assert results["alpha-7"] == f"cold standby reserved on {near.gpu} (checkpoint only, no process)"
    stale, unknown = results["beta-9"], results["gamma-1"]
    assert isinstance(stale, ApplicationError) and stale.type == ErrorType.STALE_EPOCH
    assert isinstance(unknown, ApplicationError) and unknown.type == ErrorType.UNKNOWN_MODEL
    assert count == {WRITES: 2, "alpha": 1, "beta": 1}  # not two writes and an EDS write per create

    now = platform.registry.load()
    assert "beta-9" not in now and "gamma-1" not in now
    assert (now["alpha-9"].role, now["alpha-9"].lb_priority) == (Role.HOT, 1)
    assert (now["alpha-8"].role, now["alpha-8"].lb_priority) == (Role.WARM, None)
    assert now["alpha-7"].role == Role.COLD and now["alpha-7"].pid is None
    for made in ("alpha-9", "beta-8"):
        assert now[made].created_at is not None
        assert (await platform.probe(now[made].to_instance()))[0], made
    eds = envoy.eds_file(platform.layout.eds_dir, "alpha").read_text()
    assert str(now["alpha-9"].port) in eds and str(now["alpha-8"].port) not in eds

    # Made again (a retried batch): nothing new, nothing written but the two edits.
    again = await platform.create_instances(actions[:1], lambda *_: None, 4)
    assert again == ["already hot"]
    assert platform.registry.load()["alpha-9"].pid == now["alpha-9"].pid


async def test_a_batch_loads_at_most_loads_per_node_on_one_node(
    platform: LocalPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    near = platform.registry.load()["alpha-0"].to_instance()
    loading: Counter[str | None] = Counter()
    peak: Counter[str | None] = Counter()
    wait_loaded = platform.wait_loaded

    async def watched(instance: Instance, progress: Any) -> str:
        loading[instance.node] += 1
        peak[instance.node] = max(peak[instance.node], loading[instance.node])
        try:
            await asyncio.sleep(0.05)
            return await wait_loaded(instance, progress)
        finally:
            loading[instance.node] -= 1

    monkeypatch.setattr(platform, "wait_loaded", watched)
    actions = [action(ReconcileActionKind.CREATE, f"alpha-{n}", Role.HOT, near) for n in range(10, 15)]
    results = await platform.create_instances(actions, lambda *_: None, loads_per_node=2)
    assert all(isinstance(r, str) and r.startswith("hot ") for r in results), results
    assert peak == {near.node: 2}


async def test_a_batch_of_deletes_stops_and_forgets_each_and_fences_each_on_its_own(
    platform: LocalPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = platform.registry.load()
    near = before["alpha-0"].to_instance()
    epoch = await platform.claim_epoch("beta")
    count = counted(platform, monkeypatch)
    delete = ReconcileActionKind.DELETE
    actions = [
        action(delete, "alpha-1", Role.HOT, near),
        action(delete, "beta-1", Role.HOT, near, epoch=epoch - 1),
        action(delete, "alpha-404", Role.HOT, near),
        action(delete, "alpha-2", Role.WARM, near),
    ]
    results = await platform.delete_instances(actions)

    assert results[0] == "alpha-1 deleted (process stopped)" and results[3] == "alpha-2 deleted (process stopped)"
    assert results[2] == "already gone"
    assert isinstance(results[1], ApplicationError) and results[1].type == ErrorType.STALE_EPOCH
    assert count == {WRITES: 2, "alpha": 1}
    now = platform.registry.load()
    assert "alpha-1" not in now and "alpha-2" not in now and now["beta-1"] == before["beta-1"]
    assert not processes.is_alive(before["alpha-1"].pid) and not processes.is_alive(before["alpha-2"].pid)
    assert processes.is_alive(before["beta-1"].pid)
    assert str(before["alpha-1"].port) not in envoy.eds_file(platform.layout.eds_dir, "alpha").read_text()
