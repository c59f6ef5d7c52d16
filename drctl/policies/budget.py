"""The blast-radius budget's decisions, pure: which waiting recoveries may start now, and when the
breaker trips to manual mode.

Every recovery of the fleet asks ``BudgetWorkflow`` for a lease before its runbook starts; the
workflow keeps the state and calls :func:`decide` whenever it changes. A request past the budget
waits in order (a cap delays a recovery, never drops it); when too many wait at once, the breaker
trips and nothing more starts until a person resets it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from drctl.payloads import LeaseKind, LeaseRequest
from drctl.policies.schema import DRPolicy

RATE_WINDOW = timedelta(minutes=1)
FAILED_OVER_COVERS_FOR = timedelta(minutes=5)
"""How long after a zone failover hands its lease back the recoveries in its zone still count as
zone-level (``decide(failed_over=...)``)."""


@dataclass(frozen=True)
class BudgetLimits:
    max_per_minute: int
    max_per_zone: int
    trip_after_waiting: int
    max_parallel_zone: int | None = None
    """Zone-level recoveries running at once (None: no cap)."""

    @classmethod
    def of(cls, policy: DRPolicy) -> BudgetLimits:
        return cls(
            max_per_minute=policy.budget.max_runbooks_per_minute,
            max_per_zone=policy.detection.max_failovers_per_zone,
            trip_after_waiting=policy.budget.trip_after_waiting,
            max_parallel_zone=policy.az_failover.max_parallel_failovers,
        )


@dataclass(frozen=True)
class Decision:
    grant: list[LeaseRequest]
    """Start these now, in this order."""
    trip: str | None = None
    """Trip the breaker with this reason (after granting ``grant``)."""
    wake_at: datetime | None = None
    """Decide again at this time even if nothing else happens (a start leaves the rate window)."""
    why_waiting: dict[str, str] | None = None
    """Incident → why it still waits."""
    covered: frozenset[str] = frozenset()
    """Incidents in ``grant`` asked at instance level and granted as zone-level (their zone is
    failing over): they run as zone-level leases from now on."""


def recent_starts(starts: Sequence[datetime], now: datetime) -> list[datetime]:
    """The starts that still count against the per-minute rate."""
    return [t for t in starts if now - t < RATE_WINDOW]


def decide(
    running: Sequence[LeaseRequest],
    waiting: Sequence[LeaseRequest],
    starts: Sequence[datetime],
    now: datetime,
    limits: BudgetLimits,
    tripped: bool,
    zone_covers_zone: bool = False,
    zone_failover_first: bool = False,
    failed_over: Collection[str] = (),
    gone_waits: bool = False,
) -> Decision:
    """Which of ``waiting`` (oldest first) start now, given those ``running`` and the ``starts`` of
    the last minute. A request that does not fit waits without blocking later ones that do (a full
    zone does not hold up another zone); a zone-level lease (an approved zone failover) is held to
    none of them, and passes the breaker: the zone-level decision was made (and approved, where the
    policy asks) already. Zone-level leases are held only to ``max_parallel_zone`` running at once:
    zone failovers' leases for their whole zone, counted in slots, and single zone-level recoveries,
    each pool on its own.

    ``zone_covers_zone``: an instance-level request in a zone that a zone-level lease is running or
    waiting in counts as zone-level too. The zone's failover covers every failure in it; without
    this, the prober's reports of the zone's standbys (which no zone failover reports: it moves
    serving instances) pile up behind the per-zone cap, trip the breaker, and wait for a person.

    ``zone_failover_first``: while a zone failover's lease runs, the single recoveries in its zone
    that have not started wait for it to be handed back. They are the prober's reports of the zone's
    instances: a serving one the zone failover recovers under its lease (its guardian runs the
    waiting incident then), and a standby whose runbook only ejects it. Beside the lease they
    compete with the zone's serving instances for the machine. (In the 1,000-instance zone outage of
    ``bench/zone_bench.py`` most came after the lease anyway, and this measured no change there.) A
    zone failover still waiting for its lease holds nothing back: its zone's recoveries start
    meanwhile, as before.

    ``failed_over``: zones whose failover has ended (handed its lease back) a short while ago. An
    instance-level request in one counts as zone-level too: the zone-level decision covers the
    failures it left behind, which come after its lease was handed back (the prober reports a
    zone's 500 instances one after another; an Alertmanager group arrives late). Without it they
    waited on the per-zone cap, and enough of them at once tripped the breaker: a person had to
    reset it before the zone's models got their standbys back.

    ``gone_waits`` (with ``zone_failover_first``): while a zone failover's lease runs, a single
    recovery of an instance the platform no longer has (its request has no zone: reconciliation
    deleted it, most likely a standby of the failing zone, whose report waited) waits for the lease
    too. Its runbook can only end ``already-ejected``; beside the lease it took the machine from the
    zone's recoveries (48 such runbooks in the 1,000-instance zone outage). It neither trips the
    breaker nor waits for one more than any of the zone's own."""
    failing_over = {r.zone for r in (*running, *waiting) if r.kind == LeaseKind.ZONE and r.zone is not None}
    if zone_covers_zone:
        failing_over |= set(failed_over)
    recovering = {r.zone for r in running if r.covers and r.zone is not None} if zone_failover_first else set()

    def gone_and_held(request: LeaseRequest) -> bool:
        return gone_waits and bool(recovering) and request.kind != LeaseKind.ZONE and request.zone is None

    def zone_level(request: LeaseRequest) -> bool:
        return request.kind == LeaseKind.ZONE or (zone_covers_zone and request.zone in failing_over)

    def _covered(granted: list[LeaseRequest]) -> frozenset[str]:
        return frozenset(g.incident for g in granted if g.kind != LeaseKind.ZONE and zone_level(g))

    # Two pools, each held to the cap on its own, keyed by "is a zone failover's lease": those
    # leases (one per zone, counted in slots) and single zone-level recoveries (a zone's reports of
    # old, and the prober's reports in a zone failing over, which a zone failover's lease covers but
    # does not run: its standbys). A single recovery is one slot.
    in_use = {True: 0, False: 0}
    for r in running:
        if zone_level(r):
            in_use[bool(r.covers)] += r.slots
    held = {True: False, False: False}
    grant: list[LeaseRequest] = []
    why: dict[str, str] = {}

    def grant_zone_level(request: LeaseRequest) -> bool:
        """Grant it if it fits under ``max_parallel_zone`` in its pool; True when granted. A zone
        failover's lease is counted in slots and fits when no other zone failover's runs (a lease of
        more slots than the cap runs alone). In each pool requests start in order: once one does not
        fit, later ones wait behind it (a zone's lease is not overtaken by single slots)."""
        cap = limits.max_parallel_zone
        pool = bool(request.covers)
        used = in_use[pool]
        if not pool and request.zone in recovering:
            why[request.incident] = f"the failover of zone {request.zone} goes first (its lease is running)"
            return False
        if held[pool] or (cap is not None and used > 0 and used + request.slots > cap):
            running_what = "runbooks of zone failovers" if pool else "zone failovers"
            why[request.incident] = f"{used} {running_what} running (maxParallelFailovers {cap})"
            held[pool] = True
            return False
        grant.append(request)
        in_use[pool] += request.slots
        return True

    if zone_covers_zone:
        # Zone-level first, critical models first (a zone's reports arrive side by side, not in order).
        first = sorted((w for w in waiting if zone_level(w)), key=lambda w: -w.rank)
        waiting = [*first, *(w for w in waiting if not zone_level(w))]
    if tripped:
        for request in waiting:
            if zone_level(request):
                grant_zone_level(request)
            else:
                why[request.incident] = "budget tripped: waiting for a person"
        return Decision(grant=grant, why_waiting=why, covered=_covered(grant))
    in_window = sorted(recent_starts(starts, now))
    per_zone = Counter(r.zone for r in running if r.zone is not None and not zone_level(r))
    for request in waiting:
        if zone_level(request):
            if grant_zone_level(request):
                in_window.append(now)
            continue
        if gone_and_held(request):
            zones = ", ".join(sorted(recovering))
            why[request.incident] = f"its instance is gone: the failover of zone {zones} goes first"
            continue
        if len(in_window) >= limits.max_per_minute:
            why[request.incident] = (
                f"{len(in_window)} runbooks started in the last minute (max {limits.max_per_minute})"
            )
            continue
        if request.zone is not None and per_zone[request.zone] >= limits.max_per_zone:
            why[request.incident] = (
                f"{per_zone[request.zone]} recoveries running in {request.zone} (max {limits.max_per_zone})"
            )
            continue
        grant.append(request)
        in_window.append(now)
        if request.zone is not None:
            per_zone[request.zone] += 1
    still_waiting = sum(1 for w in waiting if not zone_level(w) and not gone_and_held(w)) - sum(
        1 for g in grant if not zone_level(g)
    )
    trip = None
    if still_waiting > limits.trip_after_waiting:
        trip = (
            f"{still_waiting} recoveries waiting for the budget (more than {limits.trip_after_waiting}): "
            "that many failures at once needs a person"
        )
    wake_at = None
    rate_limited = any("last minute" in reason for reason in why.values())
    if rate_limited and in_window:
        wake_at = min(in_window) + RATE_WINDOW
    return Decision(grant=grant, trip=trip, wake_at=wake_at, why_waiting=why, covered=_covered(grant))
