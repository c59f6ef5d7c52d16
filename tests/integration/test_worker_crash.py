"""A failover survives the crash of its own worker: ``kill -9`` of the worker mid-load, a new
worker starts, and the same workflow run finishes the job without repeating completed steps."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
from temporalio.api.enums.v1 import EventType

from drctl.payloads import ActivityName, FailoverOutcome, FailoverRequest, FailoverResult, Role
from drctl.platforms.local import processes
from drctl.policies.loader import load_policy_file
from drctl.temporal.runbooks import start_failover
from drctl.workers.stack import LocalStack, isolated_settings
from tests.integration.history import activities_in_history

pytestmark = pytest.mark.integration

# One model whose only standby is cold, with a checkpoint that takes ~3 s to load, so the worker
# can be killed while the load activity runs.
SLOW_COLD_POLICY = """\
models:
  - name: slow-model
    priority: high
    coldStandby: 1
    checkpointSize: 8MiB
local:
  loadSecondsPerGib: 384
"""


@pytest.fixture(scope="module")
async def slow_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    root = tmp_path_factory.mktemp("crash")
    policy_file = root / "policy.yaml"
    policy_file.write_text(SLOW_COLD_POLICY)
    stack = LocalStack(
        isolated_settings(root / "state", policy_file), load_policy_file(policy_file), say=lambda _: None
    )
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


async def test_failover_resumes_after_worker_is_killed(slow_stack: LocalStack) -> None:
    assert slow_stack.client is not None
    instances = {i.id: i for i in slow_stack.platform.registry.of_model("slow-model")}
    os.kill(instances["slow-model-0"].pid or 0, signal.SIGKILL)
    handle = await start_failover(
        slow_stack.client, slow_stack.settings, FailoverRequest(model="slow-model", instance="slow-model-0")
    )

    # Wait until the cold standby's process was started and the load step is under way.
    for _ in range(200):
        progress = await handle.query("progress", result_type=FailoverResult)
        if progress is not None and any(s.step == "promote" and s.ok for s in progress.steps):
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the failover never reached the promote step")
    old_worker = slow_stack.pids["worker"]
    os.kill(old_worker, signal.SIGKILL)
    await asyncio.sleep(0.5)
    assert not processes.is_alive(old_worker)
    slow_stack.start_worker()

    result: FailoverResult = await asyncio.wait_for(handle.result(), timeout=90)
    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.promoted == "slow-model-1" and result.tier == Role.COLD

    scheduled = await activities_in_history(handle)
    load_attempts = 0
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            load_attempts = max(load_attempts, event.activity_task_started_event_attributes.attempt)
    # Same run, each step scheduled once: the cold process was started once, not again.
    assert scheduled.count(ActivityName.PROMOTE_STANDBY) == 1
    assert scheduled.count(ActivityName.LOAD_MODEL) == 1
    assert load_attempts >= 2, "the load step should have been retried after the worker died"
    serving = [i for i in slow_stack.platform.registry.of_model("slow-model") if i.role == Role.SERVING]
    assert [i.id for i in serving] == ["slow-model-1"]
    assert processes.is_alive(serving[0].pid)
