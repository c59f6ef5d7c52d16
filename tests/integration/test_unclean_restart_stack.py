"""An unclean stop: ``drctl up`` (the real command, a child process here) is ``kill -9``ed and leaves
its processes behind; one serving instance dies while nothing watches. The next start stops the
leftover Temporal, Envoy, worker and agents, adopts the instances still running (same pids, no
reload) and leaves the dead one as recorded, so its prober finds it and the failover runbook
replaces it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import pytest

from drctl.payloads import FailoverOutcome, FailoverResult, Role, failover_workflow_id
from drctl.platforms.local import processes
from drctl.platforms.local.registry import InstanceRegistry
from drctl.policies.loader import load_policy_file
from drctl.settings import StateLayout
from drctl.workers.stack import LocalStack, isolated_settings
from tests.integration.conftest import EXAMPLE_POLICY

pytestmark = pytest.mark.integration
MODEL = "mistral-7b"


async def test_unclean_stop_adopts_live_instances_and_fails_over_dead_ones(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    settings = isolated_settings(tmp_path_factory.mktemp("unclean"), EXAMPLE_POLICY)
    layout = StateLayout(settings.state_dir)
    policy = load_policy_file(EXAMPLE_POLICY)
    env = {}
    for key, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"DRCTL_{key.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    if "DRCTL_MEMORY_ROOT" in os.environ:  # where this test's stack keeps Envoy's endpoints, as ours does
        env["DRCTL_MEMORY_ROOT"] = os.environ["DRCTL_MEMORY_ROOT"]
    command = [sys.executable, "-c", "from drctl.cli.app import main; main()", "up"]
    up = processes.spawn(command, layout.root / "drctl-up.out", env=env)
    said: list[str] = []
    stack: LocalStack | None = None
    try:
        deadline = time.monotonic() + 60
        while not layout.stack_file.exists():
            assert processes.is_alive(up), (layout.root / "drctl-up.out").read_text()
            assert time.monotonic() < deadline, "drctl up did not come up within 60 s"
            await asyncio.sleep(0.2)
        left = json.loads(layout.stack_file.read_text())["pids"]
        before = InstanceRegistry(layout.instances_file).load()

        # A second `drctl up` on the same folder is refused, and touches nothing of the running one
        # (it used to stop every model instance and remove the stack file on its way out).
        second = await asyncio.create_subprocess_exec(
            *command, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        said_second = (await asyncio.wait_for(second.communicate(), 60))[0].decode()
        assert second.returncode == 1 and f"`drctl up` (pid {up}) is running" in said_second, said_second
        assert "stopping" not in said_second and "Traceback" not in said_second, said_second
        assert layout.stack_file.exists()
        assert all(processes.is_alive(i.pid) for i in before.values() if i.pid is not None)
        assert all(processes.is_alive(pid) for pid in left.values())

        # The supervisor dies hard: everything it started runs on, orphaned.
        os.kill(up, signal.SIGKILL)
        assert all(processes.is_alive(pid) for pid in left.values())
        # While nothing watches (the orphaned prober dies too), a serving instance dies.
        os.kill(left["prober"], signal.SIGKILL)
        [victim] = [i for i in before.values() if i.model == MODEL and i.role == Role.SERVING]
        os.kill(victim.pid or 0, signal.SIGKILL)
        for pid in (up, victim.pid):
            for _ in range(500):
                if not processes.is_alive(pid):
                    break
                await asyncio.sleep(0.01)

        stack = LocalStack(settings, policy, say=said.append, with_prober=True)
        await stack.start()
        lines = "\n".join(said)
        for name, pid in left.items():
            if name != "prober":
                assert f"stopped leftover {name} (pid {pid})" in lines, lines
            assert not processes.is_alive(pid), name

        # Live instances adopted as they were: same process, same role, same LB priority.
        after = stack.platform.registry.load()
        for instance in before.values():
            if instance.id == victim.id or instance.role == Role.COLD:
                continue
            assert after[instance.id].pid == instance.pid, instance.id
            if instance.model != MODEL:  # (the prober may already be failing MODEL over)
                assert (after[instance.id].role, after[instance.id].lb_priority) == (
                    instance.role,
                    instance.lb_priority,
                )
            assert processes.runs_instance(instance.pid, instance.id)
            assert f"adopted {instance.id} ({instance.role}," in lines
        assert f"WARNING: {victim.id} (serving, {victim.gpu}): process {victim.pid} died while drctl was down" in lines

        # The dead one was left for the prober, which started its failover; the hot standby took over.
        assert stack.client is not None
        handle = stack.client.get_workflow_handle(failover_workflow_id(MODEL, victim.id), result_type=FailoverResult)
        deadline = time.monotonic() + 30
        while True:
            try:
                result = await asyncio.wait_for(handle.result(), timeout=30)
                break
            except Exception:
                assert time.monotonic() < deadline, "the prober did not fail the dead instance over"
                await asyncio.sleep(0.1)
        assert result.outcome == FailoverOutcome.RECOVERED and result.tier == Role.HOT
        registry = stack.platform.registry.load()
        assert registry[victim.id].role == Role.FAILED and registry[victim.id].lb_priority is None
        assert registry[result.promoted or ""].role == Role.SERVING
    finally:
        processes.terminate(up, grace_s=0)
        if stack is not None:
            await stack.stop()
        else:  # the restart failed: stop what the killed `drctl up` left running
            LocalStack(settings, policy, say=lambda _: None).stop_leftovers(instances=True)
    assert not any(processes.is_alive(i.pid) for i in stack.platform.registry.load().values())
