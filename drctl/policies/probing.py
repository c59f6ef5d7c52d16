"""The health prober's decisions, pure: hysteresis and flap hold-down. (Caps on how many recoveries
run at once are the fleet budget's, :mod:`drctl.policies.budget`, shared by every trigger.)

``ProbeTracker.observe`` takes one probe result per call and says what changed. An instance goes
down after ``unhealthy_threshold`` failures in a row (or at once when its process exited), up
after ``healthy_threshold`` successes; an instance that went down ``flap_limit`` times within
``flap_window`` is *held* for ``hold_down`` and reported, not failed over again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from drctl.policies.schema import DetectionPolicy


class ProbeEvent(StrEnum):
    DOWN = "down"
    """Confirmed down: start the failover runbook."""
    UP = "up"
    FLAPPING = "flapping"
    """Down again too often: held out and reported instead of failed over."""


@dataclass
class ProbeTracker:
    policy: DetectionPolicy
    up: bool = True
    failures: int = 0
    successes: int = 0
    first_failure_at: float | None = None
    downs: list[float] = field(default_factory=list)
    held_until: float | None = None

    def held(self, now: float) -> bool:
        return self.held_until is not None and now < self.held_until

    def observe(self, ok: bool, now: float, exited: bool = False) -> ProbeEvent | None:
        if ok:
            self.failures, self.first_failure_at = 0, None
            self.successes += 1
            if not self.up and self.successes >= self.policy.healthy_threshold:
                self.up = True
                return ProbeEvent.UP
            return None
        self.successes = 0
        self.failures += 1
        if self.first_failure_at is None:
            self.first_failure_at = now
        if not self.up or (self.failures < self.policy.unhealthy_threshold and not exited):
            return None
        self.up = False
        window = self.policy.flap_window.total_seconds()
        self.downs = [t for t in self.downs if now - t <= window] + [now]
        if len(self.downs) >= self.policy.flap_limit or self.held(now):
            self.held_until = now + self.policy.hold_down.total_seconds()
            return ProbeEvent.FLAPPING
        return ProbeEvent.DOWN
