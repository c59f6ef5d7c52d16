"""Pure decisions of the failover runbook: which standby to promote, and when ejecting is safe."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from drctl.payloads import Instance, Role

TIER_ORDER: tuple[Role, ...] = (Role.HOT, Role.WARM, Role.COLD)
"""Promotion order (seed §4.1): hot takes over in < 1 s, warm in seconds, cold in minutes."""


def standby_candidates(
    instances: Sequence[Instance], failed_instance: str, prefer_zone: str | None = None
) -> list[Instance]:
    """Standbys to try, best first: hot, then warm, then cold. Within a tier, standbys away from the
    failed instance's node come first, then those outside its zone: when the node (or zone) is what
    failed, a standby there is likely down with it. ``prefer_zone`` (a zone failover: the policy's
    standby zone) goes before that. Stable by id after that."""
    rank = {role: i for i, role in enumerate(TIER_ORDER)}
    failed = next((i for i in instances if i.id == failed_instance), None)
    node = failed.node if failed else None
    zone = failed.zone if failed else None
    standbys = [i for i in instances if i.id != failed_instance and i.role in rank]

    def key(i: Instance) -> tuple[int, bool, bool, bool, int, str]:
        elsewhere = prefer_zone is not None and i.zone != prefer_zone
        same_node = node is not None and i.node == node
        same_zone = zone is not None and i.zone == zone
        return (rank[i.role], elsewhere, same_node, same_zone, len(i.id), i.id)

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
