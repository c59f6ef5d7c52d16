"""The budget's pure decisions (``drctl.policies.budget.decide``): per-zone and per-minute caps for
instance-level recoveries, and zone-level leases bounded only by ``maxParallelFailovers``."""

from __future__ import annotations

from datetime import UTC, datetime

from drctl.payloads import LeaseKind, LeaseRequest
from drctl.policies.budget import BudgetLimits, Decision, decide

NOW = datetime(2026, 12, 1, tzinfo=UTC)
LIMITS = BudgetLimits(max_per_minute=100, max_per_zone=2, trip_after_waiting=3, max_parallel_zone=2)


def lease(n: int, zone: str | None = "az-1", kind: LeaseKind = LeaseKind.INSTANCE, rank: int = 0) -> LeaseRequest:
    return LeaseRequest(
        holder=f"guardian-m{n}", incident=f"failover-m{n}", model=f"m{n}", instance=f"m{n}-0", zone=zone, kind=kind,
        rank=rank,
    )  # fmt: skip


def granted(requests: list[LeaseRequest]) -> list[str]:
    return [r.model for r in requests]


def test_instance_level_waits_on_the_per_zone_cap_without_blocking_another_zone() -> None:
    waiting = [lease(1), lease(2), lease(3), lease(4, zone="az-2")]
    decision = decide([], waiting, [], NOW, LIMITS, tripped=False)
    assert granted(decision.grant) == ["m1", "m2", "m4"]
    assert decision.why_waiting == {"failover-m3": "2 recoveries running in az-1 (max 2)"}
    assert decision.trip is None


def test_zone_level_leases_start_max_parallel_at_a_time_and_never_trip_the_breaker() -> None:
    waiting = [lease(n, kind=LeaseKind.ZONE) for n in range(6)]
    decision = decide([], waiting, [], NOW, LIMITS, tripped=False)
    assert granted(decision.grant) == ["m0", "m1"]
    assert decision.why_waiting is not None
    assert decision.why_waiting["failover-m2"] == "2 zone failovers running (maxParallelFailovers 2)"
    assert decision.trip is None  # four waiting > trip_after_waiting 3, but they are zone-level
    # One finishes: the next starts.
    running = [decision.grant[1]]
    again = decide(running, waiting[2:], [], NOW, LIMITS, tripped=False)
    assert granted(again.grant) == ["m2"]


def test_without_a_cap_every_zone_level_lease_starts_at_once() -> None:
    limits = BudgetLimits(max_per_minute=100, max_per_zone=2, trip_after_waiting=3, max_parallel_zone=None)
    waiting = [lease(n, kind=LeaseKind.ZONE) for n in range(6)]
    assert len(decide([], waiting, [], NOW, limits, tripped=False).grant) == 6


def test_a_tripped_breaker_still_starts_zone_level_leases_within_the_cap() -> None:
    waiting = [lease(1), *(lease(n, zone="az-2", kind=LeaseKind.ZONE) for n in (2, 3, 4))]
    decision = decide([], waiting, [], NOW, LIMITS, tripped=True)
    assert granted(decision.grant) == ["m2", "m3"]
    assert decision.why_waiting is not None
    assert decision.why_waiting["failover-m1"] == "budget tripped: waiting for a person"


def test_a_zone_failing_over_covers_the_instance_level_recoveries_in_it() -> None:
    """The prober reports a dead zone's standbys instance by instance; the zone failover reports its
    serving instances zone-level. While the zone fails over, its instance-level requests count as
    zone-level: they neither wait on the per-zone cap nor trip the breaker."""
    zone_lease = lease(0, kind=LeaseKind.ZONE)
    waiting = [lease(n) for n in range(1, 7)]
    before = decide([zone_lease], waiting, [], NOW, LIMITS, tripped=False)
    assert granted(before.grant) == ["m1", "m2"]  # without the patch: the per-zone cap
    assert before.trip is not None  # and four waiting, more than the three allowed

    covered = decide([zone_lease], waiting, [], NOW, LIMITS, tripped=False, zone_covers_zone=True)
    assert granted(covered.grant) == ["m1"]  # zone-level now: one more beside the running zone lease
    assert covered.covered == frozenset({"failover-m1"})
    assert covered.trip is None
    # Another zone's recoveries are not covered.
    elsewhere = decide([zone_lease], [lease(7, zone="az-2")], [], NOW, LIMITS, tripped=False, zone_covers_zone=True)
    assert granted(elsewhere.grant) == ["m7"] and elsewhere.covered == frozenset()


def test_zone_level_leases_waiting_for_the_cap_start_critical_models_first() -> None:
    waiting = [
        lease(1, kind=LeaseKind.ZONE, rank=1),
        lease(2, kind=LeaseKind.ZONE, rank=3),
        lease(3, kind=LeaseKind.ZONE, rank=2),
        lease(4, kind=LeaseKind.ZONE, rank=3),
    ]
    decision = decide([], waiting, [], NOW, LIMITS, tripped=False, zone_covers_zone=True)
    assert granted(decision.grant) == ["m2", "m4"]  # rank 3 first, in the order they came
    old = decide([], waiting, [], NOW, LIMITS, tripped=False)
    assert granted(old.grant) == ["m1", "m2"]  # before the patch: in the order they came


def zone_lease(zone: str, slots: int, rank: int = 0) -> LeaseRequest:
    """A zone failover's one lease for its whole zone."""
    return LeaseRequest(
        holder=f"zone-failover-{zone}", incident=f"zone-failover-{zone}", model="", zone=zone, kind=LeaseKind.ZONE,
        slots=slots, rank=rank, covers=[f"served-from-{zone}"],
    )  # fmt: skip


def test_a_zone_failovers_lease_counts_its_slots_and_a_second_zone_waits() -> None:
    limits = BudgetLimits(max_per_minute=100, max_per_zone=2, trip_after_waiting=3, max_parallel_zone=4)
    block = zone_lease("az-1", slots=4)
    # Alone: granted. The prober's report in its zone is covered (zone-level) and runs beside it,
    # in the pool of single recoveries (the zone failover's runbooks are its serving instances).
    first = decide([], [block, lease(1)], [], NOW, limits, tripped=False, zone_covers_zone=True)
    assert granted(first.grant) == ["", "m1"] and first.covered == {"failover-m1"}
    # A second zone's lease waits while the first runs (4 + 4 slots > 4).
    second = decide([block], [zone_lease("az-2", slots=4)], [], NOW, limits, tripped=False)
    assert second.grant == []
    assert second.why_waiting == {"zone-failover-az-2": "4 runbooks of zone failovers running (maxParallelFailovers 4)"}


def test_a_lease_of_more_slots_than_the_cap_starts_when_no_other_zone_failover_runs() -> None:
    big = zone_lease("az-1", slots=8)
    single = lease(9, zone="az-3", kind=LeaseKind.ZONE)
    assert granted(decide([single], [big], [], NOW, LIMITS, tripped=False).grant) == [""]
    assert decide([zone_lease("az-3", slots=1)], [big], [], NOW, LIMITS, tripped=False).grant == []


def test_a_waiting_zone_lease_is_not_overtaken_by_a_smaller_one() -> None:
    """One zone failover runs (1 of 2 slots); another zone's lease of two waits, and a third zone's
    lease of one behind it does not take the free slot (it would, again and again)."""
    running = [zone_lease("az-3", slots=1)]
    waiting = [zone_lease("az-1", slots=2), zone_lease("az-2", slots=1)]
    decision = decide(running, waiting, [], NOW, LIMITS, tripped=False)
    assert decision.grant == []
    assert decision.why_waiting is not None and set(decision.why_waiting) == {
        "zone-failover-az-1",
        "zone-failover-az-2",
    }


def test_while_a_zone_failovers_lease_runs_its_zones_single_recoveries_wait_for_it() -> None:
    """The prober's reports in a zone whose failover's lease runs wait until the lease is handed
    back (the lease recovers the serving ones; the standbys' runbooks would only take the machine
    from it); another zone's go on, and nothing trips."""
    limits = BudgetLimits(max_per_minute=100, max_per_zone=2, trip_after_waiting=3, max_parallel_zone=4)
    running = [zone_lease("az-1", slots=4)]
    waiting = [*(lease(n) for n in range(1, 7)), lease(7, zone="az-2")]
    decision = decide(running, waiting, [], NOW, limits, tripped=False, zone_covers_zone=True, zone_failover_first=True)
    assert granted(decision.grant) == ["m7"]
    assert decision.why_waiting is not None
    assert decision.why_waiting["failover-m1"] == "the failover of zone az-1 goes first (its lease is running)"
    assert decision.trip is None
    # Before the patch they ran beside the lease, in the pool of single recoveries.
    before = decide(running, waiting, [], NOW, limits, tripped=False, zone_covers_zone=True)
    assert granted(before.grant) == ["m1", "m2", "m3", "m4", "m7"]
    # Handed back: they start, up to the cap.
    after = decide([], waiting[:6], [], NOW, limits, tripped=False, zone_covers_zone=True, zone_failover_first=True)
    assert granted(after.grant) == ["m1", "m2"]  # instance-level again once the zone lease is gone


def test_a_zone_failover_still_waiting_for_its_lease_holds_nothing_back() -> None:
    limits = BudgetLimits(max_per_minute=100, max_per_zone=2, trip_after_waiting=3, max_parallel_zone=4)
    running = [zone_lease("az-3", slots=4)]
    waiting = [zone_lease("az-1", slots=4), lease(1), lease(2)]
    decision = decide(running, waiting, [], NOW, limits, tripped=False, zone_covers_zone=True, zone_failover_first=True)
    assert granted(decision.grant) == ["m1", "m2"]  # az-1's own lease waits for az-3's


def test_a_zone_that_failed_over_a_moment_ago_still_covers_the_recoveries_left_in_it() -> None:
    """Once a zone failover has handed its lease back, the reports of its zone that come after (the
    prober's of its standbys) are still the zone's: zone-level, held only to maxParallelFailovers,
    passing a tripped breaker, and never tripping it. Another zone's are held as ever."""
    limits = BudgetLimits(max_per_minute=100, max_per_zone=2, trip_after_waiting=3, max_parallel_zone=4)
    waiting = [*(lease(n) for n in range(1, 7)), lease(7, zone="az-2"), lease(8, zone="az-2"), lease(9, zone="az-2")]
    decision = decide([], waiting, [], NOW, limits, tripped=False, zone_covers_zone=True, failed_over=["az-1"])
    assert granted(decision.grant) == ["m1", "m2", "m3", "m4", "m7", "m8"]
    assert decision.covered == {f"failover-m{n}" for n in range(1, 5)}
    assert decision.trip is None  # m5, m6 wait for a slot as zone-level; only m9 waits instance-level
    tripped = decide([], waiting, [], NOW, limits, tripped=True, zone_covers_zone=True, failed_over=["az-1"])
    assert granted(tripped.grant) == ["m1", "m2", "m3", "m4"]
    # Before (no zone failed over): the per-zone cap, and the breaker trips.
    before = decide([], waiting, [], NOW, limits, tripped=False, zone_covers_zone=True)
    assert granted(before.grant) == ["m1", "m2", "m7", "m8"] and before.trip is not None


def test_while_a_zone_fails_over_a_report_of_an_instance_gone_waits_for_it_and_trips_nothing() -> None:
    """An instance the platform no longer has comes without a zone (reconciliation deleted it: the
    failing zone's standby, whose report waited). While a zone failover's lease runs, its recovery
    (which can only end already-ejected) waits for the lease, without tripping the breaker."""
    limits = BudgetLimits(max_per_minute=100, max_per_zone=2, trip_after_waiting=1, max_parallel_zone=4)
    running = [zone_lease("az-1", slots=4)]
    gone = [lease(n, zone=None) for n in range(1, 5)]
    waiting = [*gone, lease(5, zone="az-2")]

    def decided(running: list[LeaseRequest], waiting: list[LeaseRequest], gone_waits: bool) -> Decision:
        return decide(
            running, waiting, [], NOW, limits, tripped=False, zone_covers_zone=True, zone_failover_first=True,
            gone_waits=gone_waits,
        )  # fmt: skip

    decision = decided(running, waiting, gone_waits=True)
    assert granted(decision.grant) == ["m5"] and decision.trip is None
    assert decision.why_waiting is not None
    assert decision.why_waiting["failover-m1"] == "its instance is gone: the failover of zone az-1 goes first"
    # Before: granted at once, beside the lease (no zone, no zone cap).
    assert granted(decided(running, waiting, gone_waits=False).grant) == ["m1", "m2", "m3", "m4", "m5"]
    # The lease handed back: they run.
    assert granted(decided([], gone, gone_waits=True).grant) == ["m1", "m2", "m3", "m4"]
