"""The drill run heartbeats while it waits for a runbook's result, with the fault in every beat: a
wait longer than the heartbeat timeout (a reconcile still loading a standby, seen in a node-down
drill on the Kubernetes emulator) must not make the workflow take the run for lost."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from drctl.activities.drill import _Heartbeat
from drctl.payloads import InjectedFault


async def test_a_long_wait_heartbeats_the_fault_until_the_result_comes() -> None:
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details[0])
    heartbeat = _Heartbeat()
    heartbeat.fault = InjectedFault(injected_at=datetime.now(UTC), detail="node node-1 down")

    async def reconcile_result() -> str:
        await asyncio.sleep(1.2)
        return "applied"

    assert await env.run(heartbeat.wait, reconcile_result(), 5, "waiting for the reconcile") == "applied"
    assert len(beats) >= 3, "one beat at least every half second"
    assert {b["phase"] for b in beats} == {"waiting for the reconcile"}
    assert all(b["fault"]["detail"] == "node node-1 down" for b in beats)


async def test_a_wait_that_gets_no_answer_times_out_and_cancels() -> None:
    env = ActivityEnvironment()
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError, match=r"no answer within 0\.3s"):
        await env.run(_Heartbeat().wait, never, 0.3, "waiting")
    assert never.cancelled()
