"""The Kubernetes platform's fault injection, for drills: each scenario's fault done to the cluster,
and undone.

This is the platform's optional fault-injection capability (:class:`drctl.platforms.base.FaultInjector`),
and on a cluster it is opt-in: deleting pods is in the worker's Role already, but cordoning,
tainting and marking Nodes NotReady needs cluster-wide ``patch`` on ``nodes`` and ``nodes/status``,
which can evict anyone's pods, and corrupting a pod's weights needs ``pods/exec``, a shell in the
model pods. So the platform offers it only when ``DRCTL_KUBERNETES_FAULT_INJECTION``
is true, and the verbs it uses (``FAULT_PERMISSIONS``) are granted by a separate Role and ClusterRole
in ``deploy/kubernetes/drills`` that a platform team applies deliberately (tests/deploy checks the
two match exactly).

What each scenario does:

- **pod-crash**: the serving instance's pods deleted with grace period 0 (nothing to restore: the
  Deployment makes a new pod; the failover has ejected the instance by then);
- **node-down**: the serving instance's Node cordoned, tainted ``NoExecute`` and marked NotReady
  (:mod:`.node_faults` says why all three);
- **zone-outage**: node-down for every Node labelled ``topology.kubernetes.io/zone`` = the zone (what
  the watcher judges a zone by);
- **gpu-failure**: Xid 79 injected into the GPU node agent of the GPU's node, found the way the
  platform finds its agents (``DRCTL_NODE_AGENT_URLS`` / ``_SERVICE``, each agent's ``/healthz``
  names its node), with the fault-injection bearer token;
- **model-corruption**: the start of the weights file the serving pod loads overwritten through
  ``pods/exec``, then the server made to reload its weights (which fails); restore deletes the pod
  if it still holds the damaged copy (:mod:`.model_faults`). Only a copy that is the pod's own (its
  container's filesystem, an ``emptyDir``): where the platform's pods load the weights from the
  read-only model store (the default ``drctl-models`` claim) the scenario is refused.

Every part is recorded in the ``InjectedFault`` before it is written (a pod's name before its
delete, a Node's cordon, taint and NotReady each before its patch, a weights file and its first
bytes before they are overwritten), so whatever was done is undone
(the drill workflow restores from the activity's last heartbeat if the worker dies mid-drill);
restore undoes only what it finds in place, so a part recorded but never written is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from kubernetes.client.exceptions import ApiException
from temporalio.exceptions import ApplicationError

from drctl.payloads import DrillRestore, DrillScenario, DrillTarget, InjectedFault, NodeFault
from drctl.platforms import node_agents
from drctl.platforms.kubernetes.model_faults import ModelFaults, weights_in_the_store
from drctl.platforms.kubernetes.node_faults import Call, NodeFaults
from drctl.platforms.kubernetes.platform import INSTANCE, MODEL, PERMISSION_DENIED, ZONE
from drctl.platforms.kubernetes.templates import InstanceTemplate
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings

FAULT_PERMISSIONS: dict[tuple[str, str], frozenset[str]] = {
    ("", "pods"): frozenset({"delete", "get", "list"}),
    ("", "pods/exec"): frozenset({"create", "get"}),  # a WebSocket GET: "get", and "create" from 1.35
    ("", "nodes"): frozenset({"get", "list", "patch"}),
    ("", "nodes/status"): frozenset({"patch"}),
}
"""Exactly the (API group, resource) → verbs this injector calls; ``deploy/kubernetes/drills``
grants these and nothing more (checked by tests/deploy). An exec is called as ``create`` on
``pods/exec`` and authorized as both (:mod:`.model_faults`)."""

XID = 79
"""Fallen off the bus: a drain-class Xid, as on the local platform."""


def fault_injection_settings() -> DrctlSettings | None:
    """The settings, when they opt in to fault injection on the cluster (None: they do not). Read
    from the environment when asked, as the worker reads its own: the platform is built from
    settings' parts and this is the one part only drills need."""
    settings = DrctlSettings()
    return settings if settings.kubernetes_fault_injection else None


class KubernetesFaultInjector:
    """Each scenario's fault on the cluster, through the platform's API calls (``call``: its retries,
    its 403 made a non-retryable ``PermissionDenied``) and the platform's way to its node agents."""

    def __init__(
        self,
        core: Any,
        namespace: str,
        call: Call,
        settings: DrctlSettings,
        *,
        agent_urls: Sequence[str] = (),
        agent_service: str | None = None,
        policy: DRPolicy | None = None,
        template: InstanceTemplate | None = None,
    ) -> None:
        self.core = core
        self.namespace = namespace
        self.call = call
        self.settings = settings
        self.agent_urls = list(agent_urls)
        self.agent_service = agent_service
        self.policy = policy
        """The models' engines (model-corruption reloads the weights through the engine's calls)."""
        self.template = template or InstanceTemplate()
        """How the platform builds instance pods: where their weights are."""
        self.nodes = NodeFaults(core, call)
        self.models = ModelFaults(core, namespace, call)

    def refusal(self, scenario: DrillScenario) -> str | None:
        """What this cluster cannot do, known before anything is injected."""
        if scenario == DrillScenario.MODEL_CORRUPTION:
            if self.policy is None:
                return "model-corruption needs the policy (the models' engines): this injector was given none"
            return weights_in_the_store(self.template)
        if scenario == DrillScenario.GPU_FAILURE:
            if not self.agent_urls and not self.agent_service:
                return (
                    "gpu-failure injects an Xid through the GPU node agent DaemonSet, and this worker knows no "
                    "node agents: set DRCTL_NODE_AGENT_SERVICE (deploy/kubernetes/drills sets "
                    "drctl-node-agent.drctl.svc:9400) or DRCTL_NODE_AGENT_URLS"
                )
            try:
                token = self.settings.fault_token()
            except ValueError as exc:
                return f"gpu-failure needs the node agents' fault-injection token: {exc}"
            if token is None:
                return (
                    "gpu-failure needs the node agents' fault-injection token: set DRCTL_FAULT_INJECTION_TOKEN_FILE "
                    "(deploy/kubernetes/drills mounts the Secret drctl-fault-token)"
                )
        return None

    async def inject(self, target: DrillTarget, fault: InjectedFault) -> None:
        """Inject the scenario's fault, recording each part in ``fault`` before it is written."""
        why = self.refusal(target.scenario)
        if why is not None:
            raise RuntimeError(why)
        try:
            match target.scenario:
                case DrillScenario.POD_CRASH:
                    await self._crash(target, fault)
                case DrillScenario.NODE_DOWN:
                    if target.node is None:
                        raise RuntimeError("a node-down drill needs a target node")
                    await self._nodes_down([target.node], f"node {target.node}", fault)
                case DrillScenario.ZONE_OUTAGE:
                    if target.zone is None:
                        raise RuntimeError("a zone-outage drill needs a target zone")
                    await self._nodes_down(await self._zone_nodes(target.zone), f"zone {target.zone}", fault)
                case DrillScenario.GPU_FAILURE:
                    await self._xid(target, fault)
                case DrillScenario.MODEL_CORRUPTION:
                    assert self.policy is not None  # refusal() says so otherwise
                    engine = self.policy.model(target.model).engine_profile
                    selector = f"{MODEL}={target.model},{INSTANCE}={target.instance}"
                    await self.models.corrupt(target, selector, engine, fault)
        except ApplicationError as exc:
            if exc.type != PERMISSION_DENIED:
                raise
            raise ApplicationError(
                f"{exc.message}; drills need the Role and ClusterRole of deploy/kubernetes/drills",
                type=PERMISSION_DENIED,
                non_retryable=True,
            ) from exc

    async def restore(self, fault: InjectedFault) -> DrillRestore:
        """Undo exactly what was injected; idempotent (the drill retries it until it succeeds).
        Every part is tried; if any failed, the error names them all (and the retry tries again)."""
        out = DrillRestore()
        failed: list[str] = []
        if fault.deleted_pods:
            out.detail.append(
                f"pod(s) {', '.join(fault.deleted_pods)} deleted: nothing to restore (their Deployment makes new ones)"
            )
        for node in fault.nodes:
            try:
                out.detail.append(await self.nodes.bring_back(node))
            except (ApiException, ApplicationError, RuntimeError) as exc:
                failed.append(f"{node.node}: {_why(exc)}")
        for record in fault.corrupted_in_pods:
            try:
                out.detail.append(await self.models.restore(record))
            except (ApiException, ApplicationError, RuntimeError) as exc:
                failed.append(f"pod {record.pod}: {_why(exc)}")
        if fault.xid_agents:
            token = self.settings.fault_token()
            async with httpx.AsyncClient(timeout=5.0) as http:
                for url in fault.xid_agents:
                    try:
                        cleared = await node_agents.clear_xids(http, url, token=token)
                    except (httpx.HTTPError, RuntimeError) as exc:
                        failed.append(f"{url}: {type(exc).__name__}: {exc}")
                        continue
                    out.detail.append(f"{url}: injected Xids cleared on GPU(s) {cleared}")
        if failed:
            raise RuntimeError(f"restore incomplete (retried): {'; '.join(failed)}")
        return out

    # -- the scenarios -------------------------------------------------------------------------

    async def _crash(self, target: DrillTarget, fault: InjectedFault) -> None:
        selector = f"{MODEL}={target.model},{INSTANCE}={target.instance}"
        found = await self.call("list", "pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector)
        pods = sorted(p.metadata.name for p in found.items if not p.metadata.deletion_timestamp)
        if not pods:
            raise RuntimeError(f"{target.instance} has no pod to delete")
        for name in pods:
            fault.deleted_pods.append(name)
            try:
                await self.call(
                    "delete", "pods", self.core.delete_namespaced_pod, name, self.namespace, grace_period_seconds=0
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
        fault.detail = f"pod(s) {', '.join(pods)} of {target.instance} deleted with grace period 0"

    async def _zone_nodes(self, zone: str) -> list[str]:
        found = await self.call("list", "nodes", self.core.list_node, label_selector=f"{ZONE}={zone}")
        names = sorted(n.metadata.name for n in found.items)
        if not names:
            raise RuntimeError(f"no Node is labelled {ZONE}={zone}")
        return names

    async def _nodes_down(self, names: list[str], what: str, fault: InjectedFault) -> None:
        done = []
        for name in names:
            node = NodeFault(node=name)
            fault.nodes.append(node)  # the parts are recorded in it as they are written
            done.append(await self.nodes.take_down(name, node, f"drctl drill: {what} down"))
        fault.detail = f"{what} down: {'; '.join(done)}"

    async def _xid(self, target: DrillTarget, fault: InjectedFault) -> None:
        if target.gpu is None or target.node is None:
            raise RuntimeError("a GPU-failure drill needs a target GPU and its node")
        urls = await node_agents.agent_urls(self.agent_urls, self.agent_service)
        async with httpx.AsyncClient(timeout=5.0) as http:
            url = await node_agents.agent_for_node(http, urls, target.node)
            if url is None:
                raise RuntimeError(
                    f"no node agent answers for {target.node} (asked {len(urls)}: "
                    f"{self.agent_service or ', '.join(self.agent_urls)}); the DaemonSet runs one per GPU node"
                )
            fault.xid_agents.append(url)
            gpu_index = int(target.gpu.rsplit("/", 1)[1])
            status = await node_agents.inject_xid(http, url, gpu_index, XID, token=self.settings.fault_token())
        fault.detail = f"Xid {XID} (GPU fallen off the bus) injected on {target.gpu} via {url}: {status}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, ApplicationError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
