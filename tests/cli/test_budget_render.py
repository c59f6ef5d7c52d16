"""``drctl budget`` with a zone failover's lease, and the models it keeps busy for reconciliation."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from drctl.cli.render import budget_lines
from drctl.payloads import BudgetState, LeaseKind, LeaseRequest
from drctl.temporal import incidents


def zone_lease() -> LeaseRequest:
    return LeaseRequest(
        holder="zone-failover-az-1", incident="zone-failover-az-1", model="", zone="az-1", kind=LeaseKind.ZONE,
        slots=16, covers=["gpt-4-8b", "llama-2-7b"],
    )  # fmt: skip


def prober_request() -> LeaseRequest:
    return LeaseRequest(
        holder="guardian-mistral-7b", incident="failover-mistral-7b-mistral-7b-4", model="mistral-7b", zone="az-2"
    )


def test_a_zone_failovers_lease_says_how_many_runbooks_for_how_many_models() -> None:
    lines = budget_lines(BudgetState(running=[zone_lease(), prober_request()]))
    assert "  running  zone-failover-az-1 (zone az-1, zone, 16 runbooks at a time for 2 models)" in lines
    assert "  running  failover-mistral-7b-mistral-7b-4 (zone az-2, instance)" in lines


async def test_the_models_a_zone_lease_covers_are_busy_for_reconciliation(monkeypatch: pytest.MonkeyPatch) -> None:
    async def state(_client: object, _queue: str) -> BudgetState:
        return BudgetState(running=[zone_lease()], waiting=[prober_request()])

    monkeypatch.setattr(incidents, "budget_state", state)
    busy = await incidents.busy_models(object(), "drctl")  # type: ignore[arg-type]
    assert busy == {
        "gpt-4-8b": "zone-failover-az-1",
        "llama-2-7b": "zone-failover-az-1",
        "mistral-7b": "failover-mistral-7b-mistral-7b-4",
    }  # and no model named "" for the lease itself


def test_a_zone_that_failed_over_says_until_when_its_recoveries_count_as_the_zone_s() -> None:
    at = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
    lines = budget_lines(BudgetState(failed_over={"az-1": at}))
    assert (
        "  zone az-1 failed over at 2026-12-01T15:00:00+00:00: its recoveries count as the zone's until "
        "2026-12-01T15:05:00+00:00"
    ) in lines
