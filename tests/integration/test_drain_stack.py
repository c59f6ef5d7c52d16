"""GPU drain on the real stack: every instance leaves the drained GPU, and nothing is placed there."""

from __future__ import annotations

import asyncio
import time

import pytest

from drctl.payloads import DrainGpuRequest, DrainGpuResult, Role
from drctl.temporal.runbooks import start_gpu_drain
from drctl.workers.stack import LocalStack

pytestmark = pytest.mark.integration


async def test_drained_gpu_is_emptied_and_cordoned(local_stack: LocalStack) -> None:
    assert local_stack.client is not None
    registry = local_stack.platform.registry
    [serving] = [i for i in registry.of_model("llama-2-7b") if i.role == Role.SERVING]
    gpu = serving.gpu
    assert gpu is not None
    on_gpu = {i.id for i in registry.load().values() if i.gpu == gpu and i.role != Role.FAILED}
    handle = await start_gpu_drain(
        local_stack.client, local_stack.settings, DrainGpuRequest(gpu=gpu, reason="Xid 79 in test")
    )
    result: DrainGpuResult = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.failed == []
    assert {line.split(" ")[0] for line in result.failovers} | set(result.deleted) == on_gpu
    assert await local_stack.platform.cordoned_gpus() == [gpu]
    # After reconciliation (triggered by the drain) nothing live sits on the drained GPU.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        live = [i for i in registry.load().values() if i.role not in (Role.FAILED, Role.PROMOTING)]
        hot = [i for i in live if i.model == "llama-2-7b" and i.role == Role.HOT]
        if len(hot) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(hot) == 2
    assert not [i.id for i in registry.load().values() if i.gpu == gpu and i.role != Role.FAILED]
    [now_serving] = [i for i in registry.of_model("llama-2-7b") if i.role == Role.SERVING]
    assert now_serving.gpu != gpu
