"""When is a zone down? Pure decisions for the zone health check (seed §4.1: ``healthCheckInterval``
times ``failoverThreshold``, 10 s x 3).

A zone check asks every node of the zone whether it is there (on the local platform and on
Kubernetes: its GPU node agent's ``/healthz``). The zone is *down* when every node that has ever
answered fails to answer now; one node answering keeps the zone up, because a single node down is
the per-instance runbooks' job, not a reason to move a whole zone. A zone none of whose nodes ever
answered is *unknown* and never failed over: no evidence is not evidence of an outage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class ZoneVerdict(StrEnum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"


def zone_verdict(node_up: Mapping[str, bool | None], nodes: Iterable[str]) -> ZoneVerdict:
    """The zone's state from its nodes' (True: answered, False: did not, None/absent: never known)."""
    known = [node_up[n] for n in nodes if node_up.get(n) is not None]
    if not known:
        return ZoneVerdict.UNKNOWN
    return ZoneVerdict.UP if any(known) else ZoneVerdict.DOWN


@dataclass
class ZoneHealthTracker:
    """Counts consecutive failed checks per zone; trips once at ``threshold`` and stays tripped
    (no second zone failover) until the zone passes a check again."""

    threshold: int
    failures: dict[str, int] = field(default_factory=dict)
    tripped: set[str] = field(default_factory=set)

    def observe(self, zone: str, verdict: ZoneVerdict, corroborated: bool = False) -> bool:
        """Record one check; True exactly when this check makes the zone count as failed.
        ``corroborated``: another signal (every instance in the zone down) agrees, so a failed
        check trips the zone at once instead of after ``threshold`` of them."""
        if verdict == ZoneVerdict.UP:
            self.failures.pop(zone, None)
            self.tripped.discard(zone)
            return False
        if verdict == ZoneVerdict.UNKNOWN:
            return False
        self.failures[zone] = self.failures.get(zone, 0) + 1
        enough = self.failures[zone] >= self.threshold or corroborated
        if enough and zone not in self.tripped:
            self.tripped.add(zone)
            return True
        return False
