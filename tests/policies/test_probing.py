"""The prober's pure decisions: hysteresis, exit noticed at once, flap hold-down, failover caps."""

from __future__ import annotations

from datetime import timedelta

from drctl.policies.probing import ProbeEvent, ProbeTracker
from drctl.policies.schema import DetectionPolicy

SEED = DetectionPolicy()  # 5 s, 3 failures down, 2 successes up


def feed(tracker: ProbeTracker, results: str, start: float = 0.0, step: float = 5.0) -> list[ProbeEvent | None]:
    return [tracker.observe(r == "+", start + n * step) for n, r in enumerate(results)]


def test_three_failures_mark_down_two_successes_mark_up() -> None:
    tracker = ProbeTracker(SEED)
    assert feed(tracker, "--+--") == [None, None, None, None, None]
    assert tracker.observe(False, 30.0) == ProbeEvent.DOWN
    assert tracker.first_failure_at == 15.0  # the first of the three failures in a row
    assert tracker.observe(False, 35.0) is None  # already down: no second event
    assert tracker.observe(True, 40.0) is None
    assert tracker.observe(True, 45.0) == ProbeEvent.UP


def test_exited_process_is_down_at_once() -> None:
    tracker = ProbeTracker(SEED)
    assert tracker.observe(False, 1.0, exited=True) == ProbeEvent.DOWN


def test_flapping_instance_is_held_not_failed_over_again() -> None:
    policy = SEED.model_copy(
        update={"flap_limit": 3, "flap_window": timedelta(minutes=5), "hold_down": timedelta(minutes=10)}
    )
    tracker = ProbeTracker(policy)
    events = [e for e in feed(tracker, "---++---++---++---", step=1.0) if e is not None]
    assert events == [
        ProbeEvent.DOWN,
        ProbeEvent.UP,
        ProbeEvent.DOWN,
        ProbeEvent.UP,
        ProbeEvent.FLAPPING,
        ProbeEvent.UP,
        ProbeEvent.FLAPPING,
    ]
    assert tracker.held(20.0) and not tracker.held(20.0 + 601)


def test_downs_outside_the_window_do_not_count_as_flapping() -> None:
    tracker = ProbeTracker(SEED.model_copy(update={"flap_window": timedelta(seconds=30)}))
    events = [e for e in feed(tracker, "---++---++---", step=10.0) if e is not None]
    assert ProbeEvent.FLAPPING not in events
