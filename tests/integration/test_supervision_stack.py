"""Supervision on the real stack: ``kill -9`` of Envoy and of the Temporal dev server while
``supervise()`` runs (as under ``drctl up``). Envoy comes back from its last config (endpoints and
all) within a bound, requests through it succeed again; Temporal comes back on the same database
and ports, and a failover that starts after it returned runs to completion."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
import yaml
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

from drctl.payloads import RECONCILE_SCHEDULE_ID, FailoverOutcome, FailoverResult, Role, failover_workflow_id
from drctl.platforms.local import envoy, processes
from drctl.policies.loader import load_policy_file
from drctl.workers.stack import LocalStack, isolated_settings, supervision_lines
from tests.integration.conftest import EXAMPLE_POLICY

pytestmark = pytest.mark.integration
MODEL = "llama-2-7b"
ENVOY_GAP_BOUND_S = 3.0
"""Requests through Envoy may fail for at most this long after its ``kill -9`` (measured: well under 1 s)."""


@dataclass
class Supervised:
    stack: LocalStack
    said: list[str]
    stop: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture(scope="module")
async def supervised(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Supervised]:
    settings = isolated_settings(tmp_path_factory.mktemp("supervised"), EXAMPLE_POLICY)
    said: list[str] = []
    stack = LocalStack(settings, load_policy_file(EXAMPLE_POLICY), say=said.append, with_prober=True)
    run = Supervised(stack, said)
    task: asyncio.Task[None] | None = None
    try:
        await stack.start()
        task = asyncio.create_task(stack.supervise(run.stop))
        yield run
    finally:
        run.stop.set()
        if task is not None:
            await task
        await stack.stop()


async def _until(predicate: object, timeout_s: float, what: str) -> float:
    """Poll ``predicate()`` every 10 ms; returns the seconds it took."""
    assert callable(predicate)
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout_s:
            pytest.fail(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - began


def _stack_file(stack: LocalStack) -> dict[str, dict[str, object]]:
    supervised: dict[str, dict[str, object]] = json.loads(stack.layout.stack_file.read_text())["supervised"]
    return supervised


async def test_envoy_killed_is_restarted_from_its_last_config(supervised: Supervised) -> None:
    stack = supervised.stack
    registered = {
        model: {i.port for i in stack.platform.registry.of_model(model) if i.lb_priority is not None}
        for model in stack.policy.model_names
    }
    assert all(registered.values())
    url = f"{stack.settings.lb_url}/v1/models/{MODEL}/predict"
    results: list[tuple[float, bool]] = []
    """(when the request was sent, whether it succeeded)"""
    done = asyncio.Event()

    async def load() -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while not done.is_set():
                sent = time.monotonic()
                try:
                    ok = (await client.post(url, json={"prompt": "hi", "max_tokens": 2})).status_code == 200
                except httpx.HTTPError:
                    ok = False
                results.append((sent, ok))
                await asyncio.sleep(0.005)

    loader = asyncio.create_task(load())
    await asyncio.sleep(0.5)
    old = stack.pids["envoy"]
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    await _until(lambda: stack.pids["envoy"] != old and stack.parts["envoy"].state == "up", 10, "Envoy restarted")
    await _until(lambda: any(ok and t > killed for t, ok in results), ENVOY_GAP_BOUND_S, "a request succeeds")
    await asyncio.sleep(1.0)
    done.set()
    await loader

    # The request in flight at the kill fails with it (its connection is gone); it counts as failed.
    before = [ok for t, ok in results if t < killed]
    after = [(t, ok) for t, ok in results if t >= killed]
    failed = [t for t, ok in after if not ok]
    first_ok = min(t for t, ok in after if ok)
    gap_ms = ((max(failed) if failed else first_ok) - killed) * 1000
    in_flight = 0 if before[-1] else 1
    print(
        f"Envoy kill -9: {len(failed)} of {len(after)} requests sent after the kill failed "
        f"(+{in_flight} in flight at the kill); gap {gap_ms:.0f} ms"
    )
    assert len(before) > 10 and all(before[:-1])
    # Requests fail only during the restart gap: everything after the first success succeeds.
    assert all(ok for t, ok in after if t > first_ok), "requests failed again after Envoy was back"
    assert first_ok - killed < ENVOY_GAP_BOUND_S

    # The endpoints are back with Envoy: the EDS files were not rewritten empty.
    for model, ports in registered.items():
        document = yaml.safe_load(stack.layout.eds_file(model).read_text())
        eds_ports = {
            e["endpoint"]["address"]["socket_address"]["port_value"]
            for locality in document["resources"][0]["endpoints"]
            for e in locality["lb_endpoints"]
        }
        assert eds_ports == ports, model
        hosts = await envoy.cluster_hosts(stack.settings.envoy_admin_url, model)
        assert {h.port for h in hosts if h.healthy} == ports, (model, hosts)

    # Said and recorded, and `drctl status` shows it.
    said = "\n".join(supervised.said)
    assert f"WARNING: envoy (pid {old}) was killed by SIGKILL; restarting it now" in said, said
    assert f"envoy restarted (pid {stack.pids['envoy']}) in " in said, said
    record = _stack_file(stack)["envoy"]
    assert record["pid"] == stack.pids["envoy"]
    assert record["restarts"] == 1 and record["state"] == "up"
    assert record["last_exit"] == "was killed by SIGKILL"
    [line] = [x for x in supervision_lines(stack.layout) if x.startswith("envoy:")]
    assert line.startswith(f"envoy: up (pid {stack.pids['envoy']}), restarted 1\N{MULTIPLICATION SIGN} (last ")
    assert [x for x in supervision_lines(stack.layout) if x.startswith("temporal:")] == [
        f"temporal: up (pid {stack.pids['temporal']})"
    ]


async def test_temporal_killed_is_restarted_and_failovers_run_again(supervised: Supervised) -> None:
    stack = supervised.stack
    client = stack.client
    assert client is not None
    old = stack.pids["temporal"]
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    await _until(lambda: stack.pids["temporal"] != old, 10, "Temporal respawned")
    while True:  # the client the supervisor had before the crash works again, no new connection needed
        try:
            await client.workflow_service.get_system_info(GetSystemInfoRequest(), retry=False)
            break
        except Exception:
            assert time.monotonic() - killed < 30, "Temporal did not answer within 30 s"
            await asyncio.sleep(0.02)
    back_s = time.monotonic() - killed
    assert stack.client is client
    await _until(lambda: stack.parts["temporal"].state == "up", 10, "restart recorded")

    # The same database: the reconcile schedule created before the crash is still there.
    described = await client.get_schedule_handle(RECONCILE_SCHEDULE_ID).describe()
    assert described.id == RECONCILE_SCHEDULE_ID

    # A failure after Temporal returned: the prober starts the failover, the worker runs it.
    [victim] = [i for i in stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]
    os.kill(victim.pid or 0, signal.SIGKILL)
    failed_at = time.monotonic()
    handle = client.get_workflow_handle(failover_workflow_id(MODEL, victim.id), result_type=FailoverResult)
    while True:
        try:
            result = await asyncio.wait_for(handle.result(), timeout=30)
            break
        except Exception:
            assert time.monotonic() - failed_at < 30, "no failover completed within 30 s"
            await asyncio.sleep(0.1)
    recovered_s = time.monotonic() - failed_at
    assert result.outcome == FailoverOutcome.RECOVERED and result.tier == Role.HOT
    registry = {i.id: i for i in stack.platform.registry.of_model(MODEL)}
    assert registry[victim.id].role == Role.FAILED
    assert registry[result.promoted or ""].role == Role.SERVING

    repoll = [line for line in supervised.said if line.startswith("worker ") and "Temporal returned" in line]
    print(
        f"Temporal kill -9: answering again {back_s * 1000:.0f} ms after the kill; {repoll}; "
        f"failover after its return recovered in {recovered_s * 1000:.0f} ms (RTO {result.rto_ms:.0f} ms)"
    )
    assert repoll, supervised.said
    assert processes.is_alive(stack.pids["worker"]) and processes.is_alive(stack.pids["prober"])
    record = _stack_file(stack)["temporal"]
    assert record["restarts"] == 1 and record["last_exit"] == "was killed by SIGKILL"


async def test_a_worker_that_does_not_poll_after_temporal_returned_is_restarted(supervised: Supervised) -> None:
    stack = supervised.stack
    worker, temporal = stack.pids["worker"], stack.pids["temporal"]
    os.kill(worker, signal.SIGSTOP)  # hung: it cannot reconnect by itself
    try:
        os.kill(temporal, signal.SIGKILL)
        await _until(lambda: stack.pids["worker"] != worker, 20, "the worker restarted")
    finally:
        if processes.is_alive(worker):
            os.kill(worker, signal.SIGCONT)
    assert not processes.is_alive(worker)
    said = "\n".join(supervised.said)
    assert "worker not polling 3s after Temporal returned; restarting it" in said, said
    await _until(lambda: stack.parts["worker"].state == "up", 5, "the worker recorded up")
    deadline = time.monotonic() + 30
    while not await stack._worker_is_polling(stack.pids["worker"]):
        assert time.monotonic() < deadline, "the new worker does not poll"
        await asyncio.sleep(0.1)
    record = _stack_file(stack)["worker"]
    assert record["restarts"] == 1 and record["last_exit"] == "stopped: not polling after Temporal returned"
