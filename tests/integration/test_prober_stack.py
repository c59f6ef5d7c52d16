"""Detection on the real stack: the prober notices a ``kill -9`` at once and a hung (SIGSTOPped)
process after its failed probes, and starts the failover runbook by itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from drctl.payloads import FailoverOutcome, FailoverResult, Role, failover_workflow_id
from drctl.policies.loader import load_policy_file
from drctl.workers.stack import LocalStack, isolated_settings
from tests.integration.conftest import EXAMPLE_POLICY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def probed_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    settings = isolated_settings(tmp_path_factory.mktemp("probed"), EXAMPLE_POLICY)
    stack = LocalStack(settings, load_policy_file(EXAMPLE_POLICY), say=lambda _: None, with_prober=True)
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


async def _result_of_automatic_failover(stack: LocalStack, model: str, instance: str) -> FailoverResult:
    assert stack.client is not None
    handle = stack.client.get_workflow_handle(failover_workflow_id(model, instance), result_type=FailoverResult)
    deadline = time.monotonic() + 30
    while True:
        try:
            return await asyncio.wait_for(handle.result(), timeout=30)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # not started yet


def _serving(stack: LocalStack, model: str) -> int:
    [instance] = [i for i in stack.platform.registry.of_model(model) if i.role == Role.SERVING]
    assert instance.pid is not None
    return instance.pid


async def test_kill_9_is_detected_at_once_and_failed_over(probed_stack: LocalStack) -> None:
    pid = _serving(probed_stack, "llama-2-7b")
    os.kill(pid, signal.SIGKILL)
    result = await _result_of_automatic_failover(probed_stack, "llama-2-7b", "llama-2-7b-0")
    assert result.outcome == FailoverOutcome.RECOVERED and result.tier == Role.HOT
    assert result.reason.startswith("llama-2-7b-1")
    assert result.rto_ms is not None and result.switch_ms is not None
    detection_ms = result.rto_ms - result.switch_ms
    print(f"kill -9: detected {detection_ms:.0f} ms after the failure, RTO {result.rto_ms:.0f} ms")
    assert detection_ms < 1000  # noticed on the next 100 ms tick, not after three 1 s probes


async def test_hung_process_is_detected_after_its_probes_fail(probed_stack: LocalStack) -> None:
    pid = _serving(probed_stack, "mistral-7b")
    os.kill(pid, signal.SIGSTOP)
    try:
        result = await _result_of_automatic_failover(probed_stack, "mistral-7b", "mistral-7b-0")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.rto_ms is not None and result.switch_ms is not None
    detection_ms = result.rto_ms - result.switch_ms
    print(f"SIGSTOP: detected {detection_ms:.0f} ms after the first failed probe, RTO {result.rto_ms:.0f} ms")
    # Three failed probes at a 1 s interval: about two intervals after the first failure.
    assert 1500 < detection_ms < 6000
