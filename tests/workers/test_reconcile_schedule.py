"""The runbook worker creates the reconcile schedule when it starts (every platform: on a cluster
nothing else does) and leaves an existing one exactly as it is; ``drctl up`` keeps creating or
updating it itself and tells its worker not to. ``run_worker`` runs in-process against a real
Temporal dev server, on the local platform (the schedule does not depend on the platform)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import ScheduleDescription, ScheduleUpdate, ScheduleUpdateInput
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from drctl.payloads import RECONCILE_SCHEDULE_ID
from drctl.policies.loader import load_policy_file
from drctl.settings import DrctlSettings
from drctl.workers import runbook_worker
from drctl.workers.stack import LocalStack, isolated_settings
from tests.dev_server import dev_server

ROOT = Path(__file__).resolve().parents[2]
POLICY_FILE = ROOT / "examples" / "dr-policy.yaml"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def temporal() -> AsyncIterator[WorkflowEnvironment]:
    async with dev_server() as env:
        yield env


@pytest.fixture()
async def no_schedule(temporal: WorkflowEnvironment) -> AsyncIterator[None]:
    """Each test starts without the schedule (its ID is fixed) and leaves none behind."""

    async def delete() -> None:
        with contextlib.suppress(RPCError):
            await temporal.client.get_schedule_handle(RECONCILE_SCHEDULE_ID).delete()

    await delete()
    yield
    await delete()


@pytest.fixture()
def quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")  # no process-wide tracer provider from a test
    yield


def worker_settings(env: WorkflowEnvironment, tmp_path: Path, **kw: object) -> DrctlSettings:
    return DrctlSettings(
        _env_file=None,  # type: ignore[call-arg]
        temporal_address=env.client.service_client.config.target_host,
        task_queue=f"schedule-{uuid.uuid4().hex[:8]}",
        policy=POLICY_FILE,
        state_dir=tmp_path / "state",
        worker_metrics_port=0,
        worker_sdk_metrics_port=0,
        **kw,
    )


async def start_and_stop(settings: DrctlSettings, caplog: pytest.LogCaptureFixture) -> None:
    """Run the worker until it polls its task queue (it deals with the schedule before), then stop it."""
    caplog.clear()
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="drctl.worker"):
        task = asyncio.create_task(runbook_worker.run_worker(settings, stop))
        for _ in range(600):
            if "worker polling task queue" in caplog.text or task.done():
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert "worker polling task queue" in caplog.text, caplog.text


async def describe(env: WorkflowEnvironment) -> ScheduleDescription:
    return await env.client.get_schedule_handle(RECONCILE_SCHEDULE_ID).describe()


async def test_a_worker_creates_the_schedule_once_and_leaves_an_edited_one_alone(
    temporal: WorkflowEnvironment,
    no_schedule: None,
    quiet: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = worker_settings(temporal, tmp_path)
    policy = load_policy_file(POLICY_FILE)

    await start_and_stop(settings, caplog)
    assert f"reconcile schedule {RECONCILE_SCHEDULE_ID}: created" in caplog.text
    created = await describe(temporal)
    action = created.schedule.action
    assert getattr(action, "workflow", None) == "ReconcileStandbysWorkflow"
    assert getattr(action, "task_queue", None) == settings.task_queue
    assert [i.every for i in created.schedule.spec.intervals] == [policy.reconcile.interval]
    assert created.schedule.state.paused is (not policy.reconcile.enabled)

    # An operator pauses it and slows it down; a restarted worker (or a second replica) keeps that.
    def edit(update: ScheduleUpdateInput) -> ScheduleUpdate:
        schedule = update.description.schedule
        schedule.state.paused = True
        schedule.state.note = "paused by an operator during maintenance"
        schedule.spec.intervals[0].every = timedelta(hours=1)
        return ScheduleUpdate(schedule=schedule)

    await temporal.client.get_schedule_handle(RECONCILE_SCHEDULE_ID).update(edit)
    await start_and_stop(settings, caplog)
    assert f"reconcile schedule {RECONCILE_SCHEDULE_ID}: exists, left as it is" in caplog.text
    kept = await describe(temporal)
    assert kept.schedule.state.paused is True
    assert kept.schedule.state.note == "paused by an operator during maintenance"
    assert [i.every for i in kept.schedule.spec.intervals] == [timedelta(hours=1)]
    schedules = [s.id async for s in await temporal.client.list_schedules()]
    assert schedules.count(RECONCILE_SCHEDULE_ID) == 1


async def test_the_setting_turns_it_off(
    temporal: WorkflowEnvironment,
    no_schedule: None,
    quiet: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await start_and_stop(worker_settings(temporal, tmp_path, worker_creates_reconcile_schedule=False), caplog)
    assert "reconcile schedule" not in caplog.text
    with pytest.raises(RPCError, match="not found"):
        await describe(temporal)


async def test_a_temporal_that_refuses_is_logged_and_the_worker_still_polls(
    temporal: WorkflowEnvironment,
    no_schedule: None,
    quiet: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def refused(*_: object) -> str:
        raise RPCError("permission denied: schedules", RPCStatusCode.PERMISSION_DENIED, b"")

    monkeypatch.setattr(runbook_worker, "create_reconcile_schedule_if_missing", refused)
    await start_and_stop(worker_settings(temporal, tmp_path), caplog)
    assert f"could not create the Temporal Schedule {RECONCILE_SCHEDULE_ID}: permission denied" in caplog.text


def test_drctl_up_tells_its_worker_to_leave_the_schedule_to_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local stack creates or updates the schedule itself (to the policy, at every start): its
    worker must not create it first, so a fresh stack creates it once, as before."""
    stack = LocalStack(isolated_settings(tmp_path / "state", POLICY_FILE), load_policy_file(POLICY_FILE), print)
    spawned: dict[str, dict[str, str]] = {}

    def spawn(name: str, command: list[str], log_name: str, env: dict[str, str] | None = None) -> int:
        spawned[name] = dict(env or {})
        return 0

    monkeypatch.setattr(stack, "_spawn_part", spawn)
    stack.start_worker()
    stack._start_python_process("prober", "drctl.detectors.prober")
    env = spawned["worker"]
    assert env["DRCTL_WORKER_CREATES_RECONCILE_SCHEDULE"] == "false"
    monkeypatch.setenv("DRCTL_WORKER_CREATES_RECONCILE_SCHEDULE", env["DRCTL_WORKER_CREATES_RECONCILE_SCHEDULE"])
    assert DrctlSettings(_env_file=None).worker_creates_reconcile_schedule is False  # type: ignore[call-arg]
    assert spawned["prober"]["DRCTL_WORKER_CREATES_RECONCILE_SCHEDULE"] == "True"  # the default, elsewhere
