"""A step's progress is its activity's heartbeat, except within ``without_progress_heartbeats``
(a zone failover's batch, which heartbeats for its switches itself), tasks started there included."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio.testing import ActivityEnvironment

from drctl.activities.failover import heartbeat_progress, with_heartbeats, without_progress_heartbeats


async def test_progress_is_heartbeated_except_within_a_batch_and_its_tasks() -> None:
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details[0])

    async def steps() -> None:
        heartbeat_progress(0.1, "alone")
        with without_progress_heartbeats():

            async def switch(n: int) -> None:
                await asyncio.sleep(0)
                heartbeat_progress(0.5, f"switch {n}")

            await with_heartbeats(asyncio.gather(*(switch(n) for n in range(3))), every_s=10)
            heartbeat_progress(0.6, "in the batch itself")
        heartbeat_progress(0.9, "after")

    await env.run(steps)
    assert [b["detail"] for b in beats] == ["alone", "after"]
