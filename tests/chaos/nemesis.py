"""The nemesis: seeded random faults and duplicate triggers on a real local stack under load, and
the coordination invariants (docs/DESIGN "Invariants") checked after every round.

A round draws 1 to 3 faults from :class:`FaultKind` with ``random.Random(f"{seed}/{round}")``: ``kill -9``
or ``SIGSTOP`` of a serving instance or a hot standby (a stopped one is continued or killed once it
is ejected), the same failure reported again by several triggers at once (``report_failure`` as the
CLI does, and an Alertmanager webhook through the real alert receiver app, besides the prober), a
freshly promoted instance killed right after its recovery (flapping), and ``kill -9`` of the worker,
the Temporal dev server or Envoy at a random moment during a recovery (the stack's supervisor
restarts them, as under ``drctl up``). Requests go through Envoy the whole time.

Then the round waits for quiescence (no incident queued or running in any guardian, the budget idle,
the prober with nothing unreported, every serving instance and standby alive at the policy's
counts and placement, Envoy seeing exactly them) within a bounded time, triggering the reconcile
schedule while the fleet differs from the policy, and checks:

1. one failure → at most one promotion: no instance recovered twice across the guardians; no
   instance both ejected (role ``failed``) and in the load balancer;
2. every model has exactly ``replicas`` serving and its standbys at the policy's counts (the
   quiescence itself, bounded: not reaching it is a violation);
3. the budget was never exceeded (``most_running_per_zone <= max_per_zone``), nothing left waiting;
4. every injected failure has exactly one settled incident (``recovered``, or ``standby-ejected`` /
   ``already-ejected`` for a standby), and every other report of it joined that incident.

A violation raises :class:`InvariantViolation` naming the seed and the round, so
``bench/chaos.py --seed S --rounds N`` replays it. Requests that failed through Envoy are counted
per round, not asserted (a ``kill -9`` of Envoy fails requests by design).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiohttp import web
from temporalio.client import Client, ScheduleOverlapPolicy

from drctl.detectors.alert_receiver import build_app, platform_instances
from drctl.payloads import (
    RECONCILE_SCHEDULE_ID,
    BudgetState,
    FailoverOutcome,
    FailoverRequest,
    FailureReport,
    GuardianState,
    Incident,
    IncidentState,
    IncidentTicket,
    Instance,
    Role,
    Trigger,
)
from drctl.platforms.local import envoy, processes
from drctl.platforms.local.registry import LocalInstance
from drctl.policies.loader import load_policy_file
from drctl.policies.schema import DRPolicy
from drctl.temporal.incidents import budget_state, guardian_state, report_failure, runbook_result
from drctl.workers.stack import LocalStack, StackError, isolated_settings

T = TypeVar("T")
Say = Callable[[str], None]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO / "examples" / "dr-policy.yaml"
TENANT = "default"
REPORT_DEADLINE_S = 90.0
"""A nemesis report (as the CLI or Alertmanager would send) is retried this long: Temporal or the
worker may be down in the same round."""
RECONCILE_EVERY_S = 2.5
"""While the fleet differs from the policy and no recovery runs, the reconcile schedule is
triggered this often (its own interval, 30 s, is too slow for a test)."""
POLL_S = 0.3
STABLE_POLLS = 2
"""Quiescent on this many polls in a row (a reconcile pass between two states is not missed)."""
JOINED_KEPT = 20
"""The guardian keeps this many joined reporters' names per incident (then only the count)."""
SETTLED = frozenset({FailoverOutcome.RECOVERED, FailoverOutcome.STANDBY_EJECTED, FailoverOutcome.ALREADY_EJECTED})
SERVING_SETTLES = frozenset({FailoverOutcome.RECOVERED})
STANDBY_SETTLES = SETTLED
"""A hot standby that failed is ejected by its own runbook (standby-ejected), or already was as a
broken candidate of another runbook (already-ejected), or had been promoted before it failed and
was then recovered like any serving instance."""


class InvariantViolation(AssertionError):
    """An invariant did not hold after a round: the message names the seed and the round to replay."""


class FaultKind(StrEnum):
    KILL_SERVING = "kill-serving"
    KILL_HOT = "kill-hot"
    STOP_SERVING = "stop-serving"
    STOP_HOT = "stop-hot"
    DUPLICATES = "duplicates"
    """kill -9 of a serving instance reported at once by the prober, the CLI (several times,
    concurrently) and an Alertmanager webhook."""
    FLAP = "flap"
    """kill -9 of a serving instance, then of the instance promoted in its place right after."""
    KILL_WORKER = "kill-worker"
    KILL_TEMPORAL = "kill-temporal"
    KILL_ENVOY = "kill-envoy"

    @property
    def is_infra(self) -> bool:
        return self in (FaultKind.KILL_WORKER, FaultKind.KILL_TEMPORAL, FaultKind.KILL_ENVOY)

    @property
    def part(self) -> str:
        return {FaultKind.KILL_WORKER: "worker", FaultKind.KILL_TEMPORAL: "temporal", FaultKind.KILL_ENVOY: "envoy"}[
            self
        ]


WEIGHTS: dict[FaultKind, int] = {
    FaultKind.KILL_SERVING: 3,
    FaultKind.KILL_HOT: 2,
    FaultKind.STOP_SERVING: 1,
    FaultKind.STOP_HOT: 1,
    FaultKind.DUPLICATES: 3,
    FaultKind.FLAP: 1,
    FaultKind.KILL_WORKER: 2,
    FaultKind.KILL_TEMPORAL: 1,
    FaultKind.KILL_ENVOY: 1,
}


@dataclass(frozen=True)
class FaultPlan:
    kind: FaultKind
    delay_s: float
    """After the round starts (an infrastructure kill: a random moment during the recoveries)."""
    reports: int = 0
    """Extra reports of the same failure sent concurrently, as ``drctl failover`` would."""
    alert: bool = False
    """And one more through the alert receiver (an Alertmanager webhook)."""
    report_delay_s: float = 0.0
    """Reports go out this long after the fault (before or after the prober's)."""
    resolve: str = ""
    """A SIGSTOPped instance, once ejected: ``cont`` (it wakes up, ejected) or ``kill``."""

    def describe(self) -> str:
        extra = ""
        if self.reports or self.alert:
            extra = f" +{self.reports} cli" + (" +alert" if self.alert else "")
        if self.resolve:
            extra += f" then {self.resolve}"
        return f"{self.kind}@{self.delay_s:.2f}s{extra}"


def plan_round(seed: int, round_no: int) -> list[FaultPlan]:
    """The round's faults: a pure function of (seed, round), so a round replays the same draws."""
    rng = random.Random(f"{seed}/{round_no}")
    count = rng.randint(1, 3)
    remaining = dict(WEIGHTS)
    kinds: list[FaultKind] = []
    for _ in range(count):
        kind = rng.choices(list(remaining), weights=list(remaining.values()))[0]
        kinds.append(kind)
        del remaining[kind]
    plans = []
    for kind in kinds:
        delay = rng.uniform(0.2, 1.5) if kind.is_infra else rng.uniform(0.0, 0.3)
        reports = alert = 0
        report_delay = 0.0
        if kind == FaultKind.DUPLICATES:
            reports, alert = rng.randint(2, 4), 1
            report_delay = rng.uniform(0.0, 0.3)
        elif not kind.is_infra and rng.random() < 0.3:
            reports, alert = rng.randint(1, 2), int(rng.random() < 0.5)
            report_delay = rng.uniform(0.0, 0.5)
        resolve = rng.choice(["cont", "kill"]) if kind in (FaultKind.STOP_SERVING, FaultKind.STOP_HOT) else ""
        plans.append(FaultPlan(kind, round(delay, 3), reports, bool(alert), round(report_delay, 3), resolve))
    return plans


# -- what a round did ------------------------------------------------------------------------------


@dataclass
class Injected:
    """One instance failure the nemesis caused, and the reports it sent about it."""

    kind: FaultKind
    model: str
    instance: str
    role: Role
    pid: int
    how: str
    """SIGKILL or SIGSTOP"""
    at: datetime
    reporters: list[str] = field(default_factory=list)
    """The nemesis' own reports (CLI-like and alert) that got through."""
    tickets: list[IncidentTicket] = field(default_factory=list)
    resolve: str = ""
    resolved: bool = False
    outcome: str = ""
    recover_s: float | None = None
    """From the fault to the close of its incident (the runbook done)."""
    joined_total: int = 0


@dataclass
class InfraKill:
    kind: FaultKind
    pid: int
    at: float
    mid_recovery: bool
    """An incident's runbook was running when it was killed."""
    back_s: float | None = None
    """Until the supervisor had it up again."""


@dataclass
class RoundReport:
    seed: int
    round: int
    plan: list[FaultPlan]
    injected: list[Injected] = field(default_factory=list)
    infra: list[InfraKill] = field(default_factory=list)
    requests_ok: int = 0
    requests_failed: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    quiesce_s: float = 0.0
    reconcile_triggers: int = 0
    extra_incidents: list[str] = field(default_factory=list)
    """Incidents of instances the nemesis did not fail (a spurious detection under load)."""
    lingering: list[str] = field(default_factory=list)
    """Ejected instances whose process still ran long after their ejection."""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        faults = ", ".join(p.describe() for p in self.plan)
        recov = " ".join(f"{i.instance}:{i.outcome}/{i.recover_s:.1f}s" for i in self.injected if i.recover_s)
        back = " ".join(
            f"{k.kind.part}:{k.back_s:.1f}s" + (" (mid-recovery)" if k.mid_recovery else "")
            for k in self.infra
            if k.back_s is not None
        )
        parts = [
            f"round {self.round:3d}",
            f"[{faults}]",
            f"requests {self.requests_ok} ok / {self.requests_failed} failed",
            f"quiescent {self.quiesce_s:.1f}s",
        ]
        if recov:
            parts.append(f"recovered {recov}")
        if back:
            parts.append(f"back {back}")
        if self.extra_incidents:
            parts.append(f"extra incidents {self.extra_incidents}")
        if self.lingering:
            parts.append(f"lingering {self.lingering}")
        return " | ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "round": self.round,
            "faults": [p.describe() for p in self.plan],
            "injected": [
                {
                    "kind": str(i.kind),
                    "instance": i.instance,
                    "role": str(i.role),
                    "how": i.how,
                    "outcome": i.outcome,
                    "recover_s": i.recover_s,
                    "reports": len(i.reporters),
                    "joined_total": i.joined_total,
                }
                for i in self.injected
            ],
            "infra": [{"kind": str(k.kind), "mid_recovery": k.mid_recovery, "back_s": k.back_s} for k in self.infra],
            "requests_ok": self.requests_ok,
            "requests_failed": self.requests_failed,
            "failure_reasons": self.failure_reasons,
            "quiesce_s": self.quiesce_s,
            "reconcile_triggers": self.reconcile_triggers,
            "extra_incidents": self.extra_incidents,
            "lingering": self.lingering,
            "notes": self.notes,
        }


# -- the invariants, on observed state (pure) ------------------------------------------------------


def incidents_of(guardians: Mapping[str, GuardianState | None], instance: str) -> list[Incident]:
    return [i for g in guardians.values() if g is not None for i in [*g.recent, *g.queue] if i.instance == instance]


def ejected_as_candidate(instance: Instance | None) -> bool:
    """A failed standby taken out before anyone reported it (the prober needs a few failed probes
    for a hung one): another runbook tried to promote it and ejected it as broken
    (``FailoverWorkflow._try_eject_broken``), or reconciliation deleted it (a placement move, the
    replacement created first; the instance is gone from the registry). Handled, in that runbook's
    audit, and no report follows (the prober watches serving and hot instances only)."""
    if instance is None:
        return True
    return instance.role == Role.FAILED and instance.note.startswith("promotion failed")


def invariant_violations(
    guardians: Mapping[str, GuardianState | None],
    budget: BudgetState | None,
    instances: Sequence[Instance],
    injected: Sequence[Injected],
) -> list[str]:
    """What does not hold, one line per problem (empty: every invariant holds)."""
    problems: list[str] = []
    # 1. One failure → at most one promotion; no instance both serving and ejected.
    recovered = Counter(
        i.instance
        for g in guardians.values()
        if g is not None
        for i in [*g.recent, *g.queue]
        if i.outcome == FailoverOutcome.RECOVERED
    )
    for failed, times in sorted(recovered.items()):
        if times > 1:
            runs = [i.workflow_id for i in incidents_of(guardians, failed) if i.outcome == FailoverOutcome.RECOVERED]
            problems.append(f"invariant 1: {failed} recovered {times} times ({', '.join(runs)})")
    for instance in instances:
        if instance.role == Role.FAILED and instance.lb_priority is not None:
            problems.append(f"invariant 1: {instance.id} is ejected but in the LB at priority {instance.lb_priority}")
    for model, g in sorted(guardians.items()):
        if g is not None and g.queue:
            open_ = ", ".join(f"{i.instance} ({i.state}, waiting for: {i.waiting_for or '-'})" for i in g.queue)
            problems.append(f"quiescence: guardian-{model} still has incidents open: {open_}")
    # 3. The budget delays, never drops, and is never exceeded.
    if budget is not None:
        if budget.most_running_per_zone > budget.max_per_zone:
            problems.append(
                f"invariant 3: {budget.most_running_per_zone} recoveries ran at once in one zone "
                f"(max_per_zone {budget.max_per_zone})"
            )
        if budget.running or budget.waiting:
            held = [f"{r.incident} running" for r in budget.running] + [f"{w.incident} waiting" for w in budget.waiting]
            problems.append(f"invariant 3: the budget still holds {', '.join(held)}")
        if budget.tripped:
            problems.append(f"invariant 3: the budget tripped ({budget.tripped}): recoveries wait for a person")
    # 4. Every injected failure: one settled incident, the other reports joined to it.
    by_id = {i.id: i for i in instances}
    for fault in injected:
        incidents = incidents_of(guardians, fault.instance)
        settled = [i for i in incidents if i.outcome in SETTLED]
        allowed = SERVING_SETTLES if fault.role == Role.SERVING else STANDBY_SETTLES
        what = f"{fault.instance} ({fault.role}, {fault.kind}, {fault.how})"
        if not settled and fault.role != Role.SERVING and ejected_as_candidate(by_id.get(fault.instance)):
            continue  # taken out by another runbook before a report of it ran: in that audit
        if len(settled) != 1:
            seen = ", ".join(f"{i.workflow_id}: {i.outcome or i.state}" for i in incidents) or "none"
            problems.append(f"invariant 4: {what} has {len(settled)} settled incidents, not 1 (incidents: {seen})")
            continue
        [incident] = settled
        if incident.outcome not in allowed:
            problems.append(f"invariant 4: {what} ended {incident.outcome}, expected one of {sorted(allowed)}")
        current = by_id.get(fault.instance)
        if current is None and incident.outcome == FailoverOutcome.ALREADY_EJECTED and fault.role != Role.SERVING:
            pass  # reconciliation replaced the standby while its report waited: its runbook found it gone
        elif current is None or current.role != Role.FAILED:
            problems.append(f"invariant 1: {what} is {current.role if current else 'gone'} after its recovery")
        keys = {(i.workflow_id, i.opened_at) for i in incidents}
        opened = {i.opened_at for i in incidents}
        for ticket in fault.tickets:
            if ticket.opened_at not in opened or ticket.instance != fault.instance:
                problems.append(
                    f"invariant 4: {what}: a report was answered with {ticket.workflow_id} opened {ticket.opened_at}, "
                    f"an incident the guardian does not have ({sorted(str(k) for k in keys)})"
                )
        openers = [t for t in fault.tickets if not t.joined]
        if len(openers) > 1:
            problems.append(f"invariant 4: {what}: {len(openers)} of the nemesis' reports each opened an incident")
        reports_seen = sum(1 + i.joined_total for i in incidents)
        if reports_seen < len(fault.reporters):
            problems.append(
                f"invariant 4: {what}: {len(fault.reporters)} reports sent, the guardian counted {reports_seen}"
            )
        names = {n for i in incidents for n in (i.reporter, *i.joined)}
        if all(len(i.joined) < JOINED_KEPT for i in incidents):
            missing = [r for r in fault.reporters if r not in names]
            if missing:
                problems.append(f"invariant 4: {what}: reports not visible as opener or joined: {missing}")
    return problems


def fleet_problems(
    policy: DRPolicy,
    instances: Sequence[LocalInstance],
    hosts: Mapping[str, Sequence[envoy.HostStatus]],
    drift: Sequence[str],
    alive: Callable[[int | None], bool] = processes.is_alive,
    stopped: Callable[[int | None], bool] = processes.is_stopped,
) -> list[str]:
    """Invariant 2 as observed now: each model's serving instances and standbys at the policy's
    counts, their processes running (not hung), Envoy seeing exactly the serving ones healthy at
    priority 0 and the hot ones at priority 1, and nothing left for reconciliation (placement
    included). Empty when it holds."""
    problems: list[str] = []
    for model in policy.models:
        mine = [i for i in instances if i.model == model.name]
        by_role: dict[Role, list[LocalInstance]] = {role: [i for i in mine if i.role == role] for role in Role}
        want = {
            Role.SERVING: model.replicas,
            Role.HOT: model.hot_standby,
            Role.WARM: model.warm_standby,
            Role.COLD: model.cold_standby,
        }
        for role, count in want.items():
            have = by_role[role]
            if len(have) != count:
                problems.append(f"{model.name}: {len(have)} {role} ({', '.join(i.id for i in have)}), policy {count}")
        if by_role[Role.PROMOTING]:
            problems.append(f"{model.name}: {', '.join(i.id for i in by_role[Role.PROMOTING])} promoting")
        for instance in by_role[Role.SERVING] + by_role[Role.HOT] + by_role[Role.WARM]:
            if not alive(instance.pid):
                problems.append(f"{instance.id} ({instance.role}): process {instance.pid} is not running")
            elif stopped(instance.pid):
                problems.append(f"{instance.id} ({instance.role}): process {instance.pid} is stopped (hung)")
        seen = hosts.get(model.name)
        if seen is None:
            problems.append(f"{model.name}: Envoy's cluster not readable")
            continue
        for priority, role in ((0, Role.SERVING), (1, Role.HOT)):
            want_ports = {i.port for i in by_role[role]}
            lb_ports = {h.port for h in seen if h.priority == priority and h.healthy}
            if want_ports != lb_ports:
                problems.append(
                    f"{model.name}: Envoy has {sorted(lb_ports)} healthy at priority {priority}, "
                    f"the {role} instances are on {sorted(p for p in want_ports if p is not None)}"
                )
        failed_ports = {i.port for i in mine if i.role == Role.FAILED and i.port is not None}
        in_lb = sorted(h.port for h in seen if h.healthy and h.port in failed_ports)
        if in_lb:
            problems.append(f"{model.name}: ejected instances on ports {in_lb} are healthy in Envoy")
    problems.extend(f"reconcile would: {change}" for change in drift)
    return problems


# -- traffic ---------------------------------------------------------------------------------------


class Load:
    """A bounded request loop per model through Envoy (one request in flight each)."""

    def __init__(self, lb_url: str, models: Sequence[str], pause_s: float = 0.05) -> None:
        self.lb_url = lb_url
        self.models = list(models)
        self.pause_s = pause_s
        self.ok = 0
        self.failed = 0
        self.reasons: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(m), name=f"load-{m}") for m in self.models]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def snapshot(self) -> tuple[int, int, Counter[str]]:
        return self.ok, self.failed, Counter(self.reasons)

    async def _loop(self, model: str) -> None:
        url = f"{self.lb_url}/v1/models/{model}/predict"
        async with httpx.AsyncClient(timeout=httpx.Timeout(20.0, connect=2.0)) as http:
            while not self._stop.is_set():
                try:
                    response = await http.post(url, json={"prompt": "nemesis", "max_tokens": 2})
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failed += 1
                        self.reasons[f"{model}: HTTP {response.status_code}"] += 1
                except httpx.HTTPError as exc:
                    self.failed += 1
                    self.reasons[f"{model}: {type(exc).__name__}"] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=self.pause_s)


# -- the stack under test --------------------------------------------------------------------------


@dataclass
class ChaosStack:
    """A private local stack (prober, node agents) supervised as under ``drctl up``, the alert
    receiver app in process, and traffic through Envoy."""

    stack: LocalStack
    said: list[str]
    load: Load
    alert_url: str
    alert_token: str
    http: httpx.AsyncClient

    @property
    def client(self) -> Client:
        assert self.stack.client is not None
        return self.stack.client

    @property
    def task_queue(self) -> str:
        return self.stack.settings.task_queue

    @property
    def policy(self) -> DRPolicy:
        return self.stack.policy


@asynccontextmanager
async def chaos_stack(
    root: Path, policy_file: Path = EXAMPLE_POLICY, node_agents: bool = True
) -> AsyncIterator[ChaosStack]:
    said: list[str] = []
    stack = await _started_stack(root, policy_file, node_agents, said)
    settings = stack.settings
    stop = asyncio.Event()
    supervisor: asyncio.Task[None] | None = None
    runner: web.AppRunner | None = None
    load: Load | None = None
    try:
        supervisor = asyncio.create_task(stack.supervise(stop), name="supervise")
        token = secrets.token_hex(24)
        assert stack.client is not None
        app = await build_app(
            stack.client,
            stack.policy,
            {TENANT: token},
            task_queue=settings.task_queue,
            known_instances=platform_instances(stack.settings, stack.policy),
        )
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        alert_url = f"http://127.0.0.1:{runner.addresses[0][1]}/alerts"
        load = Load(settings.lb_url, stack.policy.model_names)
        load.start()
        async with httpx.AsyncClient(timeout=30.0) as http:
            yield ChaosStack(stack, said, load, alert_url, token, http)
    finally:
        if load is not None:
            await load.stop()
        if runner is not None:
            await runner.cleanup()
        stop.set()
        if supervisor is not None:
            await supervisor
        await stack.stop()


async def _started_stack(root: Path, policy_file: Path, node_agents: bool, said: list[str]) -> LocalStack:
    """A started stack; on other free ports again when one was taken meanwhile (the node agents use
    the ports after the one ``isolated_settings`` found free)."""
    for attempt in range(3):
        stack = LocalStack(
            isolated_settings(root / f"state-{attempt}" if attempt else root / "state", policy_file),
            load_policy_file(policy_file),
            say=said.append,
            with_prober=True,
            with_node_agents=node_agents,
        )
        try:
            await stack.start()
            return stack
        except StackError as exc:
            await stack.stop()
            if "ports already in use" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


# -- the nemesis -----------------------------------------------------------------------------------


class Nemesis:
    def __init__(self, chaos: ChaosStack, seed: int, quiesce_timeout_s: float = 120.0, say: Say = print) -> None:
        self.chaos = chaos
        self.seed = seed
        self.quiesce_timeout_s = quiesce_timeout_s
        self.say = say
        self.stack = chaos.stack
        self.models = self.stack.policy.model_names
        self._failed_alive_since: dict[str, float] = {}

    # -- a round -----------------------------------------------------------------------------------

    async def run_round(self, round_no: int) -> RoundReport:
        plan = plan_round(self.seed, round_no)
        report = RoundReport(self.seed, round_no, plan)
        rng = random.Random(f"{self.seed}/{round_no}/targets")
        ok0, failed0, reasons0 = self.chaos.load.snapshot()
        before = await self._retry(self._incident_keys, "reading the guardians before the round")
        began = time.monotonic()
        self.say(f"round {round_no}: {', '.join(p.describe() for p in plan)}")
        targets = self._pick_targets(plan, rng, report)
        await asyncio.gather(*(self._inject(p, t, report, round_no) for p, t in zip(plan, targets, strict=True)))
        await self._wait_quiescent(report, began)
        report.quiesce_s = round(time.monotonic() - began, 2)
        ok1, failed1, reasons1 = self.chaos.load.snapshot()
        report.requests_ok, report.requests_failed = ok1 - ok0, failed1 - failed0
        report.failure_reasons = dict(reasons1 - reasons0)
        guardians = await self._retry(self._guardians, "reading the guardians")
        budget = await self._retry(lambda: budget_state(self.chaos.client, self.chaos.task_queue), "reading the budget")
        instances = list(self.stack.platform.registry.load().values())
        for fault in report.injected:
            settled = [i for i in incidents_of(guardians, fault.instance) if i.outcome in SETTLED]
            current = self.stack.platform.registry.load().get(fault.instance)
            if not settled and fault.role != Role.SERVING and ejected_as_candidate(current):
                fault.outcome = "deleted by reconcile" if current is None else "ejected as a broken candidate"
            if settled:
                fault.outcome = str(settled[0].outcome)
                fault.joined_total = settled[0].joined_total
                if settled[0].closed_at is not None:
                    fault.recover_s = round((settled[0].closed_at - fault.at).total_seconds(), 2)
        injected_ids = {f.instance for f in report.injected}
        for g in guardians.values():
            for incident in [*g.recent, *g.queue] if g is not None else []:
                key = (incident.workflow_id, incident.opened_at)
                if key not in before and incident.instance not in injected_ids:
                    report.extra_incidents.append(f"{incident.instance}: {incident.outcome} ({incident.reporter})")
        report.lingering = self._lingering(instances)
        problems = invariant_violations(guardians, budget, instances, report.injected)
        if problems:
            raise self._violation(round_no, problems, report)
        return report

    def _violation(self, round_no: int, problems: Sequence[str], report: RoundReport) -> InvariantViolation:
        lines = "\n  ".join(problems)
        return InvariantViolation(
            f"seed {self.seed} round {round_no}: invariants violated:\n  {lines}\n"
            f"faults: {', '.join(p.describe() for p in report.plan)}; "
            f"injected: {[(f.instance, str(f.role), f.how) for f in report.injected]}\n"
            f"replay: .venv/bin/python bench/chaos.py --seed {self.seed} --rounds {round_no}"
        )

    def _pick_targets(
        self, plan: Sequence[FaultPlan], rng: random.Random, report: RoundReport
    ) -> list[LocalInstance | None]:
        """Distinct running instances for the round's instance faults, chosen before any fault."""
        used: set[str] = set()
        targets: list[LocalInstance | None] = []
        for fault in plan:
            if fault.kind.is_infra:
                targets.append(None)
                continue
            role = Role.HOT if fault.kind in (FaultKind.KILL_HOT, FaultKind.STOP_HOT) else Role.SERVING
            candidates = self._running(role, used)
            if not candidates and role == Role.HOT:
                report.notes.append(f"{fault.kind}: no running hot standby; a serving instance instead")
                candidates = self._running(Role.SERVING, used)
            if not candidates:
                report.notes.append(f"{fault.kind}: no running instance left to fail")
                targets.append(None)
                continue
            target = rng.choice(candidates)
            used.add(target.id)
            targets.append(target)
        return targets

    def _running(self, role: Role, exclude: set[str]) -> list[LocalInstance]:
        instances = self.stack.platform.registry.load().values()
        return sorted(
            (
                i
                for i in instances
                if i.role == role
                and i.id not in exclude
                and i.lb_priority is not None
                and processes.is_alive(i.pid)
                and not processes.is_stopped(i.pid)
            ),
            key=lambda i: i.id,
        )

    async def _inject(self, fault: FaultPlan, target: LocalInstance | None, report: RoundReport, round_no: int) -> None:
        if fault.kind == FaultKind.KILL_WORKER and any(not p.kind.is_infra for p in report.plan):
            # During a recovery: once one runs, a little later (a hot one lasts ~100-300 ms).
            await self._until_recovery_runs(timeout_s=5.0)
            await asyncio.sleep(fault.delay_s / 10)
        else:
            await asyncio.sleep(fault.delay_s)
        if fault.kind.is_infra:
            await self._kill_part(fault.kind, report)
            return
        if target is None:
            return
        stop = fault.kind in (FaultKind.STOP_SERVING, FaultKind.STOP_HOT)
        first = self._fail(fault.kind, target, report, stop, fault.resolve)
        if first is None:
            return
        if fault.reports or fault.alert:
            await asyncio.sleep(fault.report_delay_s)
            await self._duplicates(first, fault, round_no)
        if fault.kind == FaultKind.FLAP:
            incident = await self._settled_incident(first)
            if incident is None or incident.outcome != FailoverOutcome.RECOVERED:
                report.notes.append(f"flap: {first.instance} ended {incident.outcome if incident else '?'}")
                return
            done = incident
            result = await self._retry(
                lambda: runbook_result(self.chaos.client, done), f"reading {done.workflow_id}'s result"
            )
            promoted = self.stack.platform.registry.load().get(result.promoted or "")
            if promoted is None or not processes.is_alive(promoted.pid):
                report.notes.append(f"flap: the promoted instance {result.promoted} is not running")
                return
            self._fail(fault.kind, promoted, report, stop=False, resolve="")

    def _fail(
        self, kind: FaultKind, target: LocalInstance, report: RoundReport, stop: bool, resolve: str
    ) -> Injected | None:
        pid = target.pid
        if pid is None or not processes.runs_instance(pid, target.id):
            report.notes.append(f"{kind}: {target.id} was no longer running")
            return None
        how = "SIGSTOP" if stop else "SIGKILL"
        os.kill(pid, signal.SIGSTOP if stop else signal.SIGKILL)
        fault = Injected(kind, target.model, target.id, target.role, pid, how, datetime.now(UTC), resolve=resolve)
        report.injected.append(fault)
        self.say(f"  {how} {target.id} ({target.role}, pid {pid})")
        return fault

    async def _duplicates(self, fault: Injected, plan: FaultPlan, round_no: int) -> None:
        """The same failure reported concurrently by the CLI (``plan.reports`` times) and Alertmanager."""
        request = FailoverRequest(
            model=fault.model,
            instance=fault.instance,
            trigger=Trigger.MANUAL,
            reason="nemesis: reported again, as an operator would",
        )
        sends: list[Awaitable[None]] = [
            self._report(fault, request, f"nemesis cli r{round_no}-{fault.instance}-{n}") for n in range(plan.reports)
        ]
        if plan.alert:
            sends.append(self._alert(fault))
        await asyncio.gather(*sends)

    async def _report(self, fault: Injected, request: FailoverRequest, reporter: str) -> None:
        report = FailureReport(request=request, reporter=reporter)
        ticket = await self._retry(
            lambda: report_failure(self.chaos.client, self.chaos.task_queue, report), f"{reporter}'s report"
        )
        fault.tickets.append(ticket)
        fault.reporters.append(reporter)

    async def _alert(self, fault: Injected) -> None:
        """An Alertmanager notification (payload version 4) about the instance, posted to the
        receiver until it is accepted (a 503 while Temporal is down is retried, as Alertmanager does)."""
        fingerprint = secrets.token_hex(8)
        starts = fault.at.isoformat().replace("+00:00", "Z")
        labels = {"alertname": "InstanceDown", "severity": "critical", "model": fault.model, "instance": fault.instance}
        body = {
            "version": "4",
            "groupKey": '{}:{alertname="InstanceDown"}',
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "drctl",
            "groupLabels": {"alertname": "InstanceDown"},
            "commonLabels": labels,
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.example:9093",
            "alerts": [
                {
                    "status": "firing",
                    "labels": labels,
                    "annotations": {"summary": "nemesis: instance down"},
                    "startsAt": starts,
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus.example:9090/graph",
                    "fingerprint": fingerprint,
                }
            ],
        }

        async def post() -> dict[str, Any]:
            response = await self.chaos.http.post(
                self.chaos.alert_url, json=body, headers={"Authorization": f"Bearer {self.chaos.alert_token}"}
            )
            if response.status_code != 200:
                raise RuntimeError(f"alert receiver answered {response.status_code}: {response.text[:300]}")
            answer: dict[str, Any] = response.json()
            return answer

        answer = await self._retry(post, f"the alert about {fault.instance}")
        [result] = answer["alerts"]
        if result.get("action") not in ("started", "duplicate"):
            raise AssertionError(f"the alert about {fault.instance} was not reported: {result}")
        fault.reporters.append(f"alert {fingerprint} ({TENANT})")

    async def _kill_part(self, kind: FaultKind, report: RoundReport) -> None:
        name = kind.part
        part = self.stack.parts.get(name)
        pid = self.stack.pids.get(name)
        if pid is None or not processes.is_alive(pid) or (part is not None and part.state != "up"):
            report.notes.append(f"{kind}: {name} was not up; not killed")
            return
        mid = await self._recovery_running()
        os.kill(pid, signal.SIGKILL)
        killed = InfraKill(kind, pid, time.monotonic(), mid)
        report.infra.append(killed)
        self.say(f"  SIGKILL {name} (pid {pid}){' during a recovery' if mid else ''}")
        deadline = killed.at + 60.0
        while time.monotonic() < deadline:
            part = self.stack.parts.get(name)
            new = self.stack.pids.get(name)
            if new != pid and part is not None and part.state == "up" and await self._serves(name, new):
                killed.back_s = round(time.monotonic() - killed.at, 2)
                return
            await asyncio.sleep(0.05)
        report.notes.append(f"{kind}: {name} not back within 60 s")

    async def _serves(self, name: str, pid: int | None) -> bool:
        """The restarted part does its job again: the worker polls, Envoy proxies, Temporal answers."""
        try:
            if name == "worker":
                return pid is not None and await self.stack._worker_is_polling(pid)
            if name == "envoy":
                await envoy.wait_until_ready(self.stack.settings.envoy_admin_url, timeout=0.5)
                return True
            await asyncio.wait_for(budget_state(self.chaos.client, self.chaos.task_queue), timeout=2.0)
            return True
        except Exception:
            return False

    async def _until_recovery_runs(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            registry = self.stack.platform.registry.load().values()
            if any(i.role == Role.PROMOTING for i in registry) or await self._recovery_running():
                return
            await asyncio.sleep(0.03)

    async def _recovery_running(self) -> bool:
        """Best effort: whether any guardian has an incident running now."""
        try:
            guardians = await asyncio.wait_for(self._guardians(), timeout=1.0)
        except Exception:
            return False
        return any(i.state == IncidentState.RUNNING for g in guardians.values() if g for i in g.queue)

    async def _settled_incident(self, fault: Injected, timeout_s: float = 60.0) -> Incident | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                guardians = await asyncio.wait_for(self._guardians(), timeout=5.0)
                settled = [i for i in incidents_of(guardians, fault.instance) if i.outcome in SETTLED and i.closed_at]
                if settled:
                    return settled[0]
            await asyncio.sleep(0.1)
        return None

    # -- quiescence ----------------------------------------------------------------------------

    async def _wait_quiescent(self, report: RoundReport, began: float) -> None:
        deadline = began + self.quiesce_timeout_s
        stable = 0
        last_trigger = 0.0
        pending: list[str] = []
        while True:
            self._resolve_stopped(report)
            busy, fleet = await self._unsettled(report)
            safety = [p for p in busy + fleet if p.startswith("invariant 1")]
            if safety:
                raise self._violation(report.round, safety, report)
            pending = busy + fleet
            if not pending:
                stable += 1
                if stable >= STABLE_POLLS:
                    return
            else:
                stable = 0
            if not busy and fleet and time.monotonic() - last_trigger > RECONCILE_EVERY_S:
                last_trigger = time.monotonic()
                with contextlib.suppress(Exception):
                    await self.chaos.client.get_schedule_handle(RECONCILE_SCHEDULE_ID).trigger(
                        overlap=ScheduleOverlapPolicy.BUFFER_ONE
                    )
                    report.reconcile_triggers += 1
            if time.monotonic() > deadline:
                raise self._violation(
                    report.round,
                    [f"not quiescent within {self.quiesce_timeout_s:.0f}s (invariants 2/3):", *pending],
                    report,
                )
            await asyncio.sleep(POLL_S)

    async def _unsettled(self, report: RoundReport) -> tuple[list[str], list[str]]:
        """(recoveries not done, fleet not at the policy): why the stack is not quiescent yet."""
        busy: list[str] = []
        for name, pid in sorted(self.stack.pids.items()):
            part = self.stack.parts.get(name)
            if not processes.is_alive(pid) or (part is not None and part.state != "up"):
                busy.append(f"{name} is {part.state if part else 'down'}")
        if busy:
            return busy, []
        guardians: dict[str, GuardianState | None] = {}
        budget: BudgetState | None = None
        silent: list[str] = []
        for model in self.models:
            try:
                guardians[model] = await asyncio.wait_for(
                    guardian_state(self.chaos.client, self.chaos.task_queue, model), timeout=5.0
                )
            except Exception as exc:
                silent.append(f"guardian-{model} not answering: {type(exc).__name__} {exc}")
        try:
            budget = await asyncio.wait_for(budget_state(self.chaos.client, self.chaos.task_queue), timeout=5.0)
        except Exception as exc:
            silent.append(f"the budget not answering: {type(exc).__name__} {exc}")
        if silent:
            return silent, []
        for model, g in guardians.items():
            for incident in g.queue if g is not None else []:
                busy.append(f"guardian-{model}: {incident.instance} {incident.state}")
        if budget is not None and (budget.running or budget.waiting):
            busy.append(f"budget: {len(budget.running)} running, {len(budget.waiting)} waiting")
        registry = self.stack.platform.registry.load()
        for fault in report.injected:
            if fault.role != Role.SERVING and ejected_as_candidate(registry.get(fault.instance)):
                continue
            if not any(i.outcome in SETTLED for i in incidents_of(guardians, fault.instance)):
                busy.append(f"{fault.instance}: no settled incident yet")
        try:
            status = json.loads(self.stack.layout.prober_status_file.read_text(encoding="utf-8"))
            if status.get("unreported"):
                busy.append(f"prober has not reported {status['unreported']} yet")
        except (OSError, ValueError):
            busy.append("prober status unreadable")
        instances = list(self.stack.platform.registry.load().values())
        for instance in instances:
            if instance.role == Role.FAILED and instance.lb_priority is not None:
                busy.append(f"invariant 1: {instance.id} is ejected but in the LB at priority {instance.lb_priority}")
            if instance.role in (Role.SERVING, Role.HOT) and (
                not processes.is_alive(instance.pid) or processes.is_stopped(instance.pid)
            ):
                busy.append(f"{instance.id} ({instance.role}) is down, not handled yet")
        if busy:
            return busy, []
        hosts: dict[str, list[envoy.HostStatus]] = {}
        for model in self.models:
            with contextlib.suppress(Exception):
                hosts[model] = await envoy.cluster_hosts(self.stack.settings.envoy_admin_url, model, self.chaos.http)
        drift = self.stack.platform.fleet_drift()
        return [], fleet_problems(self.stack.policy, instances, hosts, drift)

    def _resolve_stopped(self, report: RoundReport) -> None:
        """A SIGSTOPped instance, once ejected, is continued (an ejected process that wakes up) or
        killed, as the round's plan drew."""
        registry = self.stack.platform.registry.load()
        for fault in report.injected:
            if fault.how != "SIGSTOP" or fault.resolved:
                continue
            current = registry.get(fault.instance)
            if current is None or current.role == Role.FAILED:
                fault.resolved = True
                with contextlib.suppress(ProcessLookupError):
                    if processes.runs_instance(fault.pid, fault.instance):
                        os.kill(fault.pid, signal.SIGCONT if fault.resolve == "cont" else signal.SIGKILL)

    def _lingering(self, instances: Sequence[LocalInstance], after_s: float = 20.0) -> list[str]:
        """Ejected instances whose process has been seen running for more than ``after_s``: their
        connection draining should have stopped them within seconds."""
        now = time.monotonic()
        alive = {i.id for i in instances if i.role == Role.FAILED and processes.runs_instance(i.pid, i.id)}
        for gone in set(self._failed_alive_since) - alive:
            del self._failed_alive_since[gone]
        for instance_id in alive:
            self._failed_alive_since.setdefault(instance_id, now)
        return sorted(i for i in alive if now - self._failed_alive_since[i] > after_s)

    # -- reading Temporal ----------------------------------------------------------------------

    async def _guardians(self) -> dict[str, GuardianState | None]:
        states = await asyncio.gather(
            *(guardian_state(self.chaos.client, self.chaos.task_queue, m) for m in self.models)
        )
        return dict(zip(self.models, states, strict=True))

    async def _incident_keys(self) -> set[tuple[str, datetime]]:
        guardians = await self._guardians()
        return {(i.workflow_id, i.opened_at) for g in guardians.values() if g for i in [*g.recent, *g.queue]}

    async def _retry(self, call: Callable[[], Awaitable[T]], what: str, deadline_s: float = REPORT_DEADLINE_S) -> T:
        """``call()`` until it succeeds (Temporal, the worker or Envoy may be restarting)."""
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                return await asyncio.wait_for(call(), timeout=15.0)
            except (AssertionError, InvariantViolation):
                raise
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise InvariantViolation(
                        f"seed {self.seed}: {what} did not get through within {deadline_s:.0f}s: {exc!r}"
                    ) from exc
                await asyncio.sleep(0.2)


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize(reports: Sequence[RoundReport]) -> dict[str, Any]:
    """Figures over rounds: faults per kind, requests, median time to recover per fault kind."""
    recover: dict[str, list[float]] = {}
    quiesce: dict[str, list[float]] = {}
    faults: Counter[str] = Counter()
    for r in reports:
        for p in r.plan:
            faults[str(p.kind)] += 1
            quiesce.setdefault(str(p.kind), []).append(r.quiesce_s)
        for i in r.injected:
            if i.recover_s is not None:
                recover.setdefault(f"{i.kind} ({i.role}, {i.how})", []).append(i.recover_s)
        for k in r.infra:
            if k.back_s is not None:
                recover.setdefault(f"{k.kind} (back up)", []).append(k.back_s)
    ok = sum(r.requests_ok for r in reports)
    failed = sum(r.requests_failed for r in reports)
    reasons: Counter[str] = Counter()
    for r in reports:
        reasons.update(r.failure_reasons)
    return {
        "rounds": len(reports),
        "faults": dict(sorted(faults.items())),
        "failures_injected": sum(len(r.injected) for r in reports),
        "duplicate_reports": sum(len(i.reporters) for r in reports for i in r.injected),
        "worker_kills_mid_recovery": sum(
            1 for r in reports for k in r.infra if k.kind == FaultKind.KILL_WORKER and k.mid_recovery
        ),
        "requests_ok": ok,
        "requests_failed": failed,
        "failure_reasons": dict(reasons),
        "median_recover_s": {k: median(v) for k, v in sorted(recover.items())},
        "median_quiesce_s_by_fault": {k: median(v) for k, v in sorted(quiesce.items())},
        "extra_incidents": [e for r in reports for e in r.extra_incidents],
        "lingering": sorted({x for r in reports for x in r.lingering}),
        "reconcile_triggers": sum(r.reconcile_triggers for r in reports),
    }


__all__ = [
    "EXAMPLE_POLICY",
    "ChaosStack",
    "FaultKind",
    "FaultPlan",
    "InvariantViolation",
    "Nemesis",
    "RoundReport",
    "chaos_stack",
    "fleet_problems",
    "invariant_violations",
    "plan_round",
    "summarize",
]
