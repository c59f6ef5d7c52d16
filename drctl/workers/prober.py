"""The health prober: watches every serving instance and hot standby and starts the failover
runbook when one is confirmed down — the same runbook an alert or an operator starts.

    python -m drctl.workers.prober        # settings from DRCTL_* variables; `drctl up` starts it

On the local platform a process that exits is noticed within one tick (100 ms), without waiting
for failed probes; a hung process is noticed after ``unhealthyThreshold`` probes time out.
Hysteresis, flap hold-down and the failover caps are pure decisions in ``drctl.policies.probing``.

With node agents configured it also runs the zone health check (:mod:`drctl.workers.zone_checker`),
which starts ``ZoneFailoverWorkflow`` for a zone whose nodes all stop answering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client, WorkflowHandle

from drctl.activities.local import processes
from drctl.activities.local.registry import InstanceRegistry
from drctl.payloads import FailoverRequest, Instance, Role, Trigger
from drctl.policies.loader import load_policy_file
from drctl.policies.probing import ProbeEvent, ProbeTracker, failover_allowed
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings, StateLayout
from drctl.workers.service import run_service
from drctl.workers.temporal_client import connect
from drctl.workers.zone_checker import ZoneChecker

log = logging.getLogger("drctl.prober")

PROBED_ROLES = (Role.SERVING, Role.HOT)
TICK_S = 0.1

StartFailover = Callable[[FailoverRequest], Awaitable[WorkflowHandle[Any, Any]]]
RaiseAlert = Callable[[dict[str, Any]], Awaitable[None]]
"""Sends one alert in Alertmanager's API format (``POST /api/v2/alerts``)."""


@dataclass
class Detection:
    """One confirmed-down instance, for logs and benchmarks."""

    instance: str
    model: str
    first_failure_at: float
    detected_at: float
    exited: bool
    action: str


class Prober:
    def __init__(
        self,
        policy: DRPolicy,
        registry: InstanceRegistry,
        start_failover: StartFailover,
        raise_alert: RaiseAlert | None = None,
    ) -> None:
        self.policy = policy
        self.raise_alert = raise_alert
        self.alerted: set[str] = set()
        self.registry = registry
        self.start_failover = start_failover
        self.trackers: dict[str, ProbeTracker] = {}
        self.next_probe: dict[str, float] = {}
        self.in_flight: dict[str, tuple[str, str | None, asyncio.Task[Any]]] = {}
        self.detections: list[Detection] = []
        self.panic: str | None = None
        self.ticks = 0
        self._http = httpx.AsyncClient()

    async def aclose(self) -> None:
        for _, _, task in self.in_flight.values():
            task.cancel()
        await self._http.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.tick(time.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), timeout=TICK_S)
            except TimeoutError:
                pass

    async def tick(self, now: float) -> None:
        self.ticks += 1
        instances = [i for i in self.registry.load().values() if i.role in PROBED_ROLES and i.port is not None]
        interval = self.policy.detection.probe_interval.total_seconds()
        due: list[Instance] = []
        for instance in instances:
            tracker = self.trackers.setdefault(instance.id, ProbeTracker(self.policy.detection))
            if not processes.is_alive(instance.pid):
                await self._handle(instance, tracker.observe(False, now, exited=True), tracker, now, exited=True)
            elif now >= self.next_probe.get(instance.id, 0.0):
                self.next_probe[instance.id] = now + interval
                due.append(instance)
        results = await asyncio.gather(*(self._probe(i) for i in due))
        for instance, (ok, final) in zip(due, results, strict=True):
            tracker = self.trackers[instance.id]
            # A model that failed to load will not come back by itself: no need to wait for more probes.
            event = tracker.observe(ok, time.monotonic(), exited=final)
            await self._handle(instance, event, tracker, now, exited=final)
        for instance_id in set(self.trackers) - {i.id for i in instances}:
            del self.trackers[instance_id]  # ejected or deleted: no longer ours to watch

    async def _probe(self, instance: Instance) -> tuple[bool, bool]:
        """(healthy, failure is final). Final: the instance says its model failed to load (a 503 with
        ``"status": "failed"``, e.g. a checkpoint that fails its checksum)."""
        timeout = self.policy.detection.probe_timeout.total_seconds()
        try:
            response = await self._http.get(f"http://{instance.host}:{instance.port}/healthz", timeout=timeout)
        except httpx.HTTPError:
            return False, False
        if response.status_code == 200:
            return True, False
        try:
            final = response.json().get("status") == "failed"
        except (ValueError, AttributeError):
            final = False
        return False, final

    async def _handle(
        self, instance: Instance, event: ProbeEvent | None, tracker: ProbeTracker, now: float, exited: bool
    ) -> None:
        if event is None or event == ProbeEvent.UP:
            if event == ProbeEvent.UP:
                log.info("%s is up again", instance.id)
            return
        first = tracker.first_failure_at or now
        if event == ProbeEvent.FLAPPING:
            log.warning("%s is flapping: held out until it settles, not failed over again", instance.id)
            self._record(instance, first, exited, "held (flapping)")
            return
        if instance.id in self.in_flight:
            return
        decision = failover_allowed(
            instance.model, instance.zone, [(m, z) for m, z, _ in self.in_flight.values()], self.policy.detection
        )
        if not decision.allowed:
            self.panic = decision.reason
            log.error("PANIC: %s is down but the prober stops acting: %s", instance.id, decision.reason)
            self._record(instance, first, exited, f"panic: {decision.reason}")
            await self._raise_panic_alert(instance, decision.reason)
            return
        self.alerted.discard(instance.model)
        failed_at = datetime.now(UTC) - timedelta(seconds=max(0.0, time.monotonic() - first))
        how = "process exited or model failed to load" if exited else f"{tracker.failures} failed probes"
        request = FailoverRequest(
            model=instance.model,
            instance=instance.id,
            trigger=Trigger.PROBE,
            failed_at=failed_at,
            reason=f"prober: {how}",
            # The prober's hysteresis (unhealthyThreshold failed probes, or the process gone) is the
            # confirmation; probing a hung instance once more would add its timeouts to the RTO.
            confirmed=True,
        )
        handle = await self.start_failover(request)
        self.in_flight[instance.id] = (
            instance.model,
            instance.zone,
            asyncio.create_task(self._follow(instance.id, handle)),
        )
        self._record(instance, first, exited, f"failover {handle.id}")
        log.info("%s down (%s): started %s", instance.id, how, handle.id)

    async def _raise_panic_alert(self, instance: Instance, reason: str) -> None:
        """Panic mode: tell people instead of acting. One alert per model until it may act again."""
        if self.raise_alert is None or instance.model in self.alerted:
            return
        self.alerted.add(instance.model)
        alert = {
            "labels": {
                "alertname": "DrctlProberPanic",
                "severity": "critical",
                "model": instance.model,
                "zone": instance.zone or "",
                "instance": instance.id,
            },
            "annotations": {
                "summary": f"drctl prober stopped acting: {reason}",
                "description": f"{instance.id} is down; failover caps reached, so no runbook was started for it.",
            },
            "startsAt": datetime.now(UTC).isoformat(),
        }
        try:
            await self.raise_alert(alert)
        except Exception as exc:  # the alert is best effort; the log line above always exists
            log.error("could not raise the panic alert: %s", exc)

    async def _follow(self, instance_id: str, handle: WorkflowHandle[Any, Any]) -> None:
        try:
            await handle.result()
        except Exception as exc:
            log.warning("failover %s ended with %s", handle.id, exc)
        finally:
            self.in_flight.pop(instance_id, None)

    def _record(self, instance: Instance, first: float, exited: bool, action: str) -> None:
        self.detections.append(Detection(instance.id, instance.model, first, time.monotonic(), exited, action))


async def run_prober(settings: DrctlSettings, stop: asyncio.Event, client: Client | None = None) -> None:
    from drctl.workers.runbooks import start_failover

    policy = load_policy_file(settings.policy)
    client = client or await connect(settings)
    registry = InstanceRegistry(StateLayout(settings.state_dir).instances_file)

    async def start(request: FailoverRequest) -> WorkflowHandle[Any, Any]:
        return await start_failover(client, settings, request)

    alertmanager = os.environ.get("DRCTL_ALERTMANAGER_URL")

    async def raise_alert(alert: dict[str, Any]) -> None:
        assert alertmanager is not None
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.post(f"{alertmanager.rstrip('/')}/api/v2/alerts", json=[alert])
            response.raise_for_status()

    prober = Prober(policy, registry, start, raise_alert if alertmanager else None)
    log.info("probing every %s", policy.detection.probe_interval)
    loops = [prober.run(stop)]
    checker = None
    if settings.node_agent_urls or settings.node_agent_service:
        checker = zone_checker(settings, policy, client)
        loops.append(checker.run(stop))
        log.info(
            "checking zones %s every %s", policy.az_failover.active_zones, policy.az_failover.health_check_interval
        )
    loops.append(write_status(StateLayout(settings.state_dir).prober_status_file, prober, checker, stop))
    try:
        await asyncio.gather(*loops)
    finally:
        await prober.aclose()


async def write_status(path: Path, prober: Prober, checker: ZoneChecker | None, stop: asyncio.Event) -> None:
    """Every half second, what the prober has done so far (atomically): ``drctl up`` waits until it
    has probed and, with node agents, checked the zones once, so a failure right after start-up is
    not missed."""
    while not stop.is_set():
        status = {
            "pid": os.getpid(),
            "updated_at": datetime.now(UTC).isoformat(),
            "ticks": prober.ticks,
            "panic": prober.panic,
            "zone_checks": None if checker is None else checker.checks,
            "zones": None if checker is None else checker.verdicts,
            "nodes_seen": None if checker is None else sorted(set(checker.node_of.values())),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass


def zone_checker(settings: DrctlSettings, policy: DRPolicy, client: Client) -> ZoneChecker:
    from drctl.payloads import ZoneFailoverRequest
    from drctl.workers.runbooks import start_zone_failover

    async def start(zone: str, reason: str) -> str:
        handle = await start_zone_failover(client, settings, ZoneFailoverRequest(zone=zone, reason=reason))
        return handle.id

    return ZoneChecker(policy, settings.node_agent_urls, start, settings.node_agent_service)


def main() -> None:
    run_service(run_prober)


if __name__ == "__main__":
    main()
