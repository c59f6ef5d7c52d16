"""The GPU node agent with pynvml faked at its function boundary, and the real no-NVML path.

The fakes replace ``pynvml.nvml*`` functions (every other ``nvml*`` function raises, so an NVML call
the fakes do not know fails the test instead of reaching the real library). The event set yields each
queued Xid once. HTTP goes over a real loopback socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pynvml
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from temporalio.service import RPCError

from drctl.detectors.gpu_node_agent import FaultTokenMissing, GpuReport, NodeAgent, make_app, serve
from drctl.detectors.nvml import NvmlInventory, NvmlUnavailable, XidEvent
from drctl.payloads import drain_workflow_id
from drctl.policies.gpu_health import UNKNOWN_NO_NVML, classify
from drctl.policies.schema import GpuNodePolicy, GpuPoolPolicy

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30
NODE = "gpu-node-0"
POOL = GpuPoolPolicy(nodes=[GpuNodePolicy(name=NODE, zone="az-1", gpus=2, gpu_memory=80 * GiB)])


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED


@dataclass
class FakeGpu:
    """One GPU's state; ``None`` in an optional field makes NVML answer "not supported"."""

    index: int
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GiB
    used: int = 0
    utilisation: int | None = 0
    temperature: int = 40
    slowdown: int | None = 87
    shutdown: int | None = 92
    ecc: tuple[int, int] | None = (0, 0)
    """(uncorrected, corrected) volatile."""
    retired: tuple[int, int, int] | None = None
    """(double-bit pages, single-bit pages, pending) — None on Ampere and newer."""
    remapped: tuple[int, int, int, int] | None = (0, 0, 0, 0)
    recovery_action: int | None = 0
    events: bool = True
    lost: bool = False
    failing: dict[str, int] = field(default_factory=dict)
    """NVML function name → error code it raises (besides "not supported")."""


class FakeNvml:
    """The pynvml functions NvmlInventory calls, over a list of FakeGpu."""

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.xids: queue.Queue[tuple[Any, int]] = queue.Queue()
        self.calls: dict[str, int] = {}
        self.init_error: int | None = None
        self.event_sets: list[object] = []
        self.freed: list[object] = []
        self.registered: list[int] = []

    def queue_xid(self, gpu: int | Any, xid: int) -> None:
        device = self.gpus[gpu] if isinstance(gpu, int) else gpu
        self.xids.put((device, xid))

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _gpu(self, name: str, handle: FakeGpu) -> FakeGpu:
        self._count(name)
        assert isinstance(handle, FakeGpu), handle
        if handle.lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in handle.failing:
            raise nvml_error(handle.failing[name])
        return handle

    def functions(self) -> dict[str, Callable[..., Any]]:
        def nvmlInit() -> None:
            self._count("nvmlInit")
            if self.init_error is not None:
                raise nvml_error(self.init_error)

        def nvmlShutdown() -> None:
            self._count("nvmlShutdown")

        def nvmlSystemGetDriverVersion() -> str:
            return "550.54.15"

        def nvmlDeviceGetCount() -> int:
            self._count("nvmlDeviceGetCount")
            return len(self.gpus)

        def nvmlDeviceGetHandleByIndex(index: int) -> FakeGpu:
            return self._gpu("nvmlDeviceGetHandleByIndex", self.gpus[index])

        def nvmlDeviceGetUUID(h: FakeGpu) -> str:
            return self._gpu("nvmlDeviceGetUUID", h).uuid

        def nvmlDeviceGetName(h: FakeGpu) -> str:
            return self._gpu("nvmlDeviceGetName", h).name

        def nvmlDeviceGetMemoryInfo(h: FakeGpu) -> SimpleNamespace:
            g = self._gpu("nvmlDeviceGetMemoryInfo", h)
            return SimpleNamespace(total=g.total, used=g.used, free=g.total - g.used)

        def nvmlDeviceGetUtilizationRates(h: FakeGpu) -> SimpleNamespace:
            g = self._gpu("nvmlDeviceGetUtilizationRates", h)
            if g.utilisation is None:
                raise nvml_error(NOT_SUPPORTED)
            return SimpleNamespace(gpu=g.utilisation, memory=0)

        def nvmlDeviceGetTemperature(h: FakeGpu, sensor: int) -> int:
            assert sensor == pynvml.NVML_TEMPERATURE_GPU
            return self._gpu("nvmlDeviceGetTemperature", h).temperature

        def nvmlDeviceGetTemperatureThreshold(h: FakeGpu, kind: int) -> int:
            g = self._gpu("nvmlDeviceGetTemperatureThreshold", h)
            value = {
                pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: g.slowdown,
                pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: g.shutdown,
            }[kind]
            if value is None:
                raise nvml_error(NOT_SUPPORTED)
            return value

        def nvmlDeviceGetTotalEccErrors(h: FakeGpu, error_type: int, counter: int) -> int:
            g = self._gpu("nvmlDeviceGetTotalEccErrors", h)
            assert counter == pynvml.NVML_VOLATILE_ECC
            if g.ecc is None:
                raise nvml_error(NOT_SUPPORTED)
            return g.ecc[0] if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else g.ecc[1]

        def nvmlDeviceGetRetiredPages(h: FakeGpu, cause: int) -> list[int]:
            g = self._gpu("nvmlDeviceGetRetiredPages", h)
            if g.retired is None:
                raise nvml_error(NOT_SUPPORTED)
            n = g.retired[0] if cause == pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR else g.retired[1]
            return [0x1000 * i for i in range(n)]

        def nvmlDeviceGetRetiredPagesPendingStatus(h: FakeGpu) -> int:
            g = self._gpu("nvmlDeviceGetRetiredPagesPendingStatus", h)
            if g.retired is None:
                raise nvml_error(NOT_SUPPORTED)
            return g.retired[2]

        def nvmlDeviceGetRemappedRows(h: FakeGpu) -> tuple[int, int, int, int]:
            g = self._gpu("nvmlDeviceGetRemappedRows", h)
            if g.remapped is None:
                raise nvml_error(NOT_SUPPORTED)
            return g.remapped

        def nvmlDeviceGetFieldValues(h: FakeGpu, ids: list[int]) -> list[SimpleNamespace]:
            g = self._gpu("nvmlDeviceGetFieldValues", h)
            assert ids == [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]
            if g.recovery_action is None:
                return [SimpleNamespace(nvmlReturn=NOT_SUPPORTED, value=SimpleNamespace(uiVal=0))]
            return [SimpleNamespace(nvmlReturn=pynvml.NVML_SUCCESS, value=SimpleNamespace(uiVal=g.recovery_action))]

        def nvmlEventSetCreate() -> object:
            event_set = object()
            self.event_sets.append(event_set)
            return event_set

        def nvmlDeviceRegisterEvents(h: FakeGpu, types: int, event_set: object) -> None:
            g = self._gpu("nvmlDeviceRegisterEvents", h)
            assert types == pynvml.nvmlEventTypeXidCriticalError and event_set in self.event_sets
            if not g.events:
                raise nvml_error(NOT_SUPPORTED)
            self.registered.append(g.index)

        def nvmlEventSetWait_v2(event_set: object, timeout_ms: int) -> SimpleNamespace:
            assert event_set in self.event_sets and event_set not in self.freed
            try:
                device, xid = self.xids.get(timeout=timeout_ms / 1000)
            except queue.Empty:
                raise nvml_error(pynvml.NVML_ERROR_TIMEOUT) from None
            return SimpleNamespace(device=device, eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid)

        def nvmlEventSetFree(event_set: object) -> None:
            self.freed.append(event_set)

        return {name: fn for name, fn in locals().items() if name.startswith("nvml")}


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml(
        [
            FakeGpu(0, "GPU-aaaaaaaa-0000", used=20 * GiB, utilisation=35, temperature=51, ecc=(0, 2)),
            # An older or consumer GPU: no ECC, no thresholds, no remapping, no recovery action, no events.
            FakeGpu(
                1,
                "GPU-bbbbbbbb-1111",
                name="NVIDIA A10",
                total=24 * GiB,
                utilisation=None,
                slowdown=None,
                shutdown=None,
                ecc=None,
                remapped=None,
                recovery_action=None,
            ),
        ]
    )
    functions = fake.functions()
    for name in dir(pynvml):  # anything the fakes do not cover must not reach the real library
        if name.startswith("nvml") and callable(getattr(pynvml, name)) and name not in functions:

            def unexpected(*args: Any, _name: str = name) -> Any:
                raise AssertionError(f"unexpected NVML call {_name}{args}")

            monkeypatch.setattr(pynvml, name, unexpected)
    for name, fn in functions.items():
        monkeypatch.setattr(pynvml, name, fn)
    return fake


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@dataclass
class Hook:
    calls: list[GpuReport] = field(default_factory=list)

    async def __call__(self, report: GpuReport) -> None:
        self.calls.append(report)


@pytest.fixture
async def agent(fake_nvml: FakeNvml) -> AsyncIterator[tuple[NodeAgent, Hook]]:
    hook = Hook()
    agent = NodeAgent(NODE, pool=POOL, interval=0.05, on_drain=hook, xid_wait_ms=20)
    await agent.start()
    try:
        yield agent, hook
    finally:
        await agent.aclose()


@pytest.fixture
async def http(agent: tuple[NodeAgent, Hook]) -> AsyncIterator[httpx.AsyncClient]:
    runner = await serve(agent[0], "127.0.0.1", 0)
    port = runner.addresses[0][1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            yield client
    finally:
        await runner.cleanup()


# -- the inventory -------------------------------------------------------------------------------------


def test_inventory_reads_both_gpus(fake_nvml: FakeNvml) -> None:
    inventory = NvmlInventory()
    inventory.init()
    gpu0, _ = inventory.read_all()
    assert dataclasses.asdict(gpu0) == {
        "index": 0,
        "uuid": "GPU-aaaaaaaa-0000",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total": 80 * GiB,
        "memory_used": 20 * GiB,
        "utilisation": 35,
        "temperature": 51,
        "temperature_slowdown": 87,
        "temperature_shutdown": 92,
        "ecc_uncorrected": 0,
        "ecc_corrected": 2,
        "retired_pages_dbe": None,
        "retired_pages_sbe": None,
        "retired_pages_pending": None,
        "remapped_rows_correctable": 0,
        "remapped_rows_uncorrectable": 0,
        "remapped_rows_pending": False,
        "remapped_rows_failure": False,
        "recovery_action": 0,
        "recent_xids": (),
        "lost": False,
        "reset_required": False,
        "read_errors": (),
    }
    assert classify(gpu0).status == "healthy" and classify(gpu0).reasons == []
    inventory.shutdown()
    assert fake_nvml.calls["nvmlInit"] == 1 and fake_nvml.calls["nvmlShutdown"] == 1


def test_not_supported_fields_are_none_not_failures(fake_nvml: FakeNvml) -> None:
    inventory = NvmlInventory()
    inventory.init()
    gpu1 = inventory.read(1)
    assert gpu1.name == "NVIDIA A10" and gpu1.memory_total == 24 * GiB and gpu1.temperature == 40
    for name in (
        "utilisation",
        "temperature_slowdown",
        "temperature_shutdown",
        "ecc_uncorrected",
        "ecc_corrected",
        "retired_pages_pending",
        "remapped_rows_pending",
        "remapped_rows_failure",
        "recovery_action",
    ):
        assert getattr(gpu1, name) is None, name
    assert gpu1.read_errors == () and not gpu1.lost
    assert classify(gpu1).status == "healthy"


def test_pre_ampere_retired_pages(fake_nvml: FakeNvml) -> None:
    fake_nvml.gpus[0].retired = (2, 5, 1)
    fake_nvml.gpus[0].remapped = None
    reading = NvmlInventory().read(0)
    assert (reading.retired_pages_dbe, reading.retired_pages_sbe, reading.retired_pages_pending) == (2, 5, True)
    assert classify(reading).status == "drain"


def test_other_nvml_errors_are_reported_and_degrade(fake_nvml: FakeNvml) -> None:
    fake_nvml.gpus[0].failing["nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_UNKNOWN
    fake_nvml.gpus[0].failing["nvmlDeviceGetTemperatureThreshold"] = pynvml.NVML_ERROR_NO_PERMISSION
    reading = NvmlInventory().read(0)
    assert reading.temperature is None
    assert reading.read_errors == (
        "temperature: Unknown Error",
        "the slowdown temperature: Insufficient Permissions",
        "the shutdown temperature: Insufficient Permissions",
    )
    health = classify(reading)
    assert health.status == "degraded"
    assert health.reasons[0] == "NVML could not read temperature: Unknown Error"


def test_lost_gpu_drains(fake_nvml: FakeNvml) -> None:
    inventory = NvmlInventory()
    inventory.read(1)  # handle cached while the GPU still answers
    fake_nvml.gpus[1].lost = True
    reading = inventory.read(1)
    assert reading.lost and reading.read_errors == () and reading.memory_total is None
    assert classify(reading).reasons[0].startswith("GPU is lost")
    assert NvmlInventory().read(1).lost  # also when the handle itself cannot be had


def test_xid_events_from_the_event_set(fake_nvml: FakeNvml) -> None:
    fake_nvml.gpus[1].events = False
    inventory = NvmlInventory()
    inventory.init()
    inventory.read_all()
    events = inventory.open_xid_events()
    assert (events.registered, events.unsupported, events.failed) == ([0], [1], {})
    assert inventory.wait_xid(events, 10) is None  # timeout
    fake_nvml.queue_xid(0, 48)
    event = inventory.wait_xid(events, 1000)
    assert event is not None and (event.gpu_index, event.xid, event.uuid) == (0, 48, "GPU-aaaaaaaa-0000")
    # A handle NVML hands back that is not the registered object: found by its UUID.
    fake_nvml.queue_xid(dataclasses.replace(fake_nvml.gpus[1]), 79)
    event = inventory.wait_xid(events, 1000)
    assert event is not None and (event.gpu_index, event.xid) == (1, 79)
    inventory.close_xid_events(events)
    assert fake_nvml.freed == [events.handle]


# -- the agent -------------------------------------------------------------------------------------------


async def test_agent_reports_both_gpus(agent: tuple[NodeAgent, Hook]) -> None:
    a, hook = agent
    reports = a.reports()
    assert [(r.index, r.status, r.source) for r in reports] == [(0, "healthy", "nvml"), (1, "healthy", "nvml")]
    assert reports[0].to_json() == {
        "node": NODE,
        "index": 0,
        "uuid": "GPU-aaaaaaaa-0000",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total": 80 * GiB,
        "memory_used": 20 * GiB,
        "utilisation": 35,
        "temperature": 51,
        "ecc_uncorrected": 0,
        "retired_pages_pending": None,
        "remapped_rows_pending": False,
        "remapped_rows_failure": False,
        "recent_xids": [],
        "status": "healthy",
        "reasons": [],
        "source": "nvml",
    }
    assert a.watcher is not None and hook.calls == []


async def test_xid_79_drains_gpu_1_and_calls_on_drain_once(
    agent: tuple[NodeAgent, Hook], fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    a, hook = agent
    caplog.set_level(logging.WARNING, logger="drctl.node_agent")
    fake_nvml.queue_xid(1, 79)
    await eventually(lambda: len(hook.calls) == 1)
    report = hook.calls[0]
    assert (report.index, report.status, report.recent_xids) == (1, "drain", (79,))
    assert report.reasons[0].startswith("Xid 79: GPU has fallen off the bus")
    assert fake_nvml.xids.empty()  # yielded once
    for _ in range(3):
        await a.poll_once()
    fake_nvml.gpus[1].lost = True  # what NVML answers after a real Xid 79
    await a.poll_once()
    await asyncio.sleep(0.05)
    assert len(hook.calls) == 1, "on_drain is called once per transition to drain"
    assert [r.index for r in a.reports("drain")] == [1]
    assert a.reports()[1].reasons[0].startswith("GPU is lost")
    assert a.reports()[0].status == "healthy"
    drain_logs = [r.getMessage() for r in caplog.records if "must be drained" in r.getMessage()]
    assert drain_logs == [f"GPU {NODE}/1 (GPU-bbbbbbbb-1111) must be drained: {'; '.join(report.reasons)}"]


async def test_drain_hook_failure_is_logged_not_fatal(fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(report: GpuReport) -> None:
        raise RuntimeError("runbook unavailable")

    agent = NodeAgent(NODE, pool=POOL, interval=0.05, on_drain=broken, xid_wait_ms=20)
    await agent.start()
    try:
        fake_nvml.gpus[0].ecc = (1, 0)
        await agent.poll_once()
        await eventually(lambda: any("on_drain hook failed" in r.getMessage() for r in caplog.records))
        assert agent.reports("drain")[0].index == 0
        await agent.poll_once()
    finally:
        await agent.aclose()


async def test_polling_picks_up_changes(agent: tuple[NodeAgent, Hook], fake_nvml: FakeNvml) -> None:
    a, hook = agent
    stop = asyncio.Event()
    runner = asyncio.create_task(a.run(stop))
    try:
        fake_nvml.gpus[0].temperature = 88
        await eventually(lambda: a.reports()[0].status == "degraded")
        assert "slowdown threshold 87 °C" in a.reports()[0].reasons[0]
        fake_nvml.gpus[0].temperature = 60
        fake_nvml.gpus[0].ecc = (0, 2 + 50)  # a burst of correctable errors between two polls
        await eventually(lambda: "correctable" in " ".join(a.reports()[0].reasons))
        fake_nvml.gpus[0].remapped = (0, 1, 0, 1)
        await eventually(lambda: a.reports()[0].status == "drain")
        assert len(hook.calls) == 1 and hook.calls[0].index == 0
    finally:
        stop.set()
        await asyncio.wait_for(runner, 2)


async def test_a_gpu_that_disappears_drains(agent: tuple[NodeAgent, Hook], fake_nvml: FakeNvml) -> None:
    a, hook = agent
    fake_nvml.gpus.pop()
    await a.poll_once()
    assert a.reports()[1].status == "drain" and a.reports()[1].uuid == "GPU-bbbbbbbb-1111"
    await eventually(lambda: len(hook.calls) == 1)


async def test_xid_window_and_unknown_gpu(fake_nvml: FakeNvml) -> None:
    now = [1000.0]
    registry = CollectorRegistry()
    agent = NodeAgent(NODE, interval=1, xid_window=60, clock=lambda: now[0], registry=registry, xid_wait_ms=20)
    await agent.start()
    try:
        agent.record_xid(XidEvent(gpu_index=0, xid=94, at=now[0]))
        agent.record_xid(XidEvent(gpu_index=None, xid=79, at=now[0]))
        assert agent.reports()[0].status == "drain" and agent.reports()[1].status == "healthy"
        now[0] += 61
        await agent.poll_once()
        assert agent.reports()[0].status == "healthy" and agent.reports()[0].recent_xids == ()
        value = registry.get_sample_value("drctl_gpu_xid_events_total", {"node": NODE, "gpu": "unknown", "xid": "79"})
        assert value == 1
    finally:
        await agent.aclose()


async def test_no_gpu_with_xid_events(fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    for gpu in fake_nvml.gpus:
        gpu.events = False
    agent = NodeAgent(NODE, interval=1, xid_wait_ms=20)
    await agent.start()
    try:
        assert agent.watcher is None and agent.healthz()[1]["xid_events"] is False
        assert fake_nvml.freed == fake_nvml.event_sets
        assert any("no GPU on gpu-node-0 delivers Xid events" in r.getMessage() for r in caplog.records)
        assert [r.status for r in agent.reports()] == ["healthy", "healthy"]
    finally:
        await agent.aclose()


async def test_stop_is_prompt_and_frees_the_event_set(fake_nvml: FakeNvml) -> None:
    agent = NodeAgent(NODE, interval=1, xid_wait_ms=200)
    await agent.start()
    started = time.monotonic()
    await agent.aclose()
    assert time.monotonic() - started < 1.5
    assert fake_nvml.freed == fake_nvml.event_sets and len(fake_nvml.freed) == 1
    assert fake_nvml.calls["nvmlShutdown"] == 1


# -- HTTP --------------------------------------------------------------------------------------------------


async def test_http_gpus_healthz_and_metrics(
    agent: tuple[NodeAgent, Hook], http: httpx.AsyncClient, fake_nvml: FakeNvml
) -> None:
    _, hook = agent
    gpus = (await http.get("/gpus")).json()
    assert [(g["index"], g["uuid"], g["status"], g["source"]) for g in gpus] == [
        (0, "GPU-aaaaaaaa-0000", "healthy", "nvml"),
        (1, "GPU-bbbbbbbb-1111", "healthy", "nvml"),
    ]
    assert gpus[1]["ecc_uncorrected"] is None and gpus[1]["utilisation"] is None
    assert (await http.get("/gpus", params={"status": "drain"})).json() == []

    fake_nvml.queue_xid(1, 79)
    await eventually(lambda: len(hook.calls) == 1)
    drained = (await http.get("/gpus", params={"status": "drain"})).json()
    assert [(g["index"], g["recent_xids"], g["status"]) for g in drained] == [(1, [79], "drain")]
    assert drained[0]["reasons"][0].startswith("Xid 79")
    assert [g["index"] for g in (await http.get("/gpus?status=healthy")).json()] == [0]
    bad = await http.get("/gpus", params={"status": "broken"})
    assert bad.status_code == 400 and "unknown status" in bad.json()["error"]

    health = await http.get("/healthz")
    assert health.status_code == 200
    assert health.json() | {"last_poll_age_s": 0} == {
        "status": "ok",
        "node": NODE,
        "source": "nvml",
        "nvml": "ok",
        "xid_events": True,
        "gpus": 2,
        "drain": [1],
        "last_poll_age_s": 0,
    }

    metrics = await http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    samples = parse_metrics(metrics.text)
    gpu0 = {"node": NODE, "gpu": "0", "uuid": "GPU-aaaaaaaa-0000"}
    gpu1 = {"node": NODE, "gpu": "1", "uuid": "GPU-bbbbbbbb-1111"}
    assert samples[("drctl_gpu_memory_total_bytes", frozen(gpu0))] == 80 * GiB
    assert samples[("drctl_gpu_memory_used_bytes", frozen(gpu0))] == 20 * GiB
    assert samples[("drctl_gpu_memory_total_bytes", frozen(gpu1))] == 24 * GiB
    assert samples[("drctl_gpu_utilisation_percent", frozen(gpu0))] == 35
    assert ("drctl_gpu_utilisation_percent", frozen(gpu1)) not in samples  # not supported: no series
    assert samples[("drctl_gpu_temperature_celsius", frozen(gpu0))] == 51
    assert samples[("drctl_gpu_ecc_uncorrected_volatile", frozen(gpu0))] == 0
    status = {
        (dict(labels)["gpu"], dict(labels)["status"]): value
        for (name, labels), value in samples.items()
        if name == "drctl_gpu_status"
    }
    assert status == {
        ("0", "healthy"): 1,
        ("0", "degraded"): 0,
        ("0", "drain"): 0,
        ("0", "unknown"): 0,
        ("1", "healthy"): 0,
        ("1", "degraded"): 0,
        ("1", "drain"): 1,
        ("1", "unknown"): 0,
    }
    assert samples[("drctl_gpu_xid_events_total", frozen({"node": NODE, "gpu": "1", "xid": "79"}))] == 1
    assert samples[("drctl_node_agent_nvml_up", frozen({"node": NODE}))] == 1


def frozen(labels: dict[str, str]) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozen(sample.labels)): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- no NVML -----------------------------------------------------------------------------------------------


def real_nvml_present() -> bool:
    inventory = NvmlInventory()
    try:
        inventory.init()
    except NvmlUnavailable:
        return False
    inventory.shutdown()
    return True


needs_no_nvml = pytest.mark.skipif(real_nvml_present(), reason="this machine has NVML")


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVMLError_LibraryNotFound): libnvidia-ml.so.1 cannot be loaded"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVMLError_DriverNotLoaded): the NVIDIA kernel driver is not loaded"),
    ],
)
async def test_no_nvml_serves_the_policy(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture, code: int, words: str
) -> None:
    fake_nvml.init_error = code
    caplog.set_level(logging.INFO, logger="drctl.node_agent")
    agent = NodeAgent(NODE, pool=POOL, interval=0.05)
    await agent.start()
    try:
        for _ in range(3):
            await agent.poll_once()
        assert_policy_inventory(agent, words)
        messages = [r.getMessage() for r in caplog.records]
        assert len([m for m in messages if "no NVML" in m]) == 1, messages  # said once
        assert fake_nvml.calls.get("nvmlDeviceGetCount", 0) == 0 and agent.watcher is None
    finally:
        await agent.aclose()
    assert fake_nvml.calls.get("nvmlShutdown", 0) == 0


def assert_policy_inventory(agent: NodeAgent, words: str) -> None:
    reports = agent.reports()
    assert [(r.index, r.memory_total, r.status, r.source) for r in reports] == [
        (0, 80 * GiB, UNKNOWN_NO_NVML, "policy"),
        (1, 80 * GiB, UNKNOWN_NO_NVML, "policy"),
    ]
    assert words in reports[0].reasons[0] and reports[0].reasons[0].startswith("no NVML on this node (")
    assert agent.reports("unknown") == reports and agent.reports(UNKNOWN_NO_NVML) == reports
    assert agent.reports("drain") == []
    assert agent.source == "policy" and agent.nvml_unavailable is not None and words in agent.nvml_unavailable
    ok, body = agent.healthz()
    assert ok and body["source"] == "policy" and body["nvml"].startswith("unavailable: ")


@needs_no_nvml
def test_real_nvml_init_says_why() -> None:
    with pytest.raises(NvmlUnavailable) as caught:
        NvmlInventory().init()
    assert caught.value.reason == (
        "NVML Shared Library Not Found (NVMLError_LibraryNotFound): "
        "libnvidia-ml.so.1 cannot be loaded - no NVIDIA driver on this machine "
        "(or, in a container, the NVIDIA runtime did not mount it)"
    )


@needs_no_nvml
async def test_real_no_nvml_agent_over_http(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="drctl.node_agent")
    agent = NodeAgent(NODE, pool=POOL, interval=0.05)
    await agent.start()
    runner = await serve(agent, "127.0.0.1", 0)
    try:
        assert_policy_inventory(agent, "NVMLError_LibraryNotFound")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}") as client:
            gpus = (await client.get("/gpus")).json()
            assert [(g["index"], g["status"], g["source"]) for g in gpus] == [
                (0, UNKNOWN_NO_NVML, "policy"),
                (1, UNKNOWN_NO_NVML, "policy"),
            ]
            assert (await client.get("/gpus?status=unknown")).json() == gpus
            metrics = (await client.get("/metrics")).text
            assert f'drctl_node_agent_nvml_up{{node="{NODE}"}} 0.0' in metrics
            assert f'drctl_gpu_status{{gpu="1",node="{NODE}",status="unknown",uuid=""}} 1.0' in metrics
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "no NVML on this machine" in warnings[0]
    finally:
        await runner.cleanup()
        await agent.aclose()


FAULT_TOKEN = "drill-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {FAULT_TOKEN}"}


@needs_no_nvml
async def test_fault_injection_drains_a_policy_gpu_and_clears(caplog: pytest.LogCaptureFixture) -> None:
    drained: list[str] = []

    async def on_drain(report: GpuReport) -> None:
        drained.append(report.gpu_id)

    agent = NodeAgent(NODE, pool=POOL, interval=0.05, on_drain=on_drain)
    await agent.start()
    plain = await serve(agent, "127.0.0.1", 0)
    drills = await serve(agent, "127.0.0.1", 0, allow_fault_injection=True, fault_token=FAULT_TOKEN)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{plain.addresses[0][1]}") as client:
            # Without --allow-fault-injection there is nothing to inject into, token or not.
            assert (await client.post("/faults/xid", json={"gpu": 1, "xid": 79}, headers=AUTH)).status_code in (
                404,
                405,
            )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{drills.addresses[0][1]}", headers=AUTH) as client:
            bad = await client.post("/faults/xid", json={"gpu": "one"})
            assert bad.status_code == 400 and "gpu" in bad.json()["error"]
            assert (await client.post("/faults/xid", json={"gpu": 9, "xid": 79})).status_code == 404
            report = (await client.post("/faults/xid", json={"gpu": 1, "xid": 79})).json()
            assert report["status"] == "drain" and report["recent_xids"] == [79]
            await asyncio.sleep(0.05)
            assert drained == [f"{NODE}/1"]
            assert [g["index"] for g in (await client.get("/gpus?status=drain")).json()] == [1]
            assert (await client.delete("/faults")).json() == {"cleared": [1]}
            gpus = (await client.get("/gpus")).json()
            assert [(g["index"], g["status"]) for g in gpus] == [(0, UNKNOWN_NO_NVML), (1, UNKNOWN_NO_NVML)]
            # A second injection is a new transition: the hook runs again.
            await client.post("/faults/xid", json={"gpu": 1, "xid": 79})
            await asyncio.sleep(0.05)
            assert drained == [f"{NODE}/1", f"{NODE}/1"]
    finally:
        await plain.cleanup()
        await drills.cleanup()
        await agent.aclose()


@needs_no_nvml
async def test_fault_endpoints_need_the_token(caplog: pytest.LogCaptureFixture) -> None:
    """What was seen on `drctl up`: one unauthenticated POST drained a GPU and failed over two tenants'
    instances, and the GPU stayed cordoned. Now nothing changes without the token."""
    drained: list[str] = []

    async def on_drain(report: GpuReport) -> None:
        drained.append(report.gpu_id)

    agent = NodeAgent(NODE, pool=POOL, interval=0.05, on_drain=on_drain)
    await agent.start()
    runner = await serve(agent, "127.0.0.1", 0, allow_fault_injection=True, fault_token=FAULT_TOKEN)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}") as client:
            asks = [
                {},
                {"Authorization": "Bearer wrong-token-0123456789"},
                {"Authorization": f"Bearer {FAULT_TOKEN}x"},
                {"Authorization": f"Bearer {FAULT_TOKEN[:-1]}"},
                {"Authorization": f"Basic {FAULT_TOKEN}"},
                {"Authorization": "Bearer"},
            ]
            for headers in asks:
                refused = await client.post("/faults/xid", json={"gpu": 1, "xid": 79}, headers=headers)
                assert refused.status_code == 401, headers
                assert refused.headers["WWW-Authenticate"].startswith("Bearer")
                assert "bearer token" in refused.json()["error"]
                assert (await client.delete("/faults", headers=headers)).status_code == 401
            await asyncio.sleep(0.05)
            assert drained == []
            assert {g["status"] for g in (await client.get("/gpus")).json()} == {UNKNOWN_NO_NVML}
            # Reading stays open: Prometheus and kubelet probes have no token.
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
            # The token is checked before the body is read: a hostile body without it is a 401 too.
            nested = await client.post(
                "/faults/xid", content=b"[" * 100_000, headers={"Content-Type": "application/json"}
            )
            assert nested.status_code == 401
            deep = await client.post(
                "/faults/xid", content=b"[" * 4000, headers={**AUTH, "Content-Type": "application/json"}
            )
            assert deep.status_code == 400
            huge = await client.post("/faults/xid", content=b" " * 10_000, headers=AUTH)
            assert huge.status_code == 413
            assert (await client.post("/faults/xid", json={"gpu": 1, "xid": 1 << 40}, headers=AUTH)).status_code == 400
            assert (await client.post("/faults/xid", json=[1, 79], headers=AUTH)).status_code == 400
        assert any("fault injection refused" in r.getMessage() for r in caplog.records)
        assert not any(FAULT_TOKEN in r.getMessage() for r in caplog.records)
    finally:
        await runner.cleanup()
        await agent.aclose()


def test_fault_injection_without_a_token_is_refused() -> None:
    agent = NodeAgent(NODE, pool=POOL)
    with pytest.raises(FaultTokenMissing, match="DRCTL_FAULT_INJECTION_TOKEN"):
        make_app(agent, allow_fault_injection=True)
    with pytest.raises(FaultTokenMissing):
        make_app(agent, allow_fault_injection=True, fault_token="")
    make_app(agent)  # without fault injection no token is needed


# -- the command line and the check script, as real processes ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def agent_process() -> Iterator[Callable[..., tuple[subprocess.Popen[str], str]]]:
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "drctl.detectors.gpu_node_agent", "--port", str(port), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        processes.append(process)
        return process, f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.communicate()


@needs_no_nvml
async def test_command_line_without_nvml(agent_process: Any) -> None:
    process, url = agent_process("--node", "gpu-node-1", "--policy", "examples/dr-policy.yaml", "--interval", "0.2")
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        deadline = time.monotonic() + 20
        while True:
            try:
                gpus = (await client.get("/gpus")).json()
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert (await client.get("/healthz")).status_code == 200
    assert [(g["node"], g["index"], g["status"], g["source"]) for g in gpus] == [
        ("gpu-node-1", i, UNKNOWN_NO_NVML, "policy") for i in range(4)
    ]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert stderr.count("no NVML on this machine (NVML Shared Library Not Found (NVMLError_LibraryNotFound)") == 1


@needs_no_nvml
def test_command_line_unknown_node_without_nvml() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "drctl.detectors.gpu_node_agent", "--node", "gpu-node-9", "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DRCTL_POLICY": "examples/dr-policy.yaml"},
    )
    assert result.returncode == 2
    assert "node 'gpu-node-9' is not in the policy (known: gpu-node-0, gpu-node-1, gpu-node-2, gpu-node-3)" in (
        result.stderr
    )


def test_command_line_bad_policy(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("models: []\n")
    result = subprocess.run(
        [sys.executable, "-m", "drctl.detectors.gpu_node_agent", "--node", NODE, "--policy", str(policy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and str(policy) in result.stderr and "invalid policy" in result.stderr


def test_command_line_fault_injection_needs_a_token(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "drctl.detectors.gpu_node_agent", "--node", NODE, "--port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRCTL_FAULT_INJECTION")}
    env["DRCTL_POLICY"] = "examples/dr-policy.yaml"
    refused = subprocess.run(
        [*command, "--allow-fault-injection"], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
    )
    assert refused.returncode == 2
    assert "--allow-fault-injection needs a token" in refused.stderr and "Traceback" not in refused.stderr
    missing = tmp_path / "no-such-token"
    unreadable = subprocess.run(
        [*command, "--allow-fault-injection"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "DRCTL_FAULT_INJECTION_TOKEN_FILE": str(missing)},
    )
    assert unreadable.returncode == 2 and f"DRCTL_FAULT_INJECTION_TOKEN_FILE {missing}: cannot read it" in (
        unreadable.stderr
    )


@needs_no_nvml
async def test_command_line_fault_injection_with_a_token_file(agent_process: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "fault-token"
    token_file.write_text(FAULT_TOKEN + "\n")
    process, url = agent_process(
        "--node",
        "gpu-node-1",
        "--policy",
        "examples/dr-policy.yaml",
        "--allow-fault-injection",
        env={"DRCTL_FAULT_INJECTION_TOKEN_FILE": str(token_file), "DRCTL_TEMPORAL_ADDRESS": "127.0.0.1:1"},
    )
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        deadline = time.monotonic() + 20
        while True:
            try:
                refused = await client.delete("/faults")
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert refused.status_code == 401
        assert (await client.delete("/faults", headers=AUTH)).json() == {"cleared": []}
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert "fault injection on (bearer token)" in stderr and FAULT_TOKEN not in stderr


BLOCK_SERVER_DEPS = """
import importlib.abc, runpy, sys
BLOCKED = ("aiohttp", "prometheus_client", "pydantic", "pydantic_settings", "yaml", "httpx", "temporalio")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the NVML check must run with only nvidia-ml-py")
sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[1], "--wait", "0.2"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_nvml_check_script_needs_only_nvidia_ml_py() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_SERVER_DEPS, str(ROOT / "scripts" / "nvml_check.py")],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    if real_nvml_present():  # a GPU machine: the real check runs
        assert result.returncode == 0, result.stderr
        assert '"gpus"' in result.stdout
    else:
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            "nvml_check: no NVML: NVML Shared Library Not Found (NVMLError_LibraryNotFound): "
            "libnvidia-ml.so.1 cannot be loaded - no NVIDIA driver on this machine "
            "(or, in a container, the NVIDIA runtime did not mount it)"
        )


# -- the drain on a cluster: the DaemonSet's Temporal settings -----------------------------------------------


def daemonset_environment(temporal_address: str) -> dict[str, str]:
    """The node agent's environment as deploy/kubernetes gives it: the ConfigMap drctl-env (which its
    container must take, as the worker's do) and its own literal env; the Temporal address pointed at
    the test's server, the policy at a file of this checkout."""
    deploy = ROOT / "deploy" / "kubernetes"
    (config,) = yaml.safe_load_all((deploy / "config.yaml").read_text(encoding="utf-8"))
    daemonset = next(
        d
        for d in yaml.safe_load_all((deploy / "node-agent.yaml").read_text(encoding="utf-8"))
        if d["kind"] == "DaemonSet"
    )
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container.get("envFrom", []), (
        "the node agent reads the worker's Temporal settings"
    )
    env = {k: str(v) for k, v in config["data"].items()}
    env.update({e["name"]: str(e["value"]) for e in container["env"] if "value" in e})  # env wins over envFrom
    assert {"DRCTL_TEMPORAL_ADDRESS", "DRCTL_TEMPORAL_NAMESPACE", "DRCTL_TASK_QUEUE"} <= env.keys()
    env.update(
        DRCTL_TEMPORAL_ADDRESS=temporal_address,
        DRCTL_POLICY=str(ROOT / "examples" / "dr-policy.yaml"),
        DRCTL_HOST="127.0.0.1",
        DRCTL_FAULT_INJECTION_TOKEN=FAULT_TOKEN,  # the drills component's Secret
    )
    return env


@needs_no_nvml
async def test_an_xid_on_a_cluster_starts_the_drain_on_the_workers_temporal(
    agent_process: Any, time_skipping_env: Any
) -> None:
    """An Xid 79 makes the GPU "drain", and the agent, configured as the DaemonSet is, starts
    DrainGpuWorkflow for it on the Temporal namespace and task queue of drctl-env, where the worker
    polls. Without those settings (the DaemonSet before) it tried 127.0.0.1:7233 and failed: the GPU
    was kept out of placement but never drained."""
    client = time_skipping_env.client
    env = daemonset_environment(client.service_client.config.target_host)
    assert client.namespace == env["DRCTL_TEMPORAL_NAMESPACE"]
    process, url = agent_process("--node", "gpu-node-1", "--interval", "0.2", "--allow-fault-injection", env=env)
    async with httpx.AsyncClient(base_url=url, timeout=5, headers=AUTH) as http:
        deadline = time.monotonic() + 20
        while True:
            try:
                injected = await http.post("/faults/xid", json={"gpu": 1, "xid": 79})
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert injected.json()["status"] == "drain"
    handle = client.get_workflow_handle(drain_workflow_id("gpu-node-1/1"))
    deadline = time.monotonic() + 20
    while True:
        try:
            described = await handle.describe()
            break
        except RPCError:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no DrainGpuWorkflow started"
            await asyncio.sleep(0.1)
    assert described.workflow_type == "DrainGpuWorkflow"
    assert described.task_queue == env["DRCTL_TASK_QUEUE"]
    await handle.terminate("test over")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert f"GPU gpu-node-1/1 drains: started {handle.id}" in stderr
