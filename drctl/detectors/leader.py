"""Leader election through a ``coordination.k8s.io/v1`` Lease, so that of several Kubernetes
watcher replicas exactly one acts (reports failures, starts zone failovers) while the others watch
and stand by, ready to take over.

The algorithm is client-go's ``leaderelection`` with a Lease lock:

- every ``retry_period`` each candidate reads the Lease. Absent: it creates it, holding it. Held
  by another candidate: it waits until the Lease's record (holder, renew time, transitions) has not
  changed for ``leaseDurationSeconds`` *as measured on its own clock since it last saw it change*,
  so no two machines' clocks are ever compared; then it takes the Lease over (a new
  ``acquireTime``, ``leaseTransitions`` + 1).
- the holder renews (``renewTime``) every ``retry_period``. Every write carries the
  ``resourceVersion`` it read (a merge patch with ``metadata.resourceVersion`` is refused with 409 if
  the Lease changed meanwhile), so of two candidates racing for an expired Lease one wins.
- the holder stops leading when it sees another holder, or when no renewal has succeeded for
  ``renew_deadline`` (API server unreachable, 409s): ``renew_deadline < lease_duration``, so it has
  stopped acting before any standby may take over. ``leading()`` is checked at the moment of every
  action, not only when the loop runs.
- a candidate that stops cleanly releases the Lease (empty holder): a standby takes over at its
  next retry instead of after the expiry.

Defaults are client-go's: lease 15 s, renew deadline 10 s, retry every 2 s: a dead leader is
replaced within about 15-17 s.

RBAC: ``get``, ``create`` and ``patch`` on ``leases`` in the watcher's namespace (``LEASE_VERBS``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("drctl.leader")

LEASE_GROUP = "coordination.k8s.io"
LEASE_VERBS = {(LEASE_GROUP, "leases"): frozenset({"get", "create", "patch"})}
"""The (API group, resource) → verbs this module calls; RBAC must grant them."""
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class LeaseTimings:
    lease_duration_s: int = 15
    """``leaseDurationSeconds`` written into the Lease (whole seconds: the API's type)."""
    renew_deadline_s: float = 10.0
    """The holder stops leading when no renewal succeeded for this long."""
    retry_period_s: float = 2.0
    """How often every candidate tries to acquire or renew."""

    def __post_init__(self) -> None:
        if self.lease_duration_s < 1:
            raise ValueError("lease_duration_s must be at least 1 (whole seconds)")
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("need 0 < retry_period_s < renew_deadline_s < lease_duration_s")


@dataclass(frozen=True)
class LeaseRecord:
    """What the Lease says (its spec and resourceVersion)."""

    holder: str = ""
    """``holderIdentity``; empty when released."""
    duration_s: int = 15
    acquired_at: datetime | None = None
    renewed_at: datetime | None = None
    transitions: int = 0
    version: str | None = None

    @property
    def key(self) -> tuple[str, datetime | None, int]:
        """What changes on every renewal or takeover (the resourceVersion may change for other reasons)."""
        return (self.holder, self.renewed_at, self.transitions)


# -- decisions, pure ---------------------------------------------------------------------------


def expired(record: LeaseRecord, observed_at: float, now: float) -> bool:
    """Free to take: released, or unchanged for its duration since this candidate saw it change."""
    return not record.holder or now >= observed_at + record.duration_s


def next_record(record: LeaseRecord | None, me: str, duration_s: int, wall: datetime) -> LeaseRecord:
    """The record ``me`` writes to acquire (a new term) or renew (the same term) the Lease."""
    if record is not None and record.holder == me:
        return LeaseRecord(me, duration_s, record.acquired_at or wall, wall, record.transitions, record.version)
    transitions = 0 if record is None else record.transitions + 1  # a new term (client-go counts so too)
    return LeaseRecord(me, duration_s, wall, wall, transitions, None if record is None else record.version)


def micro_time(at: datetime | None) -> str | None:
    """A ``MicroTime`` as the API server writes it."""
    return None if at is None else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_record(lease: Any) -> LeaseRecord:
    """A ``V1Lease`` as a record."""
    spec = lease.spec
    meta = lease.metadata
    return LeaseRecord(
        holder=(spec.holder_identity if spec else None) or "",
        duration_s=int((spec.lease_duration_seconds if spec else None) or 15),
        acquired_at=spec.acquire_time if spec else None,
        renewed_at=spec.renew_time if spec else None,
        transitions=int((spec.lease_transitions if spec else None) or 0),
        version=meta.resource_version if meta else None,
    )


def lease_body(name: str, record: LeaseRecord) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if record.version is not None:
        meta["resourceVersion"] = record.version  # the precondition: 409 if the Lease changed since
    return {
        "apiVersion": f"{LEASE_GROUP}/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": record.holder,
            "leaseDurationSeconds": record.duration_s,
            "acquireTime": micro_time(record.acquired_at),
            "renewTime": micro_time(record.renewed_at),
            "leaseTransitions": record.transitions,
        },
    }


# -- the elector ---------------------------------------------------------------------------------


@dataclass
class LeaderElector:
    """One candidate. ``coordination`` is a ``kubernetes.client.CoordinationV1Api``."""

    coordination: Any
    namespace: str
    name: str
    identity: str
    timings: LeaseTimings = field(default_factory=LeaseTimings)
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], datetime] = lambda: datetime.now(UTC)
    release_on_stop: bool = True
    """Give the Lease up when stopped cleanly (client-go's ``ReleaseOnCancel``)."""
    changes: list[tuple[float, bool]] = field(default_factory=list)
    """(when, leading) at every change of leadership, for logs and tests."""
    errors: int = 0

    def __post_init__(self) -> None:
        self._leader = False
        self._renewed_at = float("-inf")
        """Local time at which the last successful acquire or renew was *sent* (conservative)."""
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0

    def leading(self) -> bool:
        """Whether to act now: holding the Lease, renewed within the renew deadline."""
        return self._leader and self.clock() < self._renewed_at + self.timings.renew_deadline_s

    @property
    def holder(self) -> str | None:
        """The holder last seen in the Lease (None before the first read)."""
        return None if self._observed is None else self._observed.holder

    def _observe(self, record: LeaseRecord, now: float) -> None:
        if self._observed is None or record.key != self._observed.key:
            self._observed_at = now
        self._observed = record

    def _set_leading(self, leading: bool, why: str) -> None:
        if leading != self._leader:
            self._leader = leading
            self.changes.append((self.clock(), leading))
            if leading:
                log.info("%s: leading (lease %s/%s): %s", self.identity, self.namespace, self.name, why)
            else:
                log.warning("%s: no longer leading (lease %s/%s): %s", self.identity, self.namespace, self.name, why)

    async def _read(self) -> LeaseRecord | None:
        from kubernetes.client.exceptions import ApiException

        try:
            lease = await asyncio.to_thread(self.coordination.read_namespaced_lease, self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return lease_record(lease)

    async def _write(self, record: LeaseRecord, create: bool) -> LeaseRecord | None:
        """Create or patch the Lease: what it says now, or None when another candidate got there
        first (409)."""
        from kubernetes.client.exceptions import ApiException

        body = lease_body(self.name, record)
        try:
            if create:
                written = await asyncio.to_thread(self.coordination.create_namespaced_lease, self.namespace, body)
            else:
                written = await asyncio.to_thread(
                    self.coordination.patch_namespaced_lease,
                    self.name,
                    self.namespace,
                    body,
                    _content_type=MERGE_PATCH,
                )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise
        return lease_record(written)

    async def try_acquire_or_renew(self) -> bool:
        """One round: True when this candidate holds the Lease now (acquired or renewed)."""
        started = self.clock()
        record = await self._read()
        now = self.clock()
        if record is not None:
            self._observe(record, now)
            if record.holder != self.identity and not expired(record, self._observed_at, now):
                if self._leader:
                    self._set_leading(False, f"the lease is held by {record.holder}")
                return False
        mine = next_record(record, self.identity, self.timings.lease_duration_s, self.wall())
        written = await self._write(mine, create=record is None)
        if written is None:
            return False
        self._renewed_at = started
        self._observe(written, self.clock())
        renewing = record is not None and record.holder == self.identity
        self._set_leading(True, "renewed" if renewing else f"acquired (term {mine.transitions})")
        return True

    async def step(self) -> None:
        """One round, errors included: past the renew deadline without a renewal, leadership is lost."""
        try:
            await self.try_acquire_or_renew()
        except Exception as exc:
            self.errors += 1
            why = f"HTTP {exc.status} {exc.reason}" if hasattr(exc, "status") and hasattr(exc, "reason") else exc
            log.warning("%s: lease %s/%s: %s", self.identity, self.namespace, self.name, why)
        if self._leader and not self.leading():
            self._set_leading(False, f"not renewed for {self.timings.renew_deadline_s}s")

    async def run(self, stop: asyncio.Event) -> None:
        """Try every ``retry_period`` until ``stop``; then release the Lease if held (and
        ``release_on_stop``)."""
        try:
            while not stop.is_set():
                await self.step()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.timings.retry_period_s)
                except TimeoutError:
                    pass
        finally:
            if self.release_on_stop:
                await self.release()

    async def release(self) -> None:
        """Give the Lease up (empty holder) so a standby takes over at once; best effort."""
        if not self._leader or self._observed is None:
            return
        self._set_leading(False, "released")
        gone = LeaseRecord("", 1, None, None, self._observed.transitions, self._observed.version)
        try:
            await self._write(gone, create=False)
        except Exception as exc:
            log.warning("%s: could not release lease %s/%s: %s", self.identity, self.namespace, self.name, exc)
