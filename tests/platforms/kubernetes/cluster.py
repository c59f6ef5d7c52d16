"""A cluster for the Kubernetes platform's tests: kmock's KubernetesEmulator over real HTTP, with
what the emulator lacks added (``Emulator``) and the controllers it does not run played by
``Controllers``.

The emulator is an in-memory object store behind the Kubernetes REST API. It lacks, and ``Emulator``
adds: label selectors (it lists every object of a resource, ignoring ``?labelSelector=``),
resourceVersion (it neither sets one nor refuses with 409 a write carrying a stale one) and ``PUT``
(replace: it answers 404, so the fencing epochs and the cordons, both replaces, never ran against
it before). Resources it is to serve without holding an object yet must be declared
(``emulator.resources[...] = kmock.ResourceInfo()``), or it answers 404 as for an unknown URL.

Nothing in it acts on the objects: ``Controllers`` plays the Deployment controller (one pod per
replica from the template; on a template change the old pods go first, as ``Recreate`` does; a
Deployment deleted or scaled down takes its pods with it), the scheduler (the node the template's
``kubernetes.io/hostname`` selector names) and the kubelet (a pod starts Pending and turns Running
and Ready a moment later, with an IP; a pod the test "breaks" stays Running, not Ready, its
container in CrashLoopBackOff). A pod whose template is a warm standby gets a real model server (the
demo inference server, which speaks vLLM's sleep API) when the test asks for it, so the platform's
sleep and wake calls go over HTTP to a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp.web
import kmock

PODS = kmock.resource("", "v1", "pods")
NODES = kmock.resource("", "v1", "nodes")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
VIRTUAL_SERVICES = kmock.resource("networking.istio.io", "v1beta1", "virtualservices")

VERSIONS = itertools.count(1000)


def matches(labels: dict[str, str], selector: str) -> bool:
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

    async def _serve_list(self, request: kmock.Request) -> Any:
        result: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            items = result["items"]
            result["items"] = [o for o in items if matches(o.get("metadata", {}).get("labels") or {}, selector)]
        return result

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.method == kmock.method.PUT and request.resource is not None and request.name is not None:
            return await self._replace(request)
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == kmock.action.UPDATE and request.name is not None:
                key: Any = (request.resource, request.namespace, request.name)
                stored = self.objects[key].get("metadata", {}).get("resourceVersion") if key in self.objects else None
                sent = meta.get("resourceVersion")
                if sent is not None and stored is not None and sent != stored:
                    return await self._render_error(
                        kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
                    )
            if request.action in (kmock.action.UPDATE, kmock.action.CREATE):
                meta["resourceVersion"] = str(next(VERSIONS))
        return await super()._handle(request)

    async def _replace(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """``PUT`` (replace), which the emulator does not serve: 404 for a missing object, 409 for a
        stale resourceVersion, else the object replaced whole."""
        key: Any = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return await self._render_error(kmock.KubernetesError(status=404, reason="NotFound", message="not found"))
        stored = self.objects[key].get("metadata", {}).get("resourceVersion")
        data = dict(request.data)
        sent = data.get("metadata", {}).get("resourceVersion")
        if sent is not None and stored is not None and sent != stored:
            return await self._render_error(
                kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
            )
        data["metadata"] = {**data.get("metadata", {}), "resourceVersion": str(next(VERSIONS))}
        self.objects[key] = data
        return aiohttp.web.json_response(data)


def live(emulator: Emulator, resource: Any, namespace: str | None) -> dict[str, Any]:
    """name → object (as plain data) of one resource in a namespace, deleted ones left out."""
    return {
        name: copy.deepcopy(dict(obj.raw))
        for (res, ns, name), obj in list(emulator.objects.items())
        if res == resource and ns == namespace and not obj.deleted
    }


def labels_of(obj: Any) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})


ServerFor = Callable[[str], Coroutine[Any, Any, tuple[str, int]]]
"""Starts a model server for a pod (by name); returns its host and port."""


class Controllers:
    """The Deployment controller, the scheduler and the kubelet, over the emulator's objects."""

    def __init__(
        self,
        emulator: Emulator,
        namespace: str,
        *,
        default_node: str = "node-a",
        ready_after_s: float = 0.05,
        server_for: ServerFor | None = None,
        tick_s: float = 0.02,
    ) -> None:
        self.emulator = emulator
        self.namespace = namespace
        self.default_node = default_node
        self.ready_after_s = ready_after_s
        self.server_for = server_for
        self.tick_s = tick_s
        self.broken: set[str] = set()
        """Pods the kubelet reports crashing (Running, not Ready); never made Ready again."""
        self.servers: dict[str, tuple[str, int]] = {}
        """Pod → the model server behind it (warm standbys' pods, when ``server_for`` is given)."""
        self._born: dict[str, float] = {}
        self._starting: dict[str, asyncio.Task[tuple[str, int]]] = {}
        self._counter = itertools.count()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Controllers:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for task in self._starting.values():
            task.cancel()

    async def _run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.tick_s)

    def break_pod(self, name: str) -> None:
        """The model server in the pod crashed: Running, not Ready, CrashLoopBackOff."""
        self.broken.add(name)
        self._patch(
            name,
            {
                "status": {
                    "conditions": [{"type": "Ready", "status": "False"}],
                    "containerStatuses": [
                        {
                            "name": "model",
                            "image": "x",
                            "imageID": "x",
                            "ready": False,
                            "restartCount": 4,
                            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        }
                    ],
                }
            },
        )

    def delete_pod(self, name: str) -> None:
        """The pod is gone (evicted, its node drained): its Deployment makes a new one."""
        self.emulator.objects[PODS, self.namespace, name].delete()

    def _patch(self, name: str, change: dict[str, Any]) -> None:
        change = {**change, "metadata": {**change.get("metadata", {}), "resourceVersion": str(next(VERSIONS))}}
        self.emulator.objects[PODS, self.namespace, name].patch(change)

    def pods_of(self, deployment: str) -> dict[str, Any]:
        return {
            name: pod
            for name, pod in live(self.emulator, PODS, self.namespace).items()
            if any(o.get("name") == deployment for o in pod.get("metadata", {}).get("ownerReferences") or [])
        }

    def tick(self) -> None:
        loop = asyncio.get_running_loop()
        deployments = live(self.emulator, DEPLOYMENTS, self.namespace)
        for name, deployment in deployments.items():
            template = deployment["spec"]["template"]
            digest = hashlib.sha1(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
            pods = self.pods_of(name)
            current = {n: p for n, p in pods.items() if labels_of(p).get("pod-template-hash") == digest}
            for old in set(pods) - set(current):  # Recreate: the old template's pods go first
                self.emulator.objects[PODS, self.namespace, old].delete()
            replicas = deployment["spec"].get("replicas", 1)
            for surplus in sorted(current)[replicas:]:
                self.emulator.objects[PODS, self.namespace, surplus].delete()
            if len(pods) == len(current):
                for _ in range(replicas - len(current)):
                    self._create_pod(name, template, digest, loop.time())
        for name, pod in live(self.emulator, PODS, self.namespace).items():
            owners = [o.get("name") for o in pod.get("metadata", {}).get("ownerReferences") or []]
            if owners and not any(o in deployments for o in owners):
                self.emulator.objects[PODS, self.namespace, name].delete()  # garbage collection
                continue
            self._kubelet(name, pod, loop.time())

    def _create_pod(self, deployment: str, template: dict[str, Any], digest: str, now: float) -> None:
        name = f"{deployment}-{digest[:5]}-{next(self._counter)}"
        spec = copy.deepcopy(template.get("spec") or {})
        spec["nodeName"] = (spec.get("nodeSelector") or {}).get("kubernetes.io/hostname", self.default_node)
        metadata = copy.deepcopy(template.get("metadata") or {})
        self.emulator.objects[PODS, self.namespace, name] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "resourceVersion": str(next(VERSIONS)),
                "labels": {**(metadata.get("labels") or {}), "pod-template-hash": digest},
                "annotations": metadata.get("annotations") or {},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment, "uid": "u"}],
            },
            "spec": spec,
            "status": {"phase": "Pending"},
        }
        self._born[name] = now
        if self.server_for is not None and labels_of(template).get("drctl.io/role") == "warm":
            self._starting[name] = asyncio.create_task(self.server_for(name))

    def _kubelet(self, name: str, pod: Any, now: float) -> None:
        if name in self.broken or pod.get("status", {}).get("phase") != "Pending":
            return
        if now - self._born.get(name, now) < self.ready_after_s:
            return
        host, ports = "127.0.0.1", None
        starting = self._starting.get(name)
        if starting is not None:
            if not starting.done():
                return
            host, port = starting.result()
            self.servers[name] = (host, port)
            ports = [{"name": "http", "containerPort": port}]
        change: dict[str, Any] = {
            "status": {
                "phase": "Running",
                "podIP": host,
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {"name": "model", "image": "x", "imageID": "x", "ready": True, "restartCount": 0}
                    | {"state": {"running": {}}}
                ],
            }
        }
        if ports is not None:
            containers = copy.deepcopy(pod["spec"]["containers"])
            containers[0]["ports"] = ports
            change["spec"] = {"containers": containers}
        self._patch(name, change)
