"""GPU health classification: Xid table, ECC / row-remap / page-retirement / temperature rules, reasons."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drctl.policies.gpu_health import (
    APPLICATION_XIDS,
    DRAIN_XIDS,
    STATUSES,
    XID_TABLE,
    GpuReading,
    HealthThresholds,
    classify,
    classify_xid,
    worst,
)

ISSUE_DRAIN_XIDS = (48, 63, 64, 74, 79, 92, 94, 95)
"""The drain-class Xids the issue names."""
CATALOG_DRAIN_XIDS = (62, 119, 120)
"""Drain per NVIDIA's Xid catalog (GPU reset needed)."""
APP_XIDS = (13, 31, 43, 45)


def reading(**fields: object) -> GpuReading:
    return GpuReading(index=0, uuid="GPU-0", name="NVIDIA H100 80GB HBM3", **fields)  # type: ignore[arg-type]


def assert_readable(reasons: list[str]) -> None:
    for reason in reasons:
        assert isinstance(reason, str)
        assert reason.strip() == reason and reason
        assert "\n" not in reason
        assert "None" not in reason and "GpuReading" not in reason
        assert len(reason) < 200, reason


# -- Xids ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xid", ISSUE_DRAIN_XIDS + CATALOG_DRAIN_XIDS)
def test_every_drain_xid_drains(xid: int) -> None:
    health = classify(reading(recent_xids=(xid,)))
    assert health.status == "drain"
    assert health.reasons[0].startswith(f"Xid {xid}: ")
    assert_readable(health.reasons)


def test_drain_set_is_exactly_the_issue_and_catalog_xids() -> None:
    assert set(ISSUE_DRAIN_XIDS + CATALOG_DRAIN_XIDS) == DRAIN_XIDS


@pytest.mark.parametrize("xid", APP_XIDS)
def test_application_xids_do_not_drain(xid: int) -> None:
    health = classify(reading(recent_xids=(xid, xid)))
    assert health.status == "healthy"
    assert xid in APPLICATION_XIDS
    assert health.reasons == [XID_TABLE[xid].reason(2)]
    assert "application" in health.reasons[0] or "process" in health.reasons[0]
    assert "(x2)" in health.reasons[0]


@pytest.mark.parametrize("xid", [8, 32, 38, 61, 109, 154])
def test_watch_xids_degrade(xid: int) -> None:
    assert classify(reading(recent_xids=(xid,))).status == "degraded"


def test_unknown_xid_degrades_and_points_at_the_catalog() -> None:
    health = classify(reading(recent_xids=(999,)))
    assert health.status == "degraded"
    assert health.reasons == ["Xid 999: not in drctl's Xid table - look it up in NVIDIA's Xid catalog"]
    assert classify_xid(999).status == "degraded"


def test_table_entries_are_one_line_each() -> None:
    for xid, rule in XID_TABLE.items():
        assert rule.xid == xid and rule.status in STATUSES
        assert rule.description and rule.why
        assert_readable([rule.reason()])


def test_xid_79_reason_reads_well() -> None:
    assert classify(reading(recent_xids=(79,))).reasons == [
        "Xid 79: GPU has fallen off the bus - the GPU no longer answers over PCIe; needs a reboot or service"
    ]


# -- ECC, retired pages, remapped rows -----------------------------------------------------------------


def test_uncorrected_volatile_ecc_drains() -> None:
    health = classify(reading(ecc_uncorrected=2, ecc_corrected=0))
    assert health.status == "drain"
    assert health.reasons == [
        "2 uncorrected (double-bit) ECC error(s) since the driver loaded: data on the GPU cannot be trusted"
    ]
    assert classify(reading(ecc_uncorrected=0, ecc_corrected=3)).status == "healthy"


def test_remapping_failure_drains_pending_degrades() -> None:
    failed = classify(reading(remapped_rows_failure=True, remapped_rows_pending=False))
    assert failed.status == "drain" and "row remapping failed" in failed.reasons[0]
    pending = classify(reading(remapped_rows_failure=False, remapped_rows_pending=True))
    assert pending.status == "degraded"
    assert pending.reasons == ["a row remapping is pending: it takes effect at the next GPU reset"]
    assert classify(reading(remapped_rows_failure=False, remapped_rows_pending=False)).status == "healthy"


def test_retired_pages() -> None:
    assert classify(reading(retired_pages_pending=True)).status == "drain"
    dbe = classify(reading(retired_pages_pending=False, retired_pages_dbe=3))
    assert dbe.status == "degraded" and dbe.reasons[0].startswith("3 page(s) retired")
    assert classify(reading(retired_pages_pending=False, retired_pages_dbe=0, retired_pages_sbe=4)).status == "healthy"


def test_correctable_burst_between_readings() -> None:
    before = reading(ecc_corrected=5)
    burst = classify(reading(ecc_corrected=15), before)
    assert burst.status == "degraded"
    assert burst.reasons == [
        "10 correctable ECC errors since the previous reading (burst threshold 10): memory may be degrading"
    ]
    assert classify(reading(ecc_corrected=14), before).status == "healthy"
    assert classify(reading(ecc_corrected=500)).status == "healthy"  # no previous reading: no burst
    assert classify(reading(ecc_corrected=8), before, HealthThresholds(corrected_burst=3)).status == "degraded"


def test_not_supported_fields_are_no_finding() -> None:
    health = classify(reading())  # every optional value None: NVML did not support it
    assert health.status == "healthy" and health.reasons == []


# -- temperature ---------------------------------------------------------------------------------------


def test_temperature_against_the_gpus_slowdown_threshold() -> None:
    assert classify(reading(temperature=86, temperature_slowdown=87)).status == "healthy"
    hot = classify(reading(temperature=87, temperature_slowdown=87, temperature_shutdown=92))
    assert hot.status == "degraded"
    assert hot.reasons == ["temperature 87 °C reached the GPU's slowdown threshold 87 °C: the GPU throttles its clocks"]


def test_temperature_fallback_threshold_is_85() -> None:
    assert classify(reading(temperature=84)).status == "healthy"
    hot = classify(reading(temperature=85))
    assert hot.status == "degraded"
    assert "default slowdown threshold 85 °C" in hot.reasons[0]
    assert classify(reading(temperature=80), thresholds=HealthThresholds(slowdown_fallback_c=80)).status == "degraded"


def test_temperature_at_shutdown_threshold_drains() -> None:
    health = classify(reading(temperature=95, temperature_slowdown=87, temperature_shutdown=92))
    assert health.status == "drain"
    assert health.reasons == ["temperature 95 °C reached the shutdown threshold 92 °C"]


# -- lost GPU, read errors, recovery action, combination ---------------------------------------------


def test_lost_gpu_and_reset_required_drain() -> None:
    assert classify(reading(lost=True)).status == "drain"
    assert classify(reading(reset_required=True)).status == "drain"


def test_read_errors_degrade() -> None:
    health = classify(reading(read_errors=("temperature: Unknown Error",)))
    assert health.status == "degraded"
    assert health.reasons == ["NVML could not read temperature: Unknown Error"]


@pytest.mark.parametrize(
    ("action", "status"), [(0, "healthy"), (1, "drain"), (2, "drain"), (3, "degraded"), (4, "drain"), (42, "degraded")]
)
def test_recovery_action(action: int, status: str) -> None:
    assert classify(reading(recovery_action=action)).status == status


def test_worst_wins_and_reasons_are_worst_first() -> None:
    health = classify(reading(recent_xids=(13, 79), temperature=90, remapped_rows_pending=True))
    assert health.status == "drain"
    assert health.reasons[0].startswith("Xid 79")
    expected = (
        "a row remapping is pending",
        "temperature 90 °C reached the default slowdown threshold 85 °C",
        "Xid 13",
    )
    assert len(health.reasons) == 4
    for reason, start in zip(health.reasons[1:], expected, strict=True):
        assert reason.startswith(start)
    assert_readable(health.reasons)


def test_worst() -> None:
    assert worst([]) == "healthy"
    assert worst(["degraded", "healthy"]) == "degraded"
    assert worst(["healthy", "drain", "degraded"]) == "drain"


readings = st.builds(
    GpuReading,
    index=st.integers(0, 7),
    temperature=st.none() | st.integers(0, 120),
    temperature_slowdown=st.none() | st.integers(60, 100),
    temperature_shutdown=st.none() | st.integers(80, 110),
    ecc_uncorrected=st.none() | st.integers(0, 5),
    ecc_corrected=st.none() | st.integers(0, 1000),
    retired_pages_dbe=st.none() | st.integers(0, 5),
    retired_pages_pending=st.none() | st.booleans(),
    remapped_rows_pending=st.none() | st.booleans(),
    remapped_rows_failure=st.none() | st.booleans(),
    recovery_action=st.none() | st.integers(0, 8),
    recent_xids=st.lists(st.sampled_from([*XID_TABLE, 999]), max_size=4).map(tuple),
    lost=st.booleans(),
)


@given(readings, st.sampled_from([*XID_TABLE, 999]))
def test_an_xid_never_makes_a_gpu_healthier(r: GpuReading, xid: int) -> None:
    before = classify(r)
    after = classify(dataclasses.replace(r, recent_xids=(*r.recent_xids, xid)))
    assert STATUSES.index(after.status) >= STATUSES.index(before.status)
    assert STATUSES.index(after.status) >= STATUSES.index(classify_xid(xid).status)
    assert_readable(after.reasons)
    assert (after.status == "healthy") or after.reasons
