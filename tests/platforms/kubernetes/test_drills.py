"""Drills on the Kubernetes platform, against kmock's KubernetesEmulator with the real ``kubernetes``
client over HTTP: each scenario's fault injected through the platform's own ``fault_injector()``,
its effect on the emulated cluster (and on the watcher, which must see it), restored to the cluster
as it was, restore again changing nothing; the refusals (no opt-in, weights only in the read-only
model store, no node agents, an engine that cannot reload); the verbs the injector calls are exactly
those it declares (and ``deploy/kubernetes/drills`` grants); and one pod-crash drill end to end
through ``DrillWorkflow`` on a real worker.

The emulator has no kubelet, scheduler or node controllers: ``Controllers``
(tests/platforms/kubernetes/cluster.py) plays the Deployment controller and a kubelet, and
``NodeLifecycle`` here plays what a cluster does about a Node a drill takes down (pods on a NotReady
node not Ready, pods evicted by a ``NoExecute`` taint, new pods kept off a cordoned node).

**What is faked for model corruption.** The emulator has no ``pods/exec`` and there is no container
runtime here. ``ExecEmulator`` (cluster.py) adds the API server's exec endpoint, and behind it only
a stand-in for the container: ``PodShells`` runs the exec'd command with this machine's ``sh`` in a
temporary directory per pod that plays the container's filesystem (``weights_image`` fills it with
llama's weights and checksum sidecar at ``/models/llama``; a pod made later gets a fresh one, as
re-fetched weights would be). Everything on the drctl side is real: the ``kubernetes`` client's
``stream`` and WebSocket client, the channel protocol, the exit status, a 403 or 404 at the
handshake, and the scripts themselves (``find``, ``readlink``, ``dd``, ``od`` on real files). The
serving pod's model server is the demo inference server loading that very file, so its own sha256
check is what catches the corruption. Not shown: a real container (its image's tools, a read-only
root filesystem, user ids), a real kubelet's exec, or real vLLM failing to reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import kmock
import pytest
import pytest_asyncio
import yaml
from kubernetes.client import (
    ApiClient,
    Configuration,
    CoreV1Api,
    V1Container,
    V1EmptyDirVolumeSource,
    V1HostPathVolumeSource,
    V1ObjectMeta,
    V1Pod,
    V1PodSpec,
    V1SecurityContext,
    V1Volume,
    V1VolumeMount,
)
from kubernetes.client.exceptions import ApiException
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from drctl.activities.drill import DrillActivities
from drctl.activities.failover import FailoverActivities
from drctl.activities.incidents import IncidentActivities
from drctl.activities.reconcile import ReconcileActivities
from drctl.activities.zone_switch import ZoneSwitchActivities
from drctl.detectors.gpu_node_agent import NodeAgent, serve
from drctl.detectors.kube_watcher import KubeWatcher
from drctl.payloads import (
    DrillReport,
    DrillRequest,
    DrillScenario,
    DrillTarget,
    ErrorType,
    FailoverRequest,
    IncidentTicket,
    InjectedFault,
    PodCorruption,
    Role,
)
from drctl.platforms.kubernetes import model_faults, node_faults
from drctl.platforms.kubernetes.faults import FAULT_PERMISSIONS, KubernetesFaultInjector
from drctl.platforms.kubernetes.platform import PERMISSION_DENIED, KubernetesPlatform, permission_denied
from drctl.platforms.kubernetes.templates import InstanceTemplate
from drctl.platforms.local.checkpoints import CHECKSUM_MISMATCH, ensure_checkpoint
from drctl.policies.drills import choose_target
from drctl.policies.engines import Engine
from drctl.policies.reconcile import plan_reconcile
from drctl.policies.schema import DetectionPolicy, DRPolicy
from drctl.settings import DrctlSettings
from drctl.temporal.runbooks import report_failover
from drctl.temporal.schedules import ensure_reconcile_schedule
from drctl.workers.runbook_worker import WORKFLOWS
from drctl.workflows.drill import DrillWorkflow
from tests.detectors.tickets import queued_ticket
from tests.dev_server import dev_server
from tests.platforms.kubernetes.cluster import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NODES,
    PODS,
    SERVICES,
    VERSIONS,
    Controllers,
    Emulator,
    ExecEmulator,
    PodShells,
    labels_of,
    live,
)
from tests.sim.test_inference_server import Server, demo_server

NS = "fleet"
POLICY = DRPolicy.model_validate(
    yaml.safe_load(
        """
models:
  - {name: llama, priority: critical, hotStandby: 1, warmStandby: 0, coldStandby: 0}
az_failover: {strategy: active-passive, activeZones: [az-1, az-2], standbyZone: az-3, failoverThreshold: 2}
gpuPool:
  nodes:
    - {name: node-1, zone: az-1, gpus: 2, gpuMemory: 80Gi}
    - {name: node-2, zone: az-2, gpus: 2, gpuMemory: 80Gi}
    - {name: node-3, zone: az-3, gpus: 2, gpuMemory: 80Gi}
"""
    )
)
"""One model with a hot standby, three GPU nodes in three zones."""
NODE_ZONES = {"node-1": "az-1", "node-2": "az-2", "node-3": "az-3", "cpu-1": "az-1", "cpu-2": "az-2"}
"""The cluster's Nodes: the policy's GPU nodes, and a CPU node in each active zone (a zone outage
takes down every Node of the zone, not only the GPU nodes drctl places on)."""
TOKEN = "drill-token"
DETECTION = DetectionPolicy(probe_interval=timedelta(milliseconds=100), unhealthy_threshold=3, healthy_threshold=1)
ZONES = POLICY.az_failover.model_copy(update={"health_check_interval": timedelta(milliseconds=100)})
READY = {
    "type": "Ready",
    "status": "True",
    "reason": "KubeletReady",
    "message": "kubelet is posting ready status",
    "lastHeartbeatTime": "2026-01-01T00:00:00Z",
    "lastTransitionTime": "2026-01-01T00:00:00Z",
}

pytestmark = pytest.mark.timeout(120)


def node(name: str) -> dict[str, Any]:
    gpu = name.startswith("node-")
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "resourceVersion": str(next(VERSIONS)),
            "labels": {"topology.kubernetes.io/zone": NODE_ZONES[name], "kubernetes.io/hostname": name},
        },
        # A GPU node's own taint: the drill's taint goes beside it, and restore leaves it there.
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]} if gpu else {},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                dict(READY),
            ]
        },
    }


def ready_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    conditions = obj.get("status", {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), None)


def without_version(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"].pop("resourceVersion", None)
    return out


class NodeLifecycle(Controllers):
    """``Controllers`` plus what a cluster does about Nodes: the node lifecycle controller (a pod on
    a NotReady node is not Ready), the taint manager (a pod that does not tolerate a node's
    ``NoExecute`` taint is evicted) and the scheduler (a new pod for a cordoned or tainted node stays
    Pending: it is never bound there, so never evicted either). ``loading`` holds instances whose
    new pods stay Pending: a model still loading."""

    def __init__(self, emulator: Emulator, namespace: str, **kw: Any) -> None:
        super().__init__(emulator, namespace, **kw)
        self.loading: set[str] = set()
        self.evict = True
        """False: the taint manager is off (pods stay on a tainted node, only NotReady counts)."""

    def _node(self, name: str | None) -> tuple[bool, bool, bool]:
        """(NotReady, cordoned, tainted NoExecute) of a pod's node."""
        found = live(self.emulator, NODES, None).get(name or "")
        if found is None:
            return False, False, False
        ready = ready_of(found)
        spec = found.get("spec") or {}
        no_execute = any(t.get("effect") == "NoExecute" for t in spec.get("taints") or [])
        return ready is not None and ready["status"] != "True", bool(spec.get("unschedulable")), no_execute

    def tick(self) -> None:
        super().tick()
        for name, pod in live(self.emulator, PODS, self.namespace).items():
            not_ready, _, no_execute = self._node(pod["spec"].get("nodeName"))
            running = pod.get("status", {}).get("phase") == "Running"
            if no_execute and running and self.evict:  # nothing of ours tolerates the drill's taint
                self.emulator.objects[PODS, self.namespace, name].delete()
            elif not_ready and running:
                conditions = pod["status"].get("conditions") or []
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    self._patch(name, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})

    def _kubelet(self, name: str, pod: Any, now: float) -> None:
        _, cordoned, no_execute = self._node(pod["spec"].get("nodeName"))
        if cordoned or no_execute or labels_of(pod).get("drctl.io/instance") in self.loading:
            return  # not scheduled there, or its model is still loading: Pending
        super()._kubelet(name, pod, now)


class Fleet:
    """The emulated cluster with llama's serving instance and hot standby built by the platform
    (``platform_kw``: how that platform builds pods, which every platform of the fleet shares)."""

    def __init__(self, emulator: ExecEmulator, controllers: NodeLifecycle, **platform_kw: Any) -> None:
        self.emulator = emulator
        self.controllers = controllers
        self.platform_kw = platform_kw

    @property
    def shells(self) -> PodShells:
        return self.emulator.shells

    def client(self) -> ApiClient:
        return ApiClient(Configuration(host=str(self.emulator.url).rstrip("/")))

    def platform(self, client: ApiClient, **kw: Any) -> KubernetesPlatform:
        return KubernetesPlatform(client, NS, POLICY, backoff_s=0.01, poll_s=0.02, **{**self.platform_kw, **kw})

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {name: without_version(n) for name, n in live(self.emulator, NODES, None).items()}

    def pods(self, instance: str) -> dict[str, dict[str, Any]]:
        return self.controllers.pods_of(instance)

    async def settled(self, check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
        """Until ``check`` holds. Generous (it returns as soon as it holds): in the whole suite on
        two busy cores, the controllers' eviction once took over 5 s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            await asyncio.sleep(0.02)
        if not check():
            raise AssertionError(f"not settled: {what}")


CHECKPOINT = "/models/llama/llama.ckpt"
"""llama's weights in a pod whose copy is its own (``/models/{model}`` without the claim)."""


def weights_image(fs: Path) -> None:
    """A model container's filesystem as its image (or its start-up fetch) leaves it: llama's
    weights and their sha256 sidecar under ``/models/llama``."""
    ensure_checkpoint(fs / CHECKPOINT.lstrip("/"), "llama", 256 * 1024)


@contextlib.asynccontextmanager
async def built_fleet(pods_root: Path, **platform_kw: Any) -> AsyncIterator[Fleet]:
    async with ExecEmulator() as emulator, kmock.Server(emulator):
        emulator.shells = PodShells(pods_root, weights_image)
        for name in NODE_ZONES:
            emulator.objects[NODES, None, name] = node(name)
        emulator.objects[SERVICES, NS, "llama"] = {
            "metadata": {"name": "llama", "namespace": NS},
            "spec": {"selector": {"drctl.io/model": "llama", "drctl.io/serving": "true"}},
        }
        for resource in (PODS, DEPLOYMENTS, CONFIGMAPS):
            emulator.resources[resource] = kmock.ResourceInfo()
        controllers = NodeLifecycle(emulator, NS)
        async with controllers:
            built = Fleet(emulator, controllers, **platform_kw)
            with built.client() as client:
                platform = built.platform(client)
                for action in plan_reconcile(POLICY, [], POLICY.model_names).actions:
                    await platform.create_instance(action, lambda *_: None)
            yield built


@pytest_asyncio.fixture()
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """Built by the platform's defaults: the pods load their weights from the read-only
    ``drctl-models`` claim."""
    async with built_fleet(tmp_path / "pods") as built:
        yield built


@pytest_asyncio.fixture()
async def own_weights(tmp_path: Path) -> AsyncIterator[Fleet]:
    """Built by a platform without the models claim: each pod's ``/models/llama`` is in its own
    container filesystem (weights in the image, or fetched when it starts)."""
    async with built_fleet(tmp_path / "pods", models_claim=None) as built:
        yield built


@pytest.fixture()
def opted_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``deploy/kubernetes/drills`` sets for the worker."""
    monkeypatch.setenv("DRCTL_KUBERNETES_FAULT_INJECTION", "true")
    monkeypatch.setenv("DRCTL_FAULT_INJECTION_TOKEN", TOKEN)


@pytest.fixture()
def opted_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRCTL_KUBERNETES_FAULT_INJECTION", raising=False)


@contextlib.contextmanager
def injector_of(fleet: Fleet, **kw: Any) -> Iterator[tuple[KubernetesPlatform, KubernetesFaultInjector]]:
    """The platform and the fault injector it offers (the opt-in is on)."""
    with fleet.client() as client:
        platform = fleet.platform(client, **kw)
        injector = platform.fault_injector()
        assert isinstance(injector, KubernetesFaultInjector)
        yield platform, injector


async def target(platform: KubernetesPlatform, scenario: DrillScenario) -> DrillTarget:
    """What ``drill_prepare`` chooses: llama's serving instance, at its policy's redundancy."""
    return choose_target(POLICY, await platform.all_instances(), await platform.cordoned_gpus(), scenario, "llama")


def fresh_fault() -> InjectedFault:
    return InjectedFault(injected_at=datetime.now(UTC))


async def prepare(platform: KubernetesPlatform, scenario: DrillScenario, settings: DrctlSettings) -> DrillTarget:
    """``drill_prepare`` as the worker runs it (no Temporal client needed before the target)."""
    activities = DrillActivities(platform, settings, cast(Client, None))
    request = DrillRequest(scenario=scenario, model="llama", ready_wait_s=0)
    result: DrillTarget = await ActivityEnvironment().run(activities.drill_prepare, request)
    return result


# -- the opt-in ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", [DrillScenario.NODE_DOWN, DrillScenario.MODEL_CORRUPTION])
async def test_without_the_opt_in_nothing_is_injected_and_the_drill_says_how_to_opt_in(
    own_weights: Fleet, opted_out: None, scenario: DrillScenario
) -> None:
    fleet = own_weights  # where model corruption could run, were it opted in to
    before = fleet.nodes()
    with fleet.client() as client:
        platform = fleet.platform(client)
        assert platform.fault_injector() is None
        with pytest.raises(ApplicationError) as refused:
            await prepare(platform, scenario, DrctlSettings(platform="kubernetes"))
    assert refused.value.type == ErrorType.DRILL_NOT_READY and refused.value.non_retryable
    assert "DRCTL_KUBERNETES_FAULT_INJECTION=true" in refused.value.message
    assert "deploy/kubernetes/drills" in refused.value.message and "exec" in refused.value.message
    assert fleet.nodes() == before
    assert fleet.shells.calls == [], "no exec into any pod"


async def test_with_the_opt_in_the_drill_is_prepared_on_the_serving_instance(fleet: Fleet, opted_in: None) -> None:
    with fleet.client() as client:
        platform = fleet.platform(client)
        chosen = await prepare(platform, DrillScenario.NODE_DOWN, DrctlSettings(platform="kubernetes"))
        serving = [i for i in await platform.all_instances() if i.role == Role.SERVING]
    assert [chosen.instance] == [i.id for i in serving]
    assert chosen.node == serving[0].node and chosen.node in NODE_ZONES


# -- pod crash ------------------------------------------------------------------------------------


async def test_pod_crash_deletes_the_serving_pod_with_grace_period_zero(fleet: Fleet, opted_in: None) -> None:
    nodes_before = fleet.nodes()
    with injector_of(fleet) as (platform, injector):
        hit = await target(platform, DrillScenario.POD_CRASH)
        (pod,) = fleet.pods(hit.instance)
        fault = fresh_fault()
        await injector.inject(hit, fault)

        assert fault.deleted_pods == [pod] and fault.nodes == [] and fault.xid_agents == []
        assert pod not in live(fleet.emulator, PODS, NS), "deleted at once (grace period 0)"
        deletes = [r for r in fleet.emulator if r.method == kmock.method.DELETE and r.name == pod]
        assert [r.params.get("gracePeriodSeconds") for r in deletes] == ["0"]
        # Its Deployment makes a new pod (what the watcher and the failover then judge).
        await fleet.settled(lambda: bool(set(fleet.pods(hit.instance)) - {pod}), "a replacement pod")

        restored = await injector.restore(fault)
        assert restored.detail == [f"pod(s) {pod} deleted: nothing to restore (their Deployment makes new ones)"]
        assert (await injector.restore(fault)).detail == restored.detail
    assert fleet.nodes() == nodes_before


# -- node down, zone outage ---------------------------------------------------------------------------


async def test_node_down_cordons_taints_and_marks_the_node_not_ready_and_restore_puts_it_back(
    fleet: Fleet, opted_in: None
) -> None:
    before = fleet.nodes()
    with injector_of(fleet) as (platform, injector):
        hit = await target(platform, DrillScenario.NODE_DOWN)
        assert hit.node is not None
        fault = fresh_fault()
        await injector.inject(hit, fault)

        assert [(n.node, n.cordoned, n.tainted, n.not_ready) for n in fault.nodes] == [(hit.node, True, True, True)]
        assert fault.nodes[0].previous_ready == READY
        down = fleet.nodes()[hit.node]
        assert down["spec"]["unschedulable"] is True
        taints = down["spec"]["taints"]
        assert taints[0] == before[hit.node]["spec"]["taints"][0], "the node's own taint is kept"
        assert {k: taints[1][k] for k in ("key", "value", "effect")} == node_faults.TAINT
        ready = ready_of(down)
        assert ready is not None and (ready["status"], ready["reason"]) == ("False", node_faults.REASON)
        assert down["status"]["conditions"][0] == before[hit.node]["status"]["conditions"][0]
        assert {n: o for n, o in fleet.nodes().items() if n != hit.node} == {
            n: o for n, o in before.items() if n != hit.node
        }
        # What the cluster then does: the pods on it are evicted (the taint), none starts there.
        await fleet.settled(lambda: not fleet.pods(hit.instance), "the serving pod evicted")

        restored = await injector.restore(fault)
        assert restored.detail == [f"{hit.node}: Ready condition put back, taint removed, uncordoned"]
        assert fleet.nodes() == before
        again = await injector.restore(fault)
        assert again.detail == [f"{hit.node}: nothing of the drill left on it"]
        assert fleet.nodes() == before
        await fleet.settled(lambda: bool(fleet.pods(hit.instance)), "its pod back on the node")


async def test_zone_outage_takes_down_every_node_labelled_with_the_zone(fleet: Fleet, opted_in: None) -> None:
    before = fleet.nodes()
    with injector_of(fleet) as (platform, injector):
        hit = await target(platform, DrillScenario.ZONE_OUTAGE)
        in_zone = sorted(n for n, z in NODE_ZONES.items() if z == hit.zone)
        assert len(in_zone) == 2, "a GPU node and a CPU node"
        fault = fresh_fault()
        await injector.inject(hit, fault)

        assert [n.node for n in fault.nodes] == in_zone
        now = fleet.nodes()
        for name in in_zone:
            ready = ready_of(now[name])
            assert now[name]["spec"]["unschedulable"] is True and ready is not None and ready["status"] == "False"
        assert {n: now[n] for n in now if n not in in_zone} == {n: before[n] for n in before if n not in in_zone}

        restored = await injector.restore(fault)
        assert len(restored.detail) == 2
        assert fleet.nodes() == before
        await injector.restore(fault)
        assert fleet.nodes() == before


async def test_an_operators_cordon_outlives_the_drill(fleet: Fleet, opted_in: None) -> None:
    """Restore undoes what the drill did, not what it found: a node cordoned before stays cordoned."""
    with injector_of(fleet) as (platform, injector):
        hit = await target(platform, DrillScenario.NODE_DOWN)
        assert hit.node is not None
        await asyncio.to_thread(platform.core.patch_node, hit.node, {"spec": {"unschedulable": True}})
        before = fleet.nodes()
        fault = fresh_fault()
        await injector.inject(hit, fault)
        assert (fault.nodes[0].cordoned, fault.nodes[0].tainted) == (False, True)

        await injector.restore(fault)
        assert fleet.nodes() == before
        assert fleet.nodes()[hit.node]["spec"]["unschedulable"] is True


async def test_a_node_gone_during_the_drill_leaves_nothing_to_restore(fleet: Fleet, opted_in: None) -> None:
    """A Node deleted while down (replaced by the autoscaler, say): restore says so and succeeds."""
    with injector_of(fleet) as (platform, injector):
        hit = await target(platform, DrillScenario.NODE_DOWN)
        assert hit.node is not None
        fault = fresh_fault()
        await injector.inject(hit, fault)
        fleet.emulator.objects[NODES, None, hit.node].delete()
        restored = await injector.restore(fault)
        assert restored.detail == [f"{hit.node}: the Node is gone, nothing to restore"]


async def test_a_half_done_injection_is_recorded_and_restored(fleet: Fleet, opted_in: None) -> None:
    """The NotReady write is denied (a Role without nodes/status): the cordon and taint, written
    before it, are in the fault, and restore undoes them; the status it never wrote is left alone."""
    before = fleet.nodes()
    with injector_of(fleet) as (platform, opted):

        async def denying(verb: str, resource: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
            if (verb, resource) == ("patch", "nodes/status"):
                raise permission_denied(verb, resource, NS, ApiException(status=403, reason="Forbidden"))
            return await platform._call(verb, resource, fn, *args, **kwargs)

        injector = KubernetesFaultInjector(platform.core, NS, denying, opted.settings)
        hit = await target(platform, DrillScenario.NODE_DOWN)
        assert hit.node is not None
        fault = fresh_fault()
        with pytest.raises(ApplicationError) as denied:
            await injector.inject(hit, fault)
        assert denied.value.type == PERMISSION_DENIED and denied.value.non_retryable
        assert "deploy/kubernetes/drills" in denied.value.message and "nodes/status" in denied.value.message
        (recorded,) = fault.nodes
        assert (recorded.cordoned, recorded.tainted, recorded.not_ready) == (True, True, True)
        assert fleet.nodes()[hit.node]["spec"]["unschedulable"] is True
        assert ready_of(fleet.nodes()[hit.node]) == READY

        restored = await injector.restore(fault)
        assert restored.detail == [f"{hit.node}: taint removed, uncordoned"]
        assert fleet.nodes() == before


# -- what the watcher sees ------------------------------------------------------------------------------


class Reports:
    """Stands in for Temporal behind the watcher: the instances it reported, the zones it failed over."""

    def __init__(self) -> None:
        self.instances: list[str] = []
        self.zones: list[str] = []

    async def report(self, request: FailoverRequest) -> IncidentTicket:
        self.instances.append(request.instance)
        return queued_ticket(request, False)

    async def start_zone(self, zone: str, reason: str) -> str:
        self.zones.append(zone)
        return f"zone-failover-{zone}"


@contextlib.asynccontextmanager
async def watching(fleet: Fleet, reports: Reports) -> AsyncIterator[KubeWatcher]:
    with fleet.client() as client:
        watcher = KubeWatcher(
            CoreV1Api(client),
            NS,
            DETECTION,
            reports.report,
            zones=ZONES,
            start_zone_failover=reports.start_zone,
            timeout_s=60,
            backoff_s=0.05,
            read_timeout_s=0.5,
            tick_s=0.02,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        try:
            await fleet.settled(lambda: len(watcher.state.nodes) == len(NODE_ZONES), "the watcher saw the nodes")
            await fleet.settled(lambda: len(watcher.trackers) == 2, "the watcher judges both instances")
            yield watcher
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=5)


async def test_the_watcher_sees_a_node_down(fleet: Fleet, opted_in: None) -> None:
    fleet.controllers.evict = False  # the pod stays on the node: only the Node's NotReady tells
    reports = Reports()
    async with watching(fleet, reports) as watcher:
        with injector_of(fleet) as (platform, injector):
            hit = await target(platform, DrillScenario.NODE_DOWN)
            fault = fresh_fault()
            await injector.inject(hit, fault)
            await fleet.settled(lambda: reports.instances == [hit.instance], "the serving instance reported")
            assert not watcher.state.node_ready(hit.node)
            assert fleet.pods(hit.instance), "not evicted: seen down through its Node"
            assert reports.zones == [], "one node of an active zone with another node up: not a zone outage"
            await injector.restore(fault)


async def test_the_watcher_fails_over_a_zone_whose_nodes_are_all_down(fleet: Fleet, opted_in: None) -> None:
    reports = Reports()
    async with watching(fleet, reports) as watcher:
        with injector_of(fleet) as (platform, injector):
            hit = await target(platform, DrillScenario.ZONE_OUTAGE)
            fault = fresh_fault()
            await injector.inject(hit, fault)
            await fleet.settled(lambda: reports.zones == [hit.zone], "the zone failed over")
            assert hit.zone is not None and watcher.zone_verdicts[hit.zone] == "down"
            await injector.restore(fault)
            await fleet.settled(lambda: watcher.zone_verdicts.get(hit.zone or "") == "up", "the zone up again")


# -- GPU failure --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def node_agents(token: str = TOKEN) -> AsyncIterator[dict[str, str]]:
    """A real GPU node agent per GPU node (the policy's GPUs, no NVML), fault endpoints on: node → URL."""
    agents = [NodeAgent(n.name, pool=POLICY.gpu_pool, interval=60) for n in POLICY.gpu_pool.nodes]
    runners = []
    try:
        for agent in agents:
            await agent.start()
            runners.append(await serve(agent, "127.0.0.1", 0, allow_fault_injection=True, fault_token=token))
        yield {a.node: f"http://127.0.0.1:{r.addresses[0][1]}" for a, r in zip(agents, runners, strict=True)}
    finally:
        for runner in runners:
            await runner.cleanup()
        for agent in agents:
            await agent.aclose()


async def test_gpu_failure_injects_an_xid_through_the_node_agent_and_restore_clears_it(
    fleet: Fleet, opted_in: None
) -> None:
    async with node_agents() as urls:
        with injector_of(fleet, node_agent_urls=list(urls.values())) as (platform, injector):
            hit = await target(platform, DrillScenario.GPU_FAILURE)
            assert hit.gpu is not None and hit.node is not None
            assert await platform.cordoned_gpus() == []
            fault = fresh_fault()
            await injector.inject(hit, fault)

            assert fault.xid_agents == [urls[hit.node]], "the agent of the GPU's node, found by its /healthz"
            assert fault.detail.startswith(f"Xid 79 (GPU fallen off the bus) injected on {hit.gpu}")
            # The agent now reports the GPU drained: what placement keeps out and the drain acts on.
            assert await platform.cordoned_gpus() == [hit.gpu]

            restored = await injector.restore(fault)
            index = int(hit.gpu.rsplit("/", 1)[1])
            assert restored.detail == [f"{urls[hit.node]}: injected Xids cleared on GPU(s) [{index}]"]
            assert await platform.cordoned_gpus() == []
            again = await injector.restore(fault)
            assert again.detail == [f"{urls[hit.node]}: injected Xids cleared on GPU(s) []"]


async def test_gpu_failure_with_a_wrong_token_is_refused_by_the_agent(
    fleet: Fleet, opted_in: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRCTL_FAULT_INJECTION_TOKEN", "not-the-agents-token")
    async with node_agents() as urls:
        with injector_of(fleet, node_agent_urls=list(urls.values())) as (platform, injector):
            hit = await target(platform, DrillScenario.GPU_FAILURE)
            with pytest.raises(RuntimeError, match="refused the fault-injection token"):
                await injector.inject(hit, fresh_fault())
            assert await platform.cordoned_gpus() == []


# -- model corruption ---------------------------------------------------------------------------------


def first_bytes(fleet: Fleet, pod: str, n: int = model_faults.LENGTH) -> bytes:
    return (fleet.shells.fs(pod) / CHECKPOINT.lstrip("/")).read_bytes()[:n]


def scripts(fleet: Fleet) -> list[tuple[str, str]]:
    """(pod, which script) of every exec that ran, in order."""
    names = {model_faults.LOCATE: "locate", model_faults.CORRUPT: "corrupt", model_faults.CHECK: "check"}
    return [(pod, names.get(command[2], "?")) for pod, _, command in fleet.shells.calls]


def deletes_of(fleet: Fleet, pod: str) -> int:
    return sum(1 for r in fleet.emulator if r.method == kmock.method.DELETE and r.name == pod)


@contextlib.contextmanager
def serving_from_its_own_copy(fleet: Fleet, pod: str, log_dir: Path) -> Iterator[Server]:
    """The demo model server behind ``pod``, loaded from the pod's own copy of the weights (its
    sha256 checked against the sidecar), the pod's IP and port pointing at it."""
    with demo_server(fleet.shells.fs(pod) / CHECKPOINT.lstrip("/"), log_dir, instance=pod) as server:
        server.wait_until("ready")
        containers = copy.deepcopy(live(fleet.emulator, PODS, NS)[pod]["spec"]["containers"])
        containers[0]["ports"] = [{"name": "http", "containerPort": int(server.url.rsplit(":", 1)[1])}]
        fleet.emulator.objects[PODS, NS, pod].patch(
            {"metadata": {"resourceVersion": str(next(VERSIONS))}, "spec": {"containers": containers}}
        )
        yield server


async def test_model_corruption_overwrites_the_serving_pods_weights_and_its_server_fails_the_checksum(
    own_weights: Fleet, opted_in: None, tmp_path: Path
) -> None:
    fleet = own_weights
    seen_at_write: list[list[PodCorruption]] = []
    fault = fresh_fault()

    def at_write(pod: str, command: list[str]) -> None:
        if command[2] == model_faults.CORRUPT:
            seen_at_write.append([r.model_copy() for r in fault.corrupted_in_pods])

    fleet.shells.before_run = at_write
    with injector_of(fleet) as (platform, injector):
        assert injector.refusal(DrillScenario.MODEL_CORRUPTION) is None
        hit = await prepare(platform, DrillScenario.MODEL_CORRUPTION, DrctlSettings(platform="kubernetes"))
        (pod,) = fleet.pods(hit.instance)
        others = {p for i in await platform.all_instances() if i.id != hit.instance for p in fleet.pods(i.id)}
        assert others, "the hot standby's pod"
        path = fleet.shells.fs(pod) / CHECKPOINT.lstrip("/")
        before = path.read_bytes()
        with serving_from_its_own_copy(fleet, pod, tmp_path) as server:
            await injector.inject(hit, fault)
            progress = server.get("/load_progress").json()

        record = PodCorruption(
            pod=pod, container="model", path=CHECKPOINT, length=64, original=before[:64].hex()
        )  # the emulator gives pods no uid
        assert fault.corrupted_in_pods == [record]
        assert seen_at_write == [[record]], "recorded before the write reached the pod"
        assert scripts(fleet) == [(pod, "locate"), (pod, "corrupt")], "the serving pod only, not the hot standby's"
        after = path.read_bytes()
        assert len(after) == len(before) and after[64:] == before[64:] and after[:64] != before[:64]
        # The model server reloaded its weights from that file, and its own checksum caught it.
        assert progress["state"] == "failed" and progress["error"].startswith(CHECKSUM_MISMATCH), progress
        assert fault.detail.startswith(f"{CHECKPOINT} (262144 bytes) in pod {pod}: its first 64 bytes overwritten")
        assert "wake_up 503" in fault.detail and CHECKSUM_MISMATCH in fault.detail, fault.detail
        assert all(first_bytes(fleet, p) == before[:64] for p in others)

        restored = await injector.restore(fault)
        assert restored.detail == [
            f"pod {pod} deleted ({CHECKPOINT} overwritten): "
            "its Deployment starts a fresh one, which fetches the weights"
        ]
        assert scripts(fleet)[-1] == (pod, "check") and deletes_of(fleet, pod) == 1
        assert pod not in live(fleet.emulator, PODS, NS)
        await fleet.settled(lambda: bool(fleet.pods(hit.instance)), "a fresh pod for the instance")

        again = await injector.restore(fault)
        assert again.detail == [f"pod {pod} is gone, and its copy of {CHECKPOINT} with it: nothing to restore"]
        assert deletes_of(fleet, pod) == 1 and len(scripts(fleet)) == 3, "nothing more done"


async def test_a_corruption_recorded_but_never_written_is_left_alone(own_weights: Fleet, opted_in: None) -> None:
    """The write fails in the pod (a read-only filesystem, say): the file is in the fault, restore
    reads its bytes back, finds them the ones recorded, and leaves the pod alone."""
    fleet = own_weights

    def read_only(pod: str, command: list[str]) -> str | None:
        if command[2] == model_faults.CORRUPT:
            return f"dd: failed to open '{CHECKPOINT}': Read-only file system"
        return None

    fleet.shells.before_run = read_only
    with injector_of(fleet) as (platform, injector):
        hit = await target(platform, DrillScenario.MODEL_CORRUPTION)
        (pod,) = fleet.pods(hit.instance)
        before = first_bytes(fleet, pod)
        fault = fresh_fault()
        with pytest.raises(RuntimeError, match=r"was not overwritten: dd: failed to open .*: Read-only file system"):
            await injector.inject(hit, fault)
        assert [(r.pod, r.path, r.original) for r in fault.corrupted_in_pods] == [(pod, CHECKPOINT, before.hex())]
        assert first_bytes(fleet, pod) == before

        restored = await injector.restore(fault)
        assert restored.detail == [
            f"pod {pod}: {CHECKPOINT} has its own bytes (never overwritten, or a fresh container): left alone"
        ]
        assert deletes_of(fleet, pod) == 0 and pod in live(fleet.emulator, PODS, NS)


async def test_exec_denied_is_permission_denied_and_nothing_is_recorded(own_weights: Fleet, opted_in: None) -> None:
    """No ``pods/exec`` in the worker's roles: the API server refuses the WebSocket upgrade (403),
    which the drill reports as the platform's PermissionDenied, pointing at the drills' roles."""
    fleet = own_weights
    fleet.shells.refuse = True
    with injector_of(fleet) as (platform, injector):
        hit = await target(platform, DrillScenario.MODEL_CORRUPTION)
        (pod,) = fleet.pods(hit.instance)
        before = first_bytes(fleet, pod)
        fault = fresh_fault()
        with pytest.raises(ApplicationError) as denied:
            await injector.inject(hit, fault)
    assert denied.value.type == PERMISSION_DENIED and denied.value.non_retryable
    assert "denied create on pods/exec" in denied.value.message and "HTTP 403" in denied.value.message
    assert "is forbidden" in denied.value.message and "deploy/kubernetes/drills" in denied.value.message
    assert fault.corrupted_in_pods == [] and fleet.shells.calls == [] and first_bytes(fleet, pod) == before


async def test_model_corruption_refuses_weights_on_a_shared_volume_before_writing(fleet: Fleet, opted_in: None) -> None:
    """Pods that mount the models claim, found by an injector told otherwise (pods from an older
    template, say): the file is located, found on the claim, and nothing is recorded or written."""
    with injector_of(fleet) as (platform, opted):
        injector = KubernetesFaultInjector(
            platform.core,
            NS,
            platform._call,
            opted.settings,
            policy=POLICY,
            template=InstanceTemplate(models_claim=None),
        )
        assert injector.refusal(DrillScenario.MODEL_CORRUPTION) is None
        hit = await target(platform, DrillScenario.MODEL_CORRUPTION)
        (pod,) = fleet.pods(hit.instance)
        before = first_bytes(fleet, pod)
        fault = fresh_fault()
        with pytest.raises(RuntimeError) as refused:
            await injector.inject(hit, fault)
    assert str(refused.value) == (
        f"{CHECKPOINT} in pod {pod} is on volume models (persistentVolumeClaim drctl-models, mounted read-only), not "
        "the pod's own copy: a drill overwrites only weights in the container's filesystem or an emptyDir, which "
        "deleting the pod restores; nothing was written"
    )
    assert fault.corrupted_in_pods == [] and scripts(fleet) == [(pod, "locate")] and first_bytes(fleet, pod) == before


def test_only_the_pods_own_copy_may_be_overwritten() -> None:
    """The container's filesystem and an emptyDir die with the pod; a claim, a hostPath, or a
    read-only root filesystem do not qualify (the pod as the client reads it)."""

    def pod(*volumes: V1Volume, read_only_root: bool = False) -> tuple[V1Pod, V1Container]:
        mounts = [V1VolumeMount(name=v.name, mount_path=f"/{v.name}") for v in volumes]
        context = V1SecurityContext(read_only_root_filesystem=True) if read_only_root else None
        container = V1Container(name="model", volume_mounts=mounts, security_context=context)
        spec = V1PodSpec(containers=[container], volumes=list(volumes))
        return V1Pod(metadata=V1ObjectMeta(name="p"), spec=spec), container

    scratch = V1Volume(name="scratch", empty_dir=V1EmptyDirVolumeSource())
    host = V1Volume(name="cache", host_path=V1HostPathVolumeSource(path="/var/cache/models"))
    assert model_faults.shared_storage(*pod(scratch, host), "/opt/weights/a.safetensors") is None
    assert model_faults.shared_storage(*pod(scratch, host), "/scratch/llama/a.safetensors") is None
    on_host = model_faults.shared_storage(*pod(scratch, host), "/cache/llama/a.safetensors")
    assert on_host is not None and "on volume cache (hostPath)" in on_host
    assert model_faults.shared_storage(*pod(scratch, host), "/cachex/a") is None, "a prefix of a name is not a mount"
    read_only = model_faults.shared_storage(*pod(read_only_root=True), "/opt/weights/a.safetensors")
    assert read_only is not None and "readOnlyRootFilesystem" in read_only


async def test_model_corruption_needs_an_engine_that_can_reload(own_weights: Fleet, opted_in: None) -> None:
    """SGLang has no reload calls in its profile: refused before any exec."""
    fleet = own_weights
    raw = POLICY.model_dump(by_alias=True)
    raw["models"] = [{**m, "engine": Engine.SGLANG.value} for m in raw["models"]]
    sglang = DRPolicy.model_validate(raw)
    assert sglang.model("llama").engine == Engine.SGLANG
    with injector_of(fleet) as (platform, opted):
        injector = KubernetesFaultInjector(
            platform.core, NS, platform._call, opted.settings, policy=sglang, template=platform.template
        )
        hit = await target(platform, DrillScenario.MODEL_CORRUPTION)
        with pytest.raises(RuntimeError, match=r"no such calls for sglang instances .*; nothing was written"):
            await injector.inject(hit, fresh_fault())
    assert fleet.shells.calls == []


async def test_the_weights_of_a_hugging_face_download_are_found_in_the_cache(own_weights: Fleet) -> None:
    """``--model org/name`` (the engine downloads it): the first safetensors shard of the revision
    ``refs/main`` names, resolved to its blob in the Hugging Face cache under ``$HOME``."""
    fleet = own_weights
    pod = next(iter(live(fleet.emulator, PODS, NS)))
    repo = fleet.shells.fs(pod) / "root/.cache/huggingface/hub/models--meta-llama--llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("abc123")
    for rev in ("abc123", "0ld"):
        (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, blob in (("model-00002-of-00002.safetensors", "b2"), ("model-00001-of-00002.safetensors", "b1")):
        (repo / "blobs" / blob).write_bytes(bytes([len(name)]) * 100)
        (repo / "snapshots/abc123" / name).symlink_to(f"../../blobs/{blob}")
    (repo / "snapshots/abc123/config.json").write_text("{}")
    with fleet.client() as client:
        models = model_faults.ModelFaults(CoreV1Api(client), NS, fleet.platform(client)._call)
        found = await models.exec(pod, "model", model_faults.LOCATE, "meta-llama/llama", "64")
        missing = await models.exec(pod, "model", model_faults.LOCATE, "meta-llama/other", "64")
    assert (found.code, found.stdout.splitlines()) == (
        0,
        ["/root/.cache/huggingface/hub/models--meta-llama--llama/blobs/b1", "100", bytes([32]).hex() * 64],
    )
    assert missing.code == 3 and "nor downloaded into its Hugging Face cache" in missing.stderr


# -- refusals -----------------------------------------------------------------------------------------


async def test_what_the_cluster_cannot_inject_is_refused_before_the_drill_starts(fleet: Fleet, opted_in: None) -> None:
    """The default template's pods load their weights from the read-only claim every instance
    shares: model corruption is refused before any load is sent, and by ``inject`` too."""
    settings = DrctlSettings(platform="kubernetes")
    before = fleet.nodes()
    with fleet.client() as client:
        without_agents = fleet.platform(client)
        with pytest.raises(ApplicationError) as corrupt:
            await prepare(without_agents, DrillScenario.MODEL_CORRUPTION, settings)
        assert corrupt.value.type == ErrorType.DRILL_NOT_READY and corrupt.value.non_retryable
        assert corrupt.value.message == model_faults.weights_in_the_store(without_agents.template)
        assert "/models/<model> on the drctl-models claim, mounted read-only" in corrupt.value.message
        assert "DRCTL_KUBERNETES_MODEL_SOURCE" in corrupt.value.message
        with pytest.raises(ApplicationError) as no_agents:
            await prepare(without_agents, DrillScenario.GPU_FAILURE, settings)
        assert "DRCTL_NODE_AGENT_SERVICE" in no_agents.value.message
        injector = without_agents.fault_injector()
        assert injector is not None
        hit = await target(without_agents, DrillScenario.POD_CRASH)
        with pytest.raises(RuntimeError, match="model-corruption is not injected here"):
            await injector.inject(hit.model_copy(update={"scenario": DrillScenario.MODEL_CORRUPTION}), fresh_fault())
    assert fleet.nodes() == before
    assert fleet.shells.calls == []


async def test_gpu_failure_without_the_token_is_refused(
    fleet: Fleet, opted_in: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DRCTL_FAULT_INJECTION_TOKEN")
    with fleet.client() as client:
        platform = fleet.platform(client, node_agent_urls=["http://127.0.0.1:9"])
        with pytest.raises(ApplicationError) as refused:
            await prepare(platform, DrillScenario.GPU_FAILURE, DrctlSettings(platform="kubernetes"))
    assert "DRCTL_FAULT_INJECTION_TOKEN_FILE" in refused.value.message


# -- RBAC: the verbs called are the verbs declared --------------------------------------------------------


async def test_the_injector_calls_exactly_the_verbs_it_declares(
    own_weights: Fleet, opted_in: None, tmp_path: Path
) -> None:
    """Every scenario that touches the API, injected and restored twice: the (group, resource, verb)
    calls are ``FAULT_PERMISSIONS``, which tests/deploy holds ``deploy/kubernetes/drills`` to. An
    exec is called as ``create`` on ``pods/exec``; on the wire it is a WebSocket ``GET``, which the
    API server authorizes as ``get`` (and, from 1.35, as ``create`` too): the emulator's request log
    shows those."""
    fleet = own_weights
    called: set[tuple[str, str, str]] = set()
    with injector_of(fleet) as (platform, opted):

        async def recording(verb: str, resource: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
            group, _, plural = resource.rpartition(".") if "." in resource else ("", "", resource)
            called.add((group, plural, verb))
            return await platform._call(verb, resource, fn, *args, **kwargs)

        injector = KubernetesFaultInjector(
            platform.core, NS, recording, opted.settings, policy=POLICY, template=platform.template
        )
        instances = [i.id for i in await platform.all_instances()]
        scenarios = (
            DrillScenario.MODEL_CORRUPTION,
            DrillScenario.NODE_DOWN,
            DrillScenario.ZONE_OUTAGE,
            DrillScenario.POD_CRASH,
        )
        for scenario in scenarios:
            await fleet.settled(lambda: all(fleet.pods(i) for i in instances), "every instance has its pod back")
            hit = await target(platform, scenario)
            fault = fresh_fault()
            if scenario == DrillScenario.MODEL_CORRUPTION:
                (pod,) = fleet.pods(hit.instance)
                with serving_from_its_own_copy(fleet, pod, tmp_path):
                    await injector.inject(hit, fault)
                assert fault.corrupted_in_pods
            else:
                await injector.inject(hit, fault)
            await injector.restore(fault)
            await injector.restore(fault)
    exec_requests = [r for r in fleet.emulator if r.subresource == "exec"]
    assert len(exec_requests) == 3 and {r.method for r in exec_requests} == {kmock.method.GET}
    called |= {("", "pods/exec", "get") for _ in exec_requests[:1]}
    declared = {(group, resource, verb) for (group, resource), verbs in FAULT_PERMISSIONS.items() for verb in verbs}
    assert called == declared


# -- a drill end to end ---------------------------------------------------------------------------------


@pytest_asyncio.fixture()
async def temporal() -> AsyncIterator[WorkflowEnvironment]:
    async with dev_server() as env:
        yield env


@contextlib.asynccontextmanager
async def busy_pod_watch(fleet: Fleet, every_s: float = 0.1) -> AsyncIterator[None]:
    """Keep the watcher's pod watch from going silent: a pod that is not drctl's (no labels, so the
    watcher ignores it) patched over HTTP every ``every_s``. A silent watch reconnects after its read
    timeout, and the emulator, which does not resume a watch from a resourceVersion but replays what
    exists, would lose a deletion made during the reconnect (a real API server does not)."""
    fleet.emulator.objects[PODS, NS, "keepalive"] = {
        "metadata": {"name": "keepalive", "namespace": NS},
        "spec": {"containers": [{"name": "keepalive", "image": "x"}]},
        "status": {"phase": "Running"},
    }
    stop = asyncio.Event()

    async def touch() -> None:
        with fleet.client() as client:
            core = CoreV1Api(client)
            for n in itertools.count():
                body = {"metadata": {"annotations": {"tick": str(n)}}}
                await asyncio.to_thread(core.patch_namespaced_pod, "keepalive", NS, body)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every_s)
                if stop.is_set():
                    return

    task = asyncio.create_task(touch())
    try:
        yield
    finally:
        stop.set()
        await task


async def test_a_pod_crash_drill_runs_through_the_drill_workflow_on_the_cluster(
    fleet: Fleet, opted_in: None, temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    """The worker as ``runbook_worker`` builds it on the Kubernetes platform, and the watcher
    reporting to the guardians: the drill deletes the serving pod, the watcher sees it, the
    failover promotes the hot standby, reconciliation replaces it, and the drill measures, restores
    and reports (its load fails: nothing routes a Service here). The replacement pod of the crashed
    instance stays Pending (its model loading, as on a cluster), or the failover's confirm probe
    would find it Ready 50 ms later."""
    queue = f"drill-{uuid.uuid4().hex[:8]}"
    settings = DrctlSettings(
        platform="kubernetes",
        task_queue=queue,
        state_dir=tmp_path,
        drill_lb_url="http://127.0.0.1:9",  # nothing there: no Service routing in the emulator
    )

    async def report(request: FailoverRequest) -> IncidentTicket:
        return await report_failover(temporal.client, settings, request, reporter="kube-watcher")

    with fleet.client() as client:
        platform = fleet.platform(client)
        await platform.start()
        before = {i.id: i.role for i in await platform.all_instances()}
        serving = next(i for i, role in before.items() if role == Role.SERVING)
        hot = next(i for i, role in before.items() if role == Role.HOT)
        fleet.controllers.loading.add(serving)
        watcher = KubeWatcher(
            CoreV1Api(client), NS, DETECTION, report, timeout_s=60, backoff_s=0.05, read_timeout_s=1.0, tick_s=0.02
        )
        stop = asyncio.Event()
        watching_task = asyncio.create_task(watcher.run(stop))
        try:
            await fleet.settled(lambda: len(watcher.trackers) == 2, "the watcher judges both instances")
            async with (
                busy_pod_watch(fleet),
                Worker(
                    temporal.client,
                    task_queue=queue,
                    workflows=WORKFLOWS,
                    activities=[
                        *FailoverActivities(platform).all(),
                        *ReconcileActivities(platform).all(),
                        *IncidentActivities(platform).all(),
                        *ZoneSwitchActivities(platform).all(),
                        *DrillActivities(platform, settings, temporal.client).all(),
                    ],
                    graceful_shutdown_timeout=timedelta(seconds=1),
                ),
            ):
                # What replenishes a used-up standby (drctl up creates it; on a cluster, whoever deploys).
                await ensure_reconcile_schedule(temporal.client, POLICY, queue)
                request = DrillRequest(
                    scenario=DrillScenario.POD_CRASH, model="llama", rps=2, baseline_s=0.2, tail_s=0.2, timeout_s=30
                )
                drill: Awaitable[DrillReport] = temporal.client.execute_workflow(
                    DrillWorkflow.run, request, id=f"drill-{queue}", task_queue=queue
                )
                report_ = await asyncio.wait_for(drill, 60)
        finally:
            stop.set()
            await asyncio.wait_for(watching_task, timeout=5)
        after = {i.id: i.role for i in await platform.all_instances()}

    assert report_.error is None, report_.error
    measurement = report_.measurement
    assert measurement is not None and measurement.error is None
    assert measurement.fault.deleted_pods and measurement.fault.detail.endswith("deleted with grace period 0")
    assert measurement.recovered, measurement.notes
    assert (measurement.promoted, measurement.promoted_tier) == (hot, "hot")
    assert measurement.detection_ms is not None and measurement.rto_ms is not None
    assert measurement.rto_ms >= measurement.detection_ms
    assert any(line.startswith("pod(s)") and "nothing to restore" in line for line in report_.restore)
    assert after[hot] == Role.SERVING and after[serving] == Role.FAILED
    assert sorted(after.values()) == sorted([Role.SERVING, Role.HOT, Role.FAILED]), "redundancy is back"
    written = await asyncio.to_thread(lambda: [Path(f).is_file() for f in report_.files.values()])
    assert written and all(written), report_.files
