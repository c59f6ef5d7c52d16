"""KubernetesPlatform against kmock's KubernetesEmulator over real HTTP on loopback.

The emulator lacks two things a real API server has; ``Emulator`` below adds them:
- label selectors: it lists every object of a resource, ignoring ``?labelSelector=``;
- resourceVersion: it neither sets one nor rejects a write carrying a stale one with 409.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import kmock
import pytest
import pytest_asyncio
from kubernetes.client import ApiClient, Configuration
from temporalio.exceptions import ApplicationError

from drctl.activities.kubernetes.platform import KubernetesPlatform
from drctl.payloads import ReconcileAction, ReconcileActionKind, Role
from drctl.policies.schema import DRPolicy, ModelPolicy

NS = "fleet"
PODS = kmock.resource("", "v1", "pods")
NODES = kmock.resource("", "v1", "nodes")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")


def _matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selectors (``k=v``, ``k!=v``, ``k``, ``!k``), as the API server does."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class Emulator(kmock.KubernetesEmulator):
    """Adds label selectors and resourceVersion (set on every write, checked on patches)."""

    _versions = itertools.count(1000)

    async def _serve_list(self, request: kmock.Request) -> Any:
        result: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            items = result["items"]
            result["items"] = [o for o in items if _matches(o.get("metadata", {}).get("labels") or {}, selector)]
        return result

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == kmock.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                stored = self.objects[key].get("metadata", {}).get("resourceVersion") if key in self.objects else None
                sent = meta.get("resourceVersion")
                if sent is not None and stored is not None and sent != stored:
                    return await self._render_error(
                        kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
                    )
            if request.action in (kmock.action.UPDATE, kmock.action.CREATE):
                meta["resourceVersion"] = str(next(self._versions))
        return await super()._handle(request)


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
        yield emu


@pytest_asyncio.fixture()
async def platform(emulator: Any) -> AsyncIterator[KubernetesPlatform]:
    config = Configuration(host=str(emulator.url).rstrip("/"))
    with ApiClient(config) as client:
        policy = DRPolicy(models=[ModelPolicy(name="llama"), ModelPolicy(name="mistral")])
        yield KubernetesPlatform(client, NS, policy, backoff_s=0.01, poll_s=0.01)


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
    assert (one.host, one.port, one.node, one.zone) == ("10.0.0.7", 8000, "node-a", "az-1")
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
    warm = hot.model_copy(update={"role": Role.WARM})
    with pytest.raises(ApplicationError, match="not built on Kubernetes yet") as err:
        await platform.promote(warm)
    assert err.value.non_retryable


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


async def test_create_and_delete_deployment(platform: KubernetesPlatform, emulator: Any) -> None:
    def action(tier: Role, kind: ReconcileActionKind = ReconcileActionKind.CREATE) -> ReconcileAction:
        return ReconcileAction(
            kind=kind, model="llama", instance=f"llama-{tier}", tier=tier, gpu="node-a/3", node="node-a"
        )

    assert "created" in await platform.create_instance(action(Role.WARM), lambda _f, _s: None)
    assert "created" in await platform.create_instance(action(Role.COLD), lambda _f, _s: None)
    assert "already exists" in await platform.create_instance(action(Role.WARM), lambda _f, _s: None)
    warm = emulator.objects[DEPLOYMENTS, NS, "llama-warm"]
    container = warm["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert warm["spec"]["template"]["metadata"]["labels"]["drctl.io/role"] == "warm"
    assert warm["spec"]["selector"]["matchLabels"] == {"drctl.io/model": "llama", "drctl.io/instance": "llama-warm"}
    cold = emulator.objects[DEPLOYMENTS, NS, "llama-cold"]
    assert "resources" not in cold["spec"]["template"]["spec"]["containers"][0]
    deleted = await platform.delete_instance(action(Role.WARM, ReconcileActionKind.DELETE))
    assert deleted == "deployment llama-warm deleted"
    assert emulator.objects[DEPLOYMENTS, NS, "llama-warm"].deleted
    assert await platform.delete_instance(action(Role.WARM, ReconcileActionKind.DELETE)) == "already gone"


async def test_cordon_in_memory(platform: KubernetesPlatform) -> None:
    assert "cordoned" in await platform.cordon_gpu("node-a/0", "xid 79")
    assert "already" in await platform.cordon_gpu("node-a/0", "again")
    assert await platform.cordoned_gpus() == ["node-a/0"]
