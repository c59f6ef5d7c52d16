"""The prober's actions: a dead process is reported to its model's guardian at once, every one of
them (caps are the budget's, which delays instead of dropping), once per incident, and a report that
does not get through is tried again until it does."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

from drctl.detectors.prober import Prober
from drctl.payloads import FailoverRequest, IncidentState, IncidentTicket, Role, Trigger
from drctl.platforms.local.registry import InstanceRegistry, LocalInstance
from drctl.policies.loader import load_policy_file

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")


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
        return IncidentTicket(
            model=request.model,
            instance=request.instance,
            workflow_id=f"failover-{request.instance}",
            joined=False,
            state=IncidentState.QUEUED,
            opened_at=datetime.now(UTC),
        )

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
