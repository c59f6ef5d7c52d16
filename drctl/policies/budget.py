"""The blast-radius budget's decisions, pure: which waiting recoveries may start now, and when the
breaker trips to manual mode.

Every recovery of the fleet asks ``BudgetWorkflow`` for a lease before its runbook starts; the
workflow keeps the state and calls :func:`decide` whenever it changes. A request past the budget
waits in order (a cap delays a recovery, never drops it); when too many wait at once, the breaker
trips and nothing more starts until a person resets it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from drctl.payloads import LeaseKind, LeaseRequest
from drctl.policies.schema import DRPolicy

RATE_WINDOW = timedelta(minutes=1)


@dataclass(frozen=True)
class BudgetLimits:
    max_per_minute: int
    max_per_zone: int
    trip_after_waiting: int

    @classmethod
    def of(cls, policy: DRPolicy) -> BudgetLimits:
        return cls(
            max_per_minute=policy.budget.max_runbooks_per_minute,
            max_per_zone=policy.detection.max_failovers_per_zone,
            trip_after_waiting=policy.budget.trip_after_waiting,
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
) -> Decision:
    """Which of ``waiting`` (oldest first) start now, given those ``running`` and the ``starts`` of
    the last minute. A request that does not fit waits without blocking later ones that do (a full
    zone does not hold up another zone); a zone-level lease (an approved zone failover) is held to
    none of them: the zone-level decision was made (and approved, where the policy asks) already."""
    if tripped:
        zone_level = [w for w in waiting if w.kind == LeaseKind.ZONE]
        return Decision(
            grant=zone_level,
            why_waiting={w.incident: "budget tripped: waiting for a person" for w in waiting if w not in zone_level},
        )
    in_window = sorted(recent_starts(starts, now))
    per_zone = Counter(r.zone for r in running if r.zone is not None and r.kind == LeaseKind.INSTANCE)
    grant: list[LeaseRequest] = []
    why: dict[str, str] = {}
    for request in waiting:
        if request.kind == LeaseKind.ZONE:
            grant.append(request)
            in_window.append(now)
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
    still_waiting = len(waiting) - len(grant)
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
    return Decision(grant=grant, trip=trip, wake_at=wake_at, why_waiting=why)
