"""NVML on one GPU node: every GPU's reading and the Xid events, through ``pynvml`` only.

Imports only the standard library, pynvml (``nvidia-ml-py``) and the pure
``drctl.policies.gpu_health``, so ``scripts/nvml_check.py`` runs it on a GPU machine where nothing
else of drctl's dependencies is installed. :class:`NvmlInventory` looks every pynvml function up on
the module at call time, so tests replace them at the pynvml function boundary. The GPU node agent
(:mod:`drctl.detectors.gpu_node_agent`) serves what this reads.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml

from drctl.policies.gpu_health import GpuReading

log = logging.getLogger("drctl.node_agent")


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used on this machine; ``reason`` says why in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NvmlCallError(RuntimeError):
    """An NVML call failed in a way that is not "not supported"."""


def describe_init_error(exc: Exception) -> str:
    """Why ``nvmlInit`` failed, for the one log line that says so."""
    kind = type(exc).__name__
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return (
            f"{exc} ({kind}): libnvidia-ml.so.1 cannot be loaded - no NVIDIA driver on this machine "
            "(or, in a container, the NVIDIA runtime did not mount it)"
        )
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return f"{exc} ({kind}): the NVIDIA kernel driver is not loaded"
    return f"nvmlInit failed: {exc} ({kind})"


def _unsupported(exc: Exception) -> bool:
    return isinstance(exc, pynvml.NVMLError_NotSupported | pynvml.NVMLError_FunctionNotFound)


def _handle_key(handle: object) -> tuple[str, int | None]:
    """A hashable key for a device handle: the pointer value of a real ``c_nvmlDevice_t`` (NVML's
    handles are stable for the life of the process), the object's identity for anything else."""
    try:
        return ("ptr", ctypes.cast(handle, ctypes.c_void_p).value)  # type: ignore[arg-type]
    except (ctypes.ArgumentError, TypeError):
        return ("obj", id(handle))


@dataclass(frozen=True)
class XidEvent:
    """One Xid the driver reported for a GPU (``gpu_index`` None: the event named no known GPU)."""

    gpu_index: int | None
    xid: int
    at: float
    """Unix time the agent received it."""
    uuid: str | None = None


@dataclass
class XidEventSet:
    """An NVML event set registered for Xid events on the GPUs that support them."""

    handle: Any
    indices: dict[tuple[str, int | None], int] = field(default_factory=dict)
    registered: list[int] = field(default_factory=list)
    unsupported: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


class NvmlInventory:
    """The only code that calls pynvml: initialisation, one reading per GPU, Xid events.

    Each function is looked up on the ``pynvml`` module when called (never bound at import), so a
    test that monkeypatches ``pynvml.nvmlDeviceGetCount`` and friends drives all of it.
    """

    def __init__(self) -> None:
        self.initialised = False
        self._handles: dict[int, Any] = {}
        self._thresholds: dict[int, tuple[int | None, int | None]] = {}
        self._uuid_index: dict[str, int] = {}
        self._lock = threading.Lock()

    # lifecycle

    def init(self) -> None:
        """``nvmlInit``; raises :class:`NvmlUnavailable` with the reason when NVML cannot be used."""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(describe_init_error(exc)) from exc
        with self._lock:
            self.initialised = True
            self._handles.clear()
            self._thresholds.clear()
            self._uuid_index.clear()

    def shutdown(self) -> None:
        if not self.initialised:
            return
        self.initialised = False
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)

    def driver_version(self) -> str | None:
        try:
            return str(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            return None

    # readings

    def device_count(self) -> int:
        try:
            return int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            raise NvmlCallError(f"nvmlDeviceGetCount: {exc}") from exc

    def _handle(self, index: int) -> Any:
        with self._lock:
            handle = self._handles.get(index)
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            with self._lock:
                self._handles[index] = handle
        return handle

    def read_all(self) -> list[GpuReading]:
        """One reading per GPU NVML lists."""
        return [self.read(index) for index in range(self.device_count())]

    def read(self, index: int) -> GpuReading:
        """Everything NVML tells about GPU ``index``. Values NVML does not support are None; other
        failures are listed in ``read_errors`` (and "GPU is lost" / "reset required" flagged)."""
        errors: list[str] = []
        flags = {"lost": False, "reset_required": False}

        def get(what: str, fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return fn(*args)
            except pynvml.NVMLError as exc:
                if _unsupported(exc):
                    return None
                if isinstance(exc, pynvml.NVMLError_GpuIsLost):
                    flags["lost"] = True
                elif isinstance(exc, pynvml.NVMLError_ResetRequired):
                    flags["reset_required"] = True
                else:
                    errors.append(f"{what}: {exc}")
                return None

        handle = get("the device handle", self._handle, index)
        if handle is None:
            return GpuReading(
                index=index, lost=flags["lost"], reset_required=flags["reset_required"], read_errors=tuple(errors)
            )

        uuid = get("the UUID", pynvml.nvmlDeviceGetUUID, handle)
        if uuid is not None:
            uuid = str(uuid)
            with self._lock:
                self._uuid_index[uuid] = index
        name = get("the name", pynvml.nvmlDeviceGetName, handle)
        memory = get("memory", pynvml.nvmlDeviceGetMemoryInfo, handle)
        utilisation = get("utilisation", pynvml.nvmlDeviceGetUtilizationRates, handle)
        temperature = get("temperature", pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
        slowdown, shutdown = self._temperature_thresholds(index, handle, get, errors, flags)
        ecc_uncorrected = get(
            "uncorrected ECC errors",
            pynvml.nvmlDeviceGetTotalEccErrors,
            handle,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        ecc_corrected = get(
            "corrected ECC errors",
            pynvml.nvmlDeviceGetTotalEccErrors,
            handle,
            pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        pages_dbe = get(
            "retired pages (double-bit)",
            pynvml.nvmlDeviceGetRetiredPages,
            handle,
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
        )
        pages_sbe = get(
            "retired pages (single-bit)",
            pynvml.nvmlDeviceGetRetiredPages,
            handle,
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
        )
        pages_pending = get("retired pages pending", pynvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)
        rows = get("remapped rows", pynvml.nvmlDeviceGetRemappedRows, handle)
        recovery_action = self._recovery_action(handle, get, errors)

        return GpuReading(
            index=index,
            uuid=uuid,
            name=None if name is None else str(name),
            memory_total=None if memory is None else int(memory.total),
            memory_used=None if memory is None else int(memory.used),
            utilisation=None if utilisation is None else int(utilisation.gpu),
            temperature=None if temperature is None else int(temperature),
            temperature_slowdown=slowdown,
            temperature_shutdown=shutdown,
            ecc_uncorrected=None if ecc_uncorrected is None else int(ecc_uncorrected),
            ecc_corrected=None if ecc_corrected is None else int(ecc_corrected),
            retired_pages_dbe=None if pages_dbe is None else len(pages_dbe),
            retired_pages_sbe=None if pages_sbe is None else len(pages_sbe),
            retired_pages_pending=None if pages_pending is None else int(pages_pending) == pynvml.NVML_FEATURE_ENABLED,
            remapped_rows_correctable=None if rows is None else int(rows[0]),
            remapped_rows_uncorrectable=None if rows is None else int(rows[1]),
            remapped_rows_pending=None if rows is None else bool(rows[2]),
            remapped_rows_failure=None if rows is None else bool(rows[3]),
            recovery_action=recovery_action,
            lost=flags["lost"],
            reset_required=flags["reset_required"],
            read_errors=tuple(errors),
        )

    def _temperature_thresholds(
        self, index: int, handle: Any, get: Callable[..., Any], errors: list[str], flags: dict[str, bool]
    ) -> tuple[int | None, int | None]:
        """Slowdown and shutdown thresholds; fixed per GPU, so cached once NVML answered both."""
        with self._lock:
            cached = self._thresholds.get(index)
        if cached is not None:
            return cached
        before = len(errors)
        slowdown = get(
            "the slowdown temperature",
            pynvml.nvmlDeviceGetTemperatureThreshold,
            handle,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
        )
        shutdown = get(
            "the shutdown temperature",
            pynvml.nvmlDeviceGetTemperatureThreshold,
            handle,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,
        )
        result = (None if slowdown is None else int(slowdown), None if shutdown is None else int(shutdown))
        if len(errors) == before and not any(flags.values()):
            with self._lock:
                self._thresholds[index] = result
        return result

    def _recovery_action(self, handle: Any, get: Callable[..., Any], errors: list[str]) -> int | None:
        field_id = getattr(pynvml, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
        if field_id is None:
            return None
        values = get("the recovery action", pynvml.nvmlDeviceGetFieldValues, handle, [field_id])
        if not values:
            return None
        value = values[0]
        ret = int(value.nvmlReturn)
        if ret == pynvml.NVML_SUCCESS:
            return int(value.value.uiVal)
        # A driver that does not know the field answers "not supported" or "invalid argument" for it.
        if ret not in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT):
            errors.append(f"the recovery action: {pynvml.NVMLError(ret)}")
        return None

    # Xid events

    def open_xid_events(self) -> XidEventSet:
        """An event set with every GPU that supports Xid events registered for them."""
        try:
            events = XidEventSet(pynvml.nvmlEventSetCreate())
        except pynvml.NVMLError as exc:
            raise NvmlCallError(f"nvmlEventSetCreate: {exc}") from exc
        for index in range(self.device_count()):
            try:
                handle = self._handle(index)
                pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, events.handle)
            except pynvml.NVMLError as exc:
                if _unsupported(exc):
                    events.unsupported.append(index)
                else:
                    events.failed[index] = str(exc)
                continue
            events.indices[_handle_key(handle)] = index
            events.registered.append(index)
        return events

    def wait_xid(self, events: XidEventSet, timeout_ms: int) -> XidEvent | None:
        """The next Xid event, or None when none came within ``timeout_ms`` (or it was another kind)."""
        try:
            data = pynvml.nvmlEventSetWait_v2(events.handle, timeout_ms)
        except pynvml.NVMLError_Timeout:
            return None
        except pynvml.NVMLError as exc:
            raise NvmlCallError(f"nvmlEventSetWait_v2: {exc}") from exc
        if not int(data.eventType) & pynvml.nvmlEventTypeXidCriticalError:
            return None
        index = events.indices.get(_handle_key(data.device))
        uuid: str | None = None
        if index is None:  # not the handle we registered: ask the device who it is
            try:
                uuid = str(pynvml.nvmlDeviceGetUUID(data.device))
            except pynvml.NVMLError:
                uuid = None
            with self._lock:
                index = self._uuid_index.get(uuid) if uuid is not None else None
        if uuid is None and index is not None:
            with self._lock:
                uuid = next((u for u, i in self._uuid_index.items() if i == index), None)
        return XidEvent(gpu_index=index, xid=int(data.eventData), at=time.time(), uuid=uuid)

    def close_xid_events(self, events: XidEventSet) -> None:
        try:
            pynvml.nvmlEventSetFree(events.handle)
        except pynvml.NVMLError as exc:
            log.debug("nvmlEventSetFree: %s", exc)


class XidWatcher:
    """Waits for Xid events in a background thread and hands each to ``on_event`` (in that thread).

    ``nvmlEventSetWait_v2`` blocks at most ``timeout_ms``, so :meth:`stop` returns within about that.
    """

    def __init__(self, inventory: NvmlInventory, on_event: Callable[[XidEvent], None], timeout_ms: int = 500) -> None:
        self.inventory = inventory
        self.on_event = on_event
        self.timeout_ms = timeout_ms
        self.events: XidEventSet | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> XidEventSet:
        """Create the event set and start waiting; raises :class:`NvmlCallError` when NVML refuses."""
        self.events = self.inventory.open_xid_events()
        self._thread = threading.Thread(target=self._run, name="nvml-xid-events", daemon=True)
        self._thread.start()
        return self.events

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_ms / 1000 + 5)
            if self._thread.is_alive():
                log.warning("the Xid event thread did not stop; leaving its event set allocated")
                return
        if self.events is not None:
            self.inventory.close_xid_events(self.events)
            self.events = None

    def _run(self) -> None:
        assert self.events is not None
        failures = 0
        while not self._stop.is_set():
            try:
                event = self.inventory.wait_xid(self.events, self.timeout_ms)
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("waiting for Xid events failed (%d time(s)): %s", failures, exc)
                self._stop.wait(1.0)
                continue
            failures = 0
            if event is not None:
                try:
                    self.on_event(event)
                except Exception:
                    log.exception("handling Xid %d failed", event.xid)
