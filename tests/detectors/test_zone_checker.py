"""The zone health check against real node agents (no NVML: GPUs from the policy) over HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from drctl.detectors.gpu_node_agent import NodeAgent, serve
from drctl.detectors.zone_checker import ALARM_AGENT_TIMEOUT_S, ZoneChecker
from drctl.platforms import node_agents
from drctl.policies.loader import load_policy_file
from drctl.policies.zone_health import ZoneVerdict

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")
# The example policy: az-1 = gpu-node-0 + gpu-node-3, az-2 = gpu-node-1, az-3 (standby) = gpu-node-2.


async def start_agent(node: str) -> tuple[NodeAgent, web.AppRunner, str]:
    agent = NodeAgent(node, pool=POLICY.gpu_pool, interval=60)
    await agent.start()
    runner = await serve(agent, "127.0.0.1", 0)
    return agent, runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_zone_fails_over_after_threshold_checks_with_every_node_silent() -> None:
    agents = {node: await start_agent(node) for node in ("gpu-node-0", "gpu-node-3", "gpu-node-1")}
    started: list[tuple[str, str]] = []

    async def start(zone: str, reason: str) -> str:
        started.append((zone, reason))
        return f"zone-failover-{zone}"

    checker = ZoneChecker(POLICY, [url for _, _, url in agents.values()], start)
    try:
        async with httpx.AsyncClient() as http:
            # az-3 (the standby zone) is checked too; no agent of its node has answered yet.
            assert await checker.check_once(http) == {
                "az-1": ZoneVerdict.UP,
                "az-2": ZoneVerdict.UP,
                "az-3": ZoneVerdict.UNKNOWN,
            }
            # One node of az-1 gone: the zone still answers (a node is the instance runbooks' job).
            await agents["gpu-node-0"][1].cleanup()
            assert (await checker.check_once(http))["az-1"] == ZoneVerdict.UP
            await agents["gpu-node-3"][1].cleanup()
            threshold = POLICY.az_failover.failover_threshold
            for check in range(threshold + 2):
                verdicts = await checker.check_once(http)
                assert verdicts == {"az-1": ZoneVerdict.DOWN, "az-2": ZoneVerdict.UP, "az-3": ZoneVerdict.UNKNOWN}
                assert len(started) == (0 if check < threshold - 1 else 1)
            assert started[0][0] == "az-1" and f"{threshold} failed checks" in started[0][1]
            assert checker.started == [("az-1", "zone-failover-az-1")]
    finally:
        for agent, runner, _ in agents.values():
            await runner.cleanup()
            await agent.aclose()


async def test_the_standby_zone_is_checked_too() -> None:
    """After an active zone's failover serving runs in the standby zone (az-3): when that zone goes
    silent it fails over like an active one, instead of failing instance by instance behind the
    budget's per-zone cap."""
    agent, runner, url = await start_agent("gpu-node-2")
    started: list[str] = []

    async def start(zone: str, reason: str) -> str:
        started.append(zone)
        return f"zone-failover-{zone}"

    assert POLICY.az_failover.standby_zone == "az-3" and "az-3" not in POLICY.az_failover.active_zones
    assert POLICY.checked_zones == ["az-1", "az-2", "az-3"]
    checker = ZoneChecker(POLICY, [url], start)
    try:
        async with httpx.AsyncClient() as http:
            assert (await checker.check_once(http))["az-3"] == ZoneVerdict.UP
            await runner.cleanup()
            for _ in range(POLICY.az_failover.failover_threshold):
                assert (await checker.check_once(http))["az-3"] == ZoneVerdict.DOWN
            assert started == ["az-3"]
    finally:
        await runner.cleanup()
        await agent.aclose()


@pytest.mark.parametrize("urls", [[], ["http://127.0.0.1:9"]])
async def test_agents_never_seen_give_no_verdict_and_start_nothing(urls: list[str]) -> None:
    async def start(zone: str, reason: str) -> str:
        raise AssertionError("no zone failover without evidence")

    checker = ZoneChecker(POLICY, urls, start)
    async with httpx.AsyncClient() as http:
        for _ in range(5):
            assert set((await checker.check_once(http)).values()) == {ZoneVerdict.UNKNOWN}


async def test_an_agent_that_vanishes_from_the_service_still_counts_against_its_node() -> None:
    """A headless Service drops a dead node's agent from DNS; the checker keeps asking it."""
    agent, runner, url = await start_agent("gpu-node-1")  # az-2's only node
    started: list[str] = []

    async def start(zone: str, reason: str) -> str:
        started.append(zone)
        return f"zone-failover-{zone}"

    urls = [url]
    checker = ZoneChecker(POLICY, urls, start)
    try:
        async with httpx.AsyncClient() as http:
            assert (await checker.check_once(http))["az-2"] == ZoneVerdict.UP
            urls.clear()  # gone from the Service's addresses
            await runner.cleanup()
            for _ in range(POLICY.az_failover.failover_threshold):
                assert (await checker.check_once(http))["az-2"] == ZoneVerdict.DOWN
            assert started == ["az-2"]
    finally:
        await runner.cleanup()
        await agent.aclose()


@pytest.mark.parametrize("confirm", [True, False])
async def test_a_zone_whose_instances_are_all_down_too_fails_over_at_its_first_failed_check(confirm: bool) -> None:
    """Every node of az-2 silent *and* every instance the prober watches there down: two signals
    agree, so the first failed check starts the zone failover (``confirmFromInstances``); with it
    off, or while an instance still answers, the threshold applies."""
    policy = POLICY.model_copy(
        update={"az_failover": POLICY.az_failover.model_copy(update={"confirm_from_instances": confirm})}
    )
    agent, runner, url = await start_agent("gpu-node-1")  # az-2's only node
    started: list[tuple[str, str]] = []
    all_down = {"az-2": False}

    async def start(zone: str, reason: str) -> str:
        started.append((zone, reason))
        return f"zone-failover-{zone}"

    checker = ZoneChecker(policy, [url], start, instances_down=lambda zone: all_down.get(zone, False))
    try:
        async with httpx.AsyncClient() as http:
            assert (await checker.check_once(http))["az-2"] == ZoneVerdict.UP
            await runner.cleanup()
            assert (await checker.check_once(http))["az-2"] == ZoneVerdict.DOWN
            assert started == []  # an instance still up: no corroboration
            all_down["az-2"] = True
            await checker.check_once(http)
            if confirm:
                assert started == [
                    ("az-2", "zone health check: no node of az-2 answers and every instance there is down")
                ]
            else:
                assert started == []
                await checker.check_once(http)  # the third failed check
                assert [zone for zone, _ in started] == ["az-2"]
    finally:
        await runner.cleanup()
        await agent.aclose()


async def test_the_prober_s_alarm_makes_the_check_run_at_once() -> None:
    """``wake`` cuts the wait until the next interval (10 s in the example policy)."""
    agent, runner, url = await start_agent("gpu-node-1")
    started: list[str] = []

    async def start(zone: str, reason: str) -> str:
        started.append(zone)
        return zone

    checker = ZoneChecker(POLICY, [url], start, instances_down=lambda zone: zone == "az-2")
    stop = asyncio.Event()
    task = asyncio.create_task(checker.run(stop))
    try:
        for _ in range(100):
            if checker.checks:
                break
            await asyncio.sleep(0.02)
        await runner.cleanup()
        began = time.monotonic()
        checker.wake.set()
        for _ in range(100):
            if started:
                break
            await asyncio.sleep(0.02)
        assert started == ["az-2"] and time.monotonic() - began < 2.0
    finally:
        stop.set()
        await task
        await agent.aclose()


async def test_a_check_the_alarm_asked_for_waits_less_for_silent_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGSTOPped agent takes the connection and never answers: the regular check waits its full
    timeout for it; the check the prober's alarm asked for (every instance of the zone down) waits
    ``ALARM_AGENT_TIMEOUT_S``, and the two signals together still fail the zone over at once."""
    waits: list[float] = []

    async def silent(http: httpx.AsyncClient, url: str, wait_s: float) -> str | None:
        waits.append(wait_s)
        return None

    started: list[str] = []

    async def start(zone: str, reason: str) -> str:
        started.append(zone)
        return zone

    checker = ZoneChecker(POLICY, [], start, instances_down=lambda zone: zone == "az-1")
    checker.node_of = {"http://10.0.0.1:9400": "gpu-node-0", "http://10.0.0.2:9400": "gpu-node-3"}
    monkeypatch.setattr(node_agents, "agent_node", silent)
    async with httpx.AsyncClient() as http:
        await checker.check_once(http)
        regular, waits[:] = list(waits), []
        await checker.check_once(http, alarmed=True)
    interval = POLICY.az_failover.health_check_interval.total_seconds()
    assert regular == [min(2.0, interval / 2)] * 2
    assert waits == [ALARM_AGENT_TIMEOUT_S] * 2
    assert started == ["az-1"]  # at the first check: corroborated by the instances
