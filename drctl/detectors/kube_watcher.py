"""The Kubernetes watcher: watches drctl's pods and the nodes under them, and starts the same
failover runbook the prober starts when a serving instance or hot standby goes down.

    python -m drctl.detectors.kube_watcher   # DRCTL_KUBERNETES_NAMESPACE / _CONTEXT, DRCTL_POLICY

An incident is one of:
- a serving or hot pod turns not-Ready;
- one of its containers restarted (``restartCount`` went up);
- it is deleted (or starts terminating: ``deletionTimestamp`` set);
- the node it runs on turns NotReady (or is deleted): every serving or hot pod on it.

Each is reported to the model's guardian (trigger ``probe``) once per instance per incident; the
incident ends when a pod of that instance is seen Ready in a serving or hot role again. The watcher
keeps no caps of its own: the guardian serializes a model's recoveries and the fleet's budget
delays what does not fit, whoever reported it.

The decisions are pure (``pod_failures``, ``node_failures``, ``WatchState``); the I/O is thin:
one thread per resource runs ``kubernetes.watch.Watch`` over ``list_namespaced_pod`` /
``list_node``, resuming from the last resourceVersion and relisting after 410 Gone.

RBAC: ``list`` and ``watch`` on pods (namespaced) and on nodes (cluster-wide).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from temporalio.client import Client

from drctl.payloads import FailoverRequest, IncidentTicket, Role, Trigger
from drctl.platforms.kubernetes.platform import INSTANCE, MODEL, ROLE, SERVING, ZONE
from drctl.policies.loader import load_policy_file
from drctl.policies.schema import DetectionPolicy
from drctl.service import run_service
from drctl.settings import DrctlSettings
from drctl.temporal.client import connect

log = logging.getLogger("drctl.kube_watcher")

WATCHED_ROLES = (Role.SERVING.value, Role.HOT.value)
WATCH_VERBS = {("", "pods"): frozenset({"list", "watch"}), ("", "nodes"): frozenset({"list", "watch"})}
"""The (API group, resource) → verbs this module calls; RBAC must grant them."""

ReportFailover = Callable[[FailoverRequest], Awaitable[IncidentTicket]]
"""Reports a failed instance to its model's guardian (``runbooks.report_failover``)."""


# -- state, pure --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodState:
    name: str
    model: str
    instance: str
    role: str
    serving: bool = False
    ready: bool = True
    restarts: int = 0
    node: str | None = None
    terminating: bool = False

    @property
    def watched(self) -> bool:
        """A serving instance or a hot standby: what the prober probes too."""
        return self.role in WATCHED_ROLES or self.serving


@dataclass(frozen=True)
class NodeState:
    name: str
    ready: bool = True
    zone: str | None = None


@dataclass(frozen=True)
class Failure:
    model: str
    instance: str
    reason: str
    node: str | None = None


def pod_failures(old: PodState | None, new: PodState | None) -> list[Failure]:
    """What one pod change means: ``new`` None is a deletion. Only transitions count: a pod first
    seen not-Ready (starting, or not ours to judge yet) is no incident."""
    if old is None or old.terminating or not old.watched:
        return []
    gone = new is None or new.terminating
    if new is not None and not gone and not new.watched:
        return []  # relabelled out (ejected by a failover, or by an operator): not an incident
    if gone:
        return [Failure(old.model, old.instance, f"kube-watcher: pod {old.name} deleted", old.node)]
    assert new is not None
    if new.restarts > old.restarts:
        n = new.restarts - old.restarts
        return [Failure(new.model, new.instance, f"kube-watcher: pod {new.name} restarted ({n}x)", new.node)]
    if old.ready and not new.ready:
        return [Failure(new.model, new.instance, f"kube-watcher: pod {new.name} not Ready", new.node)]
    return []


def node_failures(old: NodeState | None, new: NodeState | None, pods: Iterable[PodState]) -> list[Failure]:
    """A node that turns NotReady (or is deleted) fails every serving or hot pod on it."""
    if old is None or not old.ready or (new is not None and new.ready):
        return []
    how = "deleted" if new is None else "NotReady"
    return [
        Failure(p.model, p.instance, f"kube-watcher: node {old.name} {how} (pod {p.name})", old.name)
        for p in sorted(pods, key=lambda p: p.instance)
        if p.node == old.name and p.watched and not p.terminating
    ]


def recovered(old: PodState | None, new: PodState | None) -> bool:
    """Seen Ready in a watched role again, after not being so: the instance's incident ends."""
    if new is None or new.terminating or not new.watched or not new.ready:
        return False
    return old is None or old.terminating or not old.watched or not old.ready


@dataclass
class WatchState:
    """What the watcher knows: pods and nodes by name, and the instances with an open incident."""

    pods: dict[str, PodState] = field(default_factory=dict)
    nodes: dict[str, NodeState] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    """Instances whose incident already started a failover (or was refused by a cap)."""

    def _new(self, failures: Iterable[Failure]) -> list[Failure]:
        """Drop failures of instances already down, and repeats in one batch."""
        fresh: dict[str, Failure] = {}
        for f in failures:
            if f.instance not in self.down and f.instance not in fresh:
                fresh[f.instance] = f
        return list(fresh.values())

    def pod_event(self, kind: str, pod: PodState) -> list[Failure]:
        old = self.pods.get(pod.name)
        new = None if kind == "DELETED" else pod
        if new is None:
            self.pods.pop(pod.name, None)
        else:
            self.pods[pod.name] = new
        if recovered(old, new):
            self.down.discard(pod.instance)
        return self._new(pod_failures(old, new))

    def pod_sync(self, pods: Iterable[PodState]) -> list[Failure]:
        """A full listing (start, or relist after 410 Gone): pods missing from it were deleted."""
        listed = {p.name: p for p in pods}
        failures: list[Failure] = []
        for name in sorted(set(self.pods) - set(listed)):
            failures += self.pod_event("DELETED", self.pods[name])
        for pod in listed.values():
            failures += self.pod_event("MODIFIED", pod)
        return self._new(failures)

    def node_event(self, kind: str, node: NodeState) -> list[Failure]:
        old = self.nodes.get(node.name)
        new = None if kind == "DELETED" else node
        if new is None:
            self.nodes.pop(node.name, None)
        else:
            self.nodes[node.name] = new
        return self._new(node_failures(old, new, self.pods.values()))

    def node_sync(self, nodes: Iterable[NodeState]) -> list[Failure]:
        listed = {n.name: n for n in nodes}
        failures: list[Failure] = []
        for name in sorted(set(self.nodes) - set(listed)):
            failures += self.node_event("DELETED", self.nodes[name])
        for node in listed.values():
            failures += self.node_event("MODIFIED", node)
        return self._new(failures)

    def zone(self, node: str | None) -> str | None:
        found = self.nodes.get(node) if node else None
        return found.zone if found else None


def pod_state(pod: Any) -> PodState | None:
    """A ``V1Pod`` as the watcher sees it; None if it is not a drctl instance."""
    meta = pod.metadata
    labels = dict(meta.labels or {}) if meta else {}
    if MODEL not in labels:
        return None
    status = pod.status
    conditions = (status.conditions if status else None) or []
    statuses = (status.container_statuses if status else None) or []
    return PodState(
        name=meta.name,
        model=labels[MODEL],
        instance=labels.get(INSTANCE, meta.name),
        role=labels.get(ROLE, ""),
        serving=labels.get(SERVING) == "true",
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        restarts=sum(int(s.restart_count or 0) for s in statuses),
        node=pod.spec.node_name if pod.spec else None,
        terminating=meta.deletion_timestamp is not None,
    )


def node_state(node: Any) -> NodeState:
    conditions = (node.status.conditions if node.status else None) or []
    return NodeState(
        name=node.metadata.name,
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        zone=dict(node.metadata.labels or {}).get(ZONE),
    )


# -- I/O, thin ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    resource: str
    """``pods`` or ``nodes``."""
    kind: str
    """ADDED, MODIFIED, DELETED, or SYNC (a full listing in ``objects``)."""
    objects: list[Any]


def _watch_loop(
    resource: str,
    list_fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    emit: Callable[[Event], None],
    stop: threading.Event,
    timeout_s: int,
    backoff_s: float,
    read_timeout_s: float,
) -> None:
    """List, then watch from the listing's resourceVersion; resume from the last one seen, relist
    after 410 Gone, back off and retry after any other error. Runs in its own thread."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.watch import Watch

    version: str | None = None
    while not stop.is_set():
        try:
            if version is None:
                listing = list_fn(*args, **kwargs)
                version = listing.metadata.resource_version if listing.metadata else None
                emit(Event(resource, "SYNC", list(listing.items)))
            watch = Watch()  # type: ignore[no-untyped-call]
            stream = watch.stream(  # type: ignore[no-untyped-call]
                list_fn,
                *args,
                resource_version=version,
                timeout_seconds=timeout_s,
                _request_timeout=(10, read_timeout_s),  # a silent connection is reopened, and stop is seen
                **kwargs,
            )
            for event in stream:
                if stop.is_set():
                    watch.stop()  # type: ignore[no-untyped-call]
                    break
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    emit(Event(resource, event["type"], [event["object"]]))
                version = watch.resource_version or version
        except ApiException as exc:
            if exc.status == 410:
                log.info("%s watch expired (410 Gone): relisting", resource)
                version = None
                continue
            log.warning("%s watch failed (HTTP %s): retrying in %.1fs", resource, exc.status, backoff_s)
            stop.wait(backoff_s)
        except Exception as exc:  # connection reset, timeouts: reconnect from the last version
            if stop.is_set():
                break
            log.warning("%s watch failed (%s): retrying in %.1fs", resource, exc, backoff_s)
            stop.wait(backoff_s)


class KubeWatcher:
    def __init__(
        self,
        core: Any,
        namespace: str,
        policy: DetectionPolicy,
        report: ReportFailover,
        *,
        watch_nodes: bool = True,
        timeout_s: int = 300,
        backoff_s: float = 1.0,
        read_timeout_s: float | None = None,
    ) -> None:
        self.core = core
        self.namespace = namespace
        self.policy = policy
        self.report = report
        self.watch_nodes = watch_nodes
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.read_timeout_s = read_timeout_s if read_timeout_s is not None else timeout_s + 30.0
        """Client-side read timeout of a watch: also how soon the threads see a stop."""
        self.state = WatchState()
        self.started: list[FailoverRequest] = []
        """Every failure reported (the guardian joins repeats and the budget delays what must wait)."""

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        halt = threading.Event()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        watches: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
            ("pods", self.core.list_namespaced_pod, (self.namespace,))
        ]
        if self.watch_nodes:
            watches.append(("nodes", self.core.list_node, ()))
        for resource, fn, args in watches:
            kwargs = {"label_selector": MODEL} if resource == "pods" else {}
            threading.Thread(
                target=_watch_loop,
                args=(resource, fn, args, kwargs, emit, halt, self.timeout_s, self.backoff_s, self.read_timeout_s),
                name=f"kube-watch-{resource}",
                daemon=True,  # a blocked read must not hold up the process at exit
            ).start()
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                getting = asyncio.create_task(queue.get())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    break
                await self.handle(getting.result())
        finally:
            halt.set()
            stopping.cancel()

    async def handle(self, event: Event) -> None:
        if event.resource == "pods":
            pods = [p for p in map(pod_state, event.objects) if p is not None]  # selector, client side too
            if event.kind == "SYNC":
                failures = self.state.pod_sync(pods)
            else:
                failures = [f for p in pods for f in self.state.pod_event(event.kind, p)]
        else:
            nodes = [node_state(n) for n in event.objects]
            if event.kind == "SYNC":
                failures = self.state.node_sync(nodes)
            else:
                failures = [f for n in nodes for f in self.state.node_event(event.kind, n)]
        for failure in failures:
            await self._fail_over(failure)

    async def _fail_over(self, failure: Failure) -> None:
        if failure.instance in self.state.down:
            return  # reported already: one incident per failure
        self.state.down.add(failure.instance)
        request = FailoverRequest(
            model=failure.model,
            instance=failure.instance,
            trigger=Trigger.PROBE,
            failed_at=datetime.now(UTC),
            reason=failure.reason[:500],
        )
        ticket = await self.report(request)
        self.started.append(request)
        how = "joined" if ticket.joined else "opened"
        log.info("%s: %s: %s incident %s", failure.instance, failure.reason, how, ticket.workflow_id)


def make_core_api(settings: DrctlSettings) -> Any:
    """In-cluster config if there is one, else the kubeconfig (as ``worker.make_platform``)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(context=settings.kubernetes_context)  # type: ignore[no-untyped-call]
    return client.CoreV1Api(client.ApiClient())


async def run_kube_watcher(settings: DrctlSettings, stop: asyncio.Event, client: Client | None = None) -> None:
    from drctl.temporal.runbooks import report_failover

    policy = load_policy_file(settings.policy)
    client = client or await connect(settings)
    core = make_core_api(settings)

    async def start(request: FailoverRequest) -> IncidentTicket:
        return await report_failover(client, settings, request, reporter="kube-watcher")

    watcher = KubeWatcher(core, settings.kubernetes_namespace, policy.detection, start)
    log.info("watching pods labelled %s in %r, and nodes", MODEL, settings.kubernetes_namespace)
    began = time.monotonic()
    try:
        await watcher.run(stop)
    finally:
        log.info("stopped after %.0fs; %d failover(s) started", time.monotonic() - began, len(watcher.started))


def main() -> None:
    run_service(run_kube_watcher)


if __name__ == "__main__":
    main()
