"""The zone health check: every ``healthCheckInterval`` each zone of the policy
(:attr:`~drctl.policies.schema.DRPolicy.checked_zones`: the active zones, the standby zone, where a
zone failover moves serving, and every other zone of the pool) is checked through its nodes' GPU
node agents, and after ``failoverThreshold`` failed checks in a row (the seed: 10 s x 3)
``ZoneFailoverWorkflow`` is started for it — the same runbook ``drctl zone-failover`` starts, which
waits for an operator's approval when the policy says ``requireApproval``.

It runs inside the prober (``drctl up`` starts both) whenever node agents are configured
(``DRCTL_NODE_AGENT_URLS`` or ``DRCTL_NODE_AGENT_SERVICE``). Each agent's ``/healthz`` names its
node; an agent that does not answer counts against the node it named last. The verdict and the
threshold are pure decisions in :mod:`drctl.policies.zone_health`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx

from drctl.platforms import node_agents
from drctl.policies.schema import DRPolicy
from drctl.policies.zone_health import ZoneHealthTracker, ZoneVerdict, zone_verdict

log = logging.getLogger("drctl.zone_checker")

ALARM_AGENT_TIMEOUT_S = 0.5
"""How long a check the prober's zone alarm asked for waits for each node agent. A live agent
answers ``/healthz`` in milliseconds; a SIGSTOPped or cut-off one never does, and the regular
check waited 2 s for it (a zone failover started 5.0-5.6 s after the outage at 1,000 instances,
4.4 s with this). A slow agent counted silent here cannot fail a zone over by itself: its zone's
instances must all be down too."""

StartZoneFailover = Callable[[str, str], Awaitable[str]]
"""``(zone, reason) -> workflow id``: starts (or joins) the zone's failover."""


@dataclass
class ZoneChecker:
    policy: DRPolicy
    agent_urls: Sequence[str]
    start_zone_failover: StartZoneFailover
    agent_service: str | None = None
    node_of: dict[str, str] = field(default_factory=dict)
    """Agent URL → the node it said it runs on (learned from ``/healthz``)."""
    started: list[tuple[str, str]] = field(default_factory=list)
    """(zone, workflow id) of every zone failover this checker started."""
    checks: int = 0
    verdicts: dict[str, str] = field(default_factory=dict)
    """The last check's verdict per checked zone."""
    instances_down: Callable[[str], bool] | None = None
    """Zone → the prober has every instance it watches there down (at least one): the second
    signal that lets a zone be judged down at its first failed check (``confirmFromInstances``)."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set (by the prober, when a zone's instances all go down) to check at once, not at the next
    interval."""

    def __post_init__(self) -> None:
        self.tracker = ZoneHealthTracker(self.policy.az_failover.failover_threshold)
        self.zone_of_node = {node.name: node.zone for node in self.policy.gpu_pool.nodes}

    async def check_once(self, http: httpx.AsyncClient, alarmed: bool = False) -> dict[str, ZoneVerdict]:
        """One zone check: ask every agent, decide every checked zone, start failovers that are due.
        ``alarmed``: the prober's zone alarm asked for it (every instance of a zone is down), so it
        waits :data:`ALARM_AGENT_TIMEOUT_S` at most for each agent."""
        urls = await node_agents.agent_urls(self.agent_urls, self.agent_service)
        # Agents seen before stay asked: a headless Service drops a dead node's agent from DNS,
        # and its silence is exactly the evidence the check needs.
        urls += [url for url in self.node_of if url not in urls]
        timeout = min(2.0, max(0.2, self.policy.az_failover.health_check_interval.total_seconds() / 2))
        if alarmed:
            timeout = min(timeout, ALARM_AGENT_TIMEOUT_S)
        answers = await asyncio.gather(*(node_agents.agent_node(http, url, timeout) for url in urls))
        node_up: dict[str, bool | None] = {}
        for url, node in zip(urls, answers, strict=True):
            if node is not None:
                self.node_of[url] = node
                node_up[node] = True
            elif url in self.node_of:
                node_up.setdefault(self.node_of[url], False)
        verdicts: dict[str, ZoneVerdict] = {}
        for zone in self.policy.checked_zones:
            nodes = [n for n, z in self.zone_of_node.items() if z == zone]
            verdict = verdicts[zone] = zone_verdict(node_up, nodes)
            failures_before = self.tracker.failures.get(zone, 0)
            corroborated = (
                verdict == ZoneVerdict.DOWN
                and self.policy.az_failover.confirm_from_instances
                and self.instances_down is not None
                and self.instances_down(zone)
            )
            if self.tracker.observe(zone, verdict, corroborated):
                threshold = self.policy.az_failover.failover_threshold
                if corroborated and failures_before + 1 < threshold:
                    reason = f"zone health check: no node of {zone} answers and every instance there is down"
                else:
                    reason = f"zone health check: {threshold} failed checks in a row (no node of {zone} answers)"
                workflow_id = await self.start_zone_failover(zone, reason)
                self.started.append((zone, workflow_id))
                log.error("zone %s is down: started %s", zone, workflow_id)
            elif verdict == ZoneVerdict.DOWN and zone not in self.tracker.tripped:
                log.warning("zone %s failed check %d of %d", zone, failures_before + 1, self.tracker.threshold)
        self.checks += 1
        self.verdicts = {zone: str(verdict) for zone, verdict in verdicts.items()}
        return verdicts

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.policy.az_failover.health_check_interval.total_seconds()
        next_at = time.monotonic()
        alarmed = False
        async with httpx.AsyncClient() as http:
            while not stop.is_set():
                try:
                    await self.check_once(http, alarmed)
                except Exception:
                    log.exception("zone check failed")
                # At a fixed rate: a check that waited on silent agents does not stretch the interval.
                next_at = max(next_at + interval, time.monotonic())
                woken = asyncio.create_task(self.wake.wait())
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait({woken, stopped}, timeout=next_at - time.monotonic(), return_when=FIRST_COMPLETED)
                for task in (woken, stopped):
                    task.cancel()
                alarmed = self.wake.is_set()
                if alarmed:
                    self.wake.clear()
                    next_at = time.monotonic()  # checked now; the regular cadence starts again from here
