"""The prober's actions: a dead process is reported to its model's guardian at once, every one of
them (caps are the budget's, which delays instead of dropping), once per incident, and a report that
does not get through is tried again until it does."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from drctl.detectors.prober import Prober
from drctl.payloads import FailoverRequest, IncidentTicket, Role, Trigger
from drctl.platforms.local.registry import InstanceRegistry, LocalInstance
from drctl.policies.loader import load_policy_file
from tests.detectors.tickets import queued_ticket

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")


@dataclass
class Guardians:
    """Where the prober's reports go: accepted (and kept) while reachable, refused while not."""

    reachable: bool = True
    reported: list[FailoverRequest] = field(default_factory=list)

    async def report(self, request: FailoverRequest) -> IncidentTicket:
        if not self.reachable:
            raise RuntimeError("Temporal unreachable")
        self.reported.append(request)
        return queued_ticket(request)


async def settle(prober: Prober) -> None:
    for _ in range(50):  # reports go out in the background
        await asyncio.sleep(0.01)
        if not prober.unreported:
            return


async def test_every_dead_instance_is_reported_once_and_a_failed_report_is_retried(tmp_path: Path) -> None:
    registry = InstanceRegistry(tmp_path / "instances.json")
    with registry.edit() as instances:
        for n in range(4):  # four serving instances in one zone whose processes are gone (pid None)
            instances[f"llama-2-7b-{n}"] = LocalInstance(
                id=f"llama-2-7b-{n}", model="llama-2-7b", role=Role.SERVING, port=1, zone="az-1"
            )
    reported: list[FailoverRequest] = []
    temporal_down = True

    async def report(request: FailoverRequest) -> IncidentTicket:
        if temporal_down:
            raise RuntimeError("Temporal unreachable")
        reported.append(request)
        return queued_ticket(request)

    prober = Prober(POLICY, registry, report)  # the policy's caps: 1 per model, 3 per zone
    try:
        await prober.tick(time.monotonic())
        await settle(prober)
        assert reported == [] and len(prober.unreported) == 4 and prober.report_errors >= 1  # kept, not dropped
        temporal_down = False
        await prober.tick(time.monotonic())
        await settle(prober)
        # All four, past both caps: the guardian serializes, the budget delays; nothing is dropped.
        assert sorted(r.instance for r in reported) == [f"llama-2-7b-{n}" for n in range(4)]
        first = reported[0]
        assert first.trigger == Trigger.PROBE and first.failed_at is not None and first.confirmed
        assert "process exited" in first.reason
        for _ in range(3):  # still down: the same incidents, not reported again
            await prober.tick(time.monotonic())
        await settle(prober)
        assert len(reported) == 4
    finally:
        await prober.aclose()


async def test_exits_in_a_large_fleet_are_looked_for_a_window_at_a_time(tmp_path: Path) -> None:
    """Past EXIT_CHECKS_PER_TICK instances, each tick reads /proc for the next window of them: every
    exit is still seen, within a few ticks, at a fixed cost per tick."""
    from drctl.detectors.prober import EXIT_CHECKS_PER_TICK

    registry = InstanceRegistry(tmp_path / "instances.json")
    count = EXIT_CHECKS_PER_TICK * 2 + 100
    with registry.edit() as instances:
        for n in range(count):  # processes gone (pid None)
            instances[f"m-{n}"] = LocalInstance(id=f"m-{n}", model="llama-2-7b", role=Role.SERVING, port=1)
    reported: list[FailoverRequest] = []

    async def report(request: FailoverRequest) -> IncidentTicket:
        reported.append(request)
        return queued_ticket(request)

    prober = Prober(POLICY, registry, report)
    try:
        now = time.monotonic()
        await prober.tick(now)
        assert len(prober.unreported) + len(prober.reported) == EXIT_CHECKS_PER_TICK
        for k in range(2):
            await prober.tick(now + 0.1 * (k + 1))
        await settle(prober)
        assert len({r.instance for r in reported}) == count
    finally:
        await prober.aclose()


async def test_a_serving_instance_found_asleep_is_reported(tmp_path: Path) -> None:
    """``/health`` answers 200 asleep or awake (vLLM's way); ``is_sleeping``, asked every few probes
    and on every probe once asleep, makes the instance down after ``unhealthyThreshold`` probes."""

    asleep = {"value": False}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                path = request.split(b" ", 2)[1]
                body = json.dumps({"is_sleeping": asleep["value"]}).encode() if path == b"/is_sleeping" else b"{}"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    registry = InstanceRegistry(tmp_path / "instances.json")
    with registry.edit() as instances:
        instances["llama-2-7b-0"] = LocalInstance(
            id="llama-2-7b-0", model="llama-2-7b", role=Role.SERVING, port=port, pid=os.getpid()
        )
    reported: list[FailoverRequest] = []

    async def report(request: FailoverRequest) -> IncidentTicket:
        reported.append(request)
        return queued_ticket(request)

    prober = Prober(POLICY, registry, report)
    interval = POLICY.detection.probe_interval.total_seconds()
    try:
        now = time.monotonic()
        for k in range(4):  # awake: healthy, never reported
            await prober.tick(now + k * interval)
        asleep["value"] = True
        for k in range(4, 4 + 3 * POLICY.detection.unhealthy_threshold):
            await prober.tick(now + k * interval)
            await settle(prober)
            if reported:
                break
        assert [r.instance for r in reported] == ["llama-2-7b-0"]
        assert "failed probes" in reported[0].reason
    finally:
        await prober.aclose()
        server.close()


async def test_a_new_process_under_a_reported_id_is_watched_afresh(tmp_path: Path) -> None:
    """An id that a new process took (restarted, or a new instance named after a deleted one) is a
    new instance to the prober: what it counted and reported of the process before does not carry
    over, so the new one's failure is reported again, and a report still pending of the old one is
    never made about the new."""
    registry = InstanceRegistry(tmp_path / "instances.json")
    with registry.edit() as instances:
        instances["llama-2-7b-1"] = LocalInstance(id="llama-2-7b-1", model="llama-2-7b", role=Role.HOT, port=1)
    guardians = Guardians()
    reported = guardians.reported
    prober = Prober(POLICY, registry, guardians.report)
    try:
        await prober.tick(time.monotonic())
        await settle(prober)
        assert [r.instance for r in reported] == ["llama-2-7b-1"] and "llama-2-7b-1" in prober.reported
        # The same id on a new port and process (this test's, alive): reported before, watched afresh.
        registry.update("llama-2-7b-1", port=2, pid=os.getpid())
        prober._probed()
        assert "llama-2-7b-1" not in prober.reported and "llama-2-7b-1" not in prober.trackers
        # Its process goes too: a failure of its own, reported again.
        registry.update("llama-2-7b-1", port=3, pid=None)
        await prober.tick(time.monotonic())
        await settle(prober)
        assert [r.instance for r in reported] == ["llama-2-7b-1"] * 2
        # A failure not reported yet (Temporal unreachable) is dropped when the id gets a new process.
        registry.update("llama-2-7b-1", port=4, pid=None)
        guardians.reachable = False
        await prober.tick(time.monotonic())
        await settle(prober)
        assert "llama-2-7b-1" in prober.unreported
        registry.update("llama-2-7b-1", port=5, pid=os.getpid())
        prober._probed()
        assert "llama-2-7b-1" not in prober.unreported
    finally:
        await prober.aclose()


async def test_a_failure_not_yet_reported_of_an_instance_no_longer_watched_is_not_reported(tmp_path: Path) -> None:
    """Deleted (or ejected, or being promoted) while its report waited: someone acted on it."""
    registry = InstanceRegistry(tmp_path / "instances.json")
    with registry.edit() as instances:
        for n in (1, 2):
            instances[f"llama-2-7b-{n}"] = LocalInstance(
                id=f"llama-2-7b-{n}", model="llama-2-7b", role=Role.HOT, port=n, zone="az-1"
            )
    guardians = Guardians(reachable=False)
    reported = guardians.reported
    prober = Prober(POLICY, registry, guardians.report)
    try:
        await prober.tick(time.monotonic())
        await settle(prober)
        assert sorted(prober.unreported) == ["llama-2-7b-1", "llama-2-7b-2"]
        with registry.edit() as instances:
            del instances["llama-2-7b-1"]  # reconciliation deleted it
            instances["llama-2-7b-2"] = instances["llama-2-7b-2"].with_changes(role=Role.PROMOTING)
        guardians.reachable = True
        await prober.tick(time.monotonic())
        await settle(prober)
        assert reported == [] and prober.unreported == {}
    finally:
        await prober.aclose()


async def test_failures_in_a_zone_handed_to_its_failover_are_held_until_it_ends(tmp_path: Path) -> None:
    """The zone failover reports the zone's serving instances itself: the prober's reports of them
    wait until it has ended, then go out for what is still watched (never dropped)."""
    registry = InstanceRegistry(tmp_path / "instances.json")
    with registry.edit() as instances:
        for n, zone in ((1, "az-1"), (2, "az-1"), (3, "az-2")):
            instances[f"llama-2-7b-{n}"] = LocalInstance(
                id=f"llama-2-7b-{n}", model="llama-2-7b", role=Role.SERVING, port=n, zone=zone
            )
    guardians = Guardians()
    prober = Prober(POLICY, registry, guardians.report)
    ended: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    try:
        prober.hand_zone_over("az-1", ended, at_most_s=60)
        await prober.tick(time.monotonic())
        await settle(prober)
        # The other zone's failure goes out at once; az-1's are held (held, not "unreported").
        assert [r.instance for r in guardians.reported] == ["llama-2-7b-3"]
        assert sorted(prober.unreported) == ["llama-2-7b-1", "llama-2-7b-2"]
        assert prober.held_for_zone_failover() == ["llama-2-7b-1", "llama-2-7b-2"]
        await prober.tick(time.monotonic())
        await settle(prober)
        assert len(guardians.reported) == 1
        with registry.edit() as instances:
            del instances["llama-2-7b-1"]  # the failover moved it (ejected): nothing left to report
        await prober.tick(time.monotonic())
        ended.set_exception(RuntimeError("zone failover failed"))  # ended, whatever the outcome
        await _until_reported(guardians, 2)
        assert sorted(r.instance for r in guardians.reported) == ["llama-2-7b-2", "llama-2-7b-3"]
        assert prober.unreported == {} and prober.held_for_zone_failover() == []
    finally:
        await prober.aclose()


def _prober_of_one_serving_instance_in_az_1(tmp_path: Path, guardians: Guardians) -> Prober:
    """A prober watching ``llama-2-7b-1``, serving in az-1, whose process is gone (pid None)."""
    registry = InstanceRegistry(tmp_path / "instances.json")
    with registry.edit() as instances:
        instances["llama-2-7b-1"] = LocalInstance(
            id="llama-2-7b-1", model="llama-2-7b", role=Role.SERVING, port=1, zone="az-1"
        )
    return Prober(POLICY, registry, guardians.report)


async def _until_reported(guardians: Guardians, count: int) -> None:
    """Until ``count`` reports went out (the prober reports in the background), at most 0.5 s."""
    for _ in range(50):
        if len(guardians.reported) >= count:
            return
        await asyncio.sleep(0.01)


async def test_a_zone_failover_that_runs_too_long_no_longer_holds_the_reports(tmp_path: Path) -> None:
    guardians = Guardians()
    prober = _prober_of_one_serving_instance_in_az_1(tmp_path, guardians)
    never: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    try:
        prober.hand_zone_over("az-1", never, at_most_s=0.2)
        await prober.tick(time.monotonic())
        await settle(prober)
        assert guardians.reported == [] and list(prober.unreported) == ["llama-2-7b-1"]
        await asyncio.sleep(0.25)  # taken for stuck: the prober reports again
        await prober.tick(time.monotonic())
        await settle(prober)
        assert [r.instance for r in guardians.reported] == ["llama-2-7b-1"]
    finally:
        await prober.aclose()


async def test_the_end_of_an_earlier_zone_failover_does_not_end_a_later_ones_hold(tmp_path: Path) -> None:
    guardians = Guardians()
    prober = _prober_of_one_serving_instance_in_az_1(tmp_path, guardians)
    loop = asyncio.get_running_loop()
    first: asyncio.Future[object] = loop.create_future()
    second: asyncio.Future[object] = loop.create_future()
    try:
        prober.hand_zone_over("az-1", first, at_most_s=60)
        prober.hand_zone_over("az-1", second, at_most_s=60)
        first.set_result(None)
        await prober.tick(time.monotonic())
        await settle(prober)
        assert guardians.reported == [] and prober.held_for_zone_failover() == ["llama-2-7b-1"]
        second.set_result(None)
        await _until_reported(guardians, 1)
        assert [r.instance for r in guardians.reported] == ["llama-2-7b-1"]
    finally:
        await prober.aclose()
