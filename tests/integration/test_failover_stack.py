"""The failover runbook end to end on the real local stack.

Continuous requests go through Envoy while llama-2-7b's serving instance is ``kill -9``ed and a
failover is started; no client request may fail, and the standby must end up serving at priority 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from drctl.payloads import ActivityName, FailoverOutcome, FailoverRequest, FailoverResult, Role, Trigger
from drctl.platforms.local import envoy, processes
from drctl.temporal.runbooks import start_failover
from drctl.workers.stack import LocalStack
from drctl.workflows.failover import FailoverWorkflow
from tests.integration.history import activities_in_history

pytestmark = pytest.mark.integration
MODEL = "llama-2-7b"


@dataclass
class LoadGenerator:
    """Sends predict requests through Envoy back to back until stopped; bounded by ``max_requests``."""

    url: str
    max_requests: int = 3000
    results: list[tuple[float, int | str, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            while not self.stop.is_set() and len(self.results) < self.max_requests:
                sent = time.monotonic()
                try:
                    response = await client.post(self.url, json={"prompt": "hello", "max_tokens": 4})
                    outcome: int | str = response.status_code
                    served_by = response.headers.get("x-drctl-instance", "")
                except httpx.HTTPError as exc:
                    outcome, served_by = type(exc).__name__, ""
                self.results.append((sent, outcome, served_by))
                await asyncio.sleep(0.01)

    @property
    def failed(self) -> list[tuple[float, int | str, str]]:
        return [r for r in self.results if r[1] != 200]


def _serving(stack: LocalStack) -> list[str]:
    return [i.id for i in stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]


async def test_kill_serving_instance_then_failover_loses_no_request(local_stack: LocalStack) -> None:
    settings = local_stack.settings
    assert local_stack.client is not None
    [victim] = _serving(local_stack)
    instances = {i.id: i for i in local_stack.platform.registry.of_model(MODEL)}
    hot = sorted(i for i, inst in instances.items() if inst.role == Role.HOT)

    load = LoadGenerator(f"{settings.lb_url}/v1/models/{MODEL}/predict")
    load_task = asyncio.create_task(load.run())
    await asyncio.sleep(0.5)
    os.kill(instances[victim].pid or 0, signal.SIGKILL)
    killed_at = datetime.now(UTC)
    handle = await start_failover(
        local_stack.client,
        settings,
        FailoverRequest(
            model=MODEL, instance=victim, reason="kill -9 in test", trigger=Trigger.DRILL, failed_at=killed_at
        ),
    )
    result: FailoverResult = await asyncio.wait_for(handle.result(), timeout=60)
    await asyncio.sleep(0.5)
    load.stop.set()
    await load_task

    # Zero client-visible failures, with traffic before and after the kill.
    assert len(load.results) > 50
    assert load.failed == [], f"{len(load.failed)} of {len(load.results)} requests failed: {load.failed[:5]}"
    assert load.results[-1][2] == result.promoted

    # The workflow completed, promoting the first hot standby, with timings recorded.
    assert result.outcome == FailoverOutcome.RECOVERED
    assert result.promoted == hot[0]
    assert result.tier == Role.HOT
    assert [s.step for s in result.steps] == [
        "confirm", "list", "pick", "promote", "load", "register", "verify", "eject", "replenish",
    ]  # fmt: skip
    assert all(s.ok and s.duration_ms >= 0 for s in result.steps)
    assert result.rto_ms is not None and 0 < result.rto_ms < 30_000
    assert result.switch_ms is not None and result.orchestration_ms is not None

    # Every step is in the workflow history (local activities as markers, the probe as an activity:
    # the listing came with the run's start, claimed with the epoch, and the probe's answer must be
    # recorded before anything changes).
    assert await activities_in_history(handle) == [
        ActivityName.PROBE_INSTANCE,
        ActivityName.PROMOTE_STANDBY,
        ActivityName.LOAD_MODEL,
        ActivityName.REGISTER_INSTANCE,
        ActivityName.VERIFY_SERVING,
        ActivityName.EJECT_INSTANCE,
        ActivityName.REQUEST_RECONCILE,
    ]
    assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    # The recorded history replays against the current workflow code (no non-determinism).
    replayer = Replayer(workflows=[FailoverWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(await handle.fetch_history())

    # The standby now serves at priority 0 in Envoy; the dead instance is gone from the cluster.
    hosts = await envoy.cluster_hosts(settings.envoy_admin_url, MODEL)
    by_instance = {h.instance: h for h in hosts}
    assert by_instance[hot[0]].priority == 0 and by_instance[hot[0]].healthy
    assert by_instance[hot[1]].priority == 1
    assert victim not in by_instance
    registry = {i.id: i for i in local_stack.platform.registry.of_model(MODEL)}
    assert registry[victim].role == Role.FAILED
    assert registry[hot[0]].role == Role.SERVING and registry[hot[0]].lb_priority == 0

    # Replenish: the failover triggered reconciliation, which brings back a second hot standby.
    replenish = next(s for s in result.steps if s.step == "replenish")
    assert replenish.ok and "triggered" in replenish.detail
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        hot_now = [
            i for i in local_stack.platform.registry.of_model(MODEL) if i.role == Role.HOT and i.lb_priority == 1
        ]
        if len(hot_now) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(hot_now) == 2, local_stack.platform.registry.of_model(MODEL)
    assert {i.id for i in hot_now} - {hot[1]} == {f"{MODEL}-4"}


async def test_audit_lists_the_failover_from_visibility(local_stack: LocalStack) -> None:
    """``drctl audit`` finds the failover above through its search attributes, and filters by model."""
    completed = _cli(local_stack, "audit", "--model", MODEL, "--json")
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)
    assert any(r["outcome"] == "recovered" and r["tier"] == "hot" and r["rto_ms"] for r in rows), rows
    none = _cli(local_stack, "audit", "--model", "mistral-7b", "--json")
    assert json.loads(none.stdout) == []


def _cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    s = stack.settings
    env = {
        **os.environ,
        "DRCTL_POLICY": str(s.policy),
        "DRCTL_STATE_DIR": str(s.state_dir),
        "DRCTL_TEMPORAL_ADDRESS": s.temporal_address,
        "DRCTL_TASK_QUEUE": s.task_queue,
        "DRCTL_ENVOY_ADMIN_PORT": str(s.envoy_admin_port),
        "DRCTL_ENVOY_PORT": str(s.envoy_port),
    }
    drctl = str(Path(sys.executable).parent / "drctl")
    return subprocess.run([drctl, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


async def _failover_count(stack: LocalStack, model: str) -> int:
    assert stack.client is not None
    query = f"WorkflowType = 'FailoverWorkflow' AND DrctlModel = '{model}'"
    return len([wf async for wf in stack.client.list_workflows(query)])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("failover", "no-such-model", "x-0"), "unknown model 'no-such-model'"),
        (("failover", "mistral-7b", "mistral-7b-99"), "mistral-7b has no instance 'mistral-7b-99'"),
    ],
)
async def test_bad_failover_input_is_refused_and_starts_nothing(
    local_stack: LocalStack, args: tuple[str, ...], expected: str
) -> None:
    before = await _failover_count(local_stack, args[1])
    completed = _cli(local_stack, *args)
    assert completed.returncode == 2
    assert expected in " ".join(completed.stderr.split())
    assert "Traceback" not in completed.stderr
    await asyncio.sleep(0.3)
    assert await _failover_count(local_stack, args[1]) == before
    assert processes.is_alive(local_stack.pids["temporal"])
