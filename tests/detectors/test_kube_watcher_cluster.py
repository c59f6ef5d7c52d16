"""The Kubernetes watcher on a cluster: kmock's KubernetesEmulator over real HTTP with the real
client, two replicas electing a leader through a Lease, zones judged from Node conditions with real
node agents as the second opinion. Reports and zone failovers go to injected starters (the
guardian and ZoneFailoverWorkflow's own tests cover what happens after)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import kmock
import pytest_asyncio
from kubernetes.client import ApiClient, Configuration, CoordinationV1Api, CoreV1Api

from drctl.detectors.gpu_node_agent import NodeAgent, serve
from drctl.detectors.kube_watcher import LEASE_NAME, KubeWatcher
from drctl.detectors.leader import LeaderElector, LeaseTimings
from drctl.payloads import FailoverRequest, IncidentTicket
from drctl.policies.loader import load_policy_file
from drctl.policies.schema import DetectionPolicy
from tests.detectors.tickets import queued_ticket
from tests.platforms.kubernetes.test_platform import Emulator

NS = "drctl"
PODS = kmock.resource("", "v1", "pods")
NODES = kmock.resource("", "v1", "nodes")
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")
POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")
# The example policy's zones: az-1 = gpu-node-0 + gpu-node-3, az-2 = gpu-node-1 (both active).
NODE_ZONES = {"gpu-node-0": "az-1", "gpu-node-3": "az-1", "gpu-node-1": "az-2"}
DETECTION = DetectionPolicy(probe_interval=timedelta(milliseconds=100), unhealthy_threshold=3, healthy_threshold=1)
ZONES = POLICY.az_failover.model_copy(update={"health_check_interval": timedelta(milliseconds=100)})
LEASE = LeaseTimings(lease_duration_s=1, renew_deadline_s=0.5, retry_period_s=0.05)


def node(name: str, ready: str = "True") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": NODE_ZONES[name]}},
        "status": {"conditions": [{"type": "Ready", "status": ready}]},
    }


def pod(name: str, instance: str, role: str, node_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {
                "drctl.io/model": instance.rsplit("-", 1)[0],
                "drctl.io/role": role,
                "drctl.io/instance": instance,
                "drctl.io/serving": "true" if role == "serving" else "false",
            },
        },
        "spec": {"nodeName": node_name, "containers": [{"name": "model", "image": "x"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[Any]:
    async with Emulator() as emu, kmock.Server(emu):
        emu.resources[LEASES] = kmock.ResourceInfo()
        for name in NODE_ZONES:
            emu.objects[NODES, None, name] = node(name)
        emu.objects[PODS, NS, "llama-0-a"] = pod("llama-0-a", "llama-0", "serving", "gpu-node-0")
        emu.objects[PODS, NS, "llama-1-b"] = pod("llama-1-b", "llama-1", "hot", "gpu-node-1")
        emu.objects[PODS, NS, "mistral-0-c"] = pod("mistral-0-c", "mistral-0", "serving", "gpu-node-1")
        emu.objects[PODS, NS, "mistral-1-d"] = pod("mistral-1-d", "mistral-1", "hot", "gpu-node-3")
        yield emu


@contextmanager
def api_client(emulator: Any) -> Iterator[ApiClient]:
    with ApiClient(Configuration(host=str(emulator.url).rstrip("/"))) as client:
        yield client


@dataclass
class Guardians:
    """Stands in for Temporal: the reports and zone failovers every replica made, in order."""

    reports: list[tuple[str, str]] = field(default_factory=list)
    """(replica, instance)."""
    zones: list[tuple[str, str]] = field(default_factory=list)
    refusing: bool = False

    def starters(self, replica: str) -> tuple[Any, Any]:
        async def report(request: FailoverRequest) -> IncidentTicket:
            if self.refusing:
                raise RuntimeError("Temporal unreachable")
            joined = any(i == request.instance for _, i in self.reports)
            self.reports.append((replica, request.instance))
            return queued_ticket(request, joined)

        async def start_zone(zone: str, reason: str) -> str:
            if self.refusing:
                raise RuntimeError("Temporal unreachable")
            self.zones.append((replica, zone))
            return f"zone-failover-{zone}"

        return report, start_zone


@dataclass
class Replica:
    name: str
    watcher: KubeWatcher
    stop: asyncio.Event
    task: asyncio.Task[None]


@asynccontextmanager
async def replica(
    emulator: Any, guardians: Guardians, name: str, *, lease: bool = True, **kw: Any
) -> AsyncIterator[Replica]:
    with api_client(emulator) as client:
        report, start_zone = guardians.starters(name)
        elector = LeaderElector(CoordinationV1Api(client), NS, LEASE_NAME, name, LEASE) if lease else None
        watcher = KubeWatcher(
            CoreV1Api(client),
            NS,
            DETECTION,
            report,
            zones=ZONES,
            start_zone_failover=start_zone,
            elector=elector,
            timeout_s=60,
            backoff_s=0.05,
            read_timeout_s=0.5,
            tick_s=0.02,
            **kw,
        )
        stop = asyncio.Event()
        running = Replica(name, watcher, stop, asyncio.create_task(watcher.run(stop)))
        await wait_for(lambda: len(watcher.state.pods) == 4 and len(watcher.state.nodes) >= len(NODE_ZONES))
        try:
            yield running
        finally:
            stop.set()
            await asyncio.wait_for(running.task, timeout=5)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> float:
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout_s:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)
    return time.monotonic() - began


async def set_ready(emulator: Any, kind: str, name: str, ready: str) -> None:
    with api_client(emulator) as client:
        core = CoreV1Api(client)
        body = {"status": {"conditions": [{"type": "Ready", "status": ready}]}}
        if kind == "pod":
            await asyncio.to_thread(core.patch_namespaced_pod, name, NS, body)
        else:
            await asyncio.to_thread(core.patch_node, name, body)


def lease_holder(emulator: Any) -> str:
    return str(emulator.objects[LEASES, NS, LEASE_NAME]["spec"]["holderIdentity"])


async def test_only_the_leader_reports_and_the_standby_takes_over_what_is_still_down(emulator: Any) -> None:
    guardians = Guardians()
    async with replica(emulator, guardians, "a") as a:
        await wait_for(a.watcher.leading)
        async with replica(emulator, guardians, "b") as b:
            await wait_for(lambda: b.watcher.elector is not None and b.watcher.elector.holder == "a")
            await asyncio.sleep(0.2)  # both judge llama-0 healthy (first Ready seen)
            await set_ready(emulator, "pod", "llama-0-a", "False")
            await wait_for(lambda: guardians.reports == [("a", "llama-0")])
            # the standby judged it down too, and keeps the report for when it leads
            await wait_for(lambda: "llama-0" in b.watcher.unreported)
            await asyncio.sleep(0.3)
            assert guardians.reports == [("a", "llama-0")] and not b.watcher.leading()

            assert a.watcher.elector is not None
            a.watcher.elector.release_on_stop = False  # a dies: no release
            a.stop.set()
            await a.task
            died = time.monotonic()
            # a second failure while nobody leads: kept, not lost
            await set_ready(emulator, "pod", "mistral-0-c", "False")
            await wait_for(lambda: "mistral-0" in b.watcher.unreported)
            assert guardians.reports == [("a", "llama-0")]
            await wait_for(b.watcher.leading)
            assert time.monotonic() - died >= LEASE.lease_duration_s - LEASE.retry_period_s - 0.05
            assert lease_holder(emulator) == "b"
            # the new leader reports what is still down: llama-0 joins a's incident, mistral-0 opens one
            await wait_for(lambda: len(guardians.reports) == 3)
            assert sorted(guardians.reports[1:]) == [("b", "llama-0"), ("b", "mistral-0")]
            assert b.watcher.unreported == {}


async def test_hysteresis_on_the_cluster_a_blip_is_no_incident_a_restart_is(emulator: Any) -> None:
    guardians = Guardians()
    slow = DETECTION.model_copy(update={"probe_interval": timedelta(milliseconds=300)})
    async with replica(emulator, guardians, "a", lease=False) as a:
        a.watcher.policy = slow
        await asyncio.sleep(0.4)
        await set_ready(emulator, "pod", "llama-0-a", "False")  # look 1 ...
        await asyncio.sleep(0.3)  # ... look 2 ...
        await set_ready(emulator, "pod", "llama-0-a", "True")  # ... Ready before look 3
        await asyncio.sleep(1.0)
        assert guardians.reports == []
        began = time.monotonic()
        await set_ready(emulator, "pod", "llama-0-a", "False")
        await wait_for(lambda: guardians.reports == [("a", "llama-0")])
        assert time.monotonic() - began >= 2 * 0.3 - 0.05  # three looks, one every probeInterval
        with api_client(emulator) as client:
            status = {"name": "model", "restartCount": 1, "image": "x", "imageID": "x", "ready": True}
            body = {"status": {"containerStatuses": [status]}}
            began = time.monotonic()
            await asyncio.to_thread(CoreV1Api(client).patch_namespaced_pod, "mistral-1-d", NS, body)
        await wait_for(lambda: ("a", "mistral-1") in guardians.reports)
        assert time.monotonic() - began < 0.3  # a restart needs no more looks


async def test_a_refused_report_is_kept_until_it_gets_through(emulator: Any) -> None:
    """Caps are the fleet budget's, which delays; what the watcher must not do is drop: with
    Temporal refusing, every failure waits in the watcher and goes out once it answers."""
    guardians = Guardians(refusing=True)
    async with replica(emulator, guardians, "a", lease=False) as a:
        await asyncio.sleep(0.2)
        for name in ("llama-0-a", "llama-1-b", "mistral-0-c", "mistral-1-d"):
            await set_ready(emulator, "pod", name, "False")
        await wait_for(lambda: len(a.watcher.unreported) == 4)
        await wait_for(lambda: a.watcher.report_errors >= 3)
        guardians.refusing = False
        await wait_for(lambda: len(guardians.reports) == 4)
        assert sorted(i for _, i in guardians.reports) == ["llama-0", "llama-1", "mistral-0", "mistral-1"]


async def test_a_zone_whose_nodes_are_not_ready_is_failed_over_as_a_zone(emulator: Any) -> None:
    """Panic, the cluster's way: when every node of az-1 is NotReady its instances are not reported
    one by one: one zone failover is started, which reports them after cordoning the zone. A node
    of az-2 NotReady alone is a node: its instances are reported as usual."""
    guardians = Guardians()
    async with replica(emulator, guardians, "a") as a:
        await wait_for(a.watcher.leading)
        await asyncio.sleep(0.2)
        await set_ready(emulator, "node", "gpu-node-0", "False")
        await asyncio.sleep(0.6)  # one node of az-1: its serving pod is down, the zone is up
        assert guardians.reports == [("a", "llama-0")] and guardians.zones == []
        await set_ready(emulator, "node", "gpu-node-3", "Unknown")  # the kubelet stopped posting
        await wait_for(lambda: guardians.zones == [("a", "az-1")])
        await wait_for(lambda: any(d.action.startswith("left to zone failover") for d in a.watcher.detections))
        await asyncio.sleep(0.5)
        # mistral-1 (hot, on gpu-node-3) is the zone failover's: never reported by itself
        assert guardians.reports == [("a", "llama-0")] and guardians.zones == [("a", "az-1")]
        assert [d.instance for d in a.watcher.detections if d.action.startswith("left to")] == ["mistral-1"]
        assert a.watcher.zone_tracker.tripped == {"az-1"}


async def test_node_agents_are_the_second_opinion_on_a_zone(emulator: Any) -> None:
    """Every node of az-2 NotReady, but its node agent answers: not a zone outage (a kubelet that
    lost the API server), no zone failover; its pods are still judged one by one."""
    agent = NodeAgent("gpu-node-1", pool=POLICY.gpu_pool, interval=60)
    await agent.start()
    runner = await serve(agent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    guardians = Guardians()
    try:
        async with replica(emulator, guardians, "a", lease=False, agent_urls=[url]) as a:
            await wait_for(lambda: a.watcher.agent_up == {"gpu-node-1": True})
            await set_ready(emulator, "node", "gpu-node-1", "False")
            await wait_for(lambda: len(guardians.reports) == 2)
            assert sorted(i for _, i in guardians.reports) == ["llama-1", "mistral-0"]
            assert guardians.zones == [] and a.watcher.zone_verdicts["az-2"] == "up"
            # the agent goes silent too: now the zone is down
            await runner.cleanup()
            await wait_for(lambda: guardians.zones == [("a", "az-2")])
    finally:
        await runner.cleanup()
        await agent.aclose()


async def test_the_standby_zone_is_failed_over_as_a_zone_too(emulator: Any) -> None:
    """az-3 is the example policy's standby zone, where a zone failover moves serving: its nodes all
    NotReady fail it over as a zone, as an active zone's would (it was not checked before)."""
    assert POLICY.az_failover.standby_zone == "az-3" and "az-3" not in POLICY.az_failover.active_zones
    emulator.objects[NODES, None, "gpu-node-2"] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "gpu-node-2", "labels": {"topology.kubernetes.io/zone": "az-3"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    guardians = Guardians()
    async with replica(emulator, guardians, "a") as a:
        await wait_for(a.watcher.leading)
        await asyncio.sleep(0.2)
        await set_ready(emulator, "node", "gpu-node-2", "False")
        await wait_for(lambda: guardians.zones == [("a", "az-3")])
        assert a.watcher.zone_tracker.tripped == {"az-3"}
