"""KubernetesPlatform against kmock's KubernetesEmulator over real HTTP on loopback, one call at a
time (``test_end_to_end`` runs the runbooks through a worker). What the emulator lacks and how the
tests add it: :mod:`tests.platforms.kubernetes.cluster`."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
from kubernetes.client import ApiClient, Configuration
from kubernetes.config import kube_config
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError

from drctl.payloads import ReconcileAction, ReconcileActionKind, Role
from drctl.platforms.factory import make_platform
from drctl.platforms.kubernetes.platform import KubernetesPlatform
from drctl.platforms.local.checkpoints import corrupt_checkpoint, ensure_checkpoint
from drctl.policies.engines import Engine
from drctl.policies.schema import DRPolicy, ModelPolicy
from drctl.settings import DrctlSettings
from tests.platforms.kubernetes.cluster import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NODES,
    PODS,
    SERVICES,
    VIRTUAL_SERVICES,
    Controllers,
    Emulator,
)
from tests.sim.test_inference_server import MODEL as DEMO_MODEL
from tests.sim.test_inference_server import Server, demo_server

NS = "fleet"


def pod(name: str, model: str, role: Role, instance: str, *, serving: bool = False, ready: bool = True) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "resourceVersion": "1",
            "labels": {
                "drctl.io/model": model,
                "drctl.io/role": role.value,
                "drctl.io/instance": instance,
                "drctl.io/serving": "true" if serving else "false",
            },
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "model", "image": "x", "ports": [{"containerPort": 8000}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[Any]:
    async with Emulator() as emu, kmock.Server(emu):
        emu.objects[NODES, None, "node-a"] = {
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "az-1"}}
        }
        emu.objects[PODS, NS, "llama-0-abc"] = pod("llama-0-abc", "llama", Role.SERVING, "llama-0", serving=True)
        emu.objects[PODS, NS, "llama-1-def"] = pod("llama-1-def", "llama", Role.HOT, "llama-1")
        emu.objects[PODS, NS, "mistral-0-ghi"] = pod(
            "mistral-0-ghi", "mistral", Role.SERVING, "mistral-0", serving=True
        )
        emu.objects[SERVICES, NS, "llama"] = {
            "metadata": {"name": "llama"},
            "spec": {"selector": {"drctl.io/model": "llama", "drctl.io/serving": "true"}},
        }
        emu.resources[DEPLOYMENTS] = kmock.ResourceInfo()
        emu.resources[CONFIGMAPS] = kmock.ResourceInfo()
        emu.resources[VIRTUAL_SERVICES] = kmock.ResourceInfo()
        yield emu


class FakeWakeUp:
    """Stands in for the engine's wake call on the pod: records URLs and bodies, answers ``status``."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.bodies: list[dict[str, Any] | None] = []
        self.status = 200

    async def __call__(self, url: str, body: dict[str, Any] | None = None) -> int:
        self.urls.append(url)
        self.bodies.append(body)
        return self.status


@pytest.fixture()
def wake_up() -> FakeWakeUp:
    return FakeWakeUp()


POLICY = DRPolicy(
    models=[
        ModelPolicy(name="llama"),  # vLLM, the default engine
        ModelPolicy(name="mistral"),
        ModelPolicy(name="qwen", engine=Engine.SGLANG),
    ]
)


@pytest_asyncio.fixture()
async def platform(emulator: Any, wake_up: FakeWakeUp) -> AsyncIterator[KubernetesPlatform]:
    config = Configuration(host=str(emulator.url).rstrip("/"))
    with ApiClient(config) as client:
        yield KubernetesPlatform(client, NS, POLICY, backoff_s=0.01, poll_s=0.01, wake_up=wake_up)


@pytest_asyncio.fixture()
async def controllers(emulator: Any) -> AsyncIterator[Controllers]:
    """The Deployment controller and the kubelet: a Deployment created gets a Ready pod."""
    async with Controllers(emulator, NS) as playing:
        yield playing


def labels(emulator: Any, name: str) -> dict[str, str]:
    return dict(emulator.objects[PODS, NS, name]["metadata"]["labels"])


def patches(emulator: Any) -> list[Any]:
    return [r for r in list(emulator) if r.method == "PATCH"]


async def test_list_and_get_by_labels(platform: KubernetesPlatform) -> None:
    instances = await platform.list_instances("llama")
    assert [(i.id, i.role, i.lb_priority) for i in instances] == [
        ("llama-0", Role.SERVING, 0),
        ("llama-1", Role.HOT, 1),
    ]
    one = await platform.get_instance("llama", "llama-1")
    assert (one.address, one.node, one.zone) == ("10.0.0.7:8000", "node-a", "az-1")
    assert len(await platform.all_instances()) == 3
    with pytest.raises(ApplicationError) as err:
        await platform.get_instance("llama", "mistral-0")
    assert err.value.type == "UnknownInstance" and err.value.non_retryable
    with pytest.raises(ApplicationError, match="unknown model"):
        await platform.list_instances("nope")


async def test_probe_and_verify(platform: KubernetesPlatform, emulator: Any) -> None:
    serving = await platform.get_instance("llama", "llama-0")
    assert (await platform.probe(serving))[0]
    assert "Ready" in await platform.verify(serving, lambda _f, _s: None)
    emulator.objects[PODS, NS, "llama-0-abc"].patch({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    healthy, why = await platform.probe(serving)
    assert not healthy and "not Ready" in why


async def test_eject_flips_serving_and_is_idempotent(platform: KubernetesPlatform, emulator: Any) -> None:
    instance = await platform.get_instance("llama", "llama-0")
    assert "marked failed" in await platform.eject(instance, "dead GPU")
    assert labels(emulator, "llama-0-abc")["drctl.io/serving"] == "false"
    assert labels(emulator, "llama-0-abc")["drctl.io/role"] == "failed"
    assert len(patches(emulator)) == 1
    assert await platform.eject(instance, "again") == "already ejected"
    assert len(patches(emulator)) == 1


async def test_promote_hot_then_register(platform: KubernetesPlatform, emulator: Any) -> None:
    hot = await platform.get_instance("llama", "llama-1")
    await platform.promote(hot)
    assert labels(emulator, "llama-1-def")["drctl.io/role"] == "promoting"
    assert "registered at priority 0" in await platform.register(hot, 0)
    assert labels(emulator, "llama-1-def")["drctl.io/serving"] == "true"
    assert labels(emulator, "llama-1-def")["drctl.io/role"] == "serving"
    assert (await platform.get_instance("llama", "llama-1")).lb_priority == 0


async def test_conflict_is_reread_and_retried(platform: KubernetesPlatform, emulator: Any) -> None:
    conflict = kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
    emulator["patch", PODS][:1] << conflict
    instance = await platform.get_instance("llama", "llama-0")
    assert await platform.eject(instance, "x") == "already ejected"
    # kmock stores a write even when a reaction answers it (here with 409), unlike a real API server;
    # so the re-read after the 409 finds the labels in place and no second patch is needed. The
    # retried patch itself is covered by test_stale_resource_version_conflicts.
    assert len(patches(emulator)) == 1
    after_conflict = [r for r in list(emulator) if r.id > patches(emulator)[0].id]
    assert [(r.method, r.name) for r in after_conflict] == [("GET", "llama-0-abc")]  # the re-read
    assert labels(emulator, "llama-0-abc")["drctl.io/role"] == "failed"


async def test_stale_resource_version_conflicts(platform: KubernetesPlatform, emulator: Any) -> None:
    """A real conflict: another writer changes the pod between our read and our patch."""
    original = platform.core.read_namespaced_pod

    def read_then_someone_writes(name: str, namespace: str) -> Any:
        found = original(name, namespace)
        if not hasattr(read_then_someone_writes, "done"):
            read_then_someone_writes.done = True  # type: ignore[attr-defined]
            platform.core.patch_namespaced_pod(
                name,
                namespace,
                {"metadata": {"annotations": {"other": "writer"}}},
                _content_type="application/merge-patch+json",
            )
        return found

    platform.core.read_namespaced_pod = read_then_someone_writes  # type: ignore[method-assign,assignment]
    await platform.register(await platform.get_instance("llama", "llama-1"), 0)
    assert labels(emulator, "llama-1-def")["drctl.io/serving"] == "true"
    assert len(patches(emulator)) == 3  # the other writer, our stale patch (409), our retry


@pytest.mark.parametrize("status", [429, 503])
async def test_transient_errors_are_retried(platform: KubernetesPlatform, emulator: Any, status: int) -> None:
    emulator["list", PODS][:2] << kmock.KubernetesError(status=status, reason="Busy", message="try later")
    instances = await platform.list_instances("llama")
    assert len(instances) == 2
    assert len([r for r in list(emulator) if r.method == "GET" and r.name is None and r.resource == PODS]) == 3


async def test_forbidden_is_final_and_names_the_permission(platform: KubernetesPlatform, emulator: Any) -> None:
    message = 'pods "llama-0-abc" is forbidden: User "drctl" cannot patch resource "pods" in the namespace "fleet"'
    emulator["patch", PODS] << kmock.KubernetesError(status=403, reason="Forbidden", message=message)
    start = time.monotonic()
    with pytest.raises(ApplicationError) as err:
        await platform.eject(await platform.get_instance("llama", "llama-0"), "x")
    assert time.monotonic() - start < 1.0
    assert err.value.type == "PermissionDenied" and err.value.non_retryable
    assert "denied patch on pods" in str(err.value) and "cannot patch resource" in str(err.value)
    assert len(patches(emulator)) == 1


async def test_create_and_delete_deployment(
    platform: KubernetesPlatform, emulator: Any, controllers: Controllers, wake_up: FakeWakeUp
) -> None:
    def action(tier: Role, kind: ReconcileActionKind = ReconcileActionKind.CREATE) -> ReconcileAction:
        return ReconcileAction(
            kind=kind, model="llama", instance=f"llama-{tier}", tier=tier, gpu="node-a/3", node="node-a"
        )

    warm_created = await platform.create_instance(action(Role.WARM), lambda _f, _s: None)
    assert "created: warm" in warm_created and "Ready after" in warm_created, warm_created  # waited for its pod
    assert "put to sleep" in warm_created and wake_up.urls[-1].endswith(":8000/sleep?level=1")  # vLLM's sleep
    assert "created: cold, no GPU, scaled to 0" in await platform.create_instance(
        action(Role.COLD), lambda _f, _s: None
    )
    assert "exists already" in await platform.create_instance(action(Role.WARM), lambda _f, _s: None)
    warm = emulator.objects[DEPLOYMENTS, NS, "llama-warm"]
    container = warm["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert warm["spec"]["replicas"] == 1 and warm["spec"]["strategy"] == {"type": "Recreate"}
    assert warm["spec"]["template"]["metadata"]["labels"]["drctl.io/role"] == "warm"
    assert warm["spec"]["selector"]["matchLabels"] == {"drctl.io/model": "llama", "drctl.io/instance": "llama-warm"}
    cold = emulator.objects[DEPLOYMENTS, NS, "llama-cold"]
    assert "resources" not in cold["spec"]["template"]["spec"]["containers"][0]
    assert cold["spec"]["replicas"] == 0  # a checkpoint and no process: promotion scales it up
    deleted = await platform.delete_instance(action(Role.WARM, ReconcileActionKind.DELETE))
    assert deleted == "deployment llama-warm deleted"
    assert emulator.objects[DEPLOYMENTS, NS, "llama-warm"].deleted
    assert await platform.delete_instance(action(Role.WARM, ReconcileActionKind.DELETE)) == "already gone"
    for _ in range(100):  # its pod goes with it (the garbage collector)
        if not controllers.pods_of("llama-warm"):
            break
        await asyncio.sleep(0.02)
    assert not controllers.pods_of("llama-warm")


async def test_cordons_are_kept_in_a_configmap(platform: KubernetesPlatform, emulator: Any) -> None:
    assert "cordoned" in await platform.cordon_gpu("node-a/0", "xid 79")
    assert await platform.cordon_gpu("node-a/0", "again") == "node-a/0 already cordoned (xid 79)"
    assert "cordoned" in await platform.cordon_gpu("node-a/1", "ecc")
    stored = emulator.objects[CONFIGMAPS, NS, "drctl-cordoned-gpus"]["data"]["cordoned.json"]
    assert json.loads(stored) == {"node-a/0": "xid 79", "node-a/1": "ecc"}
    assert await platform.cordoned_gpus() == ["node-a/0", "node-a/1"]
    assert "back in placement" in await platform.uncordon_gpu("node-a/0")
    assert await platform.uncordon_gpu("node-a/0") == "node-a/0 was not cordoned"
    assert await platform.cordoned_gpus() == ["node-a/1"]


def gpu_node(name: str, *, ready: str | None = "True", unschedulable: bool = False, taints: Any = ()) -> Any:
    node: dict[str, Any] = {"metadata": {"name": name}, "spec": {"taints": list(taints)}, "status": {}}
    if unschedulable:
        node["spec"]["unschedulable"] = True
    if ready is not None:
        node["status"]["conditions"] = [{"type": "Ready", "status": ready, "reason": "Kubelet"}]
    return node


async def test_gpus_of_a_node_the_cluster_closed_are_kept_out_of_placement(
    platform: KubernetesPlatform, emulator: Any
) -> None:
    """Read from the Node objects (the default policy's pool: gpu-node-0..3, 4 GPUs each), never
    written to the cordons' ConfigMap: NotReady (False or Unknown), cordoned, or tainted with what
    the instance pods do not tolerate. The GPU nodes' own taint (tolerated), a PreferNoSchedule
    taint, a Node without a Ready condition yet and a Node outside the pool change nothing."""
    gpu_taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    nodes = {
        "gpu-node-0": gpu_node("gpu-node-0", ready="False", taints=[gpu_taint]),
        "gpu-node-1": gpu_node("gpu-node-1", unschedulable=True),
        "gpu-node-2": gpu_node("gpu-node-2", taints=[gpu_taint, {"key": "drctl.io/drill", "effect": "NoExecute"}]),
        "gpu-node-3": gpu_node("gpu-node-3", taints=[gpu_taint, {"key": "team", "effect": "PreferNoSchedule"}]),
        "node-b": gpu_node("node-b", ready="Unknown"),  # not in the pool
    }
    for name, body in nodes.items():
        emulator.objects[NODES, None, name] = body
    assert await platform.closed_nodes() == {
        "gpu-node-0": "NotReady (Kubelet)",
        "gpu-node-1": "cordoned (unschedulable)",
        "gpu-node-2": "tainted drctl.io/drill:NoExecute",
    }
    assert await platform.cordon_gpu("node-a/0", "xid 79")
    want = ["node-a/0", *(f"gpu-node-{n}/{i}" for n in range(3) for i in range(4))]
    assert await platform.cordoned_gpus() == sorted(want)
    stored = emulator.objects[CONFIGMAPS, NS, "drctl-cordoned-gpus"]["data"]["cordoned.json"]
    assert json.loads(stored) == {"node-a/0": "xid 79"}

    # The Nodes back in service (and one lost: Unknown; one tainted with a key it does not tolerate).
    emulator.objects[NODES, None, "gpu-node-0"] = gpu_node("gpu-node-0", ready="Unknown")
    emulator.objects[NODES, None, "gpu-node-1"] = gpu_node("gpu-node-1", ready=None)
    emulator.objects[NODES, None, "gpu-node-2"] = gpu_node(
        "gpu-node-2", taints=[{"key": "nvidia.com/gpu", "value": "x", "effect": "NoExecute"}]
    )
    assert await platform.closed_nodes() == {
        "gpu-node-0": "NotReady (Kubelet)",
        "gpu-node-2": "tainted nvidia.com/gpu=x:NoExecute",
    }
    assert "gpu-node-1/0" not in await platform.cordoned_gpus()


async def test_nodes_that_cannot_be_read_close_nothing(
    platform: KubernetesPlatform, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.objects[NODES, None, "gpu-node-0"] = gpu_node("gpu-node-0", ready="False")
    message = 'nodes is forbidden: User "system:serviceaccount:fleet:drctl" cannot list resource "nodes"'
    emulator["list", NODES] << kmock.KubernetesError(status=403, reason="Forbidden", message=message)
    with caplog.at_level(logging.WARNING):
        assert await platform.closed_nodes() == {}
    assert "cannot read the Nodes" in caplog.text and "denied list on nodes" in caplog.text


# -- warm and cold promotion ----------------------------------------------------------------------


def cold_deployment(name: str, *, replicas: int) -> dict[str, Any]:
    tier = {"drctl.io/model": "llama", "drctl.io/instance": name, "drctl.io/role": "cold", "drctl.io/serving": "false"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "1", "labels": tier},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"drctl.io/model": "llama", "drctl.io/instance": name}},
            "template": {
                "metadata": {"labels": tier},
                "spec": {"containers": [{"name": "model", "image": "x", "ports": [{"containerPort": 8000}]}]},
            },
        },
    }


async def test_warm_promotion_wakes_the_pod_and_relabels(
    platform: KubernetesPlatform, emulator: Any, wake_up: FakeWakeUp
) -> None:
    emulator.objects[PODS, NS, "llama-2-xyz"] = pod("llama-2-xyz", "llama", Role.WARM, "llama-2")
    warm = await platform.get_instance("llama", "llama-2")
    assert "woken up" in await platform.promote(warm)
    assert wake_up.urls == ["http://10.0.0.7:8000/wake_up"]  # vLLM's wake call
    assert wake_up.bodies == [None]
    assert labels(emulator, "llama-2-xyz")["drctl.io/role"] == "promoting"
    assert labels(emulator, "llama-2-xyz")["drctl.io/serving"] == "false"
    promoting = await platform.get_instance("llama", "llama-2")
    assert await platform.promote(promoting) == "already promoting"
    assert len(wake_up.urls) == 1


async def test_warm_wake_up_failure_is_a_load_failure(
    platform: KubernetesPlatform, emulator: Any, wake_up: FakeWakeUp
) -> None:
    emulator.objects[PODS, NS, "llama-2-xyz"] = pod("llama-2-xyz", "llama", Role.WARM, "llama-2")
    wake_up.status = 503
    with pytest.raises(ApplicationError, match="/wake_up answered 503") as err:
        await platform.promote(await platform.get_instance("llama", "llama-2"))
    assert err.value.type == "ModelLoadFailed"
    assert labels(emulator, "llama-2-xyz")["drctl.io/role"] == "warm"


async def test_cold_promotion_patches_the_deployment_and_waits_for_a_ready_pod(
    platform: KubernetesPlatform, emulator: Any, wake_up: FakeWakeUp
) -> None:
    emulator.objects[DEPLOYMENTS, NS, "llama-9"] = cold_deployment("llama-9", replicas=0)
    cold = await platform.get_instance("llama", "llama-9")
    assert (cold.role, cold.note, cold.address) == (Role.COLD, "deployment llama-9, no pod", None)
    assert "patched to 1 GPU" in await platform.promote(cold)
    assert wake_up.urls == []
    deployment = emulator.objects[DEPLOYMENTS, NS, "llama-9"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["metadata"]["labels"]["drctl.io/role"] == "promoting"
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["drctl.io/role"] == "promoting"
    assert template["metadata"]["labels"]["drctl.io/instance"] == "llama-9"  # the selector still matches
    container = template["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert container["image"] == "x" and container["ports"] == [{"containerPort": 8000}]
    patched = len(patches(emulator))
    promoting = await platform.get_instance("llama", "llama-9")
    assert promoting.role == Role.PROMOTING
    assert "already promoting" in await platform.promote(cold)
    assert len(patches(emulator)) == patched

    beats: list[str] = []

    async def the_controller() -> None:
        """What the Deployment controller and kubelet would do: a pod, later Ready."""
        await asyncio.sleep(0.05)
        new = pod("llama-9-new", "llama", Role.PROMOTING, "llama-9", ready=False)
        new["spec"]["containers"][0]["resources"] = container["resources"]
        emulator.objects[PODS, NS, "llama-9-new"] = new
        await asyncio.sleep(0.05)
        emulator.objects[PODS, NS, "llama-9-new"].patch(
            {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        )

    controller = asyncio.create_task(the_controller())
    detail = await platform.wait_loaded(promoting, lambda _f, s: beats.append(s), timeout_s=5.0)
    await controller
    assert detail.startswith("pod llama-9-new Ready")
    assert "pod not created yet" in beats and "pod Running" in beats


async def test_cold_pod_without_gpu_is_not_taken_for_the_loaded_one(
    platform: KubernetesPlatform, emulator: Any
) -> None:
    """A cold standby running without a GPU: during the rollout its old pod is still Ready."""
    emulator.objects[DEPLOYMENTS, NS, "llama-9"] = cold_deployment("llama-9", replicas=1)
    emulator.objects[PODS, NS, "llama-9-old"] = pod("llama-9-old", "llama", Role.COLD, "llama-9")
    cold = await platform.get_instance("llama", "llama-9")
    assert cold.note == "llama-9-old"
    await platform.promote(cold)
    assert labels(emulator, "llama-9-old")["drctl.io/role"] == "promoting"
    with pytest.raises(TimeoutError):
        await platform.wait_loaded(cold, lambda _f, _s: None, timeout_s=0.1)


# -- Istio mode --------------------------------------------------------------------------------------


def virtual_service() -> dict[str, Any]:
    def destination(host: str, weight: int) -> dict[str, Any]:
        return {"destination": {"host": host, "port": {"number": 8080}}, "weight": weight}

    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": "model-routing", "namespace": NS, "resourceVersion": "1"},
        "spec": {
            "hosts": ["inference.example.com"],
            "http": [
                {
                    "match": [{"headers": {"model-name": {"exact": "llama"}}}],
                    "route": [destination("llama", 100), destination("llama-standby.fleet.svc.cluster.local", 0)],
                    "retries": {"attempts": 3},
                },
                {
                    "match": [{"headers": {"model-name": {"exact": "mistral"}}}],
                    "route": [destination("mistral", 100), destination("mistral-standby", 0)],
                },
            ],
        },
    }


def weights(emulator: Any) -> list[list[tuple[str, int]]]:
    spec = emulator.objects[VIRTUAL_SERVICES, NS, "model-routing"]["spec"]
    return [[(d["destination"]["host"], d["weight"]) for d in r["route"]] for r in spec["http"]]


@pytest_asyncio.fixture()
async def istio_platform(emulator: Any, wake_up: FakeWakeUp) -> AsyncIterator[KubernetesPlatform]:
    emulator.objects[VIRTUAL_SERVICES, NS, "model-routing"] = virtual_service()
    config = Configuration(host=str(emulator.url).rstrip("/"))
    with ApiClient(config) as client:
        yield KubernetesPlatform(
            client, NS, POLICY, backoff_s=0.01, poll_s=0.01, wake_up=wake_up, istio_virtual_service="model-routing"
        )


async def test_istio_register_shifts_weights_idempotently(istio_platform: KubernetesPlatform, emulator: Any) -> None:
    hot = await istio_platform.get_instance("llama", "llama-1")
    assert "weights" not in await istio_platform.register(hot, 1)  # a hot backup leaves traffic alone
    assert weights(emulator)[0] == [("llama", 100), ("llama-standby.fleet.svc.cluster.local", 0)]
    detail = await istio_platform.register(hot, 0)
    assert "VirtualService model-routing weights 0/100" in detail
    assert weights(emulator) == [
        [("llama", 0), ("llama-standby.fleet.svc.cluster.local", 100)],
        [("mistral", 100), ("mistral-standby", 0)],
    ]
    spec = emulator.objects[VIRTUAL_SERVICES, NS, "model-routing"]["spec"]
    assert spec["http"][0]["retries"] == {"attempts": 3} and spec["hosts"] == ["inference.example.com"]
    vs_patches = [r for r in patches(emulator) if r.resource == VIRTUAL_SERVICES]
    assert len(vs_patches) == 1
    again = await istio_platform.register(hot, 0)
    assert "already registered" in again and "already at 0/100" in again
    assert len([r for r in patches(emulator) if r.resource == VIRTUAL_SERVICES]) == 1


async def test_istio_without_a_route_for_the_model_is_nothing_to_shift(
    istio_platform: KubernetesPlatform, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A model the VirtualService has no route for is not routed by it: its Service, which the
    label flip already switched, is its only routing. So register says so and succeeds, writing
    nothing to the VirtualService. It used to fail, non-retryable, *after* the pod was labelled
    serving, which failed the failover of a model that had nothing to shift."""
    vs = emulator.objects[VIRTUAL_SERVICES, NS, "model-routing"]
    vs.patch({"spec": {"http": [vs["spec"]["http"][1]]}})  # mistral's route only
    before = copy.deepcopy(dict(emulator.objects[VIRTUAL_SERVICES, NS, "model-routing"].raw))
    with caplog.at_level(logging.WARNING, logger="drctl.platforms.kubernetes.istio"):
        detail = await istio_platform.register(await istio_platform.get_instance("llama", "llama-1"), 0)
    assert "registered at priority 0" in detail
    assert "nothing to shift for llama" in detail and "no http route" in detail
    assert "nothing to shift for llama" in caplog.text
    assert labels(emulator, "llama-1-def")["drctl.io/serving"] == "true"
    assert not [r for r in patches(emulator) if r.resource == VIRTUAL_SERVICES]
    assert dict(emulator.objects[VIRTUAL_SERVICES, NS, "model-routing"].raw) == before
    # A model that has a route is still shifted on the same VirtualService.
    detail = await istio_platform.register(await istio_platform.get_instance("mistral", "mistral-0"), 0)
    assert "weights 0/100" in detail
    assert weights(emulator) == [[("mistral", 0), ("mistral-standby", 100)]]


@pytest.fixture()
def kubeconfig(emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A kubeconfig whose current context is the emulator (what ``make_platform`` loads outside a
    cluster); the client's default configuration it sets is put back afterwards."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": str(emulator.url).rstrip("/")}}],
                "users": [{"name": "drctl", "user": {"token": "t"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "drctl"}}],
                "current-context": "emu",
            }
        )
    )
    # The client reads $KUBECONFIG once, when imported: set where it keeps it.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    saved = Configuration._default  # type: ignore[attr-defined]
    try:
        yield
    finally:
        Configuration._default = saved  # type: ignore[attr-defined]


async def test_the_settings_switch_istio_mode_on_with_their_host_templates(
    emulator: Any, kubeconfig: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DRCTL_KUBERNETES_ISTIO_* reach the platform through the factory: the VirtualService named and
    the route hosts as templated (here ``{model}-primary`` / ``{model}-backup``, not the defaults)."""
    vs = virtual_service()
    vs["spec"]["http"][0]["route"] = [
        {"destination": {"host": "llama-primary"}, "weight": 90},
        {"destination": {"host": "llama-backup.fleet.svc.cluster.local"}, "weight": 10},
    ]
    emulator.objects[VIRTUAL_SERVICES, NS, "model-routing"] = vs
    monkeypatch.setenv("DRCTL_KUBERNETES_ISTIO_VIRTUAL_SERVICE", "model-routing")
    monkeypatch.setenv("DRCTL_KUBERNETES_ISTIO_PRIMARY_HOST", "{model}-primary")
    monkeypatch.setenv("DRCTL_KUBERNETES_ISTIO_STANDBY_HOST", "{model}-backup")
    settings = DrctlSettings(_env_file=None, platform="kubernetes", kubernetes_namespace=NS)  # type: ignore[call-arg]
    platform = make_platform(settings, POLICY)
    assert isinstance(platform, KubernetesPlatform)
    try:
        detail = await platform.register(await platform.get_instance("llama", "llama-1"), 0)
    finally:
        await platform.close()
    assert "VirtualService model-routing weights 0/100 (was 90/10, recorded for failback)" in detail
    assert weights(emulator)[0] == [("llama-primary", 0), ("llama-backup.fleet.svc.cluster.local", 100)]


async def test_istio_mode_is_off_by_default_and_a_host_template_must_name_the_model(
    emulator: Any, kubeconfig: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("VIRTUAL_SERVICE", "PRIMARY_HOST", "STANDBY_HOST"):
        monkeypatch.delenv(f"DRCTL_KUBERNETES_ISTIO_{name}", raising=False)
    settings = DrctlSettings(_env_file=None, platform="kubernetes", kubernetes_namespace=NS)  # type: ignore[call-arg]
    assert (settings.kubernetes_istio_primary_host, settings.kubernetes_istio_standby_host) == (
        "{model}",
        "{model}-standby",
    )
    platform = make_platform(settings, POLICY)
    assert isinstance(platform, KubernetesPlatform) and platform.istio is None
    await platform.close()
    for bad in ("llama-standby", "{model}-{zone}"):
        with pytest.raises(ValidationError, match="kubernetes_istio_standby_host"):
            DrctlSettings(_env_file=None, kubernetes_istio_standby_host=bad)  # type: ignore[call-arg]


async def test_istio_forbidden_names_the_resource(istio_platform: KubernetesPlatform, emulator: Any) -> None:
    message = 'virtualservices.networking.istio.io "model-routing" is forbidden'
    emulator["patch", VIRTUAL_SERVICES] << kmock.KubernetesError(status=403, reason="Forbidden", message=message)
    with pytest.raises(ApplicationError) as err:
        await istio_platform.register(await istio_platform.get_instance("llama", "llama-1"), 0)
    assert err.value.type == "PermissionDenied"
    assert "denied patch on virtualservices.networking.istio.io" in str(err.value)


# -- probe: each tier by its own healthy state ----------------------------------------------------
#
# A sleeping model server may fail its pod's readiness probe (one that answers its health path 503
# while asleep; vLLM and the demo answer 200): a warm standby's normal state, asked on the engine's
# health path and is-sleeping query. A cold standby is a Deployment scaled to 0, without a
# pod. Neither is a failure a failover's confirm step may act on.

PROBE_CKPT_SIZE = 256 * 1024


def warm_pod(server: Server | None, *, ready: bool = False, container: dict[str, Any] | None = None) -> Any:
    """A warm standby's pod, Running; its address is the demo server's when there is one."""
    body = pod("llama-2-xyz", "llama", Role.WARM, "llama-2", ready=ready)
    if server is not None:
        body["status"]["podIP"] = "127.0.0.1"
        body["spec"]["containers"][0]["ports"] = [{"containerPort": int(server.url.rsplit(":", 1)[1])}]
    if container is not None:
        body["status"]["containerStatuses"] = [
            {"name": "model", "image": "x", "imageID": "x", "ready": False, "restartCount": 3, **container}
        ]
    return body


@pytest.fixture()
def probe_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / f"{DEMO_MODEL}.ckpt"
    ensure_checkpoint(path, DEMO_MODEL, PROBE_CKPT_SIZE)
    return path


@pytest.fixture()
def sleeping(probe_checkpoint: Path, tmp_path: Path) -> Iterator[Server]:
    with demo_server(probe_checkpoint, tmp_path, "--sleeping") as server:
        server.wait_until("sleeping")
        yield server


async def test_a_sleeping_warm_pod_that_fails_readiness_is_healthy(
    platform: KubernetesPlatform, emulator: Any, sleeping: Server
) -> None:
    emulator.objects[PODS, NS, "llama-2-xyz"] = warm_pod(sleeping, container={"state": {"running": {}}})
    warm = await platform.get_instance("llama", "llama-2")
    healthy, why = await platform.probe(warm)
    assert healthy and "asleep" in why, why
    # The same pod read as a hot standby is not healthy: a hot standby must be Ready.
    hot = warm.model_copy(update={"role": Role.HOT})
    healthy, why = await platform.probe(hot)
    assert not healthy and "not Ready" in why


async def test_a_warm_pod_whose_server_is_gone_is_not(
    platform: KubernetesPlatform, emulator: Any, sleeping: Server
) -> None:
    emulator.objects[PODS, NS, "llama-2-xyz"] = warm_pod(sleeping)
    sleeping.process.kill()
    sleeping.process.wait(5)
    healthy, why = await platform.probe(await platform.get_instance("llama", "llama-2"))
    assert not healthy and "did not answer" in why


async def test_a_warm_pod_whose_model_failed_is_not(
    platform: KubernetesPlatform, emulator: Any, probe_checkpoint: Path, tmp_path: Path
) -> None:
    corrupt_checkpoint(probe_checkpoint, offset=PROBE_CKPT_SIZE // 2)
    with demo_server(probe_checkpoint, tmp_path, "--sleeping") as server:
        server.wait_until("failed")
        emulator.objects[PODS, NS, "llama-2-xyz"] = warm_pod(server)
        healthy, why = await platform.probe(await platform.get_instance("llama", "llama-2"))
    assert not healthy and "/health 503" in why, why  # llama is vLLM: no load progress to say why


async def test_a_warm_pod_with_a_crashing_container_is_not(platform: KubernetesPlatform, emulator: Any) -> None:
    crashing = {"state": {"waiting": {"reason": "CrashLoopBackOff"}}}
    emulator.objects[PODS, NS, "llama-2-xyz"] = warm_pod(None, container=crashing)
    healthy, why = await platform.probe(await platform.get_instance("llama", "llama-2"))
    assert not healthy and "not running: model" in why


async def test_a_ready_warm_pod_is_healthy_without_asking_it(platform: KubernetesPlatform, emulator: Any) -> None:
    emulator.objects[PODS, NS, "llama-2-xyz"] = warm_pod(None, ready=True)  # 10.0.0.7: nothing answers there
    healthy, why = await platform.probe(await platform.get_instance("llama", "llama-2"))
    assert healthy and "Ready" in why


async def test_a_cold_deployment_scaled_to_zero_is_healthy(platform: KubernetesPlatform, emulator: Any) -> None:
    emulator.objects[DEPLOYMENTS, NS, "llama-9"] = cold_deployment("llama-9", replicas=0)
    cold = await platform.get_instance("llama", "llama-9")
    healthy, why = await platform.probe(cold)
    assert healthy and "without a pod" in why
    emulator.objects[DEPLOYMENTS, NS, "llama-9"].delete()
    healthy, why = await platform.probe(cold)
    assert not healthy and why == "no pod"
    # A hot standby without a pod is down, Deployment or not.
    emulator.objects[DEPLOYMENTS, NS, "llama-8"] = cold_deployment("llama-8", replicas=0)
    hot = cold.model_copy(update={"id": "llama-8", "role": Role.HOT})
    assert await platform.probe(hot) == (False, "no pod")


# -- engines: each model's pods are built and called as its engine wants ------------------------------


def instance_action(model: str, tier: Role, instance: str) -> ReconcileAction:
    return ReconcileAction(
        kind=ReconcileActionKind.CREATE, model=model, instance=instance, tier=tier, gpu="node-a/1", node="node-a"
    )


async def test_a_vllm_instance_pod_runs_the_openai_server_with_sleep_mode(
    platform: KubernetesPlatform, emulator: Any, controllers: Controllers
) -> None:
    await platform.create_instance(instance_action("llama", Role.HOT, "llama-7"), lambda _f, _s: None)
    spec = emulator.objects[DEPLOYMENTS, NS, "llama-7"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "vllm/vllm-openai:latest"
    args = container["args"]
    assert args[args.index("--model") + 1] == "/models/llama"
    assert args[args.index("--served-model-name") + 1] == "llama"
    assert args[args.index("--port") + 1] == "8000" and "--enable-sleep-mode" in args
    assert container["env"] == [{"name": "VLLM_SERVER_DEV_MODE", "value": "1"}]
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "model loads take minutes"
    assert "livenessProbe" not in container  # a hung instance is drctl's to fail over
    assert container["resources"]["requests"] == {"nvidia.com/gpu": "1"}
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": "node-a"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["drctl-models"]


async def test_an_sglang_instance_pod_runs_launch_server_with_the_memory_saver(
    platform: KubernetesPlatform, emulator: Any, controllers: Controllers, wake_up: FakeWakeUp
) -> None:
    await platform.create_instance(instance_action("qwen", Role.WARM, "qwen-1"), lambda _f, _s: None)
    (container,) = emulator.objects[DEPLOYMENTS, NS, "qwen-1"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "lmsysorg/sglang:latest"
    command = container["command"]
    assert command[:3] == ["python3", "-m", "sglang.launch_server"]
    assert command[command.index("--model-path") + 1] == "/models/qwen"
    assert command[command.index("--served-model-name") + 1] == "qwen"
    assert command[command.index("--host") + 1] == "0.0.0.0" and command[command.index("--port") + 1] == "8000"
    assert "--enable-memory-saver" in command and "args" not in container and "env" not in container
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert wake_up.urls[-1].endswith("/release_memory_occupation")  # a warm SGLang standby's sleep


async def test_the_images_and_the_weights_are_the_platforms_settings(emulator: Any, wake_up: FakeWakeUp) -> None:
    config = Configuration(host=str(emulator.url).rstrip("/"))
    with ApiClient(config) as client:
        platform = KubernetesPlatform(
            client,
            NS,
            POLICY,
            image="registry.local/vllm:v1",  # DRCTL_KUBERNETES_IMAGE: vLLM's
            images={Engine.SGLANG: "registry.local/sglang:v2"},
            model_source="hf-org/{model}-instruct",
            models_claim=None,
        )
        vllm = platform.deployment(instance_action("llama", Role.HOT, "llama-7"))["spec"]["template"]["spec"]
        sglang = platform.deployment(instance_action("qwen", Role.HOT, "qwen-7"))["spec"]["template"]["spec"]
    assert vllm["containers"][0]["image"] == "registry.local/vllm:v1"
    assert "hf-org/llama-instruct" in vllm["containers"][0]["args"]
    assert sglang["containers"][0]["image"] == "registry.local/sglang:v2"
    assert [v["name"] for v in vllm["volumes"]] == ["dshm"]
    assert [m["mountPath"] for m in vllm["containers"][0]["volumeMounts"]] == ["/dev/shm"]


async def test_the_demo_engine_has_no_pod_template(emulator: Any) -> None:
    demo_policy = DRPolicy(models=[ModelPolicy(name="llama", engine=Engine.DEMO)])
    config = Configuration(host=str(emulator.url).rstrip("/"))
    with ApiClient(config) as client:
        platform = KubernetesPlatform(client, NS, demo_policy)
        with pytest.raises(ApplicationError, match="no pod template for the demo engine") as err:
            await platform.create_instance(instance_action("llama", Role.HOT, "llama-7"), lambda _f, _s: None)
    assert err.value.non_retryable and (DEPLOYMENTS, NS, "llama-7") not in emulator.objects


async def test_an_sglang_warm_standby_is_woken_by_resuming_its_memory(
    platform: KubernetesPlatform, emulator: Any, wake_up: FakeWakeUp
) -> None:
    emulator.objects[PODS, NS, "qwen-2-xyz"] = pod("qwen-2-xyz", "qwen", Role.WARM, "qwen-2")
    assert "woken up" in await platform.promote(await platform.get_instance("qwen", "qwen-2"))
    assert wake_up.urls == ["http://10.0.0.7:8000/resume_memory_occupation"]
    assert wake_up.bodies == [{}]


async def test_retiering_warm_to_hot_wakes_the_model(
    platform: KubernetesPlatform, emulator: Any, wake_up: FakeWakeUp
) -> None:
    emulator.objects[PODS, NS, "llama-2-xyz"] = pod("llama-2-xyz", "llama", Role.WARM, "llama-2")
    action = instance_action("llama", Role.HOT, "llama-2").model_copy(update={"kind": ReconcileActionKind.RETIER})
    detail = await platform.retier_instance(action, lambda _f, _s: None)
    assert "warm → hot" in detail and wake_up.urls == ["http://10.0.0.7:8000/wake_up"]
    assert labels(emulator, "llama-2-xyz")["drctl.io/role"] == "hot"


async def test_the_highest_instance_index_is_kept_past_a_delete(platform: KubernetesPlatform, emulator: Any) -> None:
    """Kept in the fencing ConfigMap, raised before the Deployment is created: reconciliation names
    the next instance past it, never after a deleted Deployment."""

    def cold(instance: str, kind: ReconcileActionKind = ReconcileActionKind.CREATE) -> ReconcileAction:
        return ReconcileAction(kind=kind, model="llama", instance=instance, tier=Role.COLD)

    assert await platform.highest_indexes() == {}
    await platform.create_instance(cold("llama-7"), lambda _f, _s: None)
    await platform.create_instance(cold("llama-3"), lambda _f, _s: None)  # lower: changes nothing
    await platform.delete_instance(cold("llama-7", ReconcileActionKind.DELETE))
    assert await platform.highest_indexes() == {"llama": 7}
    await platform.claim_epoch("llama")  # the epochs share the ConfigMap: neither loses the other
    assert await platform.highest_indexes() == {"llama": 7} and await platform.epochs() == {"llama": 1}
    fencing = emulator.objects[CONFIGMAPS, NS, "drctl-fencing"]
    assert fencing["metadata"]["annotations"]["index.drctl.io/llama"] == "7"


async def test_epochs_claimed_side_by_side_are_each_new_and_written_together(
    platform: KubernetesPlatform, emulator: Any
) -> None:
    """A zone failover's batch claims many epochs at once: each claimer gets its own (a model twice
    gets two, in order), none is handed out twice, and the ConfigMap holds the last of each."""
    models = ["llama", "mistral", "llama", "qwen", "llama", "mistral"]
    claimed = await asyncio.gather(*(platform.claim_epoch(m) for m in models))
    assert claimed == [1, 1, 2, 1, 3, 2]
    assert await platform.epochs() == {"llama": 3, "mistral": 2, "qwen": 1}
    # A claim after them goes on from there; a fenced step with an older epoch is refused.
    assert await platform.claim_epoch("qwen") == 2
    annotations = emulator.objects[CONFIGMAPS, NS, "drctl-fencing"]["metadata"]["annotations"]
    assert annotations["epoch.drctl.io/llama"] == "3" and annotations["epoch.drctl.io/qwen"] == "2"
