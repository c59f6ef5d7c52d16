"""The Kubernetes watcher: its pure decisions, its caps, its watch loop (stubbed stream, 410 Gone),
and one run over kmock's KubernetesEmulator (which streams watches) with the real client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
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
    pod_failures,
    pod_state,
    recovered,
)
from drctl.payloads import FailoverRequest, IncidentState, IncidentTicket, Trigger
from drctl.policies.schema import DetectionPolicy

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
    [f] = pod_failures(pod, serving(restarts=2))
    assert "restarted (2x)" in f.reason
    [f] = pod_failures(pod, None)
    assert "deleted" in f.reason
    [f] = pod_failures(pod, serving(terminating=True))
    assert "deleted" in f.reason
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


def test_recovered() -> None:
    assert recovered(serving(ready=False), serving())
    assert recovered(None, serving())
    assert recovered(serving(role="failed", serving=False), serving())
    assert not recovered(serving(), serving())
    assert not recovered(serving(ready=False), serving(ready=False))
    assert not recovered(serving(ready=False), None)


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


def test_state_starts_once_per_incident_until_ready_again() -> None:
    state = WatchState()
    assert state.pod_sync([serving()]) == []
    [f] = state.pod_event("MODIFIED", serving(ready=False))
    state.down.add(f.instance)  # reported
    assert state.pod_event("MODIFIED", serving(ready=False, restarts=1)) == []  # same incident
    assert state.pod_event("DELETED", serving(ready=False, restarts=1)) == []
    # the Deployment's new pod for the same instance: starting, then Ready ends the incident
    assert state.pod_event("ADDED", serving("llama-0-xyz", ready=False)) == []
    assert state.down == {"llama-0"}
    assert state.pod_event("MODIFIED", serving("llama-0-xyz")) == []
    assert state.down == set()
    [f] = state.pod_event("MODIFIED", serving("llama-0-xyz", restarts=1))
    assert "restarted" in f.reason


def test_node_and_pod_events_of_one_incident_start_once() -> None:
    state = WatchState()
    state.node_sync([NodeState("node-a", zone="az-1")])
    state.pod_sync([serving(), serving("llama-1-def", role="hot", serving=False)])
    failures = state.node_event("MODIFIED", NodeState("node-a", ready=False, zone="az-1"))
    assert [f.instance for f in failures] == ["llama-0", "llama-1"]
    state.down.update(f.instance for f in failures)  # reported
    assert state.zone("node-a") == "az-1"
    # the node controller then marks the pods not Ready: already handled
    assert state.pod_event("MODIFIED", serving(ready=False)) == []
    assert state.pod_event("MODIFIED", serving("llama-1-def", role="hot", serving=False, ready=False)) == []


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
        tickets.append(
            IncidentTicket(
                model=request.model,
                instance=request.instance,
                workflow_id=f"failover-{request.instance}",
                joined=False,
                state=IncidentState.QUEUED,
                opened_at=datetime.now(UTC),
            )
        )
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


async def test_every_failure_is_reported_once_and_caps_are_the_budgets() -> None:
    """The watcher keeps no caps of its own (they dropped failures): it reports each incident once to
    the guardian, and the fleet's budget delays what must wait."""
    started, _, report = fake_starter()
    watcher = KubeWatcher(None, "fleet", DetectionPolicy(max_failovers_per_model=1), report)
    pods = [v1pod("llama-0-abc", "llama-0"), v1pod("llama-1-def", "llama-1", role="hot")]
    await watcher.handle(Event("pods", "SYNC", pods))
    await watcher.handle(Event("pods", "MODIFIED", [v1pod("llama-0-abc", "llama-0", ready=False)]))
    await watcher.handle(Event("pods", "MODIFIED", [v1pod("llama-0-abc", "llama-0", ready=False, restarts=1)]))
    assert [(r.instance, r.trigger) for r in started] == [("llama-0", Trigger.PROBE)]
    assert "not Ready" in started[0].reason and started[0].failed_at is not None
    # A second failure of the model is reported too (the old per-model cap dropped it).
    await watcher.handle(Event("pods", "MODIFIED", [v1pod("llama-1-def", "llama-1", role="hot", restarts=1)]))
    assert [r.instance for r in started] == ["llama-0", "llama-1"]


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
            watcher = KubeWatcher(core, NS, POLICY, start, timeout_s=60, backoff_s=0.05, read_timeout_s=0.5)
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
    assert started[0].reason == "kube-watcher: pod llama-0-abc not Ready"
