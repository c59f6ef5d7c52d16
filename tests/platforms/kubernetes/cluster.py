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

The emulator has no ``pods/exec`` either (no kubelet, no container runtime). ``ExecEmulator`` adds
the API server's exec endpoint and nothing behind it but a stand-in: ``PodShells`` runs the command
with this machine's ``sh`` in a temporary directory that plays the pod's container filesystem. The
client side is the real ``kubernetes.stream.stream`` and its WebSocket client, over the channel
protocol a real API server speaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class PodShells:
    """What runs behind ``pods/exec`` here: each pod's container filesystem is a directory under
    ``root`` (``root/<pod>``), made by ``image`` the first time the pod is asked for it (a pod made
    later, by its Deployment, gets a fresh one: what re-fetching the weights gives). A command runs
    with this machine's ``sh`` in that directory, ``HOME`` in it, each absolute path among the
    script's arguments (``sh -c SCRIPT NAME ARG…``) moved under it, and the directory's prefix taken
    out of what the command prints: the script's own logic (``find``, ``readlink``, ``dd``, ``od``)
    runs for real, on real files. ``refuse``: the API server answers 403 to every exec.
    ``before_run``: called with the pod and command just before one runs (a test looks at what the
    caller recorded by then); if it returns a text, the command does not run and exits 5 with it
    on stderr."""

    root: Path
    image: Callable[[Path], None]
    refuse: bool = False
    before_run: Callable[[str, list[str]], str | None] | None = None
    calls: list[tuple[str, str, list[str]]] = field(default_factory=list)
    """(pod, container, command) of every exec that ran."""

    def fs(self, pod: str) -> Path:
        path = self.root / pod
        if not path.exists():
            path.mkdir(parents=True)
            self.image(path)
        return path

    async def run(self, pod: str, container: str, command: list[str]) -> tuple[int, bytes, bytes]:
        fs = self.fs(pod)
        if self.before_run is not None:
            refused = self.before_run(pod, command)
            if refused is not None:
                return 5, b"", refused.encode()
        self.calls.append((pod, container, command))
        argv = command[:4] + [f"{fs}{a}" if a.startswith("/") else a for a in command[4:]]
        home = fs / "root"
        home.mkdir(exist_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=fs, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        prefix = str(fs).encode()
        return process.returncode or 0, out.replace(prefix, b""), err.replace(prefix, b"")


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason}
    return aiohttp.web.json_response({**body, "code": code}, status=code)


class ExecEmulator(Emulator):
    """``Emulator`` with the exec endpoint (``GET …/pods/<name>/exec?command=…&container=…``
    upgraded to a WebSocket): 403 when ``shells.refuse``, 404 for a pod that is not there, 400 for a
    container it does not have; else the command runs in ``shells`` and its stdout, stderr and exit
    status come back on channels 1, 2 and 3, as the API server sends them (v4/v5 channel protocol)."""

    shells: PodShells

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.subresource != "exec" or request.resource is None or request.name is None:
            return await super()._handle(request)
        raw = request._raw_request
        assert isinstance(raw, aiohttp.web.BaseRequest)
        if self.shells.refuse:
            why = f'pods "{request.name}" is forbidden: User cannot get resource "pods/exec" in the namespace'
            return _status(403, "Forbidden", why)
        pod = live(self, request.resource, request.namespace).get(request.name)
        if pod is None:
            return _status(404, "NotFound", f'pods "{request.name}" not found')
        container = raw.query.get("container", "")
        if container not in {c["name"] for c in pod["spec"]["containers"]}:
            return _status(400, "BadRequest", f"container {container} is not valid for pod {request.name}")
        ws = aiohttp.web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"))
        await ws.prepare(raw)
        code, out, err = await self.shells.run(request.name, container, raw.query.getall("command"))
        for channel, data in ((1, out), (2, err)):
            if data:
                await ws.send_bytes(bytes([channel]) + data)
        status: dict[str, Any] = {"metadata": {}, "status": "Success"}
        if code:
            status = {
                "metadata": {},
                "status": "Failure",
                "message": f"command terminated with non-zero exit code: exit code {code}",
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
            }
        await ws.send_bytes(b"\x03" + json.dumps(status).encode())
        await ws.close()
        return ws


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
