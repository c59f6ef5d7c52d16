"""How a drill counts its streams: cut at the fault, failed after it, served by the replacement."""

from __future__ import annotations

from datetime import UTC, datetime

from drctl.activities.drill import _count_streams
from drctl.activities.load import StreamSample
from drctl.payloads import DrillMeasurement, InjectedFault


def stream(opened: float, ended: float, completed: bool, by: str | None = "m-1") -> StreamSample:
    return StreamSample(opened, ended, completed, 3, by, 200 if completed else "RemoteProtocolError")


def test_streams_are_counted_around_the_fault() -> None:
    m = DrillMeasurement(fault=InjectedFault(injected_at=datetime.now(UTC)), recovered=True, promoted="m-1")
    fault_at, injected_at = 10.0, 10.1
    _count_streams(
        m,
        [
            stream(8.0, 9.0, True, "m-0"),  # over before the fault: not counted
            stream(9.5, 10.05, False, "m-0"),  # open at the fault, cut
            stream(9.9, 10.5, True, "m-0"),  # open at the fault, finished anyway
            stream(10.2, 10.6, False, None),  # after the fault, failed
            stream(10.7, 11.0, True, "m-1"),  # after the fault, by the replacement
            stream(11.1, 11.4, True, "m-2"),  # after the fault, by another instance
        ],
        fault_at,
        injected_at,
    )
    assert (m.streams_cut, m.streams, m.streams_failed, m.streams_by_replacement) == (1, 3, 1, 1)
    assert len(m.notes) == 1 and "RemoteProtocolError" in m.notes[0] and "+200 ms" in m.notes[0]
