"""The Kubernetes platform: model instances are pods, each model's Service is the load balancer.

Pods carry ``drctl.io/model``, ``drctl.io/role`` and ``drctl.io/instance``; the model's Service
selects ``drctl.io/serving=true``, so putting a pod in or out of the load balancer is a label flip.
Reconciliation creates one Deployment per instance (named after it, selecting on the instance and
model labels only, so relabelling a pod's role or serving flag never orphans it).

**The record is the Deployment, the pod's labels are its projection.** An instance's tier
(``drctl.io/role``), serving flag (``drctl.io/serving``) and the fencing epoch of the last runbook
that changed it (annotation ``drctl.io/epoch``) are written first on its Deployment's *own*
metadata, then on its pods. They are read back from the Deployment, so they survive what a pod
does not: a pod deleted, evicted or rescheduled comes back from the pod template with the tier it
was created with, and a worker restart forgets whatever it held in memory. Not the pod template:
any change to a template rolls out a new pod, which would unload the model of the very standby
being promoted (a hot promotion must stay a label flip); and not an annotation on the pod, which
dies with it. A platform that was started (``start``: a worker) keeps the projection true: every
read of the fleet re-labels the pods whose labels disagree with their Deployment (a restarted
serving pod is put back in its Service), and ``start`` does so for the whole fleet. One that was
not started (the CLI) only reads. A fenced write is refused when the Deployment records a newer
epoch than the step carries; the write carries the Deployment's ``resourceVersion``, so it is a
compare-and-set on the instance, not only the check of the model's epoch that precedes it. Pods
without a Deployment (created by hand) keep their state on their labels, as before.

Every API call runs the official (blocking) client in a thread. 429/5xx are retried with backoff,
409 conflicts (stale resourceVersion) are re-read and retried, 403 is a non-retryable
``PermissionDenied`` error that names the verb and resource. GPU cordons are in a ConfigMap
(:mod:`.cordons`, which says why not on the Node), fencing epochs in another (:mod:`.fencing`).

Every call on an instance goes through its model's engine profile (:mod:`drctl.policies.engines`):
the warm probe asks the engine's health path, and waking up is the engine's wake call (vLLM's
``POST /wake_up``, SGLang's ``POST /resume_memory_occupation``) on the pod IP and container port;
a warm standby is created awake (the engine loads its model) and put to sleep with the engine's
sleep call once its pod is Ready. Reconciliation builds each instance's pod from the engine's
template (:mod:`.templates`: image, args, env, startup and readiness probes on the health path, one
GPU), and waits for it to be Ready: an instance created is loaded.

Promotion: a hot standby is relabelled; a warm standby (running, model asleep) is woken through its
engine's wake call, then relabelled; a cold standby (a Deployment scaled to 0, or running without a
GPU) is promoted by patching its Deployment: one GPU requested and limited, replicas 1, role
``promoting`` on the Deployment and its pod template (this rolls out a new pod, which
``wait_loaded`` waits for). Ejecting an instance records it failed and scales its Deployment to 0:
its pod goes, and with it the GPU it held (the Deployment stays, as the record of the failure).

Optional Istio mode (``istio_virtual_service=``, from ``DRCTL_KUBERNETES_ISTIO_VIRTUAL_SERVICE``):
registering an instance at priority 0 also shifts the model's VirtualService weights from the
primary to the standby destination, recording the weights it replaced on the VirtualService;
failback (``uncordon_gpu``) writes those back (see ``istio``). A model the VirtualService has no
route for has nothing to shift: register says so and succeeds.

Placement keeps out what ``cordoned_gpus`` returns: the cordons, the GPUs the node agents want
drained, and every GPU of a Node the cluster has closed (NotReady, cordoned, tainted: ``nodes``),
the last read from the Nodes each time, never recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
from drctl.platforms.base import FaultInjector, ProgressCallback, find_instance
from drctl.platforms.kubernetes import istio, nodes
from drctl.platforms.kubernetes.cordons import KubernetesCordons
from drctl.platforms.kubernetes.fencing import KubernetesFencing
from drctl.platforms.kubernetes.templates import (
    DEFAULT_IMAGES,
    GPU_RESOURCE,
    TOLERATIONS,
    EngineNotOnKubernetes,
    InstanceTemplate,
)
from drctl.policies.engines import Engine, EngineProfile
from drctl.policies.placement import gpu_inventory
from drctl.policies.reconcile import instance_index
from drctl.policies.schema import DRPolicy

MODEL = "drctl.io/model"
ROLE = "drctl.io/role"
INSTANCE = "drctl.io/instance"
SERVING = "drctl.io/serving"
GPU_ANNOTATION = "drctl.io/gpu"
EPOCH_ANNOTATION = "drctl.io/epoch"
"""On an instance's Deployment: the fencing epoch of the last runbook that changed its record."""
RECORDED = (ROLE, SERVING)
"""The labels whose truth is the Deployment's metadata; its pods carry a copy (the projection)."""
STANDBY_TYPE = "standby-type"
"""The seed's cold-standby manager label, kept for existing dashboards: the standby tier (or
``promoting``) while the instance is one, absent once it serves or has failed. It follows ``ROLE``
wherever drctl writes that (and is projected with it)."""
HOSTNAME = "kubernetes.io/hostname"
ZONE = "topology.kubernetes.io/zone"
MERGE_PATCH = "application/merge-patch+json"

PERMISSION_DENIED = "PermissionDenied"
NOT_BUILT = "NotBuiltOnKubernetes"

T = TypeVar("T")

log = logging.getLogger(__name__)


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


def _epoch(annotations: Mapping[str, str]) -> int:
    """The epoch an instance's Deployment records (0: none)."""
    try:
        return int(annotations.get(EPOCH_ANNOTATION, "0") or 0)
    except ValueError:
        return 0


def _with_standby_type(labels: Mapping[str, str | None]) -> dict[str, str | None]:
    """``labels`` with ``standby-type`` following the role they set (None: remove the label)."""
    out = dict(labels)
    if labels.get(ROLE):
        role = Role(str(labels[ROLE]))
        out[STANDBY_TYPE] = role.value if role.is_standby or role == Role.PROMOTING else None
    return out


def _projected(record: Any) -> dict[str, str | None]:
    """What an instance's pods must carry of its record: tier, serving flag and standby-type."""
    labels = _labels(record)
    want: dict[str, str | None] = {k: v for k, v in labels.items() if k in RECORDED}
    if ROLE in labels:
        want[STANDBY_TYPE] = labels.get(STANDBY_TYPE)
    return want


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
"""POST to a URL with an optional JSON body (the engine's wake or sleep call), return the HTTP
status (injectable so tests need no model server)."""


async def http_wake_up(url: str, body: dict[str, Any] | None = None) -> int:
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=2.0)) as client:
        return (await client.post(url, json=body)).status_code


API_PERMISSIONS: dict[tuple[str, str], frozenset[str]] = {
    ("", "pods"): frozenset({"delete", "get", "list", "patch"}),
    ("apps", "deployments"): frozenset({"create", "delete", "get", "list", "patch"}),
    ("", "nodes"): frozenset({"get", "list"}),  # an instance's zone; Nodes closed to placement (.nodes)
    ("", "configmaps"): frozenset({"create", "get", "update"}),  # .fencing and .cordons
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
        istio_primary_host: str = "{model}",
        istio_standby_host: str = "{model}-standby",
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
                CustomObjectsApi(api_client),
                self._call,
                namespace,
                istio_virtual_service,
                primary_host=istio_primary_host,
                standby_host=istio_standby_host,
                attempts=attempts,
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
        self.cordons = KubernetesCordons(self.core, namespace, self._call)
        self._repair = False
        """Set by ``start`` (a worker): reads re-label pods whose labels disagree with their record."""

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
        """One ``Instance`` per instance: its state from its Deployment's record (its pods' labels
        when it has no Deployment), its address from its pod (the Ready one first, during a
        rollout). A started platform re-labels pods that disagree with their record."""
        zones: dict[str, str | None] = {}
        pods, deployments = await asyncio.gather(self._pods(selector), self._deployments(selector))
        records: dict[tuple[str, str], Any] = {}
        for deployment in deployments:
            labels = _labels(deployment)
            if labels.get(MODEL):
                records[(labels[MODEL], labels.get(INSTANCE, deployment.metadata.name))] = deployment
        by_key: dict[tuple[str, str], list[Any]] = {}
        for pod in pods:
            labels = _labels(pod)
            if labels.get(MODEL):
                by_key.setdefault((labels[MODEL], labels.get(INSTANCE, pod.metadata.name)), []).append(pod)
        instances = []
        for key, its_pods in by_key.items():
            its_pods.sort(key=lambda p: (not _ready(p), p.metadata.name))
            pod = its_pods[0]
            record = records.get(key)
            state = _labels(record) if record is not None and ROLE in _labels(record) else _labels(pod)
            try:
                role = Role(state.get(ROLE, ""))
            except ValueError:
                continue  # not ours to manage
            if self._repair and record is not None:
                await self._project(record, its_pods)
            serving = state.get(SERVING) == "true"
            node = pod.spec.node_name
            annotations = {**((record.metadata.annotations or {}) if record is not None else {})}
            annotations.update(pod.metadata.annotations or {})
            instances.append(
                Instance(
                    id=key[1],
                    model=key[0],
                    role=role,
                    address=_address(pod),
                    lb_priority=0 if serving else (1 if role == Role.HOT else None),
                    gpu=annotations.get(GPU_ANNOTATION),
                    node=node,
                    zone=await self._zone(node, zones),
                    note=pod.metadata.name,
                    created_at=pod.metadata.creation_timestamp,
                )
            )
        for key, deployment in records.items():  # e.g. a cold standby scaled to 0: a Deployment without a pod
            if key in by_key:
                continue
            try:
                role = Role(_labels(deployment).get(ROLE, ""))
            except ValueError:
                continue
            node = ((deployment.spec.template.spec.node_selector if deployment.spec.template.spec else None) or {}).get(
                HOSTNAME
            )
            instances.append(
                Instance(
                    id=key[1],
                    model=key[0],
                    role=role,
                    lb_priority=0 if _labels(deployment).get(SERVING) == "true" else None,
                    gpu=(deployment.metadata.annotations or {}).get(GPU_ANNOTATION),
                    node=node,
                    zone=await self._zone(node, zones),
                    note=f"deployment {deployment.metadata.name}, no pod",
                    created_at=deployment.metadata.creation_timestamp,
                )
            )
        return sorted(instances, key=lambda i: i.id)

    async def _project(self, record: Any, pods: list[Any]) -> None:
        """Copy the record's tier and serving flag onto pods that lost them (a pod recreated from
        its template); patches only pods that differ."""
        want = _projected(record)
        for pod in pods:
            if any(_labels(pod).get(k) != v for k, v in want.items()):
                await self._label_pod(pod.metadata.name, want)

    async def _instance_pods(self, instance: Instance) -> list[Any]:
        return await self._pods(f"{MODEL}={instance.model},{INSTANCE}={instance.id}")

    async def _label_pod(self, name: str, labels: Mapping[str, str | None]) -> bool:
        """Set labels on one pod; False if it had them already (or is gone). A 409 (another writer
        changed the pod since we read it) is re-read and retried, up to ``attempts`` times."""
        for attempt in range(self.attempts):
            try:
                pod: Any = await self._call("get", "pods", self.core.read_namespaced_pod, name, self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return False  # gone meanwhile (its Deployment scaled down, say)
                raise
            if all(_labels(pod).get(k) == v for k, v in labels.items()):
                return False
            metadata: dict[str, Any] = {"labels": dict(labels)}
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
                return True
            except ApiException as exc:
                if exc.status == 404:
                    return False
                if exc.status != 409 or attempt == self.attempts - 1:
                    raise
        return False

    async def _record(
        self, instance: Instance, labels: Mapping[str, str | None], epoch: int | None, replicas: int | None = None
    ) -> bool | None:
        """Write the instance's record on its Deployment's metadata (and ``replicas``, when given):
        labels, and the epoch when the step is fenced. Refused with ``StaleEpoch`` when the record
        holds a newer epoch. Returns whether it changed anything; None when the instance has no
        Deployment of its model (a pod made by hand: its labels are its only record)."""
        for attempt in range(self.attempts):
            deployment = await self._read_deployment(instance.id)
            if deployment is None or _labels(deployment).get(MODEL) != instance.model:
                return None
            annotations = deployment.metadata.annotations or {}
            recorded = _epoch(annotations)
            errors.check_epoch(instance.model, epoch, recorded)
            metadata: dict[str, Any] = {}
            if any(_labels(deployment).get(k) != v for k, v in labels.items()):
                metadata["labels"] = dict(labels)
            if epoch is not None and epoch != recorded:
                metadata["annotations"] = {EPOCH_ANNOTATION: str(epoch)}
            body: dict[str, Any] = {}
            if replicas is not None and deployment.spec.replicas != replicas:
                body["spec"] = {"replicas": replicas}
            if not metadata and not body:
                return False
            if deployment.metadata.resource_version:
                metadata["resourceVersion"] = deployment.metadata.resource_version  # compare-and-set
            body["metadata"] = metadata
            try:
                await self._call(
                    "patch",
                    "deployments.apps",
                    self.apps.patch_namespaced_deployment,
                    instance.id,
                    self.namespace,
                    body,
                    _content_type=MERGE_PATCH,
                )
                return True
            except ApiException as exc:
                if exc.status != 409 or attempt == self.attempts - 1:
                    raise
        return False

    async def _set_labels(
        self,
        instance: Instance,
        labels: Mapping[str, str | None],
        epoch: int | None = None,
        replicas: int | None = None,
    ) -> bool:
        """The record first (the Deployment), then its projection (the pods' labels); False if both
        were as wanted already. A retry after a crash between the two finds the record written and
        labels the pods. A role comes with its ``standby-type``."""
        recorded = await self._record(instance, _with_standby_type(labels), epoch, replicas)
        pods = await self._instance_pods(instance)
        if recorded is None and not pods:
            raise errors.unknown_instance(instance.model, instance.id, [])
        changed = bool(recorded)
        for name in [p.metadata.name for p in pods]:
            changed = await self._label_pod(name, _with_standby_type(labels)) or changed
        return changed

    # -- the Platform interface -------------------------------------------------------------

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """From now on (a worker), reads keep pods' labels true to their Deployment's record; first,
        the whole fleet's: a pod recreated while no worker ran gets its tier and serving flag back."""
        self._repair = True
        drifted = await self._drifted()
        if drifted:
            await self._instances(MODEL)  # a read by a started platform re-labels them
        return [f"re-labelled pod(s) from their Deployment's record: {', '.join(drifted)}"] if drifted else []

    async def _drifted(self) -> list[str]:
        """Pods whose tier or serving flag disagrees with their Deployment's record."""
        pods, deployments = await asyncio.gather(self._pods(MODEL), self._deployments(MODEL))
        records = {(_labels(d).get(MODEL), _labels(d).get(INSTANCE, d.metadata.name)): d for d in deployments}
        drifted = []
        for pod in pods:
            labels = _labels(pod)
            record = records.get((labels.get(MODEL), labels.get(INSTANCE, pod.metadata.name)))
            if record is None or ROLE not in _labels(record):
                continue
            if any(labels.get(k) != v for k, v in _projected(record).items()):
                drifted.append(pod.metadata.name)
        return sorted(drifted)

    async def close(self) -> None:
        await asyncio.to_thread(self.core.api_client.close)

    def fault_injector(self) -> FaultInjector | None:
        """Drills' faults on the cluster (:mod:`.faults`), only where a platform team opted in: the
        Role of ``deploy/kubernetes/drills`` applied and ``DRCTL_KUBERNETES_FAULT_INJECTION=true``
        (read from the environment when asked). None otherwise: ``drill_prepare`` says how to opt in."""
        from drctl.platforms.kubernetes.faults import KubernetesFaultInjector, fault_injection_settings

        settings = fault_injection_settings()
        if settings is None:
            return None
        return KubernetesFaultInjector(
            self.core,
            self.namespace,
            self._call,
            settings,
            agent_urls=self._agent_urls,
            agent_service=self._agent_service,
            policy=self.policy,
            template=self.template,
        )

    async def list_instances(self, model: str) -> list[Instance]:
        if not self.policy.has_model(model):
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
        corrupted local copy. Not exercised against a real cluster (see docs/deploy.md). The
        model-corruption drill restores the pod it damaged the same way (:mod:`.model_faults`); no
        runbook reaches this on Kubernetes yet: ``wait_loaded`` reports a failed pod or a timeout,
        never ``CheckpointCorrupt``."""
        pods = await self._instance_pods(instance)
        for pod in pods:
            await self._call("delete", "pods", self.core.delete_namespaced_pod, pod.metadata.name, self.namespace)
        return f"deleted {len(pods)} pod(s) of {instance.id}; its Deployment starts a fresh one that fetches the model"

    async def claim_epoch(self, model: str) -> int:
        if not self.policy.has_model(model):
            raise errors.unknown_model(model, self.policy.model_names)
        return await self.fencing.claim(model)

    async def epochs(self) -> dict[str, int]:
        return await self.fencing.epochs()

    async def highest_indexes(self) -> dict[str, int]:
        return await self.fencing.highest_indexes()

    async def eject(self, instance: Instance, reason: str, epoch: int | None = None) -> str:
        await self.fencing.check(instance.model, epoch)
        changed = await self._set_labels(instance, {SERVING: "false", ROLE: Role.FAILED.value}, epoch, replicas=0)
        if not changed:
            return "already ejected"
        return f"{SERVING}=false (out of the Service), marked failed, scaled to 0 (GPU released): {reason[:200]}"

    async def promote(self, instance: Instance, epoch: int | None = None) -> str:
        await self.fencing.check(instance.model, epoch)
        if instance.role in (Role.SERVING, Role.PROMOTING):
            return f"already {instance.role}"
        if instance.role == Role.HOT:
            await self._set_labels(instance, {ROLE: Role.PROMOTING.value}, epoch)
            return "hot standby: already loaded, marked promoting"
        if instance.role == Role.WARM:
            pods = [p for p in await self._instance_pods(instance) if p.status and p.status.pod_ip]
            if pods:
                return await self._wake(instance, pods[0], epoch)
        if instance.role in (Role.WARM, Role.COLD):  # a warm standby without a pod is started like a cold one
            return await self._promote_deployment(instance, epoch)
        raise errors.not_a_standby(instance.id, instance.role)

    async def _wake(self, instance: Instance, pod: Any, epoch: int | None) -> str:
        woken = await self._wake_pod(instance, pod)
        await self._set_labels(instance, {ROLE: Role.PROMOTING.value}, epoch)
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

    async def _promote_deployment(self, instance: Instance, epoch: int | None = None) -> str:
        """GPU request and limit, replicas 1, role promoting on the Deployment and its pod template
        (and the epoch on the record: a compare-and-set like every fenced write of the record)."""
        name = instance.id
        labels = _with_standby_type({ROLE: Role.PROMOTING.value})
        for attempt in range(self.attempts):
            deployment = await self._read_deployment(name)
            if deployment is None:
                raise errors.model_load_failed(instance.id, f"no deployment {name} to scale up")
            recorded = _epoch(deployment.metadata.annotations or {})
            errors.check_epoch(instance.model, epoch, recorded)
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
            if epoch is not None and epoch != recorded:
                metadata["annotations"] = {EPOCH_ANNOTATION: str(epoch)}
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
            await self._set_labels(instance, labels, epoch)
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
        changed = await self._set_labels(instance, labels, epoch)
        detail = f"{'registered' if changed else 'already registered'} at priority {priority}"
        if self.istio is not None and priority == 0:
            detail += "; " + await self.istio.shift(instance.model, to_standby=True)
        return detail

    async def verify(self, instance: Instance, progress: ProgressCallback) -> str:
        """The pod is Ready and selected by the Service (no request goes through the Service)."""
        pods = await self._instance_pods(instance)
        if not pods:
            raise RuntimeError(f"{instance.id} has no pod")
        # During a rollout (a promoted cold standby) the old pod may linger: the Ready one counts.
        pods.sort(key=lambda p: (_labels(p).get(SERVING) != "true", not _ready(p), p.metadata.name))
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
        """Recorded in the ConfigMap ``drctl-cordoned-gpus`` (:mod:`.cordons` says why not on the Node)."""
        changed, before = await self.cordons.change(gpu, reason or "drained")
        if not changed:
            return f"{gpu} already cordoned ({before})"
        return f"{gpu} cordoned (ConfigMap {self.namespace}/drctl-cordoned-gpus)"

    async def uncordon_gpu(self, gpu: str) -> str:
        """Back in placement. This is failback's step (a zone's GPUs, a drill's GPU): in Istio mode
        the VirtualService's weights go back to what they were before drctl first shifted them
        (``istio.IstioRouting.restore``), also when the GPU was not cordoned (a retried step)."""
        changed, _ = await self.cordons.change(gpu, None)
        if not changed:
            detail = f"{gpu} was not cordoned"
        else:
            detail = f"{gpu} back in placement (unless its node agent still reports it drained)"
        if self.istio is not None:
            detail += "; " + await self.istio.restore()
        return detail

    async def cordoned_gpus(self) -> list[str]:
        """What placement must keep out: cordoned by a runbook (the ConfigMap, whichever worker wrote
        it), what the node agents say must be drained right now (``GET /gpus?status=drain`` on each
        agent), and every GPU of a Node the cluster has closed (NotReady, cordoned, or tainted with
        what instance pods do not tolerate: :mod:`.nodes`). The last is read from the Nodes each
        time and never recorded: a Node back in service brings its GPUs back."""
        urls = await node_agents.agent_urls(self._agent_urls, self._agent_service)
        from_agents: set[str] = set()
        if urls:
            async with httpx.AsyncClient() as client:
                for answer in await node_agents.drained_gpus(urls, client):
                    from_agents.update(answer.drain)
        closed = await self.closed_nodes()
        from_nodes = {slot.id for slot in gpu_inventory(self.policy.gpu_pool) if slot.node in closed}
        return sorted(set(await self.cordons.cordoned()) | from_agents | from_nodes)

    async def closed_nodes(self) -> dict[str, str]:
        """Nodes of the policy's GPU pool that cannot take a new instance now, with why (:mod:`.nodes`).
        Empty, with a warning, when the Nodes cannot be read (no ``list`` on nodes, say): placement
        then goes on as the cordons alone say, as it did before Nodes were read."""
        pool = {node.name for node in self.policy.gpu_pool.nodes}
        try:
            found: Any = await self._call("list", "nodes", self.core.list_node)
        except (ApiException, ApplicationError) as exc:
            log.warning("cannot read the Nodes, so none is kept out of placement for its state: %s", exc)
            return {}
        closed: dict[str, str] = {}
        for node in found.items or []:
            name = str(node.metadata.name)
            why = nodes.unavailable(node, TOLERATIONS) if name in pool else None
            if why is not None:
                closed[name] = why
        return closed

    def deployment(self, action: ReconcileAction) -> dict[str, Any]:
        """The Deployment for one instance: selected by instance and model, labelled with its tier,
        its pod the model's engine template (:mod:`.templates`). A cold standby is the same pod
        without a GPU, scaled to 0 (its normal state: a checkpoint and no process); promotion asks
        for the GPU and scales it to 1. ``Recreate``: never two pods of one instance on one GPU. A
        serving instance (an emergency one, or reconciliation's) is in its Service from the start
        (the Service only sends to it once its pod is Ready). The Deployment's own metadata is the
        instance's record (with the action's epoch); the template carries the tier it starts with."""
        selector = {MODEL: action.model, INSTANCE: action.instance}
        serving = "true" if action.tier == Role.SERVING else "false"
        # Also the seed's cold-standby manager labels (app, standby-type), for existing dashboards.
        labels = {**selector, ROLE: action.tier.value, SERVING: serving, "app": action.model}
        if action.tier.is_standby:
            labels[STANDBY_TYPE] = action.tier.value
        engine = self.policy.model(action.model).engine
        pod_spec = self.template.pod_spec(engine, action.model, gpu=action.tier != Role.COLD, node=action.node)
        annotations = {GPU_ANNOTATION: action.gpu} if action.gpu else {}
        record = {**annotations, EPOCH_ANNOTATION: str(action.epoch)} if action.epoch is not None else annotations
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": action.instance, "labels": labels, "annotations": record},
            "spec": {
                "replicas": 0 if action.tier == Role.COLD else 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": selector},
                "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
            },
        }

    async def create_instance(self, action: ReconcileAction, progress: ProgressCallback) -> str:
        """The Deployment, then (unless cold) a wait for its pod to be Ready — the instance is loaded
        when this returns, as the interface says — and a warm standby put to sleep. A retry finds
        the Deployment (409) and carries on waiting."""
        if not self.policy.has_model(action.model):
            raise errors.unknown_model(action.model, self.policy.model_names)
        await self.fencing.check(action.model, action.epoch)
        try:
            body = V1Deployment.from_dict(self.deployment(action))
        except EngineNotOnKubernetes as exc:
            raise not_built(f"{action.instance}: {exc}") from exc
        await self.fencing.record_index(action.model, instance_index(action.instance))
        how = "created"
        try:
            await self._call("create", "deployments.apps", self.apps.create_namespaced_deployment, self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            how = "exists already"
        if action.tier == Role.COLD:
            return f"deployment {action.instance} {how}: cold, no GPU, scaled to 0"
        instance = Instance(id=action.instance, model=action.model, role=action.tier, gpu=action.gpu)
        loaded = await self.wait_loaded(instance, progress)
        detail = f"deployment {action.instance} {how}: {action.tier}, 1 GPU ({action.gpu or 'any'}); {loaded}"
        if action.tier == Role.WARM:
            detail += f"; {await self._sleep(instance)}"
        return detail

    async def _sleep(self, instance: Instance) -> str:
        """Put a warm standby's model to sleep through its engine's sleep call (idempotent: a model
        its engine says is asleep is left alone)."""
        engine = self._engine(instance.model)
        pods = [p for p in await self._instance_pods(instance) if _ready(p) and _address(p)]
        if not pods:
            raise RuntimeError(f"{instance.id} has no Ready pod to put to sleep")  # retryable
        address = _address(pods[0])
        if engine.sleep is None:
            return f"stays awake ({engine.engine} cannot sleep)"
        if engine.is_sleeping_path is not None:
            try:
                async with httpx.AsyncClient(timeout=5.0) as client:
                    if _is_sleeping(await client.get(f"http://{address}{engine.is_sleeping_path}")):
                        return f"asleep already ({address})"
            except httpx.HTTPError:
                pass  # ask it to sleep anyway: that call's answer decides
        query = f"?{urlencode(engine.sleep.params)}" if engine.sleep.params else ""
        url = f"http://{address}{engine.sleep.path}{query}"
        try:
            status = await self.wake_up(url, engine.sleep.json)
        except httpx.HTTPError as exc:
            raise RuntimeError(f"{url}: {type(exc).__name__}: {exc}") from exc  # retryable
        if status != 200:
            raise RuntimeError(f"{url} answered {status}")  # retryable: it is loaded, only awake
        return f"put to sleep ({url})"

    async def retier_instance(self, action: ReconcileAction, progress: ProgressCallback) -> str:
        await self.fencing.check(action.model, action.epoch)
        instance = await self.get_instance(action.model, action.instance)
        if instance.role == action.tier:
            return f"already {action.tier}"
        if action.tier != Role.HOT or instance.role != Role.WARM:
            raise not_built(f"retiering {instance.id} {instance.role} → {action.tier}")
        pods = [p for p in await self._instance_pods(instance) if p.status and p.status.pod_ip]
        woken = f"; {await self._wake_pod(instance, pods[0])}" if pods else ""  # a hot standby is awake
        await self._set_labels(instance, {ROLE: Role.HOT.value}, action.epoch)
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
                propagation_policy="Background",  # its pods go with it
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            return "already gone"
        return f"deployment {action.instance} deleted"
