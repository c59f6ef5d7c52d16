"""The prober's actions: a dead process starts a failover at once; past the cap it stops acting
and raises one alert (panic mode) instead."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from drctl.activities.local.registry import InstanceRegistry
from drctl.payloads import FailoverRequest, Instance, Role, Trigger
from drctl.policies.loader import load_policy_file
from drctl.workers.prober import Prober

POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")


class PendingHandle:
    """A started failover that is still running."""

    def __init__(self, workflow_id: str) -> None:
        self.id = workflow_id
        self.done = asyncio.Event()

    async def result(self) -> None:
        await self.done.wait()


async def test_exit_starts_a_failover_and_the_cap_turns_into_one_panic_alert(tmp_path: Path) -> None:
    registry = InstanceRegistry(tmp_path / "instances.json")
    with registry.edit() as instances:
        for n in range(3):  # three serving instances whose processes are gone (pid None)
            instances[f"llama-2-7b-{n}"] = Instance(
                id=f"llama-2-7b-{n}", model="llama-2-7b", role=Role.SERVING, port=1, zone="az-1"
            )
    started: list[FailoverRequest] = []
    handles: list[PendingHandle] = []
    alerts: list[dict[str, Any]] = []

    async def start(request: FailoverRequest) -> Any:
        started.append(request)
        handles.append(PendingHandle(f"failover-{request.instance}"))
        return handles[-1]

    async def raise_alert(alert: dict[str, Any]) -> None:
        alerts.append(alert)

    prober = Prober(POLICY, registry, start, raise_alert)  # cap: 1 failover per model at a time
    try:
        await prober.tick(time.monotonic())
        assert [r.instance for r in started] == ["llama-2-7b-0"]
        assert started[0].trigger == Trigger.PROBE and started[0].failed_at is not None
        assert "process exited" in started[0].reason
        assert started[0].confirmed  # the prober's hysteresis is the confirmation
        # The other two are down too, but the cap holds: one alert, not one per instance or tick.
        assert prober.panic is not None and "cap 1" in prober.panic
        assert len(alerts) == 1 and alerts[0]["labels"]["alertname"] == "DrctlProberPanic"
        await prober.tick(time.monotonic())
        assert len(started) == 1 and len(alerts) == 1
        # When the running failover ends (it ejected the instance), the prober may act again.
        registry.update("llama-2-7b-0", role=Role.FAILED)
        handles[0].done.set()
        await asyncio.sleep(0.05)
        prober.trackers.clear()
        await prober.tick(time.monotonic())
        assert [r.instance for r in started] == ["llama-2-7b-0", "llama-2-7b-1"]
    finally:
        for handle in handles:
            handle.done.set()
        await prober.aclose()
