"""A ``drctl up`` stopped cleanly and started again without ``--fresh`` resumes the fleet the
registry recorded, not the policy's initial layout: an instance ejected by a failover stays failed
and out of Envoy, the promoted standby keeps serving, tiers, GPUs and cordons stay, ids continue."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus

from drctl.payloads import (
    FailoverOutcome,
    FailoverResult,
    Instance,
    ReconcileRequest,
    ReconcileResult,
    Role,
    failover_workflow_id,
)
from drctl.platforms.local import envoy, processes
from drctl.platforms.local.platform import DELETING
from drctl.policies.loader import load_policy_file
from drctl.policies.placement import serving_zones
from drctl.policies.reconcile import instance_index
from drctl.workers.stack import LocalStack, isolated_settings
from tests.integration.conftest import EXAMPLE_POLICY

pytestmark = pytest.mark.integration
MODEL = "llama-2-7b"
UNUSED_GPU = "gpu-node-3/3"
"""Cordoned before the stop; no instance of the example policy is placed there."""


async def _failover_after_kill(stack: LocalStack, instance_id: str) -> FailoverResult:
    """``kill -9`` the instance; the prober starts its failover; its result."""
    [instance] = [i for i in stack.platform.registry.of_model(MODEL) if i.id == instance_id]
    assert processes.is_alive(instance.pid)
    os.kill(instance.pid or 0, signal.SIGKILL)
    assert stack.client is not None
    handle = stack.client.get_workflow_handle(failover_workflow_id(MODEL, instance_id), result_type=FailoverResult)
    deadline = time.monotonic() + 30
    while True:
        try:
            return await asyncio.wait_for(handle.result(), timeout=30)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _hot_standbys(stack: LocalStack, count: int) -> list[Instance]:
    """Until reconciliation has brought the model back to ``count`` registered hot standbys."""
    deadline = time.monotonic() + 30
    while True:
        hot = [i for i in stack.platform.registry.of_model(MODEL) if i.role == Role.HOT and i.lb_priority == 1]
        if len(hot) == count or time.monotonic() > deadline:
            return hot
        await asyncio.sleep(0.1)


async def _reconciled(stack: LocalStack) -> None:
    """Reconcile until the fleet matches the policy: after a failover, reconciliation replaces the
    used standby and may move others (a few per pass); the stop must not cut that short. A move
    creates the replacement first, so the fleet matches while the moved instance is still being
    deleted (role failed, note ``deleting``): wait for that delete too (CI saw the registry lose
    such an instance between the test's snapshot and the end of the stop)."""
    assert stack.client is not None
    for _ in range(4):
        if not stack.platform.fleet_drift():
            break
        await stack.client.execute_workflow(
            "ReconcileStandbysWorkflow",
            ReconcileRequest(),
            id=f"test-reconcile-{uuid.uuid4().hex[:6]}",
            task_queue=stack.settings.task_queue,
            result_type=ReconcileResult,
        )
    assert stack.platform.fleet_drift() == []
    deadline = time.monotonic() + 30.0
    while any(i.note == DELETING for i in stack.platform.registry.load().values()):
        assert time.monotonic() < deadline, "a reconcile pass never finished its delete"
        await asyncio.sleep(0.1)


async def _served_by(stack: LocalStack) -> set[str]:
    url = f"{stack.settings.lb_url}/v1/models/{MODEL}/predict"
    async with httpx.AsyncClient(timeout=5.0) as client:
        responses = [await client.post(url, json={"prompt": "hi", "max_tokens": 2}) for _ in range(10)]
    assert all(r.status_code == 200 for r in responses)
    return {r.headers["x-drctl-instance"] for r in responses}


async def test_clean_restart_resumes_the_recorded_fleet(tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = isolated_settings(tmp_path_factory.mktemp("restart"), EXAMPLE_POLICY)
    policy = load_policy_file(EXAMPLE_POLICY)
    first = LocalStack(settings, policy, say=lambda _: None, with_prober=True)
    try:
        await first.start()
        result = await _failover_after_kill(first, f"{MODEL}-0")
        assert result.outcome == FailoverOutcome.RECOVERED and result.promoted == f"{MODEL}-1"
        hot = [i.id for i in await _hot_standbys(first, 2)]
        assert hot[0] == f"{MODEL}-2" and instance_index(hot[1]) >= 4, hot
        await _reconciled(first)
        await first.platform.cordon_gpu(UNUSED_GPU, "test: kept across the restart")
        recorded = first.platform.registry.load()
    finally:
        await first.stop()

    # The clean stop ended every process and said so in the registry: no pid, roles as they were.
    stopped = first.platform.registry.load()
    assert {i.id: (i.role, i.gpu, i.lb_priority) for i in stopped.values()} == {
        i.id: (i.role, i.gpu, i.lb_priority) for i in recorded.values()
    }
    assert all(i.pid is None for i in stopped.values() if i.role != Role.FAILED)
    assert not any(processes.is_alive(i.pid) for i in recorded.values())

    said: list[str] = []
    second = LocalStack(settings, policy, say=said.append, with_prober=True)
    try:
        await second.start()
        resumed = second.platform.registry.load()
        # Same ids, roles, tiers and GPUs; the LB priority as before; new processes for what ran.
        assert {i.id: (i.role, i.gpu, i.zone, i.lb_priority) for i in resumed.values()} == {
            i.id: (i.role, i.gpu, i.zone, i.lb_priority) for i in recorded.values()
        }
        for instance in resumed.values():
            if instance.role in (Role.SERVING, Role.HOT, Role.WARM):
                assert processes.runs_instance(instance.pid, instance.id), instance
                assert f"restarted {instance.id} ({instance.role}, {instance.gpu})" in "\n".join(said)
            else:
                assert not processes.is_alive(instance.pid), instance
        # The ejected instance stays failed and out of Envoy; the promoted standby still serves.
        assert resumed[f"{MODEL}-0"].role == Role.FAILED and resumed[f"{MODEL}-0"].lb_priority is None
        hosts = {h.instance: h for h in await envoy.cluster_hosts(settings.envoy_admin_url, MODEL)}
        assert set(hosts) == {f"{MODEL}-1", *hot}
        assert hosts[f"{MODEL}-1"].priority == 0 and hosts[f"{MODEL}-1"].healthy
        assert await _served_by(second) == {f"{MODEL}-1"}
        assert await second.platform.cordoned_gpus() == [UNUSED_GPU]
        assert second.platform.fleet_drift() == []
        # Temporal kept the history: the first stack's failover is there, completed.
        assert second.client is not None
        handle = second.client.get_workflow_handle(failover_workflow_id(MODEL, f"{MODEL}-0"))
        assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED

        # The resumed stack runs the next failover itself, and the replacement's id continues.
        result = await _failover_after_kill(second, f"{MODEL}-1")
        # Of the two hot standbys, the one in an active zone (the example policy is active-passive).
        active = [i for i in hot if resumed[i].zone in serving_zones(policy)]
        assert result.outcome == FailoverOutcome.RECOVERED and result.promoted == (active or hot)[0]
        kept = next(i for i in hot if i != result.promoted)
        replaced = {i.id for i in await _hot_standbys(second, 2)} - {kept}
        newest = max(instance_index(i) for i in recorded if i.startswith(f"{MODEL}-"))
        assert len(replaced) == 1 and instance_index(replaced.pop()) > newest, replaced
    finally:
        await second.stop()
