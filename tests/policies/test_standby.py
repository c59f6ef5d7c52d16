"""Pure runbook decisions: promotion order and the last-instance safety rule."""

from __future__ import annotations

import pytest

from drctl.payloads import Instance, Role
from drctl.policies.standby import FailoverPlan, hot_switch, must_defer_eject, plan_failover, standby_candidates


def fleet(*roles: Role) -> list[Instance]:
    return [Instance(id=f"m-{n}", model="m", role=role) for n, role in enumerate(roles)]


def test_candidates_hot_then_warm_then_cold_excluding_failed_and_serving() -> None:
    instances = fleet(Role.SERVING, Role.COLD, Role.WARM, Role.FAILED, Role.HOT, Role.HOT)
    assert [c.id for c in standby_candidates(instances, "m-0")] == ["m-4", "m-5", "m-2", "m-1"]


def test_failed_instance_is_never_its_own_candidate() -> None:
    instances = fleet(Role.HOT, Role.HOT)
    assert [c.id for c in standby_candidates(instances, "m-0")] == ["m-1"]


def test_last_serving_instance_is_ejected_only_after_replacement() -> None:
    assert must_defer_eject(fleet(Role.SERVING, Role.HOT), "m-0")
    assert not must_defer_eject(fleet(Role.SERVING, Role.SERVING, Role.HOT), "m-0")
    # A failed standby is not serving anything: eject at once.
    assert not must_defer_eject(fleet(Role.SERVING, Role.HOT), "m-1")
    assert not must_defer_eject(fleet(Role.SERVING), "m-9")


def test_plan_depends_on_the_role_of_the_failed_instance() -> None:
    instances = fleet(Role.SERVING, Role.HOT, Role.WARM, Role.FAILED, Role.PROMOTING)
    assert plan_failover(instances, "m-0") == FailoverPlan.REPLACE
    assert plan_failover(instances, "m-1") == FailoverPlan.EJECT_ONLY
    assert plan_failover(instances, "m-2") == FailoverPlan.EJECT_ONLY
    assert plan_failover(instances, "m-3") == FailoverPlan.NOTHING
    assert plan_failover(instances, "m-4") == FailoverPlan.EJECT_ONLY
    assert plan_failover(instances, "m-9") == FailoverPlan.NOTHING


def test_within_a_tier_standbys_away_from_the_failed_node_and_zone_come_first() -> None:
    def at(n: int, role: Role, node: str, zone: str) -> Instance:
        return Instance(id=f"m-{n}", model="m", role=role, node=node, zone=zone)

    instances = [
        at(0, Role.SERVING, "node-a", "az-1"),
        at(1, Role.HOT, "node-a", "az-1"),  # same node: likely down with it
        at(2, Role.HOT, "node-b", "az-1"),  # same zone, other node
        at(3, Role.HOT, "node-c", "az-2"),
        at(4, Role.WARM, "node-c", "az-2"),  # a warm standby still comes after every hot one
    ]
    assert [c.id for c in standby_candidates(instances, "m-0")] == ["m-3", "m-2", "m-1", "m-4"]


def test_a_preferred_zone_goes_first_within_a_tier() -> None:
    instances = [
        Instance(id="m-0", model="m", role=Role.SERVING, node="n0", zone="az-1"),
        Instance(id="m-1", model="m", role=Role.HOT, node="n1", zone="az-2"),
        Instance(id="m-2", model="m", role=Role.HOT, node="n2", zone="az-3"),
        Instance(id="m-3", model="m", role=Role.WARM, node="n2", zone="az-3"),
    ]
    assert [c.id for c in standby_candidates(instances, "m-0")] == ["m-1", "m-2", "m-3"]
    assert [c.id for c in standby_candidates(instances, "m-0", prefer_zone="az-3")] == ["m-2", "m-1", "m-3"]


def test_an_active_zone_goes_first_within_a_tier_after_the_failed_node() -> None:
    """Active-passive (az-1, az-2 active, az-3 standby): an ordinary failover keeps serving in the
    active zones; a hot standby still beats a warm one, and the failed node still goes last."""

    def at(n: int, role: Role, node: str, zone: str) -> Instance:
        return Instance(id=f"m-{n}", model="m", role=role, node=node, zone=zone)

    active = ["az-1", "az-2"]
    instances = [
        at(0, Role.SERVING, "n1", "az-1"),
        at(1, Role.HOT, "n3", "az-3"),  # the standby zone: first by the old order (away from az-1)
        at(2, Role.HOT, "n4", "az-1"),  # the failed zone, another node: still active
        at(3, Role.HOT, "n1", "az-1"),  # the failed node: likely down with it, last of the hot ones
        at(4, Role.HOT, "n2", "az-2"),  # active, away from the failed zone: first
        at(5, Role.WARM, "n2", "az-2"),  # a warm standby in an active zone after every hot one
        at(6, Role.WARM, "n3", "az-3"),
    ]
    assert [c.id for c in standby_candidates(instances, "m-0")] == ["m-1", "m-4", "m-2", "m-3", "m-5", "m-6"]
    assert [c.id for c in standby_candidates(instances, "m-0", active_zones=active)] == [
        "m-4", "m-2", "m-1", "m-3", "m-5", "m-6",
    ]  # fmt: skip


def test_a_hot_standby_in_the_standby_zone_beats_a_warm_one_in_an_active_zone() -> None:
    instances = [
        Instance(id="m-0", model="m", role=Role.SERVING, node="n0", zone="az-2"),
        Instance(id="m-1", model="m", role=Role.WARM, node="n1", zone="az-1"),
        Instance(id="m-2", model="m", role=Role.HOT, node="n2", zone="az-3"),
    ]
    order = standby_candidates(instances, "m-0", active_zones={"az-1", "az-2"})
    assert [c.id for c in order] == ["m-2", "m-1"]


def test_a_zone_failover_orders_as_before_and_no_active_zones_change_nothing() -> None:
    instances = [
        Instance(id="m-0", model="m", role=Role.SERVING, node="n0", zone="az-1"),
        Instance(id="m-1", model="m", role=Role.HOT, node="n1", zone="az-3"),
        Instance(id="m-2", model="m", role=Role.HOT, node="n2", zone="az-2"),
        Instance(id="m-3", model="m", role=Role.HOT, node="n3", zone="az-3"),
    ]
    # The preferred (standby) zone goes before the active zones when both are given.
    zone_failover = standby_candidates(instances, "m-0", prefer_zone="az-3", active_zones=["az-1", "az-2"])
    assert [c.id for c in zone_failover] == ["m-1", "m-3", "m-2"]
    assert [c.id for c in standby_candidates(instances, "m-0", prefer_zone="az-3")] == ["m-1", "m-3", "m-2"]
    assert standby_candidates(instances, "m-0", active_zones=()) == standby_candidates(instances, "m-0")


def _in(iid: str, role: Role, zone: str | None, node: str = "n") -> Instance:
    return Instance(id=iid, model="m", role=role, zone=zone, node=f"{node}-{zone}")


@pytest.mark.parametrize(
    ("instances", "expected"),
    [
        # The plain case: the serving instance's hot standby, out of the failed zone.
        ([_in("m-0", Role.SERVING, "az-1"), _in("m-1", Role.HOT, "az-2")], "m-1"),
        # The runbook's first choice is what the batch takes: the standby zone's hot standby.
        ([_in("m-0", Role.SERVING, "az-1"), _in("m-1", Role.HOT, "az-2"), _in("m-2", Role.HOT, "az-3")], "m-2"),
        # A warm standby only: loading is the runbook's (its guardian's).
        ([_in("m-0", Role.SERVING, "az-1"), _in("m-1", Role.WARM, "az-2")], None),
        # The only hot standby is in the failed zone: down with it, the runbook tries the next.
        ([_in("m-0", Role.SERVING, "az-1"), _in("m-1", Role.HOT, "az-1"), _in("m-2", Role.WARM, "az-2")], None),
        # A hot standby whose zone is not known cannot be said to be out of the failed one.
        ([_in("m-0", Role.SERVING, "az-1"), _in("m-1", Role.HOT, None)], None),
        # Something of the model is mid-promotion: an earlier runbook's, the guardian's to finish.
        ([_in("m-0", Role.SERVING, "az-1"), _in("m-1", Role.HOT, "az-2"), _in("m-2", Role.PROMOTING, "az-2")], None),
        # Not serving (already failed and ejected): nothing to switch.
        ([_in("m-0", Role.FAILED, "az-1"), _in("m-1", Role.HOT, "az-2")], None),
        # No standby at all: an emergency instance, the runbook's.
        ([_in("m-0", Role.SERVING, "az-1")], None),
    ],
)
def test_a_zone_failover_batches_only_the_plain_switch_to_a_hot_standby_out_of_the_zone(
    instances: list[Instance], expected: str | None
) -> None:
    chosen = hot_switch(instances, "m-0", "az-1", prefer_zone="az-3")
    assert (chosen.id if chosen else None) == expected
