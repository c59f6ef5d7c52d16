"""Classify one GPU's NVML reading as ``healthy``, ``degraded`` or ``drain``. Pure: no I/O.

The node agent (``drctl.detectors.gpu_node_agent``) reads NVML into a :class:`GpuReading`; :func:`classify`
turns it into a :class:`GpuHealth` with a human-readable reason for every finding. A GPU that must be
**drained** cannot be trusted with model instances any more (their instances move away and placement
skips it); a **degraded** GPU still serves but needs a look; **healthy** may still carry notes (an
application-level Xid, for instance).

Rules, worst wins
    drain
        - an Xid whose table entry below says ``drain`` (hardware, memory or firmware faults);
        - uncorrected (double-bit) ECC errors in the volatile counter (since the last driver load);
        - a row-remapping failure (the GPU ran out of spare rows: an RMA candidate);
        - retired pages pending (pre-Ampere page retirement that waits for a reset);
        - NVML's recovery action asks for a GPU reset, bus reset or reboot;
        - the GPU is lost (NVML answers ``GPU is lost``: it no longer responds over PCIe) or NVML
          answers that it requires a reset;
        - temperature at or above the shutdown threshold.
    degraded
        - an Xid whose table entry says ``degraded``, and any Xid not in the table;
        - temperature at or above the slowdown threshold (NVML's ``SLOWDOWN`` threshold of the GPU,
          85 °C when NVML does not report one): the GPU throttles its clocks;
        - a burst of correctable ECC errors: at least ``corrected_burst`` new ones since the previous
          reading;
        - a row remapping pending (activated by the next GPU reset; the GPU keeps working meanwhile);
        - pages retired after double-bit errors (already retired, so harmless, but worth watching);
        - NVML's recovery action asks to drain peer-to-peer traffic or recover the IMEX domain;
        - a value NVML could not read for another reason than "not supported".
    A field NVML does not support (``None``) is no finding: ECC counters on a GPU without ECC,
    page retirement on Ampere and newer (row remapping replaced it), remapping on older GPUs.

Xid table (:data:`XID_TABLE`)
    From the NVIDIA Xid Errors catalog (https://docs.nvidia.com/deploy/xid-errors/, "Analyzing Xid
    Errors with the Xid Catalog": per Xid its description and resolution bucket, e.g. RESTART_APP,
    RESET_GPU). Mapped here as: application faults (the catalog says restart the application; the
    GPU itself is fine) are ``healthy``; faults worth watching that do not by themselves make the GPU
    unusable are ``degraded``; memory, bus, link and firmware faults after which the GPU needs a
    reset, a reboot or service are ``drain``. Xid 61 (a micro-controller *warning*) is ``degraded``
    but 62 (the micro-controller *halted*) is ``drain``: the catalog's action for a halt is a GPU
    reset, and drivers log it together with Xid 154 "recovery action changed to GPU Reset Required".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

HealthStatus = Literal["healthy", "degraded", "drain"]
"""What a GPU's reading says, from best to worst."""

UNKNOWN_NO_NVML = "unknown (no NVML)"
"""The status of a GPU the node agent only knows from the policy (no NVML on the node)."""

STATUSES: tuple[HealthStatus, ...] = ("healthy", "degraded", "drain")
_RANK: dict[str, int] = {status: rank for rank, status in enumerate(STATUSES)}

SLOWDOWN_FALLBACK_C = 85
"""Slowdown temperature when NVML does not report the GPU's own threshold."""


def worst(statuses: Iterable[HealthStatus]) -> HealthStatus:
    """The worst of some statuses; ``healthy`` when there are none."""
    result: HealthStatus = "healthy"
    for status in statuses:
        if _RANK[status] > _RANK[result]:
            result = status
    return result


@dataclass(frozen=True)
class XidRule:
    """How one Xid counts: its status, the catalog's description and why."""

    xid: int
    status: HealthStatus
    description: str
    why: str

    def reason(self, count: int = 1) -> str:
        times = f" (x{count})" if count > 1 else ""
        return f"Xid {self.xid}{times}: {self.description} - {self.why}"


def _table(*rules: XidRule) -> dict[int, XidRule]:
    return {rule.xid: rule for rule in rules}


XID_TABLE: Mapping[int, XidRule] = _table(
    # Application-level faults: the catalog's action is to restart (or fix) the application.
    XidRule(
        13,
        "healthy",
        "graphics engine exception",
        "usually an application fault (out-of-range access, illegal instruction); restart the application",
    ),
    XidRule(
        31,
        "healthy",
        "GPU memory page fault",
        "usually an application's illegal memory access; restart the application",
    ),
    XidRule(
        43,
        "healthy",
        "GPU stopped processing",
        "an application hit a software-induced fault; the GPU keeps serving other work",
    ),
    XidRule(
        45,
        "healthy",
        "preemptive cleanup due to previous errors",
        "channels of a killed or failed process were cleaned up; an Xid logged with it names the cause",
    ),
    # Worth watching: the GPU keeps working, a repeat points at hardware or the driver.
    XidRule(
        8,
        "degraded",
        "GPU stopped processing (channel idle timeout)",
        "a hung channel was reset; restart the application, repeats point at hardware or the driver",
    ),
    XidRule(
        32,
        "degraded",
        "invalid or corrupted push buffer stream",
        "commands reached the GPU corrupted; can be a PCIe or driver problem",
    ),
    XidRule(38, "degraded", "driver firmware error", "the driver's firmware reported an error; watch for repeats"),
    XidRule(
        61,
        "degraded",
        "internal micro-controller breakpoint/warning",
        "firmware raised a warning; watch for a halt (Xid 62) that follows",
    ),
    XidRule(
        109,
        "degraded",
        "context switch timeout",
        "a channel hung at a context switch; restart the application, repeats point at hardware",
    ),
    XidRule(
        154,
        "degraded",
        "GPU recovery action changed",
        "the driver set a new recovery action; the recovery action read from NVML decides",
    ),
    # The GPU needs a reset, a reboot or service before it can be trusted again.
    XidRule(48, "drain", "double-bit ECC error", "an uncorrectable memory error: data on the GPU cannot be trusted"),
    XidRule(62, "drain", "internal micro-controller halt", "GPU firmware stopped; the catalog's action is a GPU reset"),
    XidRule(
        63,
        "drain",
        "ECC page retirement or row remapping event",
        "a failing memory row was recorded; it is retired/remapped only at the next GPU reset",
    ),
    XidRule(
        64,
        "drain",
        "ECC page retirement or row remapping failure",
        "a failing memory row could not be retired/remapped: RMA candidate",
    ),
    XidRule(
        74,
        "drain",
        "NVLink error",
        "an NVLink link failed; peer-to-peer and tensor-parallel traffic is unreliable until a reset",
    ),
    XidRule(
        79, "drain", "GPU has fallen off the bus", "the GPU no longer answers over PCIe; needs a reboot or service"
    ),
    XidRule(92, "drain", "high single-bit ECC error rate", "GPU memory is degrading quickly"),
    XidRule(
        94,
        "drain",
        "contained ECC error",
        "an uncorrectable error was contained to one application; the row needs remapping at a GPU reset",
    ),
    XidRule(
        95,
        "drain",
        "uncontained ECC error",
        "an uncorrectable error could not be contained: every application on the GPU is affected; reset the GPU",
    ),
    XidRule(119, "drain", "GSP RPC timeout", "the GPU System Processor stopped answering; the GPU needs a reset"),
    XidRule(120, "drain", "GSP error", "the GPU System Processor firmware failed; the GPU needs a reset"),
)
"""Xids by code (NVIDIA Xid Errors catalog); any other Xid counts as ``degraded``."""

DRAIN_XIDS = frozenset(x for x, rule in XID_TABLE.items() if rule.status == "drain")
APPLICATION_XIDS = frozenset(x for x, rule in XID_TABLE.items() if rule.status == "healthy")


def classify_xid(xid: int) -> XidRule:
    """The table's rule for ``xid``; an Xid not in the table is ``degraded`` (look it up)."""
    rule = XID_TABLE.get(xid)
    if rule is not None:
        return rule
    return XidRule(xid, "degraded", "not in drctl's Xid table", "look it up in NVIDIA's Xid catalog")


RECOVERY_ACTIONS: Mapping[int, tuple[HealthStatus, str]] = {
    0: ("healthy", "none"),
    1: ("drain", "reset the GPU"),
    2: ("drain", "reboot the node"),
    3: ("degraded", "drain peer-to-peer (NVLink) traffic"),
    4: ("drain", "drain peer-to-peer traffic and reset the GPU"),
    5: ("degraded", "recover the IMEX domain"),
    6: ("drain", "reset the GPU's PCIe bus"),
    7: ("drain", "reboot the system"),
}
"""NVML's ``nvmlDeviceGpuRecoveryAction_t`` (field ``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``)."""


@dataclass(frozen=True)
class GpuReading:
    """What NVML says about one GPU at one moment. ``None``: NVML does not support the value here."""

    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total: int | None = None
    """Bytes."""
    memory_used: int | None = None
    """Bytes."""
    utilisation: int | None = None
    """GPU (SM) utilisation over NVML's last sample period, percent."""
    temperature: int | None = None
    """Degrees Celsius."""
    temperature_slowdown: int | None = None
    """The GPU's own slowdown threshold (NVML ``SLOWDOWN``), degrees Celsius."""
    temperature_shutdown: int | None = None
    """The GPU's own shutdown threshold (NVML ``SHUTDOWN``), degrees Celsius."""
    ecc_uncorrected: int | None = None
    """Uncorrected (double-bit) ECC errors, volatile counter (since the last driver load)."""
    ecc_corrected: int | None = None
    """Corrected (single-bit) ECC errors, volatile counter."""
    retired_pages_dbe: int | None = None
    """Pages retired after double-bit ECC errors (pre-Ampere)."""
    retired_pages_sbe: int | None = None
    """Pages retired after multiple single-bit ECC errors (pre-Ampere)."""
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    recovery_action: int | None = None
    """NVML's recovery action (see :data:`RECOVERY_ACTIONS`)."""
    recent_xids: tuple[int, ...] = ()
    """Xid codes seen on this GPU recently (one entry per event)."""
    lost: bool = False
    """NVML answered "GPU is lost": the GPU does not respond any more."""
    reset_required: bool = False
    """NVML answered "GPU requires reset" to a query."""
    read_errors: tuple[str, ...] = ()
    """``"<what>: <NVML error>"`` for every value NVML failed to read (other than not supported)."""


@dataclass(frozen=True)
class HealthThresholds:
    slowdown_fallback_c: int = SLOWDOWN_FALLBACK_C
    corrected_burst: int = 10
    """New correctable ECC errors between two readings that count as a burst."""


DEFAULT_THRESHOLDS = HealthThresholds()


@dataclass(frozen=True)
class GpuHealth:
    status: HealthStatus
    reasons: list[str]
    """One sentence per finding, worst first; may be non-empty for a healthy GPU (notes)."""


def classify(
    reading: GpuReading,
    previous: GpuReading | None = None,
    thresholds: HealthThresholds = DEFAULT_THRESHOLDS,
) -> GpuHealth:
    """The GPU's status and the reasons for it (see the module's rules).

    ``previous`` is the reading before this one of the same GPU, for the correctable-error burst.
    """
    findings: list[tuple[HealthStatus, str]] = []

    if reading.lost:
        findings.append(("drain", "GPU is lost: NVML cannot reach it any more (fallen off the bus or hung)"))
    if reading.reset_required:
        findings.append(("drain", "NVML says the GPU requires a reset before it can be used again"))

    for xid, count in sorted(Counter(reading.recent_xids).items()):
        rule = classify_xid(xid)
        findings.append((rule.status, rule.reason(count)))

    if reading.ecc_uncorrected:
        findings.append(
            (
                "drain",
                f"{reading.ecc_uncorrected} uncorrected (double-bit) ECC error(s) since the driver loaded: "
                "data on the GPU cannot be trusted",
            )
        )
    if reading.remapped_rows_failure:
        findings.append(("drain", "row remapping failed: the GPU has no spare memory rows left (RMA candidate)"))
    if reading.retired_pages_pending:
        findings.append(("drain", "a page retirement is pending: the GPU must be reset to retire the failing page"))
    if reading.remapped_rows_pending:
        findings.append(("degraded", "a row remapping is pending: it takes effect at the next GPU reset"))
    if reading.retired_pages_dbe:
        findings.append(
            ("degraded", f"{reading.retired_pages_dbe} page(s) retired after double-bit ECC errors: memory is wearing")
        )

    if reading.recovery_action:
        status, action = RECOVERY_ACTIONS.get(reading.recovery_action, ("degraded", "unknown action"))
        findings.append((status, f"NVML recovery action {reading.recovery_action}: {action}"))

    if reading.temperature is not None:
        shutdown = reading.temperature_shutdown
        slowdown = reading.temperature_slowdown
        if slowdown is None:
            slowdown = thresholds.slowdown_fallback_c
            where = f"the default slowdown threshold {slowdown} °C (NVML reports none)"
        else:
            where = f"the GPU's slowdown threshold {slowdown} °C"
        if shutdown is not None and reading.temperature >= shutdown:
            findings.append(
                ("drain", f"temperature {reading.temperature} °C reached the shutdown threshold {shutdown} °C")
            )
        elif reading.temperature >= slowdown:
            findings.append(
                ("degraded", f"temperature {reading.temperature} °C reached {where}: the GPU throttles its clocks")
            )

    if (
        previous is not None
        and reading.ecc_corrected is not None
        and previous.ecc_corrected is not None
        and reading.ecc_corrected - previous.ecc_corrected >= thresholds.corrected_burst
    ):
        burst = reading.ecc_corrected - previous.ecc_corrected
        findings.append(
            (
                "degraded",
                f"{burst} correctable ECC errors since the previous reading (burst threshold "
                f"{thresholds.corrected_burst}): memory may be degrading",
            )
        )

    for error in reading.read_errors:
        findings.append(("degraded", f"NVML could not read {error}"))

    findings.sort(key=lambda f: -_RANK[f[0]])  # stable: worst first, then in rule order
    return GpuHealth(status=worst(s for s, _ in findings), reasons=[reason for _, reason in findings])
