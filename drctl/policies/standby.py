"""Pure decisions of the failover runbook: which standby to promote, and when ejecting is safe."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from enum import StrEnum

from drctl.payloads import Instance, Role

TIER_ORDER: tuple[Role, ...] = (Role.HOT, Role.WARM, Role.COLD)
"""Promotion order (seed §4.1): hot takes over in < 1 s, warm in seconds, cold in minutes."""


def standby_candidates(
    instances: Sequence[Instance],
    failed_instance: str,
    prefer_zone: str | None = None,
    active_zones: Collection[str] = (),
) -> list[Instance]:
    """Standbys to try, best first. The keys, in order:

    1. the tier: hot, then warm, then cold. A hot standby anywhere beats a warm one in a better
       zone: it takes over in under a second, a warm one in seconds (RTO first);
    2. in ``prefer_zone`` (a zone failover: the policy's standby zone);
    3. away from the failed instance's node: when the node is what failed, a standby there is down
       with it, and trying it costs the run a hot check (3 s) or a hung load before the next one;
    4. in ``active_zones`` (an ordinary failover in an active-passive policy: its active zones,
       :func:`drctl.policies.placement.serving_zones`): the promoted standby serves from then on,
       and serving outside the active zones is outside every zone check (reconcile reports it).
       After the node, as in placement, where anti-affinity (``protects``) ranks before the zone
       roles: a standby on the failed node is rare (placement keeps a model's instances on separate
       nodes while another fits), and trying one first is what made node-down drills slow;
    5. away from the failed instance's zone (when the zone is what failed, a standby there is
       likely down with it). After the active zones: an ordinary failover is not a zone failure
       (that is ``ZoneFailoverWorkflow``, which sets ``prefer_zone``), and within the active zones
       another zone than the failed one still goes first;
    6. stable by id.

    With no ``active_zones`` (not active-passive, or a zone failover) every zone is alike for key
    4: the order is the one from before ``active_zones`` existed."""
    rank = {role: i for i, role in enumerate(TIER_ORDER)}
    active = frozenset(active_zones)
    failed = next((i for i in instances if i.id == failed_instance), None)
    node = failed.node if failed else None
    zone = failed.zone if failed else None
    standbys = [i for i in instances if i.id != failed_instance and i.role in rank]

    def key(i: Instance) -> tuple[int, bool, bool, bool, bool, int, str]:
        elsewhere = prefer_zone is not None and i.zone != prefer_zone
        same_node = node is not None and i.node == node
        outside_active = bool(active) and i.zone not in active
        same_zone = zone is not None and i.zone == zone
        return (rank[i.role], elsewhere, same_node, outside_active, same_zone, len(i.id), i.id)

    return sorted(standbys, key=key)


def serving_others(instances: Sequence[Instance], failed_instance: str) -> list[Instance]:
    """Instances of the model other than the failed one that serve traffic now."""
    return [i for i in instances if i.id != failed_instance and i.role == Role.SERVING]


def must_defer_eject(instances: Sequence[Instance], failed_instance: str) -> bool:
    """The last serving instance of a model is not ejected before a replacement serves.

    Ejecting it first would leave the model with nothing registered at priority 0 for the whole
    promotion; deferring costs nothing (Envoy's health check already steers traffic away from a
    dead endpoint) and protects against a wrong confirmation of a half-alive instance.
    """
    failed = next((i for i in instances if i.id == failed_instance), None)
    if failed is None or failed.role != Role.SERVING:
        return False
    return not serving_others(instances, failed_instance)


class FailoverPlan(StrEnum):
    """What a confirmed failure of one instance calls for."""

    REPLACE = "replace"
    """A serving instance: promote a standby in its place."""
    EJECT_ONLY = "eject-only"
    """A standby (or one mid-promotion): take it out; promoting another would add a server."""
    NOTHING = "nothing"
    """Already failed and ejected by an earlier run."""


def plan_failover(instances: Sequence[Instance], failed_instance: str) -> FailoverPlan:
    failed = next((i for i in instances if i.id == failed_instance), None)
    if failed is None or failed.role == Role.FAILED:
        return FailoverPlan.NOTHING
    if failed.role == Role.SERVING:
        return FailoverPlan.REPLACE
    return FailoverPlan.EJECT_ONLY


def hot_switch(
    instances: Sequence[Instance], failed_instance: str, failed_zone: str, prefer_zone: str | None = None
) -> Instance | None:
    """The hot standby a zone failover switches ``failed_instance`` to in its batch, or None when
    this recovery needs the model's own runbook (its guardian). Only the plain case is batched: the
    failed instance serves, nothing of the model is mid-promotion, and the runbook's first choice
    (:func:`standby_candidates`, the zone failover's order) is a hot standby known to be outside
    ``failed_zone``. Anything else (a warm or cold standby to load, no standby, a standby in the
    failed zone) goes through the runbook, which tries standby after standby."""
    if plan_failover(instances, failed_instance) != FailoverPlan.REPLACE:
        return None
    if any(i.role == Role.PROMOTING for i in instances):
        return None
    candidates = standby_candidates(instances, failed_instance, prefer_zone)
    first = candidates[0] if candidates else None
    if first is None or first.role != Role.HOT or first.zone is None or first.zone == failed_zone:
        return None
    return first
