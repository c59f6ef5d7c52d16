"""The Kubernetes watcher: its pure decisions (transitions, hysteresis and hold-down through the
prober's ProbeTracker, zone verdicts), its watch loop (stubbed stream, 410 Gone), and one run over
kmock's KubernetesEmulator (which streams watches) with the real client. Leader election, caps,
panic and zones over the emulator: test_kube_watcher_cluster.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import kmock
import pytest
from kubernetes.client import ApiClient, Configuration, CoreV1Api
from kubernetes.client.exceptions import ApiException

from drctl.detectors import kube_watcher
from drctl.detectors.kube_watcher import (
    Event,
    KubeWatcher,
    NodeState,
    PodState,
    WatchState,
    node_failures,
    node_state,
    pod_failures,
    pod_state,
    zone_verdicts,
)
from drctl.payloads import FailoverRequest, IncidentTicket, Trigger
from drctl.policies.schema import DetectionPolicy
from drctl.policies.zone_health import ZoneVerdict
from tests.detectors.tickets import queued_ticket

POLICY = DetectionPolicy()


def serving(name: str = "llama-0-abc", **kw: Any) -> PodState:
    base: dict[str, Any] = dict(model="llama", instance=name.rsplit("-", 1)[0], role="serving", serving=True)
    base.update(kw)
    return PodState(name=name, node=base.pop("node", "node-a"), **base)


# -- pure: one pod --------------------------------------------------------------------------------


def test_not_ready_restart_and_deletion_are_incidents() -> None:
    pod = serving()
    [f] = pod_failures(pod, serving(ready=False))
    assert (f.model, f.instance, f.node) == ("llama", "llama-0", "node-a") and "not Ready" in f.reason
    assert not f.exited  # one bad observation: hysteresis decides
    [f] = pod_failures(pod, serving(restarts=2))
    assert "restarted (2x)" in f.reason and f.exited  # down at once, like a process that exited
    [f] = pod_failures(pod, None)
    assert "deleted" in f.reason and f.exited
    [f] = pod_failures(pod, serving(terminating=True))
    assert "deleted" in f.reason and f.exited
    hot = serving(role="hot", serving=False)
    assert pod_failures(hot, serving(role="hot", serving=False, ready=False))


def test_what_is_not_an_incident() -> None:
    pod = serving()
    assert pod_failures(None, serving(ready=False)) == []  # first seen not Ready: starting
    assert pod_failures(pod, pod) == []
    assert pod_failures(serving(ready=False), serving(ready=False)) == []  # still down: same incident
    assert pod_failures(serving(ready=False), serving()) == []
    warm = serving(role="warm", serving=False)
    assert pod_failures(warm, serving(role="warm", serving=False, ready=False)) == []
    assert pod_failures(warm, None) == []
    # relabelled out (ejected) and not Ready at once: the failover did that, not a new incident
    assert pod_failures(pod, serving(role="failed", serving=False, ready=False)) == []
    assert pod_failures(serving(terminating=True), None) == []  # its deletion already counted


def test_health_of_an_instance_from_its_pods_and_nodes() -> None:
    state = WatchState()
    state.node_sync([NodeState("node-a", zone="az-1"), NodeState("node-b", ready=False, zone="az-1")])
    state.pod_sync(
        [
            serving("llama-0-abc"),
            serving("llama-1-def", role="hot", serving=False, ready=False),
            serving("llama-2-ghi", role="warm", serving=False),
            serving("llama-3-jkl", node="node-b"),
            serving("llama-4-old", terminating=True),
            serving("llama-4-new"),  # the replacement pod of the same instance: Ready
            serving("llama-5-xyz", role="failed", serving=False),
        ]
    )
    health = state.health()
    assert {i: (h.ok, h.zone) for i, h in health.items()} == {
        "llama-0": (True, "az-1"),
        "llama-1": (False, "az-1"),  # not Ready
        "llama-3": (False, "az-1"),  # Ready, on a NotReady node
        "llama-4": (True, "az-1"),  # one pod of it serves
    }
    assert state.unwatched() == {"llama-2", "llama-5"}


# -- pure: nodes ----------------------------------------------------------------------------------


def test_node_not_ready_fails_its_serving_and_hot_pods() -> None:
    pods = [
        serving("llama-0-abc"),
        serving("llama-1-def", role="hot", serving=False),
        serving("llama-2-ghi", role="warm", serving=False),
        serving("llama-3-jkl", node="node-b"),
        serving("llama-4-mno", terminating=True),
    ]
    failures = node_failures(NodeState("node-a"), NodeState("node-a", ready=False), pods)
    assert [f.instance for f in failures] == ["llama-0", "llama-1"]
    assert all("node node-a NotReady" in f.reason and f.node == "node-a" for f in failures)
    assert [f.instance for f in node_failures(NodeState("node-a"), None, pods)] == ["llama-0", "llama-1"]
    assert node_failures(None, NodeState("node-a", ready=False), pods) == []  # first seen: no transition
    assert node_failures(NodeState("node-a", ready=False), NodeState("node-a", ready=False), pods) == []
    assert node_failures(NodeState("node-a"), NodeState("node-a"), pods) == []


# -- pure: state, once per incident ---------------------------------------------------------------


def test_node_and_pod_events_of_one_batch_count_once() -> None:
    state = WatchState()
    state.node_sync([NodeState("node-a", zone="az-1")])
    state.pod_sync([serving(), serving("llama-1-def", role="hot", serving=False)])
    failures = state.node_event("MODIFIED", NodeState("node-a", ready=False, zone="az-1"))
    assert [(f.instance, f.exited) for f in failures] == [("llama-0", False), ("llama-1", False)]
    assert state.zone("node-a") == "az-1"
    assert state.node_event("MODIFIED", NodeState("node-a", zone="az-1")) == []  # Ready again
    assert [f.exited for f in state.node_sync([])] == [True, True]  # the node deleted: gone at once
    # one failure per instance per listing, the exited one preferred
    state.pod_sync([serving(), serving("llama-0-xyz")])
    [f] = state.pod_sync([serving(ready=False)])
    assert f.instance == "llama-0" and f.exited  # llama-0-xyz deleted, llama-0-abc not Ready


def test_zone_verdicts_from_node_conditions_with_agents_as_a_second_opinion() -> None:
    nodes = [
        NodeState("n0", ready=False, zone="az-1"),
        NodeState("n3", ready=False, zone="az-1"),
        NodeState("n1", zone="az-2"),
        NodeState("n9", ready=False),  # no zone label: in no zone
    ]
    zones = ["az-1", "az-2", "az-4"]
    assert zone_verdicts(nodes, {}, zones) == {
        "az-1": ZoneVerdict.DOWN,
        "az-2": ZoneVerdict.UP,
        "az-4": ZoneVerdict.UNKNOWN,  # no node: no evidence
    }
    # a NotReady node whose agent answers is there (its kubelet lost the API server): the zone is up
    assert zone_verdicts(nodes, {"n3": True}, zones)["az-1"] == ZoneVerdict.UP
    assert zone_verdicts(nodes, {"n3": False, "n0": False}, zones)["az-1"] == ZoneVerdict.DOWN


def test_node_state_reads_ready_false_and_unknown_as_not_ready() -> None:
    def v1node(*conditions: tuple[str, str]) -> Any:
        return SimpleNamespace(
            metadata=SimpleNamespace(name="n", labels={"topology.kubernetes.io/zone": "az-1"}),
            status=SimpleNamespace(conditions=[SimpleNamespace(type=t, status=s) for t, s in conditions]),
        )

    assert node_state(v1node(("Ready", "True"), ("MemoryPressure", "False"))) == NodeState("n", True, "az-1")
    assert not node_state(v1node(("Ready", "False"))).ready
    assert not node_state(v1node(("Ready", "Unknown"))).ready
    assert node_state(v1node()).ready  # no Ready condition yet: no evidence


def test_resync_after_gone_sees_deletions_and_changes() -> None:
    state = WatchState()
    state.pod_sync([serving("llama-0-abc"), serving("llama-1-def")])
    failures = state.pod_sync([serving("llama-1-def", ready=False)])
    assert sorted((f.instance, "deleted" in f.reason) for f in failures) == [("llama-0", True), ("llama-1", False)]
    assert set(state.pods) == {"llama-1-def"}
    state.node_sync([NodeState("node-a")])
    assert [f.instance for f in state.node_sync([])] == ["llama-1"]


# -- the async layer: every failure reported to the guardian, once per incident ----------------


def fake_starter() -> tuple[list[FailoverRequest], list[IncidentTicket], Any]:
    started: list[FailoverRequest] = []
    tickets: list[IncidentTicket] = []

    async def report(request: FailoverRequest) -> IncidentTicket:
        started.append(request)
        tickets.append(queued_ticket(request))
        return tickets[-1]

    return started, tickets, report


def v1pod(name: str, instance: str, *, ready: bool = True, restarts: int = 0, role: str = "serving") -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(
            name=name,
            labels={"drctl.io/model": "llama", "drctl.io/instance": instance, "drctl.io/role": role},
            deletion_timestamp=None,
            resource_version="7",
        ),
        spec=SimpleNamespace(node_name="node-a"),
        status=SimpleNamespace(
            conditions=[SimpleNamespace(type="Ready", status="True" if ready else "False")],
            container_statuses=[SimpleNamespace(restart_count=restarts)],
        ),
    )


def test_pod_state_reads_a_v1pod() -> None:
    state = pod_state(v1pod("llama-0-abc", "llama-0", ready=False, restarts=3))
    assert state == PodState("llama-0-abc", "llama", "llama-0", "serving", False, False, 3, "node-a")
    other = v1pod("x", "x")
    other.metadata.labels = {"app": "other"}
    assert pod_state(other) is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


HYSTERESIS = DetectionPolicy(
    probe_interval=timedelta(seconds=1),
    unhealthy_threshold=3,
    healthy_threshold=2,
    flap_window=timedelta(minutes=5),
    flap_limit=3,
    hold_down=timedelta(minutes=10),
)


async def test_not_ready_needs_threshold_looks_a_restart_none_and_each_incident_is_reported_once() -> None:
    started, _, report = fake_starter()
    clock = Clock()
    watcher = KubeWatcher(None, "fleet", HYSTERESIS, report, clock=clock)
    pods = [v1pod("llama-0-abc", "llama-0"), v1pod("llama-1-def", "llama-1", role="hot")]
    await watcher.handle(Event("pods", "SYNC", pods))
    watcher.tick(clock.now)  # first seen Ready: judged from now on

    async def at(t: float, *events: Event) -> None:
        clock.now = 100.0 + t
        for event in events:
            await watcher.handle(event)
        watcher.tick(clock.now)
        await watcher.settle()

    not_ready = Event("pods", "MODIFIED", [v1pod("llama-0-abc", "llama-0", ready=False)])
    ready = Event("pods", "MODIFIED", [v1pod("llama-0-abc", "llama-0")])
    await at(1.0, not_ready)  # look 1
    await at(2.0)  # look 2
    await at(2.5, ready)  # Ready again before look 3: a blip, not an incident
    await at(3.0)
    assert started == [] and watcher.trackers["llama-0"].up
    await at(10.0, not_ready)  # look 1
    await at(10.5)  # not due
    await at(11.0)  # look 2
    assert started == []
    await at(12.0)  # look 3: down
    assert [(r.instance, r.trigger) for r in started] == [("llama-0", Trigger.PROBE)]
    assert started[0].reason == "kube-watcher: pod llama-0-abc not Ready (3 looks in a row)"
    assert started[0].failed_at is not None and not started[0].confirmed  # the runbook confirms
    for t in (13.0, 14.0, 15.0):  # still down, restarted even: the same incident
        await at(t, Event("pods", "MODIFIED", [v1pod("llama-0-abc", "llama-0", ready=False, restarts=1)]))
    assert len(started) == 1
    # A hot standby's container restarts: down at once, like a process that exited.
    await at(16.0, Event("pods", "MODIFIED", [v1pod("llama-1-def", "llama-1", role="hot", restarts=1)]))
    assert [r.instance for r in started] == ["llama-0", "llama-1"]
    assert "restarted (1x)" in started[1].reason
    # Caps are the budget's: a second failure of the model is reported too (the guardian queues it).
    assert [d.action for d in watcher.detections if d.instance == "llama-1"] == ["down", "reported"]


async def test_an_instance_that_keeps_failing_is_held_down_not_failed_over_again_and_again() -> None:
    started, _, report = fake_starter()
    clock = Clock()
    watcher = KubeWatcher(None, "fleet", HYSTERESIS, report, clock=clock)
    await watcher.handle(Event("pods", "SYNC", [v1pod("llama-0-abc", "llama-0")]))
    watcher.tick(clock.now)
    restarts = 0
    for cycle in range(5):  # restart, then Ready for two looks (up again), every 10 s
        restarts += 1
        clock.now += 10
        await watcher.handle(Event("pods", "MODIFIED", [v1pod("llama-0-abc", "llama-0", restarts=restarts)]))
        for _ in range(2):
            clock.now += 1
            watcher.tick(clock.now)
        await watcher.settle()
        assert watcher.trackers["llama-0"].up, cycle
    # flapLimit 3: the first two downs are failed over, the third and later are held for holdDown
    assert len(started) == 2
    actions = [d.action for d in watcher.detections if d.action != "up"]
    assert actions == ["down", "reported", "down", "reported", *["held (flapping)"] * 3]
    # after the hold-down (10 min) and out of the flap window, a failure is failed over again
    clock.now += 11 * 60
    await watcher.handle(Event("pods", "MODIFIED", [v1pod("llama-0-abc", "llama-0", restarts=restarts + 1)]))
    await watcher.settle()
    assert len(started) == 3


async def test_a_report_that_does_not_get_through_is_kept_and_tried_again() -> None:
    """Temporal unreachable (or a worker restarting): nothing is dropped, every failure of the
    batch is reported once it gets through, past the policy's caps (the budget delays those)."""
    reported: list[FailoverRequest] = []
    down = True

    async def report(request: FailoverRequest) -> IncidentTicket:
        if down:
            raise RuntimeError("Temporal unreachable")
        reported.append(request)
        return queued_ticket(request)

    clock = Clock()
    watcher = KubeWatcher(None, "fleet", DetectionPolicy(max_failovers_per_zone=1), report, clock=clock)
    pods = [v1pod(f"llama-{n}-abc", f"llama-{n}") for n in range(4)]
    await watcher.handle(Event("pods", "SYNC", pods))
    watcher.tick(clock.now)
    await watcher.handle(Event("pods", "DELETED", pods))
    await watcher.settle()
    assert reported == [] and len(watcher.unreported) == 4 and watcher.report_errors >= 1
    for _ in range(3):
        clock.now += 1
        watcher.tick(clock.now)  # pods gone, reports pending: the trackers stay
        await watcher.settle()
    assert len(watcher.unreported) == 4
    down = False
    clock.now += 1
    watcher.tick(clock.now)
    await watcher.settle()
    assert sorted(r.instance for r in reported) == [f"llama-{n}" for n in range(4)]
    assert watcher.unreported == {}
    clock.now += 1
    watcher.tick(clock.now)  # reported and gone: forgotten
    assert watcher.trackers == {}


# -- the watch loop, over a stubbed stream --------------------------------------------------------


class StubWatch:
    """Replays scripted streams: each call to ``stream`` pops the next list of events (or error)."""

    scripts: list[Any] = []
    calls: list[dict[str, Any]] = []

    def __init__(self) -> None:
        self.resource_version: str | None = None

    def stream(self, fn: Any, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        StubWatch.calls.append(kwargs)
        script = StubWatch.scripts.pop(0)
        if isinstance(script, Exception):
            raise script
        for event in script:
            self.resource_version = event["object"].metadata.resource_version
            yield event

    def stop(self) -> None:
        pass


def test_watch_loop_resumes_from_the_last_version_and_relists_after_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes.watch

    monkeypatch.setattr(kubernetes.watch, "Watch", StubWatch)
    stop = threading.Event()
    modified = v1pod("llama-0-abc", "llama-0", ready=False)
    modified.metadata.resource_version = "12"
    StubWatch.calls = []
    StubWatch.scripts = [
        [{"type": "MODIFIED", "object": modified}],  # then the stream ends (server timeout): resume
        ApiException(status=410, reason="Gone"),  # too old: relist
        ApiException(status=500, reason="boom"),  # back off, then watch again from the relist
        [],
    ]
    lists: list[Any] = []

    def list_pods(namespace: str, **kwargs: Any) -> Any:
        lists.append((namespace, kwargs))
        return SimpleNamespace(metadata=SimpleNamespace(resource_version=str(10 * len(lists))), items=[])

    events: list[Event] = []

    def emit(event: Event) -> None:
        events.append(event)

    replay = StubWatch.stream

    def stream(self: StubWatch, fn: Any, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield from replay(self, fn, *args, **kwargs)
        if not StubWatch.scripts:
            stop.set()  # the last script played: end the loop

    monkeypatch.setattr(StubWatch, "stream", stream)
    kube_watcher._watch_loop(
        "pods", list_pods, ("fleet",), {"label_selector": "drctl.io/model"}, emit, stop, 5, 0.0, 1.0
    )
    assert [(e.kind, len(e.objects)) for e in events] == [("SYNC", 0), ("MODIFIED", 1), ("SYNC", 0)]
    assert lists == [("fleet", {"label_selector": "drctl.io/model"})] * 2
    versions = [c["resource_version"] for c in StubWatch.calls]
    assert versions == ["10", "12", "20", "20"]
    assert all(c["timeout_seconds"] == 5 and c["label_selector"] == "drctl.io/model" for c in StubWatch.calls)


# -- over the emulator: a real watch stream -------------------------------------------------------

NS = "fleet"
PODS = kmock.resource("", "v1", "pods")
NODES = kmock.resource("", "v1", "nodes")


def emulated_pod(name: str, instance: str, role: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "resourceVersion": "1",
            "labels": {"drctl.io/model": "llama", "drctl.io/role": role, "drctl.io/instance": instance},
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "model", "image": "x"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out waiting")


async def test_a_pod_turning_not_ready_over_a_real_watch_starts_one_failover() -> None:
    started, _, start = fake_starter()
    async with kmock.KubernetesEmulator() as emu, kmock.Server(emu):
        emu.objects[NODES, None, "node-a"] = {"metadata": {"name": "node-a"}, "status": {"conditions": []}}
        emu.objects[PODS, NS, "llama-0-abc"] = emulated_pod("llama-0-abc", "llama-0", "serving")
        emu.objects[PODS, NS, "llama-1-def"] = emulated_pod("llama-1-def", "llama-1", "warm")
        with ApiClient(Configuration(host=str(emu.url).rstrip("/"))) as client:
            core = CoreV1Api(client)
            fast = DetectionPolicy(probe_interval=timedelta(milliseconds=100))  # 3 looks: 0.2 s
            watcher = KubeWatcher(core, NS, fast, start, timeout_s=60, backoff_s=0.05, read_timeout_s=0.5)
            stop = asyncio.Event()
            task = asyncio.create_task(watcher.run(stop))
            await wait_for(lambda: len(watcher.state.pods) == 2 and "node-a" in watcher.state.nodes)
            await asyncio.sleep(0.3)  # the watch streams are connected (they replay ADDED: no change)

            def flip(name: str, ready: str) -> None:
                core.patch_namespaced_pod(name, NS, {"status": {"conditions": [{"type": "Ready", "status": ready}]}})

            await asyncio.to_thread(flip, "llama-1-def", "False")  # a warm standby: not watched
            await asyncio.to_thread(flip, "llama-0-abc", "False")
            await wait_for(lambda: len(started) == 1)
            await asyncio.to_thread(flip, "llama-0-abc", "False")  # still down: same incident
            await wait_for(lambda: watcher.state.pods["llama-0-abc"].ready is False)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.wait_for(task, timeout=5)
    assert [(r.model, r.instance, r.trigger) for r in started] == [("llama", "llama-0", Trigger.PROBE)]
    assert started[0].reason == "kube-watcher: pod llama-0-abc not Ready (3 looks in a row)"
