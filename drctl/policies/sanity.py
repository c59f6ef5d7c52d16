"""What a policy that validates may still get wrong: the checks ``drctl policy validate`` warns
about (pure). Each is legal by the schema — a pool grows, a zone is added later — but most likely a
mistake in the file at hand, so it is said before any stack runs the policy."""

from __future__ import annotations

from datetime import timedelta

from drctl.policies.reconcile import plan_reconcile
from drctl.policies.schema import DRPolicy

SHORTEST_RECONCILE = timedelta(seconds=1)
"""A reconcile schedule more often than this runs pass after pass for nothing (passes are serialized
and each observes the whole fleet)."""
LISTED = 5
"""Instances that do not fit, named one by one before "... and N more"."""


def policy_warnings(policy: DRPolicy) -> list[str]:
    """Every warning, each naming the field it is about."""
    warnings: list[str] = []
    node_zones = {node.zone for node in policy.gpu_pool.nodes}
    failover = policy.az_failover
    for zone in failover.active_zones:
        if zone not in node_zones:
            warnings.append(
                f"az_failover.activeZones: {zone} has no node in gpuPool.nodes "
                f"(zones with nodes: {', '.join(sorted(node_zones)) or 'none'}): nothing serves or is checked there"
            )
    standby = failover.standby_zone
    if standby is not None and standby in failover.active_zones:
        warnings.append(
            f"az_failover.standbyZone: {standby} is also an active zone; a zone failover of it would "
            "move serving to the zone that failed"
        )
    elif standby is not None and standby not in node_zones:
        warnings.append(f"az_failover.standbyZone: {standby} has no node in gpuPool.nodes: no standby can go there")
    if policy.reconcile.interval < SHORTEST_RECONCILE:
        warnings.append(
            f"reconcile.interval: {policy.reconcile.interval.total_seconds() * 1000:g} ms is less than "
            f"{SHORTEST_RECONCILE.total_seconds():g} s: pass after pass over the whole fleet for nothing"
        )
    unplaceable = plan_reconcile(policy, []).unplaceable
    if unplaceable:
        named = [line.split(": ", 1)[0] for line in unplaceable]  # "m-2 (hot): why" -> "m-2 (hot)"
        more = f", ... and {len(named) - LISTED} more" if len(named) > LISTED else ""
        why = unplaceable[0].split(": ", 1)[-1]
        warnings.append(
            f"gpuPool: {len(unplaceable)} instance(s) the models ask for do not fit an empty pool: "
            f"{', '.join(named[:LISTED])}{more} (the first: {why})"
        )
    return warnings
