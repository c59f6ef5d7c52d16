"""Zone health decisions: when a zone counts as down, and that it trips once per outage."""

from __future__ import annotations

from drctl.policies.zone_health import ZoneHealthTracker, ZoneVerdict, zone_verdict


def test_one_answering_node_keeps_the_zone_up() -> None:
    assert zone_verdict({"n0": False, "n3": True}, ["n0", "n3"]) == ZoneVerdict.UP


def test_every_known_node_silent_is_down_and_never_known_nodes_do_not_count() -> None:
    assert zone_verdict({"n0": False, "n3": None}, ["n0", "n3"]) == ZoneVerdict.DOWN
    assert zone_verdict({"n0": False}, ["n0", "n3"]) == ZoneVerdict.DOWN


def test_no_evidence_is_unknown() -> None:
    assert zone_verdict({"n1": True}, ["n0", "n3"]) == ZoneVerdict.UNKNOWN
    assert zone_verdict({}, []) == ZoneVerdict.UNKNOWN


def test_trips_at_the_threshold_once_and_rearms_after_the_zone_is_back() -> None:
    tracker = ZoneHealthTracker(threshold=3)
    assert [tracker.observe("az-1", ZoneVerdict.DOWN) for _ in range(5)] == [False, False, True, False, False]
    assert tracker.observe("az-1", ZoneVerdict.UP) is False
    assert [tracker.observe("az-1", ZoneVerdict.DOWN) for _ in range(3)] == [False, False, True]


def test_a_passing_check_resets_the_count_and_unknown_does_not_count() -> None:
    tracker = ZoneHealthTracker(threshold=2)
    assert tracker.observe("az-1", ZoneVerdict.DOWN) is False
    assert tracker.observe("az-1", ZoneVerdict.UNKNOWN) is False
    assert tracker.observe("az-1", ZoneVerdict.UP) is False
    assert tracker.observe("az-1", ZoneVerdict.DOWN) is False
    assert tracker.observe("az-2", ZoneVerdict.DOWN) is False  # zones are counted apart
    assert tracker.observe("az-1", ZoneVerdict.DOWN) is True


def test_a_corroborated_failed_check_trips_at_once_and_only_once() -> None:
    tracker = ZoneHealthTracker(threshold=3)
    assert tracker.observe("az-1", ZoneVerdict.DOWN, corroborated=True)
    assert not tracker.observe("az-1", ZoneVerdict.DOWN, corroborated=True)
    assert not tracker.observe("az-2", ZoneVerdict.UNKNOWN, corroborated=True)  # no evidence stays none
    assert not tracker.observe("az-3", ZoneVerdict.UP, corroborated=True)
