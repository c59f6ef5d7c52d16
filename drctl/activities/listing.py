"""A model's instances as a runbook decides from them: the platform's listing and the policy's
serving zones, shared by the runbook's own ``list_instances`` step and the guardian's epoch claim
(which lists right after claiming, so the runbook it starts has its decision input in its start)."""

from __future__ import annotations

import time

from temporalio import activity

from drctl.payloads import InstanceList
from drctl.platforms.base import Platform
from drctl.policies.loader import PolicyError
from drctl.policies.placement import serving_zones

POLICY_TTL_S = 5.0
"""How long a listing reuses the policy's serving zones before reading the policy again."""


class ModelListing:
    """Lists one model's instances on a platform, with the policy's serving zones re-read at most
    every :data:`POLICY_TTL_S` seconds."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._zones_cache: tuple[float, frozenset[str]] | None = None

    async def __call__(self, model: str) -> InstanceList:
        start = time.monotonic()
        instances = await self.platform.list_instances(model)
        zones = await self.serving_zones()
        return InstanceList(
            model=model,
            instances=instances,
            duration_ms=round((time.monotonic() - start) * 1000, 1),
            serving_zones=sorted(zones),
        )

    async def serving_zones(self) -> frozenset[str]:
        """The policy's zones for serving, re-read at most every few seconds (the local platform
        parses the policy file: tens of milliseconds at 500 models, on every failover's path
        otherwise); none (every zone alike) when the policy does not read now (a local policy file
        mid-edit): that must not fail a failover."""
        now = time.monotonic()
        if self._zones_cache is not None and now - self._zones_cache[0] < POLICY_TTL_S:
            return self._zones_cache[1]
        try:
            zones = serving_zones(await self.platform.current_policy())
        except PolicyError as err:
            activity.logger.warning("listing without the policy's active zones: %s", err)
            return frozenset()
        self._zones_cache = (now, zones)
        return zones
