"""The Kubernetes watcher: watches drctl's pods and the nodes under them, and reports a serving
instance or hot standby that goes down to its model's guardian (trigger ``probe``) — the cluster's
prober, with the prober's hysteresis and flap hold-down.

    python -m drctl.detectors.kube_watcher   # DRCTL_KUBERNETES_NAMESPACE / _CONTEXT, DRCTL_POLICY

What it sees of an instance (its pods labelled ``drctl.io/instance``):
- a pod deleted (or terminating: ``deletionTimestamp`` set), a container restarted (``restartCount``
  went up), or its node deleted: like a process that exited, the instance is down at once;
- a pod not Ready, or its node NotReady (condition ``Ready`` False or Unknown): one bad observation.
  The instance is looked at again every ``detection.probeInterval`` and is down after
  ``unhealthyThreshold`` bad looks in a row, up again after ``healthyThreshold`` good ones
  (:class:`drctl.policies.probing.ProbeTracker`, the prober's own decisions). An instance that went
  down ``flapLimit`` times within ``flapWindow`` is held for ``holdDown``: logged, not failed over
  again and again.

Each instance down is reported once per incident; a report that does not get through (Temporal
down, a worker restarting) is kept and tried again every tick, never dropped. Caps are not the
watcher's business, as they are not the prober's: the guardian runs a model's recoveries one after
the other, and the fleet's budget (``maxFailoversPerZone``, ``maxRunbooksPerMinute``) delays what does
not fit and trips to a person past ``tripAfterWaiting`` waiting — whoever reported it.

Zones are judged from Node objects: a node is up when its ``Ready`` condition is True or, with node
agents configured (``DRCTL_NODE_AGENT_URLS`` / ``_SERVICE``), when its GPU node agent answers — the
second opinion, so that nodes which only lost their kubelet's connection to the API server do not
move a zone. A checked zone (the active ones, ``az_failover.activeZones``, the standby zone and every
zone a node is labelled with, by ``topology.kubernetes.io/zone``) none of whose known nodes is up
fails a check; after ``failoverThreshold`` checks in a row, one every
``healthCheckInterval`` (:class:`drctl.policies.zone_health.ZoneHealthTracker`, the zone checker's),
``ZoneFailoverWorkflow`` is started through the zone checker's starter. While a zone looks down its
instances are not reported one by one: they are the zone failover's (it reports every serving
instance of the zone to its guardian after cordoning the zone); if the zone comes back first, they
are reported as usual.

Of several replicas only the one holding the Lease ``drctl-kube-watcher`` acts
(:mod:`drctl.detectors.leader`); the others watch and judge the same way, so a standby that takes
over reports what is still down (a duplicate joins its incident at the guardian).

The decisions are pure (``pod_failures``, ``node_failures``, ``WatchState``, ``zone_verdicts``); the
I/O is thin: one thread per resource runs ``kubernetes.watch.Watch`` over ``list_namespaced_pod`` /
``list_node``, resuming from the last resourceVersion and relisting after 410 Gone.

RBAC: ``list`` and ``watch`` on pods (namespaced) and on nodes (cluster-wide), and the Lease's verbs
(``WATCH_VERBS``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from temporalio.client import Client

from drctl.detectors.leader import LEASE_VERBS, LeaderElector, LeaseTimings
from drctl.detectors.zone_checker import StartZoneFailover
from drctl.payloads import FailoverRequest, IncidentTicket, Role, Trigger
from drctl.platforms import node_agents
from drctl.platforms.kubernetes.platform import INSTANCE, MODEL, ROLE, SERVING, ZONE
from drctl.policies.loader import load_policy_file
from drctl.policies.probing import ProbeEvent, ProbeTracker
from drctl.policies.schema import DetectionPolicy, ZoneFailoverPolicy
from drctl.policies.zone_health import ZoneHealthTracker, ZoneVerdict, zone_verdict
from drctl.service import run_service
from drctl.settings import DrctlSettings
from drctl.temporal.client import connect

log = logging.getLogger("drctl.kube_watcher")

WATCHED_ROLES = (Role.SERVING.value, Role.HOT.value)
WATCH_VERBS = {
    ("", "pods"): frozenset({"list", "watch"}),
    ("", "nodes"): frozenset({"list", "watch"}),
    **LEASE_VERBS,
}
"""The (API group, resource) → verbs this module calls (the Lease's in :mod:`leader`); RBAC must
grant them."""
LEASE_NAME = "drctl-kube-watcher"
TICK_S = 0.1

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
    exited: bool = False
    """Gone or restarted (deleted, terminating, a container restart, its node deleted): down at once,
    like a process that exited. Otherwise (not Ready, node NotReady) one bad observation."""


@dataclass(frozen=True)
class InstanceHealth:
    """One instance as its pods show it now."""

    model: str
    ok: bool
    """A pod of it in a watched role is Ready, not terminating, on a node not known NotReady."""
    zone: str | None = None
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
        return [Failure(old.model, old.instance, f"kube-watcher: pod {old.name} deleted", old.node, exited=True)]
    assert new is not None
    if new.restarts > old.restarts:
        n = new.restarts - old.restarts
        reason = f"kube-watcher: pod {new.name} restarted ({n}x)"
        return [Failure(new.model, new.instance, reason, new.node, exited=True)]
    if old.ready and not new.ready:
        return [Failure(new.model, new.instance, f"kube-watcher: pod {new.name} not Ready", new.node)]
    return []


def node_failures(old: NodeState | None, new: NodeState | None, pods: Iterable[PodState]) -> list[Failure]:
    """A node that turns NotReady (or is deleted) fails every serving or hot pod on it."""
    if old is None or not old.ready or (new is not None and new.ready):
        return []
    how = "deleted" if new is None else "NotReady"
    return [
        Failure(p.model, p.instance, f"kube-watcher: node {old.name} {how} (pod {p.name})", old.name, new is None)
        for p in sorted(pods, key=lambda p: p.instance)
        if p.node == old.name and p.watched and not p.terminating
    ]


def zone_verdicts(
    nodes: Iterable[NodeState], agent_up: Mapping[str, bool], zones: Iterable[str]
) -> dict[str, ZoneVerdict]:
    """Each zone's verdict from its nodes (by their ``topology.kubernetes.io/zone`` label): a node is
    up when it is Ready or its node agent answered (the second opinion); a zone is down when none
    of its nodes is, unknown when it has none."""
    members: dict[str, dict[str, bool | None]] = {zone: {} for zone in zones}
    for node in nodes:
        if node.zone in members:
            members[node.zone][node.name] = node.ready or agent_up.get(node.name) is True
    return {zone: zone_verdict(up, up) for zone, up in members.items()}


@dataclass
class WatchState:
    """What the watcher knows: pods and nodes by name."""

    pods: dict[str, PodState] = field(default_factory=dict)
    nodes: dict[str, NodeState] = field(default_factory=dict)

    @staticmethod
    def _once(failures: Iterable[Failure]) -> list[Failure]:
        """One failure per instance per batch (the first; exited wins, it needs no more looks)."""
        fresh: dict[str, Failure] = {}
        for f in failures:
            if f.instance not in fresh or (f.exited and not fresh[f.instance].exited):
                fresh[f.instance] = f
        return list(fresh.values())

    def pod_event(self, kind: str, pod: PodState) -> list[Failure]:
        old = self.pods.get(pod.name)
        new = None if kind == "DELETED" else pod
        if new is None:
            self.pods.pop(pod.name, None)
        else:
            self.pods[pod.name] = new
        return pod_failures(old, new)

    def pod_sync(self, pods: Iterable[PodState]) -> list[Failure]:
        """A full listing (start, or relist after 410 Gone): pods missing from it were deleted."""
        listed = {p.name: p for p in pods}
        failures: list[Failure] = []
        for name in sorted(set(self.pods) - set(listed)):
            failures += self.pod_event("DELETED", self.pods[name])
        for pod in listed.values():
            failures += self.pod_event("MODIFIED", pod)
        return self._once(failures)

    def node_event(self, kind: str, node: NodeState) -> list[Failure]:
        old = self.nodes.get(node.name)
        new = None if kind == "DELETED" else node
        if new is None:
            self.nodes.pop(node.name, None)
        else:
            self.nodes[node.name] = new
        return node_failures(old, new, self.pods.values())

    def node_sync(self, nodes: Iterable[NodeState]) -> list[Failure]:
        listed = {n.name: n for n in nodes}
        failures: list[Failure] = []
        for name in sorted(set(self.nodes) - set(listed)):
            failures += self.node_event("DELETED", self.nodes[name])
        for node in listed.values():
            failures += self.node_event("MODIFIED", node)
        return self._once(failures)

    def zone(self, node: str | None) -> str | None:
        found = self.nodes.get(node) if node else None
        return found.zone if found else None

    def node_ready(self, node: str | None) -> bool:
        """Not known NotReady (a node not seen, or with no Ready condition, is no evidence)."""
        found = self.nodes.get(node) if node else None
        return found is None or found.ready

    def health(self) -> dict[str, InstanceHealth]:
        """Every instance with a pod in a watched role, as its pods show it now."""
        out: dict[str, InstanceHealth] = {}
        for pod in sorted(self.pods.values(), key=lambda p: p.name):
            if not pod.watched:
                continue
            ok = pod.ready and not pod.terminating and self.node_ready(pod.node)
            seen = out.get(pod.instance)
            if seen is None or (ok and not seen.ok):  # a serving pod of it speaks for it
                out[pod.instance] = InstanceHealth(pod.model, ok, self.zone(pod.node), pod.node)
        return out

    def unwatched(self) -> set[str]:
        """Instances with pods, none of them in a watched role (ejected, warm, cold)."""
        return {p.instance for p in self.pods.values()} - {p.instance for p in self.pods.values() if p.watched}


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
    """A ``V1Node``: NotReady when its ``Ready`` condition is False or Unknown (a node without one
    yet is no evidence either way)."""
    conditions = (node.status.conditions if node.status else None) or []
    return NodeState(
        name=node.metadata.name,
        ready=all(c.status == "True" for c in conditions if c.type == "Ready"),
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


@dataclass
class Detection:
    """What the watcher did about one instance (or zone), for logs and tests."""

    instance: str
    model: str
    action: str
    """down, reported, held (flapping), up, left to zone failover, zone failover started."""
    at: float


class KubeWatcher:
    def __init__(
        self,
        core: Any,
        namespace: str,
        policy: DetectionPolicy,
        report: ReportFailover,
        *,
        zones: ZoneFailoverPolicy | None = None,
        start_zone_failover: StartZoneFailover | None = None,
        elector: LeaderElector | None = None,
        agent_urls: Sequence[str] = (),
        agent_service: str | None = None,
        watch_nodes: bool = True,
        timeout_s: int = 300,
        backoff_s: float = 1.0,
        read_timeout_s: float | None = None,
        tick_s: float = TICK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.namespace = namespace
        self.policy = policy
        self.report = report
        self.zones = zones if start_zone_failover is not None else None
        """Zone judgement runs only with a zone failover starter to act on it."""
        self.start_zone_failover = start_zone_failover
        self.elector = elector
        """None: a single replica, always acting."""
        self.agent_urls = list(agent_urls)
        self.agent_service = agent_service
        self.watch_nodes = watch_nodes
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.read_timeout_s = read_timeout_s if read_timeout_s is not None else timeout_s + 30.0
        """Client-side read timeout of a watch: also how soon the threads see a stop."""
        self.tick_s = tick_s
        self.clock = clock
        self.state = WatchState()
        self.trackers: dict[str, ProbeTracker] = {}
        self.next_look: dict[str, float] = {}
        self.reasons: dict[str, str] = {}
        """The last failure seen per instance: the reason its report gives."""
        self.unreported: dict[str, FailoverRequest] = {}
        """Instances down, not yet accepted by their guardian (tried again every tick; a standby
        keeps them for when it leads)."""
        self.reported: dict[str, IncidentTicket] = {}
        self.started: list[FailoverRequest] = []
        """Every report the guardian accepted (it joins repeats; the budget delays what must wait)."""
        self.report_errors = 0
        self.detections: list[Detection] = []
        self.zone_tracker = ZoneHealthTracker(zones.failover_threshold if zones else 1)
        self.zone_checks = 0
        self.zone_verdicts: dict[str, ZoneVerdict] = {}
        self.zones_due: dict[str, str] = {}
        """Zones judged down whose failover is not started yet (zone → reason)."""
        self.zones_failing: dict[str, str] = {}
        """Zones whose failover was started (zone → workflow id), until the zone is up again."""
        self.zone_started: list[tuple[str, str]] = []
        self._next_zone_check = 0.0
        self.agent_up: dict[str, bool] = {}
        """Node → whether its node agent answered the last check (nodes whose agent was ever seen)."""
        self.agent_node_of: dict[str, str] = {}
        self._reporting: asyncio.Task[None] | None = None

    # -- deciding (no I/O) -----------------------------------------------------------------

    def leading(self) -> bool:
        return self.elector is None or self.elector.leading()

    async def handle(self, event: Event) -> None:
        """One watch event (or listing): its failures are observed at once."""
        now = self.clock()
        if event.resource == "pods":
            pods = [p for p in map(pod_state, event.objects) if p is not None]  # selector, client side too
            if event.kind == "SYNC":
                failures = self.state.pod_sync(pods)
            else:
                failures = WatchState._once(f for p in pods for f in self.state.pod_event(event.kind, p))
        else:
            nodes = [node_state(n) for n in event.objects]
            if event.kind == "SYNC":
                failures = self.state.node_sync(nodes)
            else:
                failures = WatchState._once(f for n in nodes for f in self.state.node_event(event.kind, n))
        for failure in failures:
            self.reasons[failure.instance] = failure.reason
            tracker = self.trackers.setdefault(failure.instance, ProbeTracker(self.policy))
            self.next_look[failure.instance] = now + self.policy.probe_interval.total_seconds()
            self._on(failure.instance, failure.model, tracker.observe(False, now, exited=failure.exited), now)
        self._kick()

    def tick(self, now: float) -> None:
        """Look again at every instance due, forget those no longer ours, judge the zones."""
        interval = self.policy.probe_interval.total_seconds()
        health = self.state.health()
        for instance, seen in health.items():
            tracker = self.trackers.get(instance)
            if tracker is None:
                if seen.ok:  # judged from its first Ready on: a pod starting is not down
                    self.trackers[instance] = ProbeTracker(self.policy)
                    self.next_look[instance] = now + interval
                continue
            if now >= self.next_look.get(instance, 0.0):
                self.next_look[instance] = now + interval
                self._on(instance, seen.model, tracker.observe(seen.ok, now), now)
        unwatched = self.state.unwatched()
        for instance in [i for i in self.trackers if i not in health]:
            if instance in unwatched:  # ejected (by its runbook, or a person): handled
                self.unreported.pop(instance, None)
            if instance in self.unreported or self.trackers[instance].held(now):
                continue  # a report still to make (a pod deleted), or a hold-down to keep
            del self.trackers[instance]
            self.next_look.pop(instance, None)
            self.reasons.pop(instance, None)
            self.reported.pop(instance, None)
        if self.zones is not None and now >= self._next_zone_check:
            self._next_zone_check = now + self.zones.health_check_interval.total_seconds()
            self.check_zones()
        self._kick()

    def _on(self, instance: str, model: str, event: ProbeEvent | None, now: float) -> None:
        tracker = self.trackers[instance]
        if event is None:
            return
        if event == ProbeEvent.UP:
            log.info("%s is up again", instance)
            self.reported.pop(instance, None)  # a report still pending goes out: its runbook confirms
            self._record(instance, model, "up", now)
            return
        if event == ProbeEvent.FLAPPING:
            log.warning("%s is flapping: held out until it settles, not failed over again", instance)
            self._record(instance, model, "held (flapping)", now)
            return
        if instance in self.reported or instance in self.unreported:
            return
        first = tracker.first_failure_at if tracker.first_failure_at is not None else now
        reason = self.reasons.get(instance, f"kube-watcher: {instance} not serving")
        if tracker.failures > 1:
            reason += f" ({tracker.failures} looks in a row)"
        self.unreported[instance] = FailoverRequest(
            model=model,
            instance=instance,
            trigger=Trigger.PROBE,
            failed_at=datetime.now(UTC) - timedelta(seconds=max(0.0, self.clock() - first)),
            reason=reason[:500],
        )
        self._record(instance, model, "down", now)
        log.info("%s down: %s", instance, reason)

    def _record(self, instance: str, model: str, action: str, now: float) -> None:
        self.detections.append(Detection(instance, model, action, now))

    def zone_of(self, instance: str) -> str | None:
        seen = self.state.health().get(instance)
        if seen is not None and seen.zone is not None:
            return seen.zone
        return next((self.state.zone(p.node) for p in self.state.pods.values() if p.instance == instance), None)

    def checked_zones(self) -> list[str]:
        """The zones the zone checks watch: the active ones, the standby zone (where a zone failover
        moves serving) and every zone a watched node is labelled with, as the prober checks every
        zone of the policy (:attr:`~drctl.policies.schema.DRPolicy.checked_zones`)."""
        assert self.zones is not None
        return self.zones.checked_zones(node.zone for node in self.state.nodes.values() if node.zone)

    def zone_looks_down(self, zone: str | None) -> bool:
        """A checked zone none of whose nodes is up right now: its instances are the zone failover's."""
        if self.zones is None or zone is None or zone not in self.checked_zones():
            return False
        verdict = zone_verdicts(self.state.nodes.values(), self.agent_up, [zone])[zone]
        return verdict == ZoneVerdict.DOWN or zone in self.zones_failing

    def check_zones(self) -> dict[str, ZoneVerdict]:
        """One zone check from the nodes as watched (and the agents' last answers)."""
        assert self.zones is not None
        verdicts = zone_verdicts(self.state.nodes.values(), self.agent_up, self.checked_zones())
        for zone, verdict in verdicts.items():
            failures_before = self.zone_tracker.failures.get(zone, 0)
            if self.zone_tracker.observe(zone, verdict):
                threshold = self.zones.failover_threshold
                self.zones_due[zone] = (
                    f"kube-watcher: {threshold} zone checks in a row with every node of {zone} NotReady"
                    + (" and its node agents silent" if self.agent_node_of else "")
                )
                log.error("zone %s is down", zone)
            elif verdict == ZoneVerdict.DOWN and zone not in self.zone_tracker.tripped:
                log.warning("zone %s failed check %d of %d", zone, failures_before + 1, self.zone_tracker.threshold)
            elif verdict == ZoneVerdict.UP:
                self.zones_due.pop(zone, None)
                self.zones_failing.pop(zone, None)
        self.zone_checks += 1
        self.zone_verdicts = verdicts
        return verdicts

    def _leave_to_zone_failovers(self) -> None:
        for instance, request in list(self.unreported.items()):
            zone = self.zone_of(instance)
            if zone is not None and zone in self.zones_failing:
                del self.unreported[instance]
                self._record(instance, request.model, f"left to zone failover {self.zones_failing[zone]}", self.clock())
                log.info("%s: left to the failover of zone %s", instance, zone)

    # -- acting ----------------------------------------------------------------------------

    def _kick(self) -> None:
        """Report in the background, so a slow or unreachable Temporal never stalls the watching."""
        if not (self.unreported or self.zones_due) or not self.leading():
            return
        if self._reporting is None or self._reporting.done():
            self._reporting = asyncio.create_task(self._act())

    async def settle(self) -> None:
        """Wait for the reports in flight (tests, shutdown)."""
        while self._reporting is not None and not self._reporting.done():
            await asyncio.shield(self._reporting)

    async def _act(self) -> None:
        """Start the zone failovers due, then report every instance down to its guardian, except
        those of a zone that looks down. What does not get through is tried again next tick."""
        for zone, reason in list(self.zones_due.items()):
            if not self.leading():
                return
            assert self.start_zone_failover is not None
            try:
                workflow_id = await self.start_zone_failover(zone, reason)
            except Exception as exc:
                self.report_errors += 1
                log.warning("could not start the failover of zone %s yet (%s): trying again", zone, exc)
                return
            self.zones_due.pop(zone, None)
            self.zones_failing[zone] = workflow_id
            self.zone_started.append((zone, workflow_id))
            self._record(zone, "", "zone failover started", self.clock())
            log.error("zone %s is down: started %s", zone, workflow_id)
        self._leave_to_zone_failovers()
        for instance, request in list(self.unreported.items()):
            if self.zone_looks_down(self.zone_of(instance)):
                continue  # the zone failover's, unless the zone comes back first
            if not self.leading():
                return
            try:
                ticket = await self.report(request)
            except Exception as exc:
                self.report_errors += 1
                log.warning("could not report %s yet (%s): trying again", instance, exc)
                return
            if self.unreported.get(instance) is request:
                del self.unreported[instance]
            tracker = self.trackers.get(instance)
            if tracker is not None and not tracker.up:  # up again meanwhile: that incident is over
                self.reported[instance] = ticket
            self.started.append(request)
            self._record(instance, request.model, "reported", self.clock())
            how = "joined" if ticket.joined else "opened"
            log.info("%s: %s: %s incident %s", instance, request.reason, how, ticket.workflow_id)

    # -- I/O -------------------------------------------------------------------------------

    async def check_agents(self, http: httpx.AsyncClient) -> None:
        """Ask every node agent which node it is on (the zone checker's way); an agent seen before
        that does not answer counts against its node."""
        urls = await node_agents.agent_urls(self.agent_urls, self.agent_service)
        urls += [url for url in self.agent_node_of if url not in urls]
        interval = self.zones.health_check_interval.total_seconds() if self.zones else 10.0
        timeout = min(2.0, max(0.2, interval / 2))
        answers = await asyncio.gather(*(node_agents.agent_node(http, url, timeout) for url in urls))
        up: dict[str, bool] = {}
        for url, node in zip(urls, answers, strict=True):
            if node is not None:
                self.agent_node_of[url] = node
                up[node] = True
            elif url in self.agent_node_of:
                up.setdefault(self.agent_node_of[url], False)
        self.agent_up = up

    async def _agents_loop(self, stop: asyncio.Event) -> None:
        interval = self.zones.health_check_interval.total_seconds() if self.zones else 10.0
        async with httpx.AsyncClient() as http:
            while not stop.is_set():
                try:
                    await self.check_agents(http)
                except Exception:
                    log.exception("node agent check failed")
                try:
                    await asyncio.wait_for(stop.wait(), timeout=interval)
                except TimeoutError:
                    pass

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
        helpers: list[asyncio.Task[None]] = []
        if self.elector is not None:
            helpers.append(asyncio.create_task(self.elector.run(stop)))
        if self.zones is not None and (self.agent_urls or self.agent_service):
            helpers.append(asyncio.create_task(self._agents_loop(stop)))
        next_tick = self.clock()
        try:
            while not stop.is_set():
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=max(0.0, next_tick - self.clock()))
                except TimeoutError:
                    pass
                else:
                    await self.handle(event)
                if self.clock() >= next_tick:
                    self.tick(self.clock())
                    next_tick = self.clock() + self.tick_s
        finally:
            halt.set()
            if self._reporting is not None:
                self._reporting.cancel()
            if not stop.is_set():  # ended by an error: the helpers would wait for a stop forever
                for helper in helpers:
                    helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)


def make_api_client(settings: DrctlSettings) -> Any:
    """In-cluster config if there is one, else the kubeconfig (as ``worker.make_platform``)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(context=settings.kubernetes_context)  # type: ignore[no-untyped-call]
    return client.ApiClient()


def make_core_api(settings: DrctlSettings) -> Any:
    from kubernetes import client

    return client.CoreV1Api(make_api_client(settings))


def identity() -> str:
    """This replica's name in the Lease: the pod's name (``POD_NAME``, else the hostname, which is the
    pod's name in a pod) and a random suffix, so a restarted container is a new candidate."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


async def run_kube_watcher(settings: DrctlSettings, stop: asyncio.Event, client: Client | None = None) -> None:
    from kubernetes.client import CoordinationV1Api, CoreV1Api

    from drctl.payloads import ZoneFailoverRequest
    from drctl.temporal.runbooks import report_failover, start_zone_failover

    policy = load_policy_file(settings.policy)
    client = client or await connect(settings)
    api = make_api_client(settings)

    async def start(request: FailoverRequest) -> IncidentTicket:
        return await report_failover(client, settings, request, reporter="kube-watcher")

    async def start_zone(zone: str, reason: str) -> str:
        handle = await start_zone_failover(client, settings, ZoneFailoverRequest(zone=zone, reason=reason))
        return handle.id

    elector = LeaderElector(
        CoordinationV1Api(api), settings.kubernetes_namespace, LEASE_NAME, identity(), LeaseTimings()
    )
    watcher = KubeWatcher(
        CoreV1Api(api),
        settings.kubernetes_namespace,
        policy.detection,
        start,
        zones=policy.az_failover,
        start_zone_failover=start_zone,
        elector=elector,
        agent_urls=settings.node_agent_urls,
        agent_service=settings.node_agent_service,
    )
    log.info(
        "watching pods labelled %s in %r, and nodes; zones %s (and those of the nodes); as %s (lease %s)",
        MODEL,
        settings.kubernetes_namespace,
        policy.checked_zones,
        elector.identity,
        LEASE_NAME,
    )
    began = time.monotonic()
    try:
        await watcher.run(stop)
    finally:
        log.info("stopped after %.0fs; %d failure(s) reported", time.monotonic() - began, len(watcher.started))


def main(argv: Sequence[str] | None = None) -> None:
    run_service(
        run_kube_watcher,
        argv,
        prog="python -m drctl.detectors.kube_watcher",
        description="The Kubernetes watcher: watches the fleet's pods and nodes and reports a failed "
        "instance to its model's guardian, and a silent zone to the zone failover.",
    )


if __name__ == "__main__":
    main()
