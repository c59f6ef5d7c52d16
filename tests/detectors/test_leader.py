"""Leader election through a coordination.k8s.io/v1 Lease: the pure decisions, then candidates
against kmock's KubernetesEmulator over real HTTP with the real client (the emulator of
tests/platforms/kubernetes, which sets resourceVersions and refuses a stale write with 409)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import kmock
import pytest
import pytest_asyncio
from kubernetes.client import ApiClient, Configuration, CoordinationV1Api

from drctl.detectors.leader import (
    LeaderElector,
    LeaseRecord,
    LeaseTimings,
    expired,
    lease_body,
    next_record,
)
from tests.platforms.kubernetes.test_platform import Emulator

NS = "drctl"
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")
FAST = LeaseTimings(lease_duration_s=1, renew_deadline_s=0.5, retry_period_s=0.05)
T0 = datetime(2026, 12, 1, tzinfo=UTC)
T1 = datetime(2026, 12, 1, 0, 0, 5, tzinfo=UTC)


# -- pure -------------------------------------------------------------------------------------------


def test_timings_keep_the_holder_stopping_before_anyone_may_take_over() -> None:
    LeaseTimings()
    with pytest.raises(ValueError):
        LeaseTimings(lease_duration_s=10, renew_deadline_s=10, retry_period_s=2)
    with pytest.raises(ValueError):
        LeaseTimings(lease_duration_s=15, renew_deadline_s=10, retry_period_s=10)
    with pytest.raises(ValueError):
        LeaseTimings(lease_duration_s=0, renew_deadline_s=0.5, retry_period_s=0.1)


def test_expiry_is_measured_on_the_candidates_own_clock_from_when_it_saw_a_change() -> None:
    held = LeaseRecord("a", 15, T0, T0, 0, "7")
    assert not expired(held, observed_at=100.0, now=114.9)
    assert expired(held, observed_at=100.0, now=115.0)
    assert expired(LeaseRecord("", 15, T0, T0, 0, "7"), observed_at=100.0, now=100.0)  # released


def test_renewing_keeps_the_term_taking_over_starts_a_new_one() -> None:
    assert next_record(None, "a", 15, T0) == LeaseRecord("a", 15, T0, T0, 0, None)
    mine = LeaseRecord("a", 15, T0, T0, 3, "7")
    assert next_record(mine, "a", 15, T1) == LeaseRecord("a", 15, T0, T1, 3, "7")
    assert next_record(mine, "b", 15, T1) == LeaseRecord("b", 15, T1, T1, 4, "7")
    released = LeaseRecord("", 1, None, None, 3, "8")
    assert next_record(released, "b", 15, T1).transitions == 4  # after a release: a new term too
    body = lease_body("x", next_record(mine, "a", 15, T1))
    assert body["metadata"] == {"name": "x", "resourceVersion": "7"}  # the write's precondition
    assert body["spec"]["renewTime"] == "2026-12-01T00:00:05.000000Z"


# -- against the emulator ------------------------------------------------------------------------


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[Any]:
    async with Emulator() as emu, kmock.Server(emu):
        emu.resources[LEASES] = kmock.ResourceInfo()
        yield emu


@pytest_asyncio.fixture()
async def api(emulator: Any) -> AsyncIterator[CoordinationV1Api]:
    with ApiClient(Configuration(host=str(emulator.url).rstrip("/"))) as client:
        yield CoordinationV1Api(client)


def candidate(api: CoordinationV1Api, name: str, **kw: Any) -> LeaderElector:
    return LeaderElector(api, NS, "drctl-kube-watcher", name, FAST, **kw)


def lease(emulator: Any) -> dict[str, Any]:
    return dict(emulator.objects[LEASES, NS, "drctl-kube-watcher"]["spec"])


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> float:
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout_s:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)
    return time.monotonic() - began


async def test_one_candidate_acquires_the_other_waits_then_takes_over_after_expiry(
    emulator: Any, api: CoordinationV1Api
) -> None:
    a, b = candidate(api, "a", release_on_stop=False), candidate(api, "b")
    assert await a.try_acquire_or_renew() and a.leading()
    assert lease(emulator)["holderIdentity"] == "a" and lease(emulator)["leaseTransitions"] == 0
    assert not await b.try_acquire_or_renew() and not b.leading() and b.holder == "a"
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    run_a = asyncio.create_task(a.run(stop_a))
    run_b = asyncio.create_task(b.run(stop_b))
    try:
        await asyncio.sleep(3 * FAST.lease_duration_s)  # a renews all along: b never takes over
        assert a.leading() and not b.leading() and b.changes == []
        renewed = lease(emulator)["renewTime"]
        stop_a.set()  # a dies without releasing
        await run_a
        died = time.monotonic()
        await wait_for(b.leading)
        took = time.monotonic() - died
        # b waited for the lease to expire on its own clock, and no longer than a few retries more
        assert FAST.lease_duration_s - FAST.retry_period_s - 0.05 <= took <= FAST.lease_duration_s + 0.5
        spec = lease(emulator)
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1 and spec["renewTime"] != renewed
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(run_a, run_b)
    # b released its lease when it stopped cleanly: a new candidate acquires at once
    assert lease(emulator)["holderIdentity"] == ""
    c = candidate(api, "c")
    assert await c.try_acquire_or_renew() and lease(emulator)["leaseTransitions"] == 2


async def test_a_clean_stop_hands_over_at_the_next_retry(emulator: Any, api: CoordinationV1Api) -> None:
    a, b = candidate(api, "a"), candidate(api, "b")
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    run_a = asyncio.create_task(a.run(stop_a))
    await wait_for(a.leading)
    run_b = asyncio.create_task(b.run(stop_b))
    await asyncio.sleep(0.2)
    stop_a.set()
    await run_a
    assert await wait_for(b.leading) < FAST.lease_duration_s / 2  # no wait for the expiry
    stop_b.set()
    await run_b


async def test_the_leader_stops_leading_when_it_cannot_renew_within_the_deadline(
    emulator: Any, api: CoordinationV1Api
) -> None:
    a = candidate(api, "a")
    stop = asyncio.Event()
    run = asyncio.create_task(a.run(stop))
    try:
        await wait_for(a.leading)
        # The API server refuses its renewals (20 of them: about 1 s at one per 50 ms)
        emulator["patch", LEASES][:20] << kmock.KubernetesError(status=500, reason="InternalError", message="etcd")
        # (kmock still applies a write it answers with an error: only the holder's view matters here)
        lost = await wait_for(lambda: len(a.changes) == 2)
        assert lost <= FAST.renew_deadline_s + 0.2 and not a.leading()
        assert [leading for _, leading in a.changes] == [True, False]
        # ... then lets them through again: it holds the lease still, and leads again
        await wait_for(a.leading)
        assert [leading for _, leading in a.changes] == [True, False, True] and a.errors >= 1
        assert lease(emulator)["leaseTransitions"] == 0  # the same term
    finally:
        stop.set()
        await run


async def test_the_leader_stops_at_once_when_it_sees_another_holder(emulator: Any, api: CoordinationV1Api) -> None:
    a = candidate(api, "a")
    stop = asyncio.Event()
    run = asyncio.create_task(a.run(stop))
    try:
        await wait_for(a.leading)
        await asyncio.to_thread(
            api.patch_namespaced_lease,
            "drctl-kube-watcher",
            NS,
            {"spec": {"holderIdentity": "intruder", "renewTime": "2026-12-01T00:00:00.000000Z"}},
        )
        assert await wait_for(lambda: not a.leading()) < FAST.renew_deadline_s
    finally:
        stop.set()
        await run


async def test_two_candidates_racing_for_a_free_lease_one_wins(emulator: Any, api: CoordinationV1Api) -> None:
    candidates = [candidate(api, name) for name in "abcd"]
    results = await asyncio.gather(*(c.try_acquire_or_renew() for c in candidates))
    assert sum(results) == 1  # create: one 201, the rest 409
    winner = candidates[results.index(True)].identity
    assert lease(emulator)["holderIdentity"] == winner
    # renewals of the others, with the resourceVersion they read, are refused as well
    assert not any(await asyncio.gather(*(c.try_acquire_or_renew() for c in candidates if c.identity != winner)))
