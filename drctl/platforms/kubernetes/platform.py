"""The Kubernetes platform: model instances are pods, each model's Service is the load balancer.

Pods carry ``drctl.io/model``, ``drctl.io/role`` and ``drctl.io/instance``; the model's Service
selects ``drctl.io/serving=true``, so putting a pod in or out of the load balancer is a label flip.
Reconciliation creates one Deployment per instance (named after it, selecting on the instance and
model labels only, so relabelling a pod's role or serving flag never orphans it).

Every API call runs the official (blocking) client in a thread. 429/5xx are retried with backoff,
409 conflicts (stale resourceVersion) are re-read and retried, 403 is a non-retryable
``PermissionDenied`` error that names the verb and resource. GPU cordons are kept in memory only.

Every call on an instance goes through its model's engine profile (:mod:`drctl.policies.engines`):
the warm probe asks the engine's health path, and waking up is the engine's wake call (vLLM's
``POST /wake_up``, SGLang's ``POST /resume_memory_occupation``) on the pod IP and container port.
Reconciliation builds each instance's pod from the engine's template (:mod:`.templates`: image,
args, env, startup and readiness probes on the health path, one GPU).

Promotion: a hot standby is relabelled; a warm standby (running, model asleep) is woken through its
engine's wake call, then relabelled; a cold standby (a Deployment scaled to 0, or running without a
GPU) is promoted by patching its Deployment: one GPU requested and limited, replicas 1, role
``promoting`` on the Deployment and its pod template (this rolls out a new pod, which
``wait_loaded`` waits for). Relabelling a running pod does not touch its Deployment's pod template:
changing the template rolls the pod out, which would unload a loaded standby.

Optional Istio mode (``istio_virtual_service=``): registering an instance at priority 0 also shifts
the model's VirtualService weights from the primary to the standby destination (see ``istio``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
from kubernetes.client import ApiClient, AppsV1Api, CoreV1Api, CustomObjectsApi, V1Deployment
from kubernetes.client.exceptions import ApiException
from temporalio.exceptions import ApplicationError

from drctl.payloads import Instance, ReconcileAction, Role
from drctl.platforms import errors, node_agents
from drctl.platforms.base import ProgressCallback, find_instance
from drctl.platforms.kubernetes import istio
from drctl.platforms.kubernetes.fencing import KubernetesFencing
from drctl.platforms.kubernetes.templates import DEFAULT_IMAGES, GPU_RESOURCE, EngineNotOnKubernetes, InstanceTemplate
from drctl.policies.engines import Engine, EngineProfile
from drctl.policies.schema import DRPolicy

MODEL = "drctl.io/model"
ROLE = "drctl.io/role"
INSTANCE = "drctl.io/instance"
SERVING = "drctl.io/serving"
GPU_ANNOTATION = "drctl.io/gpu"
ZONE = "topology.kubernetes.io/zone"
MERGE_PATCH = "application/merge-patch+json"

PERMISSION_DENIED = "PermissionDenied"
NOT_BUILT = "NotBuiltOnKubernetes"

T = TypeVar("T")


def permission_denied(verb: str, resource: str, namespace: str, exc: ApiException) -> ApplicationError:
    detail = _api_message(exc)
    return ApplicationError(
        f"Kubernetes denied {verb} on {resource} in namespace {namespace!r} (HTTP 403): {detail}",
        type=PERMISSION_DENIED,
        non_retryable=True,
    )


def not_built(what: str) -> ApplicationError:
    return ApplicationError(f"{what}: not built on Kubernetes yet", type=NOT_BUILT, non_retryable=True)


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "")["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc.reason or exc.body or "")


def _labels(obj: Any) -> dict[str, str]:
    return dict(obj.metadata.labels or {})


def _ready(pod: Any) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _address(pod: Any) -> str | None:
    """``ip:port`` where the pod's model server answers: its pod IP and first container port; None
    while it has no IP (pending) or declares no port."""
    ip = pod.status.pod_ip if pod.status else None
    ports = [p.container_port for c in (pod.spec.containers or []) for p in (c.ports or [])]
    return f"{ip}:{ports[0]}" if ip and ports else None


def _phase(pod: Any) -> str:
    return str(pod.status.phase) if pod.status and pod.status.phase else "Unknown"


def _is_sleeping(response: httpx.Response) -> bool | None:
    """An ``is_sleeping`` answer: ``{"is_sleeping": bool}``; None for anything else."""
    try:
        asleep = response.json().get("is_sleeping") if response.status_code == 200 else None
    except (ValueError, AttributeError):
        return None
    return asleep if isinstance(asleep, bool) else None


def _has_gpu(containers: Any) -> bool:
    """Whether any container (client objects) requests or limits a GPU."""
    for c in containers or []:
        resources = c.resources
        if resources and (GPU_RESOURCE in (resources.limits or {}) or GPU_RESOURCE in (resources.requests or {})):
            return True
    return False


WakeUp = Callable[[str, dict[str, Any] | None], Awaitable[int]]
"""POST to a URL with an optional JSON body (the engine's wake call), return the HTTP status
(injectable so tests need no model server)."""


async def http_wake_up(url: str, body: dict[str, Any] | None = None) -> int:
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=2.0)) as client:
        return (await client.post(url, json=body)).status_code


API_PERMISSIONS: dict[tuple[str, str], frozenset[str]] = {
    ("", "pods"): frozenset({"delete", "get", "list", "patch"}),
    ("apps", "deployments"): frozenset({"create", "delete", "get", "list", "patch"}),
    ("", "nodes"): frozenset({"get"}),
    ("", "configmaps"): frozenset({"create", "get", "update"}),
    (istio.GROUP, istio.PLURAL): frozenset({"get", "patch"}),
}
"""Exactly the (API group, resource) → verbs this module calls; the RBAC manifests in
``deploy/kubernetes`` must grant these and nothing more (checked by tests/deploy)."""


class KubernetesPlatform:
    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        policy: DRPolicy,
        *,
        image: str | None = None,
        images: Mapping[Engine, str] | None = None,
        model_source: str = "/models/{model}",
        models_claim: str | None = "drctl-models",
        attempts: int = 5,
        backoff_s: float = 0.2,
        poll_s: float = 1.0,
        wake_up: WakeUp = http_wake_up,
        istio_virtual_service: str | None = None,
        node_agent_urls: Sequence[str] = (),
        node_agent_service: str | None = None,
    ) -> None:
        self._agent_urls = list(node_agent_urls)
        self._agent_service = node_agent_service
        self.core = CoreV1Api(api_client)
        self.apps = AppsV1Api(api_client)
        self.wake_up = wake_up
        self.istio = (
            istio.IstioRouting(
                CustomObjectsApi(api_client), self._call, namespace, istio_virtual_service, attempts=attempts
            )
            if istio_virtual_service
            else None
        )
        self.namespace = namespace
        self.policy = policy
        chosen = {**DEFAULT_IMAGES, **(images or {})}
        if image is not None:  # the one image setting (DRCTL_KUBERNETES_IMAGE) is vLLM's
            chosen[Engine.VLLM] = image
        self.template = InstanceTemplate(images=chosen, model_source=model_source, models_claim=models_claim)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.poll_s = poll_s
        self.fencing = KubernetesFencing(self.core, namespace, self._call)
        self._cordoned: dict[str, str] = {}
        """In memory only: lost when the worker restarts (a node taint or ConfigMap would persist it)."""

    # -- API calls ---------------------------------------------------------------------------

    async def _call(self, verb: str, resource: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One API call in a thread: 429/5xx retried with exponential backoff, 403 made final."""
        for attempt in range(self.attempts):
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except ApiException as exc:
                if exc.status == 403:
                    raise permission_denied(verb, resource, self.namespace, exc) from exc
                transient = exc.status == 429 or (exc.status or 0) >= 500
                if not transient or attempt == self.attempts - 1:
                    raise
                await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def _pods(self, selector: str) -> list[Any]:
        pods = await self._call("list", "pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector)
        items: list[Any] = pods.items
        return [p for p in items if not p.metadata.deletion_timestamp]

    async def _zone(self, node: str | None, cache: dict[str, str | None]) -> str | None:
        """The node's zone label, if this identity may read nodes (None otherwise)."""
        if node is None:
            return None
        if node not in cache:
            try:
                found = await asyncio.to_thread(self.core.read_node, node)
                cache[node] = _labels(found).get(ZONE)
            except ApiException:
                cache[node] = None
        return cache[node]

    async def _deployments(self, selector: str) -> list[Any]:
        found = await self._call(
            "list", "deployments.apps", self.apps.list_namespaced_deployment, self.namespace, label_selector=selector
        )
        items: list[Any] = found.items
        return [d for d in items if not d.metadata.deletion_timestamp]

    async def _read_deployment(self, name: str) -> Any | None:
        try:
            return await self._call(
                "get", "deployments.apps", self.apps.read_namespaced_deployment, name, self.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def _instances(self, selector: str) -> list[Instance]:
        zones: dict[str, str | None] = {}
        instances = []
        pods, deployments = await asyncio.gather(self._pods(selector), self._deployments(selector))
        for pod in pods:
            labels = _labels(pod)
            try:
                role = Role(labels.get(ROLE, ""))
            except ValueError:
                continue  # not ours to manage
            serving = labels.get(SERVING) == "true"
            node = pod.spec.node_name
            instances.append(
                Instance(
                    id=labels.get(INSTANCE, pod.metadata.name),
                    model=labels[MODEL],
                    role=role,
                    address=_address(pod),
                    lb_priority=0 if serving else (1 if role == Role.HOT else None),
                    gpu=(pod.metadata.annotations or {}).get(GPU_ANNOTATION),
                    node=node,
                    zone=await self._zone(node, zones),
                    note=pod.metadata.name,
                )
            )
        with_pods = {(i.model, i.id) for i in instances}
        for deployment in deployments:  # e.g. a cold standby scaled to 0: a Deployment without a pod
            labels = _labels(deployment)
            key = (labels.get(MODEL, ""), labels.get(INSTANCE, deployment.metadata.name))
            try:
                role = Role(labels.get(ROLE, ""))
            except ValueError:
                continue
            if key in with_pods or not key[0]:
                continue
            instances.append(
                Instance(
                    id=key[1],
                    model=key[0],
                    role=role,
                    gpu=(deployment.metadata.annotations or {}).get(GPU_ANNOTATION),
                    note=f"deployment {deployment.metadata.name}, no pod",
                )
            )
        return sorted(instances, key=lambda i: i.id)

    async def _instance_pods(self, instance: Instance) -> list[Any]:
        return await self._pods(f"{MODEL}={instance.model},{INSTANCE}={instance.id}")

    async def _set_labels(self, instance: Instance, labels: dict[str, str]) -> bool:
        """Set labels on the instance's pods; False if they all had them already. A 409 (another
        writer changed the pod since we read it) is re-read and retried, up to ``attempts`` times."""
        pods = await self._instance_pods(instance)
        if not pods:
            raise errors.unknown_instance(instance.model, instance.id, [])
        changed = False
        for name in [p.metadata.name for p in pods]:
            for attempt in range(self.attempts):
                pod: Any = await self._call("get", "pods", self.core.read_namespaced_pod, name, self.namespace)
                if all(_labels(pod).get(k) == v for k, v in labels.items()):
                    break
                metadata: dict[str, Any] = {"labels": labels}
                if pod.metadata.resource_version:
                    metadata["resourceVersion"] = pod.metadata.resource_version  # optimistic concurrency
                try:
                    await self._call(
                        "patch",
                        "pods",
                        self.core.patch_namespaced_pod,
                        name,
                        self.namespace,
                        {"metadata": metadata},
                        _content_type=MERGE_PATCH,
                    )
                    changed = True
                    break
                except ApiException as exc:
                    if exc.status != 409 or attempt == self.attempts - 1:
                        raise
        return changed

    # -- the Platform interface -------------------------------------------------------------

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Nothing to prepare: every call goes to the API server."""
        return []

    async def close(self) -> None:
        await asyncio.to_thread(self.core.api_client.close)

    def fault_injector(self) -> None:
        """Not built yet on Kubernetes (pod delete, node taint, Xid through the node agent DaemonSet)."""
        return None

    async def list_instances(self, model: str) -> list[Instance]:
        if model not in self.policy.model_names:
            raise errors.unknown_model(model, self.policy.model_names)
        return await self._instances(f"{MODEL}={model}")

    async def get_instance(self, model: str, instance_id: str) -> Instance:
        return find_instance(await self.list_instances(model), model, instance_id)

    async def probe(self, instance: Instance) -> tuple[bool, str]:
        """Healthy *for its tier*. Serving and hot: a Running and Ready pod. Warm: a Running pod whose
        containers run, Ready or answering that its model is asleep (a sleeping model server may fail
        its readiness probe: that is a warm standby's normal state). Cold: a Deployment scaled to 0
        (no pod) is its normal state; a cold pod that exists must be Running and Ready."""
        pods = await self._instance_pods(instance)
        if not pods:
            if instance.role == Role.COLD and await self._read_deployment(instance.id) is not None:
                return True, f"cold standby: deployment {instance.id} without a pod (its normal state)"
            return False, "no pod"
        pod = pods[0]
        name = pod.metadata.name
        if _phase(pod) != "Running":
            return False, f"pod {name} is {_phase(pod)}"
        if _ready(pod):
            return True, f"pod {name} Running and Ready"
        if instance.role != Role.WARM:
            return False, f"pod {name} is Running but not Ready"
        statuses = (pod.status.container_statuses if pod.status else None) or []
        stopped = [s.name for s in statuses if not (s.state and s.state.running)]
        if stopped:
            return False, f"warm standby: pod {name} container(s) not running: {', '.join(stopped)}"
        address = _address(pod)
        if address is None:
            return False, f"warm standby: pod {name} is Running but not Ready, and has no address to ask"
        engine = self._engine(instance.model)
        url = f"http://{address}{engine.health_path}"
        try:
            async with httpx.AsyncClient(timeout=self.policy.detection.probe_timeout.total_seconds()) as client:
                response = await client.get(url)
                asleep, why = None, None
                if response.status_code == 200 and engine.is_sleeping_path is not None:
                    asleep = _is_sleeping(await client.get(f"http://{address}{engine.is_sleeping_path}"))
                elif response.status_code != 200 and engine.load_progress_path is not None:
                    why = (await client.get(f"http://{address}{engine.load_progress_path}")).text
        except httpx.HTTPError as exc:
            return False, f"warm standby: pod {name} not Ready and {url} did not answer: {type(exc).__name__}"
        verdict = engine.judge_health(
            response.status_code, response.text, asleep=asleep, may_sleep=True, load_progress=why
        )
        if verdict.healthy:
            return True, f"warm standby: pod {name} Running, {verdict.detail}"
        return False, f"warm standby: pod {name} not Ready, {verdict.detail}"

    async def restore_checkpoint(self, instance: Instance) -> str:
        """Delete the instance's pods: its Deployment starts new ones, whose model server fetches the
        checkpoint from the model store again (what the image must do on start) instead of reusing a
        corrupted local copy. Not exercised against a real cluster (see docs/deploy.md)."""
        pods = await self._instance_pods(instance)
        for pod in pods:
            await self._call("delete", "pods", self.core.delete_namespaced_pod, pod.metadata.name, self.namespace)
        return f"deleted {len(pods)} pod(s) of {instance.id}; its Deployment starts a fresh one that fetches the model"

    async def claim_epoch(self, model: str) -> int:
        if model not in self.policy.model_names:
            raise errors.unknown_model(model, self.policy.model_names)
        return await self.fencing.claim(model)

    async def epochs(self) -> dict[str, int]:
        return await self.fencing.epochs()

    async def eject(self, instance: Instance, reason: str, epoch: int | None = None) -> str:
        await self.fencing.check(instance.model, epoch)
        changed = await self._set_labels(instance, {SERVING: "false", ROLE: Role.FAILED.value})
        if not changed:
            return "already ejected"
        return f"{SERVING}=false (out of the Service), marked failed: {reason[:200]}"

    async def promote(self, instance: Instance, epoch: int | None = None) -> str:
        await self.fencing.check(instance.model, epoch)
        if instance.role in (Role.SERVING, Role.PROMOTING):
            return f"already {instance.role}"
        if instance.role == Role.HOT:
            await self._set_labels(instance, {ROLE: Role.PROMOTING.value})
            return "hot standby: already loaded, marked promoting"
        if instance.role == Role.WARM:
            pods = [p for p in await self._instance_pods(instance) if p.status and p.status.pod_ip]
            if pods:
                return await self._wake(instance, pods[0])
        if instance.role in (Role.WARM, Role.COLD):  # a warm standby without a pod is started like a cold one
            return await self._promote_deployment(instance)
        raise errors.not_a_standby(instance.id, instance.role)

    async def _wake(self, instance: Instance, pod: Any) -> str:
        woken = await self._wake_pod(instance, pod)
        await self._set_labels(instance, {ROLE: Role.PROMOTING.value})
        return f"warm standby {woken}, marked promoting"

    async def _wake_pod(self, instance: Instance, pod: Any) -> str:
        """Wake the pod's model up through its engine's wake call; says how."""
        engine = self._engine(instance.model)
        if engine.wake is None:
            return f"awake already ({engine.engine} cannot sleep)"
        ports = [p.container_port for c in (pod.spec.containers or []) for p in (c.ports or [])]
        if not ports:
            raise errors.model_load_failed(instance.id, f"pod {pod.metadata.name} exposes no container port")
        query = f"?{urlencode(engine.wake.params)}" if engine.wake.params else ""
        url = f"http://{pod.status.pod_ip}:{ports[0]}{engine.wake.path}{query}"
        try:
            status = await self.wake_up(url, engine.wake.json)
        except httpx.HTTPError as exc:
            raise RuntimeError(f"{url}: {type(exc).__name__}: {exc}") from exc  # retryable
        if status != 200:
            raise errors.model_load_failed(instance.id, f"{engine.wake.path} answered {status}")
        return f"woken up ({url})"

    def _engine(self, model: str) -> EngineProfile:
        try:
            return self.policy.model(model).engine_profile
        except KeyError:
            raise errors.unknown_model(model, self.policy.model_names) from None

    async def _promote_deployment(self, instance: Instance) -> str:
        """GPU request and limit, replicas 1, role promoting on the Deployment and its pod template."""
        name = instance.id
        labels = {ROLE: Role.PROMOTING.value}
        for attempt in range(self.attempts):
            deployment = await self._read_deployment(name)
            if deployment is None:
                raise errors.model_load_failed(instance.id, f"no deployment {name} to scale up")
            template = deployment.spec.template
            containers = template.spec.containers or []
            if not containers:
                raise errors.model_load_failed(instance.id, f"deployment {name} has no container")
            if (
                (deployment.spec.replicas or 0) >= 1
                and _has_gpu(containers[:1])
                and _labels(deployment).get(ROLE) == Role.PROMOTING.value
                and (template.metadata.labels or {}).get(ROLE) == Role.PROMOTING.value
            ):
                return f"deployment {name} already promoting (1 GPU, replicas {deployment.spec.replicas})"
            body_containers: list[dict[str, Any]] = self.apps.api_client.sanitize_for_serialization(containers)
            resources = body_containers[0].setdefault("resources", {})
            resources.setdefault("requests", {})[GPU_RESOURCE] = "1"
            resources.setdefault("limits", {})[GPU_RESOURCE] = "1"
            metadata: dict[str, Any] = {"labels": labels}
            if deployment.metadata.resource_version:
                metadata["resourceVersion"] = deployment.metadata.resource_version
            body = {
                "metadata": metadata,
                "spec": {
                    "replicas": max(1, deployment.spec.replicas or 0),
                    "template": {"metadata": {"labels": labels}, "spec": {"containers": body_containers}},
                },
            }
            try:
                await self._call(
                    "patch",
                    "deployments.apps",
                    self.apps.patch_namespaced_deployment,
                    name,
                    self.namespace,
                    body,
                    _content_type=MERGE_PATCH,
                )
                break
            except ApiException as exc:
                if exc.status != 409 or attempt == self.attempts - 1:
                    raise
        if await self._instance_pods(instance):  # pods of the old template: their role too (until replaced)
            await self._set_labels(instance, labels)
        return f"cold standby: deployment {name} patched to 1 GPU, replicas 1, marked promoting"

    async def wait_loaded(self, instance: Instance, progress: ProgressCallback, timeout_s: float = 600.0) -> str:
        """Wait for a Ready pod, heartbeating through ``progress``. When the instance's Deployment asks
        for a GPU (a promoted cold standby), only a pod that has one counts: during the rollout the old
        CPU-only pod may still be Ready."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            deployment = await self._read_deployment(instance.id)
            need_gpu = deployment is not None and _has_gpu(deployment.spec.template.spec.containers)
            pods = [p for p in await self._instance_pods(instance) if not need_gpu or _has_gpu(p.spec.containers)]
            if pods and _phase(pods[0]) == "Failed":
                raise errors.model_load_failed(instance.id, f"pod {pods[0].metadata.name} failed")
            ready = [p for p in pods if _ready(p)]
            if ready:
                return f"pod {ready[0].metadata.name} Ready after {time.monotonic() - start:.2f}s"
            progress(0.0, f"pod {_phase(pods[0]) if pods else 'not created yet'}")
            await asyncio.sleep(self.poll_s)
        raise TimeoutError(f"{instance.id} was not Ready within {timeout_s:.0f}s")

    async def register(self, instance: Instance, priority: int, epoch: int | None = None) -> str:
        await self.fencing.check(instance.model, epoch)
        if priority == 0:
            labels = {SERVING: "true", ROLE: Role.SERVING.value}
        else:  # a Service has no priorities: the hot backup stays out of it until promoted
            labels = {SERVING: "false", ROLE: Role.HOT.value}
        changed = await self._set_labels(instance, labels)
        detail = f"{'registered' if changed else 'already registered'} at priority {priority}"
        if self.istio is not None and priority == 0:
            detail += "; " + await self.istio.shift(instance.model, to_standby=True)
        return detail

    async def verify(self, instance: Instance, progress: ProgressCallback) -> str:
        """The pod is Ready and selected by the Service (no request goes through the Service)."""
        pods = await self._instance_pods(instance)
        if not pods:
            raise RuntimeError(f"{instance.id} has no pod")
        pod = pods[0]
        if _labels(pod).get(SERVING) != "true":
            raise RuntimeError(f"pod {pod.metadata.name} is not labelled {SERVING}=true")
        if not _ready(pod):
            raise RuntimeError(f"pod {pod.metadata.name} is not Ready")
        progress(1.0, "Ready and serving")
        return f"pod {pod.metadata.name} Ready and labelled {SERVING}=true"

    # -- reconciliation ----------------------------------------------------------------------

    async def current_policy(self) -> DRPolicy:
        return self.policy

    async def all_instances(self) -> list[Instance]:
        return await self._instances(MODEL)

    async def cordon_gpu(self, gpu: str, reason: str) -> str:
        if gpu in self._cordoned:
            return f"{gpu} already cordoned ({self._cordoned[gpu]})"
        self._cordoned[gpu] = reason or "drained"
        return f"{gpu} cordoned (in this worker's memory only)"

    async def uncordon_gpu(self, gpu: str) -> str:
        if self._cordoned.pop(gpu, None) is None:
            return f"{gpu} was not cordoned"
        return f"{gpu} back in placement (unless its node agent still reports it drained)"

    async def cordoned_gpus(self) -> list[str]:
        """Drained by a runbook (kept in this worker's memory), plus what the node agents say must
        be drained right now (``GET /gpus?status=drain`` on each agent)."""
        urls = await node_agents.agent_urls(self._agent_urls, self._agent_service)
        from_agents: set[str] = set()
        if urls:
            async with httpx.AsyncClient() as client:
                for answer in await node_agents.drained_gpus(urls, client):
                    from_agents.update(answer.drain)
        return sorted(set(self._cordoned) | from_agents)

    def deployment(self, action: ReconcileAction) -> dict[str, Any]:
        """The Deployment for one instance: selected by instance and model, labelled with its tier,
        its pod the model's engine template (:mod:`.templates`). A cold standby is the same pod
        without a GPU, scaled to 0 (its normal state: a checkpoint and no process); promotion asks
        for the GPU and scales it to 1. ``Recreate``: never two pods of one instance on one GPU."""
        selector = {MODEL: action.model, INSTANCE: action.instance}
        # Also the seed's cold-standby manager labels (app, standby-type), for existing dashboards.
        labels = {**selector, ROLE: action.tier.value, SERVING: "false", "app": action.model}
        if action.tier.is_standby:
            labels["standby-type"] = action.tier.value
        engine = self.policy.model(action.model).engine
        pod_spec = self.template.pod_spec(engine, action.model, gpu=action.tier != Role.COLD, node=action.node)
        annotations = {GPU_ANNOTATION: action.gpu} if action.gpu else {}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": action.instance, "labels": labels, "annotations": annotations},
            "spec": {
                "replicas": 0 if action.tier == Role.COLD else 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": selector},
                "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
            },
        }

    async def create_instance(self, action: ReconcileAction, progress: ProgressCallback) -> str:
        if action.model not in self.policy.model_names:
            raise errors.unknown_model(action.model, self.policy.model_names)
        await self.fencing.check(action.model, action.epoch)
        try:
            body = V1Deployment.from_dict(self.deployment(action))
        except EngineNotOnKubernetes as exc:
            raise not_built(f"{action.instance}: {exc}") from exc
        try:
            await self._call("create", "deployments.apps", self.apps.create_namespaced_deployment, self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return f"deployment {action.instance} already exists"
        gpu = "no GPU, scaled to 0" if action.tier == Role.COLD else f"1 GPU ({action.gpu or 'any'})"
        return f"deployment {action.instance} created: {action.tier}, {gpu}"

    async def retier_instance(self, action: ReconcileAction, progress: ProgressCallback) -> str:
        await self.fencing.check(action.model, action.epoch)
        instance = await self.get_instance(action.model, action.instance)
        if instance.role == action.tier:
            return f"already {action.tier}"
        if action.tier != Role.HOT or instance.role != Role.WARM:
            raise not_built(f"retiering {instance.id} {instance.role} → {action.tier}")
        pods = [p for p in await self._instance_pods(instance) if p.status and p.status.pod_ip]
        woken = f"; {await self._wake_pod(instance, pods[0])}" if pods else ""  # a hot standby is awake
        await self._set_labels(instance, {ROLE: Role.HOT.value})
        return f"{instance.id} warm → hot (pod relabelled; both tiers hold a GPU){woken}"

    async def delete_instance(self, action: ReconcileAction) -> str:
        await self.fencing.check(action.model, action.epoch)
        try:
            await self._call(
                "delete",
                "deployments.apps",
                self.apps.delete_namespaced_deployment,
                action.instance,
                self.namespace,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            return "already gone"
        return f"deployment {action.instance} deleted"
