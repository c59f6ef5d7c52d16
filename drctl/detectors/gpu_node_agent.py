"""The GPU node agent: reads every GPU of its node from NVML, classifies it, and serves the result.

    python -m drctl.detectors.gpu_node_agent --node gpu-node-0 [--port 9400] [--policy FILE] [--interval 5]
        [--log-format json]

Every ``--interval`` seconds it reads each GPU through NVML (``pynvml``, from the ``nvidia-ml-py``
package): memory, utilisation, temperature and its slowdown/shutdown thresholds, volatile ECC
counters, retired pages, remapped rows and NVML's recovery action. A background thread waits for
Xid events (``nvmlEventSetWait_v2`` with a timeout, so it stops promptly) and re-classifies the GPU
at once when one arrives. :func:`drctl.policies.gpu_health.classify` (pure) turns each reading into
``healthy`` / ``degraded`` / ``drain`` with reasons.

HTTP (aiohttp)
    ``GET /gpus``                 every GPU of the node as JSON (see :meth:`GpuReport.to_json`)
    ``GET /gpus?status=drain``    only those with that status (``healthy``, ``degraded``, ``drain``,
                                  ``unknown``)
    ``GET /healthz``              the agent itself: 200 while polls succeed, 503 when they stall
    ``GET /metrics``              Prometheus: memory, utilisation, temperature, ECC, status per GPU
                                  (one series per status, 1 for the current one), Xid events by code
    ``POST /faults/xid``          drills only (``--allow-fault-injection``): ``{"gpu": 0, "xid": 79}``
                                  is handled as if the driver had reported it (like DCGM's error
                                  injection); 404 unless the flag is given
    ``DELETE /faults``            drills only: forget injected Xids and re-classify (the drill's
                                  restore step)

The fault endpoints drain GPUs and fail instances over, so they need their own bearer token
(``Authorization: Bearer <token>``; 401 without it or with another, compared in constant time): the
agent refuses to start with ``--allow-fault-injection`` unless ``DRCTL_FAULT_INJECTION_TOKEN`` or
``DRCTL_FAULT_INJECTION_TOKEN_FILE`` is set. It does not make one up: a token nobody else knows would
only make the endpoints useless. ``drctl up`` writes a new one per stack (``.drctl/fault-token``,
0600) and gives it to its agents and to the worker, whose drills send it. The other endpoints only
read, and are open: Prometheus and kubelet probes use them (the DaemonSet listens on the pod's
address). The agent listens on ``DRCTL_HOST`` (127.0.0.1) unless ``--host`` says otherwise.

A GPU whose status *becomes* ``drain`` is logged and handed to the ``on_drain`` hook once (per
transition). The command line's hook (:func:`drain_runbook_hook`) starts ``DrainGpuWorkflow`` for it
on Temporal, which moves its instances away; if Temporal cannot be reached the GPU stays reported as
``drain`` on ``/gpus`` (the zone checker and ``drctl drain`` read it there).

Without NVML (no driver: ``nvmlInit`` raises ``NVMLError_LibraryNotFound`` or
``NVMLError_DriverNotLoaded``, as on every machine without an NVIDIA GPU) the agent says so once,
with the reason, and serves the node's GPUs as the policy declares them (``gpuPool.nodes``, the
node named by ``--node``) with status ``unknown (no NVML)`` and ``source: "policy"``.

Only :class:`NvmlInventory` calls pynvml, and it looks every function up on the module at call
time, so tests replace them at the pynvml function boundary. An NVML call that answers "not
supported" (or a function the installed driver does not have) gives ``None`` for that value and is
no failure. The NVML part (:class:`~drctl.detectors.nvml.NvmlInventory`,
:class:`~drctl.detectors.nvml.XidWatcher`) lives in :mod:`drctl.detectors.nvml`, which imports only
the standard library, pynvml and the pure ``drctl.policies.gpu_health``: ``scripts/nvml_check.py``
uses it on a GPU machine where only ``nvidia-ml-py`` is installed. aiohttp, prometheus-client and
the policy schema are imported where the agent and the server use them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import hmac
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from drctl.detectors.nvml import (
    NvmlCallError,
    NvmlInventory,
    NvmlUnavailable,
    XidEvent,
    XidWatcher,
)
from drctl.policies.gpu_health import (
    DEFAULT_THRESHOLDS,
    STATUSES,
    UNKNOWN_NO_NVML,
    GpuHealth,
    GpuReading,
    HealthThresholds,
    classify,
)

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from drctl.policies.placement import GpuSlot
    from drctl.policies.schema import GpuPoolPolicy

log = logging.getLogger("drctl.node_agent")

DEFAULT_PORT = 9400
DEFAULT_XID_WINDOW_S = 24 * 3600.0
"""How long an Xid counts in the classification (a drain-class Xid keeps the GPU drained so long,
unless the agent restarts)."""

Source = Literal["nvml", "policy"]
STATUS_FILTERS = (*STATUSES, "unknown")


# -- reports ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuReport:
    """What the agent says about one GPU (``GET /gpus``)."""

    node: str
    index: int
    uuid: str | None
    name: str | None
    memory_total: int | None
    memory_used: int | None
    utilisation: int | None
    temperature: int | None
    ecc_uncorrected: int | None
    retired_pages_pending: bool | None
    remapped_rows_pending: bool | None
    remapped_rows_failure: bool | None
    recent_xids: tuple[int, ...]
    status: str
    """``healthy``, ``degraded``, ``drain`` or ``unknown (no NVML)``."""
    reasons: tuple[str, ...]
    source: Source

    @property
    def gpu_id(self) -> str:
        """The placement engine's id of this GPU (``GpuSlot.id``)."""
        return f"{self.node}/{self.index}"

    def matches(self, status: str) -> bool:
        return self.status == status or self.status.split(" ", 1)[0] == status

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["recent_xids"] = list(self.recent_xids)
        data["reasons"] = list(self.reasons)
        return data

    @classmethod
    def from_reading(cls, node: str, reading: GpuReading, health: GpuHealth) -> GpuReport:
        return cls(
            node=node,
            index=reading.index,
            uuid=reading.uuid,
            name=reading.name,
            memory_total=reading.memory_total,
            memory_used=reading.memory_used,
            utilisation=reading.utilisation,
            temperature=reading.temperature,
            ecc_uncorrected=reading.ecc_uncorrected,
            retired_pages_pending=reading.retired_pages_pending,
            remapped_rows_pending=reading.remapped_rows_pending,
            remapped_rows_failure=reading.remapped_rows_failure,
            recent_xids=reading.recent_xids,
            status=health.status,
            reasons=tuple(health.reasons),
            source="nvml",
        )

    @classmethod
    def from_policy(cls, node: str, index: int, memory: int, why: str) -> GpuReport:
        return cls(
            node=node,
            index=index,
            uuid=None,
            name=None,
            memory_total=memory,
            memory_used=None,
            utilisation=None,
            temperature=None,
            ecc_uncorrected=None,
            retired_pages_pending=None,
            remapped_rows_pending=None,
            remapped_rows_failure=None,
            recent_xids=(),
            status=UNKNOWN_NO_NVML,
            reasons=(f"no NVML on this node ({why}); GPU as declared in the policy",),
            source="policy",
        )


OnDrain = Callable[[GpuReport], Awaitable[None]]
"""Called once when a GPU's status becomes ``drain``: the hook for the runbook that moves its
instances away (not built here)."""


# -- the agent ---------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self, node: str, registry: CollectorRegistry | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.node = node
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["node", "gpu", "uuid"]
        r = self.registry
        self.memory_total = Gauge("drctl_gpu_memory_total_bytes", "GPU memory", labels, registry=r)
        self.memory_used = Gauge("drctl_gpu_memory_used_bytes", "GPU memory in use", labels, registry=r)
        self.utilisation = Gauge("drctl_gpu_utilisation_percent", "GPU (SM) utilisation", labels, registry=r)
        self.temperature = Gauge("drctl_gpu_temperature_celsius", "GPU temperature", labels, registry=r)
        self.ecc_uncorrected = Gauge(
            "drctl_gpu_ecc_uncorrected_volatile", "Uncorrected ECC errors since the driver loaded", labels, registry=r
        )
        self.status = Gauge(
            "drctl_gpu_status",
            "1 for the GPU's current status (healthy, degraded, drain, unknown), 0 for the others",
            [*labels, "status"],
            registry=r,
        )
        self.xids = Counter(
            "drctl_gpu_xid_events", "Xid events reported by the driver", ["node", "gpu", "xid"], registry=r
        )
        self.nvml = Gauge(
            "drctl_node_agent_nvml_up", "1 when the agent reads NVML, 0 on the policy", ["node"], registry=r
        )

    def gpus(self, reports: Sequence[GpuReport]) -> None:
        gauges = (self.memory_total, self.memory_used, self.utilisation, self.temperature, self.ecc_uncorrected)
        for gauge in (*gauges, self.status):
            gauge.clear()
        for report in reports:
            labels = (self.node, str(report.index), report.uuid or "")
            values = (
                report.memory_total,
                report.memory_used,
                report.utilisation,
                report.temperature,
                report.ecc_uncorrected,
            )
            for gauge, value in zip(gauges, values, strict=True):
                if value is not None:
                    gauge.labels(*labels).set(value)
            current = report.status.split(" ", 1)[0]
            for status in STATUS_FILTERS:
                self.status.labels(*labels, status).set(1 if status == current else 0)

    def xid(self, event: XidEvent) -> None:
        gpu = "unknown" if event.gpu_index is None else str(event.gpu_index)
        self.xids.labels(self.node, gpu, str(event.xid)).inc()


class NodeAgent:
    """Polls NVML (or serves the policy's inventory), classifies, and keeps the reports."""

    def __init__(
        self,
        node: str,
        *,
        inventory: NvmlInventory | None = None,
        pool: GpuPoolPolicy | None = None,
        interval: float = 5.0,
        on_drain: OnDrain | None = None,
        thresholds: HealthThresholds = DEFAULT_THRESHOLDS,
        xid_window: float = DEFAULT_XID_WINDOW_S,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
        xid_wait_ms: int = 500,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.node = node
        self.inventory = inventory if inventory is not None else NvmlInventory()
        self.pool = pool
        self.interval = interval
        self.on_drain = on_drain
        self.thresholds = thresholds
        self.xid_window = xid_window
        self.clock = clock
        self.xid_wait_ms = xid_wait_ms
        self.metrics = _Metrics(node, registry)
        self.source: Source = "nvml"
        self.nvml_unavailable: str | None = None
        """Why NVML is not used (None while it is)."""
        self.watcher: XidWatcher | None = None
        self.last_poll: float | None = None
        """``time.monotonic()`` of the last successful poll."""
        self._reports: dict[int, GpuReport] = {}
        self._readings: dict[int, GpuReading] = {}
        self._previous: dict[int, GpuReading] = {}
        self._xids: dict[int, deque[XidEvent]] = {}
        self._drain_tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._injected: set[int] = set()
        """GPUs with an Xid injected by a drill (what ``clear_injected`` puts back)."""

    # lifecycle

    async def start(self) -> None:
        """Initialise NVML (or fall back to the policy), start the Xid thread, poll once."""
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self.inventory.init)
        except NvmlUnavailable as exc:
            self._serve_policy(exc.reason)
            return
        self.metrics.nvml.labels(self.node).set(1)
        driver = await asyncio.to_thread(self.inventory.driver_version)
        log.info("NVML ready on %s (driver %s)", self.node, driver or "version unknown")
        self.watcher = XidWatcher(self.inventory, self._xid_from_thread, timeout_ms=self.xid_wait_ms)
        try:
            events = await asyncio.to_thread(self.watcher.start)
        except NvmlCallError as exc:
            log.warning("no Xid events on %s (%s): Xids will not be seen, only polled values", self.node, exc)
            self.watcher = None
        else:
            if events.unsupported:
                log.warning("GPU(s) %s do not support Xid events", ", ".join(map(str, events.unsupported)))
            for index, error in events.failed.items():
                log.warning("GPU %d: registering for Xid events failed: %s", index, error)
            if not events.registered:
                log.warning("no GPU on %s delivers Xid events: only polled values count", self.node)
                await asyncio.to_thread(self.watcher.stop)
                self.watcher = None
        await self.poll_once()
        self._compare_with_policy()

    async def aclose(self) -> None:
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
            self.watcher = None
        if self._drain_tasks:
            await asyncio.wait(set(self._drain_tasks), timeout=10)
        await asyncio.to_thread(self.inventory.shutdown)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every ``interval`` until ``stop`` is set (call :meth:`start` first)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
            except TimeoutError:
                pass
            else:
                return
            try:
                await self.poll_once()
            except Exception:
                log.exception("poll failed")

    def _serve_policy(self, reason: str) -> None:
        self.source = "policy"
        self.nvml_unavailable = reason
        self.metrics.nvml.labels(self.node).set(0)
        node = None if self.pool is None else next((n for n in self.pool.nodes if n.name == self.node), None)
        if node is None:
            known = "no policy given" if self.pool is None else "known: " + ", ".join(n.name for n in self.pool.nodes)
            log.error(
                "no NVML on this machine (%s), and node %r is not in the policy (%s): no GPUs to report",
                reason,
                self.node,
                known,
            )
            return
        log.warning(
            "no NVML on this machine (%s): serving the %d GPU(s) the policy declares for node %r with status %r",
            reason,
            node.gpus,
            self.node,
            UNKNOWN_NO_NVML,
        )
        for slot in _policy_slots(self.pool, self.node):
            self._reports[slot.index] = GpuReport.from_policy(self.node, slot.index, slot.memory, reason)
        self.metrics.gpus(self.reports())
        self.last_poll = time.monotonic()

    def _compare_with_policy(self) -> None:
        if self.pool is None:
            return
        node = next((n for n in self.pool.nodes if n.name == self.node), None)
        if node is None:
            log.warning("node %r is not in the policy's gpuPool.nodes; placement does not know its GPUs", self.node)
        elif node.gpus != len(self._reports):
            log.warning("the policy declares %d GPU(s) on %r, NVML lists %d", node.gpus, self.node, len(self._reports))

    # polling

    async def poll_once(self) -> list[GpuReport]:
        """Read every GPU once and update the reports (the policy's inventory needs no reading)."""
        if self.source == "policy":
            self.last_poll = time.monotonic()
            return self.reports()
        try:
            readings = await asyncio.to_thread(self.inventory.read_all)
        except NvmlCallError as exc:
            log.error("reading NVML failed: %s", exc)
            return self.reports()
        seen = {r.index for r in readings}
        for index, old in list(self._readings.items()):
            if index not in seen:  # NVML stopped listing a GPU it listed before
                readings.append(GpuReading(index=index, uuid=old.uuid, name=old.name, lost=True))
        for reading in readings:
            self._previous[reading.index] = self._readings.get(reading.index, reading)
            self._readings[reading.index] = reading
            self._classify(reading.index)
        self.metrics.gpus(self.reports())
        self.last_poll = time.monotonic()
        return self.reports()

    def _classify(self, index: int) -> None:
        reading = dataclasses.replace(self._readings[index], recent_xids=self._recent_xids(index))
        previous = self._previous.get(index)
        health = classify(reading, previous if previous is not reading else None, self.thresholds)
        self._set_report(GpuReport.from_reading(self.node, reading, health))

    def _recent_xids(self, index: int) -> tuple[int, ...]:
        events = self._xids.get(index)
        if not events:
            return ()
        horizon = self.clock() - self.xid_window
        while events and events[0].at < horizon:
            events.popleft()
        return tuple(e.xid for e in events)

    def _set_report(self, report: GpuReport) -> None:
        old = self._reports.get(report.index)
        self._reports[report.index] = report
        was = None if old is None else old.status
        if report.status == was:
            return
        if report.status == "drain":
            log.warning("GPU %s (%s) must be drained: %s", report.gpu_id, report.uuid, "; ".join(report.reasons))
            self._spawn_drain(report)
        elif report.status == "degraded":
            log.warning("GPU %s (%s) is degraded: %s", report.gpu_id, report.uuid, "; ".join(report.reasons))
        elif was is not None:
            log.info("GPU %s (%s) is %s again", report.gpu_id, report.uuid, report.status)

    def _spawn_drain(self, report: GpuReport) -> None:
        if self.on_drain is None:
            return
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(self._call_drain(self.on_drain, report))
        self._drain_tasks.add(task)
        task.add_done_callback(self._drain_tasks.discard)

    @staticmethod
    async def _call_drain(hook: OnDrain, report: GpuReport) -> None:
        try:
            await hook(report)
        except Exception:
            log.exception("the on_drain hook failed for GPU %s", report.gpu_id)

    # Xid events

    def _xid_from_thread(self, event: XidEvent) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        event = dataclasses.replace(event, at=self.clock())
        try:
            loop.call_soon_threadsafe(self.record_xid, event)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass

    def record_xid(self, event: XidEvent) -> None:
        """Count an Xid and re-classify its GPU at once (runs on the event loop)."""
        where = "an unknown GPU" if event.gpu_index is None else f"GPU {self.node}/{event.gpu_index}"
        log.warning("Xid %d on %s (%s)", event.xid, where, event.uuid)
        self.metrics.xid(event)
        if event.gpu_index is None:
            return
        self._xids.setdefault(event.gpu_index, deque(maxlen=1024)).append(event)
        if event.gpu_index in self._readings:
            self._classify(event.gpu_index)
            self.metrics.gpus(self.reports())

    # fault injection (drills)

    def inject_xid(self, gpu_index: int, xid: int) -> GpuReport:
        """Handle ``xid`` on GPU ``gpu_index`` as if the driver had reported it; returns the new report.

        Without NVML (the GPUs come from the policy) the GPU gets a reading with nothing but the
        Xid, so :func:`classify` decides exactly as it would for a real event."""
        if gpu_index not in self._reports:
            raise LookupError(f"no GPU {gpu_index} on {self.node}; GPUs: {sorted(self._reports)}")
        if gpu_index not in self._readings:
            old = self._reports[gpu_index]
            self._readings[gpu_index] = GpuReading(index=gpu_index, uuid=old.uuid, memory_total=old.memory_total)
        self._injected.add(gpu_index)
        self.record_xid(XidEvent(gpu_index=gpu_index, xid=xid, at=self.clock(), uuid=self._reports[gpu_index].uuid))
        return self._reports[gpu_index]

    def clear_injected(self) -> list[int]:
        """Forget every injected Xid and re-classify those GPUs; returns their indexes."""
        cleared = sorted(self._injected)
        for index in cleared:
            self._xids.pop(index, None)
            if self.source == "policy":
                self._readings.pop(index, None)
                slot = next((s for s in _policy_slots(self.pool, self.node) if s.index == index), None)
                memory = slot.memory if slot is not None else 0
                self._set_report(GpuReport.from_policy(self.node, index, memory, self.nvml_unavailable or "policy"))
            elif index in self._readings:
                self._classify(index)
        self._injected.clear()
        self.metrics.gpus(self.reports())
        return cleared

    # queries

    def reports(self, status: str | None = None) -> list[GpuReport]:
        reports = [self._reports[i] for i in sorted(self._reports)]
        return reports if status is None else [r for r in reports if r.matches(status)]

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        age = None if self.last_poll is None else time.monotonic() - self.last_poll
        ok = age is not None and age <= max(3 * self.interval, self.interval + 10)
        return ok, {
            "status": "ok" if ok else "stale",
            "node": self.node,
            "source": self.source,
            "nvml": "ok" if self.nvml_unavailable is None else f"unavailable: {self.nvml_unavailable}",
            "xid_events": self.watcher is not None,
            "gpus": len(self._reports),
            "drain": [r.index for r in self.reports("drain")],
            "last_poll_age_s": None if age is None else round(age, 3),
        }


def _policy_slots(pool: GpuPoolPolicy | None, node: str) -> list[GpuSlot]:
    if pool is None:
        return []
    from drctl.policies.placement import gpu_inventory

    return [slot for slot in gpu_inventory(pool) if slot.node == node]


# -- HTTP ---------------------------------------------------------------------------------------------


FAULT_BODY_MAX = 4096
"""Largest fault-injection body accepted (``{"gpu": 0, "xid": 79}`` is 20 bytes)."""
FAULT_REALM = 'Bearer realm="drctl-faults"'


class FaultTokenMissing(ValueError):
    """``--allow-fault-injection`` without a token to protect the endpoints."""

    def __init__(self) -> None:
        super().__init__(
            "--allow-fault-injection needs a token: set DRCTL_FAULT_INJECTION_TOKEN, or "
            "DRCTL_FAULT_INJECTION_TOKEN_FILE to a file holding one (drctl up makes one per stack); "
            "the fault endpoints drain GPUs and must not be open to anyone who can connect"
        )


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _presented_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or another scheme."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def make_app(agent: NodeAgent, allow_fault_injection: bool = False, fault_token: str | None = None) -> web.Application:
    """The agent's HTTP API. With ``allow_fault_injection`` the fault endpoints are served, and only
    to requests that carry ``fault_token`` (required: :class:`FaultTokenMissing` without one)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if allow_fault_injection and not fault_token:
        raise FaultTokenMissing()
    expected = _token_digest(fault_token or "")

    def unauthorised(request: web.Request) -> web.Response | None:
        """A 401 unless the request carries the fault token (digests compared in constant time)."""
        presented = _presented_token(request.headers.get("Authorization"))
        if presented is None:
            problem = "missing bearer token (Authorization: Bearer <fault-injection token>)"
        elif not hmac.compare_digest(_token_digest(presented), expected):
            problem = "invalid bearer token"
        else:
            return None
        log.warning("fault injection refused from %s: %s", request.remote, problem)
        return web.json_response({"error": problem}, status=401, headers={"WWW-Authenticate": FAULT_REALM})

    async def gpus(request: web.Request) -> web.Response:
        status = request.query.get("status")
        if status is not None and status not in STATUS_FILTERS and status != UNKNOWN_NO_NVML:
            return web.json_response(
                {"error": f"unknown status {status!r}; one of {', '.join(STATUS_FILTERS)}"}, status=400
            )
        return web.json_response([r.to_json() for r in agent.reports(status)])

    async def healthz(request: web.Request) -> web.Response:
        ok, body = agent.healthz()
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(agent.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def inject_xid(request: web.Request) -> web.Response:
        if (refused := unauthorised(request)) is not None:
            return refused
        if request.content_length is not None and request.content_length > FAULT_BODY_MAX:
            return web.json_response({"error": f"body larger than {FAULT_BODY_MAX} bytes"}, status=413)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("not a JSON object")
            gpu, xid = body["gpu"], body["xid"]
            if not isinstance(gpu, int) or not isinstance(xid, int) or isinstance(gpu, bool) or isinstance(xid, bool):
                raise TypeError("gpu and xid must be integers")
            if not 0 <= xid < 1 << 16:
                raise ValueError(f"xid {xid} is not an Xid code")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            return web.json_response({"error": f'expected {{"gpu": INDEX, "xid": CODE}}: {detail}'}, status=400)
        try:
            report = agent.inject_xid(gpu, xid)
        except LookupError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        return web.json_response(report.to_json())

    async def clear_faults(request: web.Request) -> web.Response:
        if (refused := unauthorised(request)) is not None:
            return refused
        return web.json_response({"cleared": agent.clear_injected()})

    app = web.Application(client_max_size=FAULT_BODY_MAX)
    app.router.add_get("/gpus", gpus)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    if allow_fault_injection:
        app.router.add_post("/faults/xid", inject_xid)
        app.router.add_delete("/faults", clear_faults)
    return app


async def serve(
    agent: NodeAgent, host: str, port: int, allow_fault_injection: bool = False, fault_token: str | None = None
) -> web.AppRunner:
    """Serve the agent's HTTP API; the caller cleans the runner up. ``port=0`` picks a free port
    (``runner.addresses``)."""
    from aiohttp import web

    runner = web.AppRunner(make_app(agent, allow_fault_injection, fault_token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


# -- command line -------------------------------------------------------------------------------------


def _parser(prog: str = "python -m drctl.detectors.gpu_node_agent") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="GPU node agent: NVML readings, Xid events and health per GPU over HTTP.",
    )
    parser.add_argument("--node", required=True, help="this node's name in the policy's gpuPool.nodes")
    parser.add_argument("--host", default=None, help="address to listen on (default: DRCTL_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument("--policy", default=None, help="DR policy file (default: DRCTL_POLICY)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between NVML polls (default 5)")
    parser.add_argument(
        "--xid-window",
        type=float,
        default=DEFAULT_XID_WINDOW_S,
        help="seconds an Xid keeps counting in the classification (default 86400)",
    )
    parser.add_argument(
        "--allow-fault-injection",
        action="store_true",
        help="serve POST /faults/xid and DELETE /faults, for DR drills (drctl drill gpu-failure); off by default; "
        "needs DRCTL_FAULT_INJECTION_TOKEN or DRCTL_FAULT_INJECTION_TOKEN_FILE, which callers send as a bearer token",
    )
    from drctl.service import add_log_format_option

    add_log_format_option(parser)
    return parser


async def run_agent(
    node: str,
    pool: GpuPoolPolicy | None,
    host: str,
    port: int,
    interval: float,
    allow_fault_injection: bool = False,
    fault_token: str | None = None,
    **kw: Any,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    agent = NodeAgent(node, pool=pool, interval=interval, **kw)
    await agent.start()
    try:
        if agent.source == "policy" and not agent.reports():
            print(f"node-agent: no NVML and no GPUs for node {node!r} in the policy; nothing to serve", file=sys.stderr)
            return 2
        runner = await serve(agent, host, port, allow_fault_injection, fault_token)
        bound = runner.addresses[0][1] if runner.addresses else port
        faults = "fault injection on (bearer token)" if allow_fault_injection else "fault injection off"
        log.info("node agent for %s on http://%s:%d (GPUs from %s; %s)", node, host, bound, agent.source, faults)
        from drctl.settings import is_loopback

        if not is_loopback(host):
            log.warning(
                "listening on %s, beyond this machine: /gpus, /healthz and /metrics are open to whoever can "
                "connect (they only read); %s",
                host,
                faults,
            )
        try:
            await agent.run(stop)
        finally:
            await runner.cleanup()
    finally:
        await agent.aclose()
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m drctl.detectors.gpu_node_agent") -> int:
    from drctl.service import configure_logging

    args = _parser(prog).parse_args(argv)
    configure_logging(args.log_format)  # --log-format, else DRCTL_LOG_FORMAT, else text
    from drctl.policies.loader import PolicyError, load_policy_file
    from drctl.settings import DrctlSettings

    settings = DrctlSettings()
    if args.interval <= 0:
        print("node-agent: --interval must be positive", file=sys.stderr)
        return 2
    fault_token = None
    if args.allow_fault_injection:
        try:
            fault_token = settings.fault_token()
        except ValueError as exc:
            print(f"node-agent: {exc}", file=sys.stderr)
            return 2
        if not fault_token:
            print(f"node-agent: {FaultTokenMissing()}", file=sys.stderr)
            return 2
    try:
        policy = load_policy_file(args.policy or settings.policy)
    except PolicyError as exc:
        print(f"node-agent: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(
        run_agent(
            args.node,
            policy.gpu_pool,
            args.host or settings.host,
            args.port,
            args.interval,
            allow_fault_injection=args.allow_fault_injection,
            fault_token=fault_token,
            xid_window=args.xid_window,
            on_drain=drain_runbook_hook(settings),
        )
    )


def drain_runbook_hook(settings: Any) -> OnDrain:
    """The ``on_drain`` hook of a real agent: start ``DrainGpuWorkflow`` for the GPU on Temporal.

    Connects on first use; if Temporal cannot be reached the hook raises, the agent logs it, and
    the GPU stays reported as ``drain`` on ``/gpus`` for an operator (``drctl drain GPU``)."""
    from drctl.payloads import DrainGpuRequest
    from drctl.temporal.client import connect
    from drctl.temporal.runbooks import start_gpu_drain

    async def hook(report: GpuReport) -> None:
        client = await connect(settings)
        reason = "; ".join(report.reasons)[:500] or "drain"
        handle = await start_gpu_drain(client, settings, DrainGpuRequest(gpu=report.gpu_id, reason=reason))
        log.warning("GPU %s drains: started %s", report.gpu_id, handle.id)

    return hook


if __name__ == "__main__":
    raise SystemExit(main())
