"""The local platform in pooled mode (``DRCTL_INSTANCE_MODE=pooled``): a real pool process per node,
real HTTP, the platform's own calls (start, probe, fault injection, stop) and ``/proc``. No Temporal
or Envoy (the EDS files are written all the same)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from drctl.payloads import DrillScenario, DrillTarget, InjectedFault, Role
from drctl.platforms.local import pools, processes
from drctl.platforms.local.platform import LocalPlatform
from drctl.platforms.local.registry import LocalInstance
from drctl.policies.loader import load_policy_file
from drctl.settings import DrctlSettings
from drctl.workers.stack import free_ports

POLICY = """\
models:
  - name: alpha
    engine: demo
    priority: critical
    hotStandby: 1
    warmStandby: 1
    coldStandby: 1
  - name: beta
    engine: demo
    hotStandby: 1
detection:
  probeTimeout: 200ms
local:
  checkpointSize: 64KiB
"""


@dataclass
class PooledFleet:
    state_dir: Path
    settings: DrctlSettings

    def platform(self) -> LocalPlatform:
        return LocalPlatform(self.settings, load_policy_file(self.settings.policy))

    def registry(self) -> dict[str, LocalInstance]:
        return self.platform().registry.load()


@pytest.fixture()
async def fleet(tmp_path: Path) -> AsyncIterator[PooledFleet]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    instance_port, pool_port = free_ports(2)
    settings = DrctlSettings(
        policy=policy_file,
        state_dir=tmp_path / "state",
        instance_base_port=instance_port,
        instance_mode="pooled",
        instance_pool_base_port=pool_port,
    )
    made = PooledFleet(tmp_path / "state", settings)
    platform = made.platform()
    platform.ensure_fleet()
    await platform.settle_fleet()
    await platform.close()
    try:
        yield made
    finally:
        made.platform().stop_all()


def _running(fleet: PooledFleet) -> dict[str, LocalInstance]:
    return {i.id: i for i in fleet.registry().values() if i.role != Role.COLD}


async def test_a_pooled_fleet_runs_one_pool_per_node_and_probes_healthy(fleet: PooledFleet) -> None:
    platform = fleet.platform()
    running = _running(fleet)
    assert set(running) == {"alpha-0", "alpha-1", "alpha-2", "beta-0", "beta-1"}
    recorded = {p.name: p for p in platform.pools.recorded()}
    assert set(recorded) == {i.node for i in running.values()}  # one pool per node that runs instances
    for instance in running.values():
        assert instance.node is not None and instance.pid is not None
        # Its pid is a thread of its node's pool, and /proc answers for it as for a process.
        assert processes.thread_group(instance.pid) == recorded[instance.node].pid
        assert processes.runs_instance(instance.pid, instance.id)
        ok, detail = await platform.probe(instance.to_instance())
        assert ok, (instance.id, detail)
    ports = {i.port for i in running.values()}
    assert len(ports) == len(running)
    await platform.close()


async def test_the_platform_kills_hangs_and_stops_one_pooled_instance(fleet: PooledFleet) -> None:
    platform = fleet.platform()
    running = _running(fleet)
    serving, hot = running["alpha-0"], running["alpha-1"]
    injector = platform.fault_injector()
    times = {"policy_rto_ms": 1, "sla_detection_ms": 1, "sla_switch_ms": 1, "sla_rto_ms": 1}

    # A pod crash of the serving instance: its pid is gone, its siblings (same pool or not) answer.
    crash = InjectedFault(injected_at=datetime.now(UTC))
    await injector.inject(
        DrillTarget(scenario=DrillScenario.POD_CRASH, model="alpha", instance=serving.id, **times), crash
    )
    assert "pooled instance alpha-0" in crash.detail
    assert not processes.is_alive(serving.pid)
    ok, detail = await platform.probe(serving.to_instance())
    assert not ok and detail == f"process {serving.pid} is not running"
    for sibling in ("alpha-1", "beta-0", "beta-1"):
        assert (await platform.probe(running[sibling].to_instance()))[0], sibling
    assert all(processes.is_alive(p.pid) for p in platform.pools.recorded())

    # A node down hangs the node's instances (the pool process itself keeps answering its control
    # endpoint), restoring resumes them.
    node = hot.node
    assert node is not None
    down = InjectedFault(injected_at=datetime.now(UTC))
    target = DrillTarget(scenario=DrillScenario.NODE_DOWN, model="alpha", instance=hot.id, node=node, **times)
    await injector.inject(target, down)
    on_node = [i for i in running.values() if i.node == node and processes.is_alive(i.pid)]
    assert sorted(down.stopped_pids) == sorted(i.pid or 0 for i in on_node)
    ok, detail = await platform.probe(hot.to_instance())
    assert not ok and "unreachable" in detail
    assert processes.is_alive(hot.pid)  # hung, not gone
    others = [i for i in running.values() if i.node != node and processes.is_alive(i.pid)]
    assert others
    for other in others:
        assert (await platform.probe(other.to_instance()))[0], other.id
    await injector.restore(down)
    assert (await platform.probe(hot.to_instance()))[0]

    # Stopping one instance (as ejection and deletion do) ends it alone.
    assert processes.terminate(hot.pid, grace_s=2.0)
    assert not processes.is_alive(hot.pid)
    assert all(processes.is_alive(i.pid) for i in others)
    await platform.close()


async def test_promotion_starts_in_the_pool_and_stop_all_ends_the_pools(fleet: PooledFleet) -> None:
    platform = fleet.platform()
    cold = fleet.registry()["alpha-3"]
    said = await platform.promote(cold.to_instance())
    started = fleet.registry()["alpha-3"]
    assert started.pid is not None and f"pid {started.pid}" in said
    assert processes.pool_control_port(started.pid) is not None  # a thread of a pool
    await platform.wait_loaded(started.to_instance(), lambda _f, _s: None)

    # A second platform on the same state folder (the next worker) adopts the running pools.
    before = {p.name: p.pid for p in platform.pools.recorded()}
    again = fleet.platform()
    assert {name: again.pools.ensure(name).pid for name in before} == before
    said_lines: list[str] = []
    again.ensure_fleet(said_lines.append)
    assert any(line.startswith("adopted alpha-0") for line in said_lines), said_lines

    pids = [i.pid for i in _running(fleet).values()]
    assert platform.stop_all() == len(pids)
    assert not any(processes.is_alive(pid) for pid in pids)
    assert platform.pools.recorded() == []
    assert not any(processes.is_alive(pid) for pid in before.values())
    assert all(i.pid is None for i in _running(fleet).values())

    # The next start starts new pools and the instances in them.
    restart: list[str] = []
    again.ensure_fleet(restart.append)
    await again.settle_fleet()
    for instance in _running(fleet).values():
        assert processes.pool_control_port(instance.pid) is not None
        assert (await again.probe(instance.to_instance()))[0], instance.id
    await platform.close()
    await again.close()


def test_only_the_demo_server_command_is_pooled() -> None:
    demo = ["/usr/bin/python3", "-m", "drctl.sim.inference_server", "--model", "m", "--port", "1"]
    assert pools.demo_server_args(demo) == ["--model", "m", "--port", "1"]
    assert pools.demo_server_args(["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server"]) is None
    assert pools.with_port(["--port", "1", "--host", "h"], 7) == ["--port", "7", "--host", "h"]


async def test_a_kill_on_a_stopped_node_fences_its_pool_at_once_and_no_second_pool_starts(
    fleet: PooledFleet,
) -> None:
    """A zone outage stops a node's pool (SIGSTOP): deleting one of its instances must not wait for
    the node to come back (reconcile deletes a zone's instances one by one), and no second pool may
    start beside the stopped one (nobody would stop it)."""
    running = _running(fleet)
    victim = next(i for i in running.values() if i.pid is not None)
    group = processes.thread_group(victim.pid)
    assert group is not None and group != victim.pid
    node_pools = pools.InstancePools(fleet.platform().layout, fleet.settings.instance_pool_base_port)
    pool = next(p for p in node_pools.recorded() if p.pid == group)
    os.kill(group, signal.SIGSTOP)
    try:
        with pytest.raises(RuntimeError, match="looks hung"):
            node_pools.ensure(pool.name)
        began = time.monotonic()
        assert processes.terminate(victim.pid, grace_s=5.0)
        assert time.monotonic() - began < 2.0
        assert not processes.is_alive(group)
        assert not processes.is_alive(victim.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(group, signal.SIGCONT)


async def test_a_kill_fences_a_stopped_pool_at_once_even_while_the_thread_still_reads_as_running(
    fleet: PooledFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The threads of a just-SIGSTOPped pool enter the stopped state one by one: the instance's
    thread may still read as running when its pool reads as stopped (seen once in CI: the kill
    sent SIGTERM, which a stopped pool cannot act out, and waited its 5 s grace)."""
    victim = next(i for i in _running(fleet).values() if i.pid is not None)
    group = processes.thread_group(victim.pid)
    assert group is not None and group != victim.pid
    stopped = processes.is_stopped
    monkeypatch.setattr(processes, "is_stopped", lambda pid: pid != victim.pid and stopped(pid))
    os.kill(group, signal.SIGSTOP)
    try:
        for _ in range(500):  # until the pool reads as stopped, as a zone stopped a while ago
            if stopped(group):
                break
            await asyncio.sleep(0.01)
        began = time.monotonic()
        assert processes.terminate(victim.pid, grace_s=5.0)
        assert time.monotonic() - began < 2.0
        assert not processes.is_alive(group)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(group, signal.SIGCONT)


async def test_a_pool_too_busy_to_answer_gets_no_second_pool_beside_it(
    fleet: PooledFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running pool that does not answer its health check in time (at 2,000 instances one ran at
    200 % CPU) is not replaced: a second pool would take over its record, and the first, with every
    instance it serves, would run on after the stack stopped."""
    node_pools = pools.InstancePools(fleet.platform().layout, fleet.settings.instance_pool_base_port)
    pool = node_pools.recorded()[0]
    monkeypatch.setattr(pools, "_answers", lambda _pool: False)
    with pytest.raises(RuntimeError, match="not starting a second pool"):
        node_pools.ensure(pool.name)
    assert [p.pid for p in node_pools.recorded() if p.name == pool.name] == [pool.pid]
    assert processes.is_alive(pool.pid)


async def test_the_gpus_of_a_node_whose_pool_is_stopped_are_hung_until_it_resumes(fleet: PooledFleet) -> None:
    """Placement's view of a hung node (``SeesHungNodes``): every GPU of the node whose pool is
    SIGSTOPped, read from ``/proc`` at each look and never recorded (not a cordon)."""
    platform = fleet.platform()
    victim = next(i for i in _running(fleet).values() if i.pid is not None)
    group = processes.thread_group(victim.pid)
    assert group is not None and victim.node is not None
    node = next(n for n in platform.policy.gpu_pool.nodes if n.name == victim.node)
    assert await platform.hung_gpus() == []
    os.kill(group, signal.SIGSTOP)
    try:
        for _ in range(500):
            if processes.is_stopped(group):
                break
            await asyncio.sleep(0.01)
        assert await platform.hung_gpus() == [f"{node.name}/{n}" for n in range(node.gpus)]
        assert await platform.cordoned_gpus() == []
    finally:
        os.kill(group, signal.SIGCONT)
    for _ in range(500):
        if not processes.is_stopped(group):
            break
        await asyncio.sleep(0.01)
    assert await platform.hung_gpus() == []
    await platform.close()
