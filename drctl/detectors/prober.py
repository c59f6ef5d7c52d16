"""The health prober: watches every serving instance and hot standby and starts the failover
runbook when one is confirmed down, by reporting it to the model's guardian — the same way an alert
or an operator does, so a failure seen by several of them is still recovered once.

    python -m drctl.detectors.prober        # settings from DRCTL_* variables; `drctl up` starts it

On the local platform a process that exits is noticed within one tick (100 ms) in a fleet of up to
250 instances (within a few ticks in a larger one), without waiting for failed probes; a hung
process is noticed after ``unhealthyThreshold`` probes time out. Each instance is probed on its
model's engine profile (:mod:`drctl.policies.engines`): its health path, and, where the engine has
one, its ``is_sleeping`` query (every third probe), since a vLLM server answers ``/health`` 200
asleep or awake while a serving instance or hot standby asleep cannot serve. Probes go over a
kept-alive connection per instance (:mod:`drctl.detectors.http_probe`: a tenth of httpx's CPU per
request), and the registry is parsed again only when its file changed.
Hysteresis, flap hold-down and the failover caps are pure decisions in ``drctl.policies.probing``.

With node agents configured it also runs the zone health check (:mod:`drctl.detectors.zone_checker`),
which starts ``ZoneFailoverWorkflow`` for a zone whose nodes all stop answering; while that runs,
the prober's own reports of the zone's instances wait for it to end (:meth:`Prober.hand_zone_over`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio.client import Client

from drctl.detectors.http_probe import ProbeClient, ProbeError
from drctl.detectors.zone_checker import ZoneChecker
from drctl.payloads import FailoverRequest, IncidentTicket, Role, Trigger
from drctl.platforms.local import processes
from drctl.platforms.local.registry import InstanceRegistry, LocalInstance
from drctl.policies.engines import Engine, EngineProfile, profile
from drctl.policies.loader import load_policy_file
from drctl.policies.probing import ProbeEvent, ProbeTracker
from drctl.policies.schema import DRPolicy
from drctl.service import run_service
from drctl.settings import DrctlSettings, StateLayout
from drctl.telemetry.metrics import ProberMetrics, serve
from drctl.telemetry.tracing import setup_tracing, span
from drctl.temporal.client import connect

log = logging.getLogger("drctl.prober")

PROBED_ROLES = (Role.SERVING, Role.HOT)
TICK_S = 0.1
EXIT_CHECKS_PER_TICK = 250
"""Processes looked for in /proc per tick (~10 µs each): a fleet of up to 250 instances has every
exit noticed within a tick (100 ms), a fleet of 1,000 within 4 ticks, at a fixed cost."""
SLEEP_CHECK_EVERY = 3
"""Ask an engine's ``is_sleeping`` on every third probe of an instance (and on every probe once it
was seen asleep, until it is seen awake): an instance asleep is noticed within a few probes more,
and a fleet of 1,000 instances is not asked twice per probe interval."""

ReportFailover = Callable[[FailoverRequest], Awaitable[IncidentTicket]]
"""Reports one failed instance to its model's guardian (``runbooks.report_failover``)."""


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
        report: ReportFailover,
        metrics: ProberMetrics | None = None,
    ) -> None:
        self.policy = policy
        self.metrics = metrics
        self.registry = registry
        self.report = report
        self.trackers: dict[str, ProbeTracker] = {}
        self.next_probe: dict[str, float] = {}
        self.unreported: dict[str, FailoverRequest] = {}
        """Confirmed failures not yet accepted by their guardian (tried again every tick)."""
        self.reported: dict[str, IncidentTicket] = {}
        self.report_errors = 0
        self._reporting: asyncio.Task[None] | None = None
        self.detections: list[Detection] = []
        self.ticks = 0
        self._http = ProbeClient()
        self._probes: dict[str, int] = {}
        """Probes sent to each instance (every ``SLEEP_CHECK_EVERY``-th also asks ``is_sleeping``)."""
        self._asleep: set[str] = set()
        """Instances last seen asleep: asked ``is_sleeping`` on every probe until seen awake."""
        self._fleet: tuple[Mapping[str, LocalInstance], list[LocalInstance]] | None = None
        self._identity: dict[str, tuple[str | None, int | None]] = {}
        """Instance id → the address and pid it was probed at (:meth:`_forget_replaced`)."""
        self._exit_cursor = 0
        self.zone_alarm: Callable[[], None] | None = None
        """Called when every watched instance of a zone is down (the zone check looks at once)."""
        self._zones_alarmed: set[str] = set()
        self._zones_handed_over: dict[str, tuple[float, object]] = {}
        """Zone → until when (monotonic) the failures of its instances are left to the zone failover
        the prober started for it (:meth:`hand_zone_over`), and which hand-over that is."""
        self._zone_failovers: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        if self._reporting is not None:
            self._reporting.cancel()
        for task in self._zone_failovers:
            task.cancel()
        await self._http.aclose()

    def _probed(self) -> list[LocalInstance]:
        """The instances to watch, sorted out of the registry again only when its content changed
        (the registry re-parses only then too: at 1,000 instances parsing the file ten times a
        second was a tenth of a core)."""
        view = self.registry.view()
        if self._fleet is None or self._fleet[0] is not view:
            instances = [i for i in view.values() if i.role in PROBED_ROLES and i.port is not None]
            self._fleet = (view, instances)
            self._forget_replaced(instances)
        return self._fleet[1]

    def _forget_replaced(self, instances: list[LocalInstance]) -> None:
        """Start afresh with an instance whose process or port changed under the same id (restarted,
        or a new instance given a deleted one's id): the failed probes counted, a report not yet
        made or one made already were about the process before. Carried over, a failure of the one
        before was reported as the new one's (a runbook failing over a healthy instance), or a
        failure of the new one was never reported (it read as reported already)."""
        for instance in instances:
            now = (instance.address, instance.pid)
            if self._identity.get(instance.id, now) != now:
                self._forget(instance.id)
            self._identity[instance.id] = now

    def _forget(self, instance_id: str) -> FailoverRequest | None:
        """Drop all the prober knows of ``instance_id``; returns its failure not yet reported, if any."""
        self.trackers.pop(instance_id, None)
        self.next_probe.pop(instance_id, None)
        self.reported.pop(instance_id, None)
        self._probes.pop(instance_id, None)
        self._asleep.discard(instance_id)
        self._identity.pop(instance_id, None)
        return self.unreported.pop(instance_id, None)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.tick(time.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), timeout=TICK_S)
            except TimeoutError:
                pass

    async def tick(self, now: float) -> None:
        self.ticks += 1
        if self.metrics is not None:
            self.metrics.last_tick.set_to_current_time()
            held = len(self.held_for_zone_failover())
            self.metrics.unreported.set(len(self.unreported) - held)
            self.metrics.held_for_zone_failover.set(held)
        instances = self._probed()
        interval = self.policy.detection.probe_interval.total_seconds()
        due: list[LocalInstance] = []
        # Exits are looked for in /proc on every tick for up to EXIT_CHECKS_PER_TICK instances, in
        # turn: every instance each tick in a fleet of up to that many, every few ticks in a larger one.
        checked = self._exit_check_window(len(instances))
        for n, instance in enumerate(instances):
            tracker = self.trackers.setdefault(instance.id, ProbeTracker(self.policy.detection))
            if n in checked and not processes.is_alive(instance.pid):
                self._count_probe(instance, "exited")
                await self._handle(instance, tracker.observe(False, now, exited=True), tracker, now, exited=True)
            elif now >= self.next_probe.get(instance.id, 0.0):
                self.next_probe[instance.id] = now + interval
                due.append(instance)
        results = await asyncio.gather(*(self._probe(i) for i in due))
        for instance, (ok, final) in zip(due, results, strict=True):
            tracker = self.trackers[instance.id]
            # A model that failed to load will not come back by itself: no need to wait for more probes.
            event = tracker.observe(ok, time.monotonic(), exited=final)
            self._count_probe(instance, "healthy" if ok else "failed-to-load" if final else "unhealthy")
            await self._handle(instance, event, tracker, now, exited=final)
        self._sound_zone_alarm(instances)
        gone = set(self.trackers) - {i.id for i in instances}
        for instance_id in gone:  # ejected or deleted: no longer ours to watch
            if self._forget(instance_id) is not None:
                # Someone acted on it meanwhile (a runbook ejected or promoted it, reconciliation
                # deleted it): its failure is in hand. Sent anyway, the report (late: the reports
                # of a failed zone's 500 instances take ~40 s to go out one by one) only ran a
                # runbook that found it gone, and claimed its model's epoch under reconciliation.
                log.info("%s is no longer watched (ejected, promoted or deleted): not reported", instance_id)
        if gone:
            self._http.forget({i.address for i in instances if i.address is not None})
        self._kick_reports()  # what is still unreported, tried again every tick

    def hand_zone_over(self, zone: str, ended: Awaitable[object], at_most_s: float) -> None:
        """Leave the failures of ``zone``'s instances to the zone failover the prober has started for
        it, until ``ended`` (the failover's result, whatever it is) or ``at_most_s`` from now (a
        failover that runs that long is taken for stuck). They are held, not dropped: reported once
        the failover has ended, if they are still watched then (a serving instance it moved, a
        standby reconciliation replaced, are not).

        Why: the zone failover reports every serving instance of the zone itself, and the prober's
        own reports of the zone's 500 instances (at 1,000), sent one by one through the failover,
        were each an Update of a guardian beside the failover's recoveries; a report of an instance
        whose runbook was running was signalled into it, landed while its one workflow task
        completed, and the task ran again with every step in it (28 of 250 runbooks)."""
        hand_over = self._zones_handed_over[zone] = (time.monotonic() + at_most_s, object())
        log.info("the failures of %s's instances are left to its zone failover until it ends", zone)

        async def take_back() -> None:
            try:
                await ended
            except Exception as err:  # failed, terminated, unreachable: the prober's reports go out
                log.info("zone failover of %s: %s", zone, err)
            finally:
                if self._zones_handed_over.get(zone) is hand_over:  # not a later failover's hand-over
                    del self._zones_handed_over[zone]
                log.info("zone failover of %s ended: its instances' failures are reported again", zone)
                self._kick_reports()

        task = asyncio.create_task(take_back())
        self._zone_failovers.add(task)
        task.add_done_callback(self._zone_failovers.discard)

    def _left_to_zone_failover(self, instance_id: str) -> bool:
        """``instance_id`` is in a zone handed over to its zone failover (:meth:`hand_zone_over`)."""
        if not self._zones_handed_over or self._fleet is None:
            return False
        instance = self._fleet[0].get(instance_id)
        hand_over = self._zones_handed_over.get(instance.zone) if instance is not None and instance.zone else None
        return hand_over is not None and time.monotonic() < hand_over[0]

    def held_for_zone_failover(self) -> list[str]:
        """The failures not reported yet because their zone's failover runs: not "unreported" in
        the status or the metrics (``DrctlFailuresUnreported`` would fire on a long zone failover)."""
        if not self._zones_handed_over:
            return []
        return sorted(i for i in self.unreported if self._left_to_zone_failover(i))

    def instances_down(self, zone: str) -> bool:
        """Every instance watched in ``zone`` is down (past its hysteresis); False with none."""
        return zone in self._zones_down(self._fleet[1] if self._fleet is not None else [])

    def _zones_down(self, instances: list[LocalInstance]) -> set[str]:
        """The zones whose every watched instance is down, in one pass over the fleet."""
        up: dict[str, bool] = {}
        for instance in instances:
            tracker = self.trackers.get(instance.id)
            if instance.zone is not None and tracker is not None:
                up[instance.zone] = up.get(instance.zone, False) or tracker.up
        return {zone for zone, any_up in up.items() if not any_up}

    def _sound_zone_alarm(self, instances: list[LocalInstance]) -> None:
        down = self._zones_down(instances)
        if down - self._zones_alarmed and self.zone_alarm is not None:
            log.warning("every watched instance in %s is down: zone check now", ", ".join(sorted(down)))
            self.zone_alarm()
        self._zones_alarmed = down

    def _exit_check_window(self, count: int) -> range | set[int]:
        """Which of ``count`` instances (by position) have their process looked for this tick."""
        if count <= EXIT_CHECKS_PER_TICK:
            return range(count)
        start = self._exit_cursor % count
        self._exit_cursor = start + EXIT_CHECKS_PER_TICK
        return {(start + k) % count for k in range(EXIT_CHECKS_PER_TICK)}

    def _count_probe(self, instance: LocalInstance, result: str) -> None:
        if self.metrics is not None:
            self.metrics.probes.labels(instance.model, instance.id, result).inc()

    async def _probe(self, instance: LocalInstance) -> tuple[bool, bool]:
        """(healthy, failure is final). Healthy: the engine's health path answers 200 and the
        instance is not asleep (it is a serving instance or a hot standby). Final: the instance says
        its model failed to load, e.g. a checkpoint that fails its checksum (the demo's load
        progress, asked when the health answer is not 200, says ``"state": "failed"``)."""
        engine = self._engine(instance.model)
        assert instance.address is not None
        timeout = self.policy.detection.probe_timeout.total_seconds()
        count = self._probes[instance.id] = self._probes.get(instance.id, 0) + 1
        try:
            status, body = await self._http.get(instance.address, engine.health_path, timeout)
        except ProbeError:
            return False, False
        asleep = why = None
        ask_sleep = instance.id in self._asleep or count % SLEEP_CHECK_EVERY == 1
        if status == 200 and engine.is_sleeping_path is not None and ask_sleep:
            asleep = await self._is_sleeping(instance.address, engine.is_sleeping_path, timeout)
            (self._asleep.add if asleep else self._asleep.discard)(instance.id)
        elif status != 200 and engine.load_progress_path is not None:
            why = await self._text(instance.address, engine.load_progress_path, timeout)  # the demo says if it failed
        verdict = engine.judge_health(
            status, body.decode(errors="replace"), asleep=asleep, may_sleep=False, load_progress=why
        )
        return verdict.healthy, verdict.final

    async def _text(self, address: str, path: str, timeout_s: float) -> str | None:
        try:
            return (await self._http.get(address, path, timeout_s))[1].decode(errors="replace")
        except ProbeError:
            return None

    async def _is_sleeping(self, address: str, path: str, timeout_s: float) -> bool | None:
        """The ``is_sleeping`` answer; None when there is none (an engine without dev mode: 404)."""
        try:
            status, body = await self._http.get(address, path, timeout_s)
            asleep = json.loads(body).get("is_sleeping") if status == 200 else None
        except (ProbeError, ValueError, AttributeError):
            return None
        return asleep if isinstance(asleep, bool) else None

    def _engine(self, model: str) -> EngineProfile:
        """The model's engine profile. A model the prober's policy does not have (added since it
        started) is probed as the schema's default engine, vLLM, whose paths the demo serves too."""
        try:
            return self.policy.model(model).engine_profile
        except KeyError:
            return profile(Engine.VLLM)

    async def _handle(
        self, instance: LocalInstance, event: ProbeEvent | None, tracker: ProbeTracker, now: float, exited: bool
    ) -> None:
        if event is None or event == ProbeEvent.UP:
            if event == ProbeEvent.UP:
                log.info("%s is up again", instance.id)
                self.reported.pop(instance.id, None)
            return
        first = tracker.first_failure_at or now
        if event == ProbeEvent.FLAPPING:
            log.warning("%s is flapping: held out until it settles, not failed over again", instance.id)
            self._record(instance, first, exited, "held (flapping)")
            return
        if instance.id in self.reported or instance.id in self.unreported:
            return
        failed_at = datetime.now(UTC) - timedelta(seconds=max(0.0, time.monotonic() - first))
        how = "process exited or model failed to load" if exited else f"{tracker.failures} failed probes"
        self.unreported[instance.id] = FailoverRequest(
            model=instance.model,
            instance=instance.id,
            trigger=Trigger.PROBE,
            failed_at=failed_at,
            reason=f"prober: {how}",
            # The prober's hysteresis (unhealthyThreshold failed probes, or the process gone) is the
            # confirmation; probing a hung instance once more would add its timeouts to the RTO.
            confirmed=True,
        )
        self._record(instance, first, exited, "reported")
        log.info("%s down (%s): reporting it to guardian-%s", instance.id, how, instance.model)
        self._kick_reports()

    def _kick_reports(self) -> None:
        """Report in the background, so a slow or unreachable Temporal never stalls the probing."""
        if self.unreported and (self._reporting is None or self._reporting.done()):
            self._reporting = asyncio.create_task(self._report_pending())

    async def _report_pending(self) -> None:
        """Hand every confirmed failure to its model's guardian. A report that does not get through
        (Temporal down, a worker restarting) is tried again next tick: never dropped. Caps are not
        the prober's business any more: the guardian and the fleet's budget delay what must wait."""
        for instance_id, request in list(self.unreported.items()):
            if self.unreported.get(instance_id) is not request:
                continue  # dropped meanwhile (no longer watched, or a new process under its id)
            if self._left_to_zone_failover(instance_id):
                continue  # held while its zone fails over (asked again per report: it can start meanwhile)
            fields = {"model": request.model, "instance": instance_id}
            try:
                # The trace of a probe-triggered recovery starts at this decision to report.
                with span(
                    "prober.report", model=request.model, instance=instance_id, trigger=Trigger.PROBE.value
                ) as current:
                    current.set_attribute("drctl.reason", request.reason)
                    try:
                        ticket = await self.report(request)
                    except Exception as exc:
                        log.warning("could not report %s yet (%s): trying again", instance_id, exc, extra=fields)
                        raise
                    current.set_attribute("drctl.incident", ticket.workflow_id)
                    # Logged in the span: the line carries the trace id as well as the incident's id.
                    how = "joined" if ticket.joined else "opened"
                    log.info(
                        "%s: %s incident %s (%s)",
                        instance_id,
                        how,
                        ticket.workflow_id,
                        ticket.state,
                        extra={**fields, "workflow_id": ticket.workflow_id, "reason": request.reason},
                    )
            except Exception:
                self.report_errors += 1
                if self.metrics is not None:
                    self.metrics.report_errors.inc()
                return
            self.unreported.pop(instance_id, None)
            self.reported[instance_id] = ticket
            if self.metrics is not None:
                self.metrics.reported.labels(request.model).inc()

    def _record(self, instance: LocalInstance, first: float, exited: bool, action: str) -> None:
        self.detections.append(Detection(instance.id, instance.model, first, time.monotonic(), exited, action))
        if self.metrics is not None:
            self.metrics.detections.labels(instance.model, action).inc()


async def run_prober(settings: DrctlSettings, stop: asyncio.Event, client: Client | None = None) -> None:
    from drctl.temporal.runbooks import report_failover

    policy = load_policy_file(settings.policy)
    tracing = setup_tracing("prober", settings.state_dir)
    client = client or await connect(settings, interceptors=tracing.interceptors())
    registry = InstanceRegistry(StateLayout(settings.state_dir).instances_file)

    async def report(request: FailoverRequest) -> IncidentTicket:
        return await report_failover(client, settings, request, reporter="prober")

    metrics = ProberMetrics()
    close_metrics = serve(metrics.registry, settings.host, settings.prober_metrics_port, "prober")
    prober = Prober(policy, registry, report, metrics)
    log.info("probing every %s", policy.detection.probe_interval)
    loops = [prober.run(stop)]
    checker = None
    if settings.node_agent_urls or settings.node_agent_service:
        checker = zone_checker(settings, policy, client, prober)
        checker.instances_down = prober.instances_down
        prober.zone_alarm = checker.wake.set
        loops.append(checker.run(stop))
        log.info("checking zones %s every %s", policy.checked_zones, policy.az_failover.health_check_interval)
    loops.append(write_status(StateLayout(settings.state_dir).prober_status_file, prober, checker, stop))
    try:
        await asyncio.gather(*loops)
    finally:
        await prober.aclose()
        if close_metrics is not None:
            await asyncio.to_thread(close_metrics)
        tracing.shutdown()


async def write_status(path: Path, prober: Prober, checker: ZoneChecker | None, stop: asyncio.Event) -> None:
    """Every half second, what the prober has done so far (atomically): ``drctl up`` waits until it
    has probed and, with node agents, checked the zones once, so a failure right after start-up is
    not missed."""
    while not stop.is_set():
        status = {
            "pid": os.getpid(),
            "updated_at": datetime.now(UTC).isoformat(),
            "ticks": prober.ticks,
            "unreported": sorted(set(prober.unreported) - set(held := prober.held_for_zone_failover())),
            "held_for_zone_failover": held,
            "report_errors": prober.report_errors,
            "zone_checks": None if checker is None else checker.checks,
            "zones": None if checker is None else checker.verdicts,
            "nodes_seen": None if checker is None else sorted(set(checker.node_of.values())),
        }
        if checker is not None and prober.metrics is not None:
            prober.metrics.zones(checker.verdicts, checker.checks)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass


def zone_checker(
    settings: DrctlSettings, policy: DRPolicy, client: Client, prober: Prober | None = None
) -> ZoneChecker:
    """The zone check, starting ``ZoneFailoverWorkflow``; with ``prober``, the failures of the zone's
    instances are left to the failover while it runs (:meth:`Prober.hand_zone_over`), unless the
    policy wants an operator's approval first (until then the instances recover one by one)."""
    from drctl.payloads import ZoneFailoverRequest
    from drctl.temporal.incidents import ZONE_FAILOVER_FIRST_FOR
    from drctl.temporal.runbooks import start_zone_failover

    async def start(zone: str, reason: str) -> str:
        with span("prober.zone_failover", trigger=Trigger.PROBE.value) as current:
            current.set_attribute("drctl.zone", zone)
            handle = await start_zone_failover(client, settings, ZoneFailoverRequest(zone=zone, reason=reason))
        if prober is not None and not policy.az_failover.require_approval:
            prober.hand_zone_over(zone, handle.result(), ZONE_FAILOVER_FIRST_FOR.total_seconds())
        return handle.id

    return ZoneChecker(policy, settings.node_agent_urls, start, settings.node_agent_service)


def main(argv: Sequence[str] | None = None) -> None:
    run_service(
        run_prober,
        argv,
        prog="python -m drctl.detectors.prober",
        description="The health prober: probes serving instances and hot standbys, and reports a "
        "confirmed failure to the model's guardian (which starts the failover runbook).",
    )


if __name__ == "__main__":
    main()
