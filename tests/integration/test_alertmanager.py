"""A real Prometheus Alertmanager in front of the alert receiver.

The test starts ``prometheus-alertmanager`` on loopback (clustering off, storage in a temporary
folder) with one route to the receiver's webhook, authenticated with a tenant's bearer token, and
runs the receiver in-process against the time-skipping Temporal server (no worker: a started
failover just waits in its queue). An alert posted to Alertmanager's API must start exactly one
failover workflow, however often Alertmanager re-sends it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from aiohttp import web
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.detectors.alert_receiver import ALERTS_PATH, RECEIVER, AlertReceiver, build_app
from drctl.payloads import LeaseAnswer, LeaseRequest, failover_workflow_id, guardian_workflow_id
from drctl.policies.schema import DRPolicy
from drctl.temporal.incidents import guardian_state
from drctl.workers.stack import free_ports
from drctl.workflows.guardian import ModelGuardianWorkflow

pytestmark = pytest.mark.integration

ALERTMANAGER = "prometheus-alertmanager"
TOKEN = "team-a-alertmanager-0123456789abcdef"
POLICY = DRPolicy.model_validate(
    {"models": [{"name": "llama-2-7b", "tenant": "team-a", "hotStandby": 1}], "tenants": [{"name": "team-a"}]}
)
REPEAT_INTERVAL_S = 1.0


def alertmanager_binary() -> str:
    path = shutil.which(ALERTMANAGER) or (
        f"/usr/bin/{ALERTMANAGER}" if Path(f"/usr/bin/{ALERTMANAGER}").is_file() else None
    )
    if path is None:
        pytest.fail(
            f"{ALERTMANAGER} not found: install it with scripts/install-system-deps.sh "
            f"(Debian package {ALERTMANAGER}; `make pytest` runs it)",
            pytrace=False,
        )
    return path


@dataclass
class Stack:
    receiver: AlertReceiver
    alertmanager_url: str
    log_path: Path
    queue: str


def alertmanager_config(webhook_url: str) -> dict[str, object]:
    return {
        "route": {
            "receiver": "drctl",
            "group_by": ["alertname", "model", "instance"],
            "group_wait": "0s",
            "group_interval": "100ms",
            "repeat_interval": f"{int(REPEAT_INTERVAL_S * 1000)}ms",
        },
        "receivers": [
            {
                "name": "drctl",
                "webhook_configs": [
                    {
                        "url": webhook_url,
                        "send_resolved": True,
                        "http_config": {"authorization": {"type": "Bearer", "credentials": TOKEN}},
                    }
                ],
            }
        ],
    }


def start_alertmanager(folder: Path, webhook_url: str, port: int) -> subprocess.Popen[bytes]:
    """Alertmanager on loopback, clustering off, its state and log in ``folder``."""
    config_path = folder / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(alertmanager_config(webhook_url)))
    with (folder / "alertmanager.log").open("wb") as log:
        return subprocess.Popen(
            [
                alertmanager_binary(),
                f"--config.file={config_path}",
                f"--storage.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@activity.defn(name="request_lease")
async def never_granted(request: LeaseRequest) -> LeaseAnswer:
    """The budget is out of the picture: the incident stays queued, which is what the receiver does."""
    return LeaseAnswer(granted=False, detail="test: waiting for the budget forever")


async def wait_for(predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(every_s)
    return predicate()


@pytest.fixture
async def stack(time_skipping_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[Stack]:
    alertmanager_binary()  # fail first, with the install hint, when it is missing
    queue = f"am-{uuid.uuid4()}"
    app = await build_app(time_skipping_env.client, POLICY, {"team-a": TOKEN}, task_queue=queue)
    runner = web.AppRunner(app)
    await runner.setup()
    process: subprocess.Popen[bytes] | None = None
    guardians = Worker(
        time_skipping_env.client, task_queue=queue, workflows=[ModelGuardianWorkflow], activities=[never_granted]
    )
    await guardians.__aenter__()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        webhook_url = f"http://127.0.0.1:{runner.addresses[0][1]}{ALERTS_PATH}"
        [port] = free_ports(1)
        process = start_alertmanager(tmp_path, webhook_url, port)
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(url, process, tmp_path / "alertmanager.log")
        yield Stack(app[RECEIVER], url, tmp_path / "alertmanager.log", queue)
    finally:
        if process is not None:
            stop(process)
        await runner.cleanup()
        await guardians.__aexit__(None, None, None)


async def _wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1.0) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"Alertmanager exited with {process.returncode}:\n{tail(log_path)}")
            try:
                if (await http.get(f"{url}/-/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"Alertmanager not ready after {timeout_s}s:\n{tail(log_path)}")


async def test_alertmanager_alert_starts_exactly_one_failover(
    stack: Stack, time_skipping_env: WorkflowEnvironment
) -> None:
    instance = f"llama-2-7b-{uuid.uuid4().hex[:8]}"
    receiver = stack.receiver
    async with httpx.AsyncClient(base_url=stack.alertmanager_url, timeout=5) as http:
        now = datetime.now(UTC)
        starts_at = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as posted: milliseconds
        posted = {
            "labels": {
                "alertname": "InstanceDown",
                "severity": "critical",
                "model": "llama-2-7b",
                "instance": instance,
            },
            "annotations": {"summary": f"{instance} does not answer /healthz"},
            "startsAt": starts_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "generatorURL": "http://prometheus.example:9090/graph",
        }
        posted_at = time.time()
        response = await http.post("/api/v2/alerts", json=[posted])
        assert response.status_code == 200, response.text

        # Alertmanager computes the fingerprint; the incident is the instance's, whatever the episode.
        [seen] = (await http.get("/api/v2/alerts", params={"filter": f'instance="{instance}"'})).json()
        workflow_id = failover_workflow_id("llama-2-7b", instance)

        started = await wait_for(lambda: bool(receiver.starts), timeout_s=10)
        assert started, f"no incident opened in 10 s; Alertmanager log:\n{tail(stack.log_path)}"
        [record] = receiver.starts
        assert record.workflow_id == workflow_id
        state = await guardian_state(time_skipping_env.client, stack.queue, "llama-2-7b")
        assert state is not None
        [incident] = state.queue
        assert incident.instance == instance and incident.reporter.startswith(f"alert {seen['fingerprint']}")

        # Alertmanager re-sends every repeat_interval; the same alert posted again joins it.
        await asyncio.sleep(REPEAT_INTERVAL_S * 2.5)
        assert (await http.post("/api/v2/alerts", json=[posted])).status_code == 200
        await asyncio.sleep(REPEAT_INTERVAL_S * 1.5)
        assert [s.workflow_id for s in receiver.starts] == [workflow_id]
        registry = receiver.metrics.registry
        notifications = registry.get_sample_value("drctl_alert_notifications_total", {"code": "200"}) or 0
        duplicates = registry.get_sample_value("drctl_alerts_total", {"action": "duplicate"}) or 0
        assert notifications >= 3, "Alertmanager should have re-sent the alert at least twice"
        assert duplicates == notifications - 1

        # The alert resolves: Alertmanager sends it resolved, and the running workflow is told.
        ended = {**posted, "endsAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")}
        assert (await http.post("/api/v2/alerts", json=[ended])).status_code == 200
        handle = time_skipping_env.client.get_workflow_handle(guardian_workflow_id("llama-2-7b", stack.queue))
        deadline = time.monotonic() + 10
        signals: list[str] = []
        while not signals and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            history = await handle.fetch_history()
            signals = [
                e.workflow_execution_signaled_event_attributes.signal_name
                for e in history.events
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
            ]
        assert signals == ["alert_resolved"]
    assert [s.workflow_id for s in receiver.starts] == [workflow_id]

    alert_to_start_ms = record.alert_to_start_s * 1000
    print(
        f"\nAlertmanager → receiver → workflow start: "
        f"POST /api/v2/alerts → webhook arrived {(record.received_at - posted_at) * 1000:.1f} ms; "
        f"webhook arrived → workflow started {(record.started_at - record.received_at) * 1000:.1f} ms; "
        f"end to end (POST → started) {(record.started_at - posted_at) * 1000:.1f} ms; "
        f"alert startsAt → started {alert_to_start_ms:.1f} ms "
        f"({notifications:.0f} deliveries, {duplicates:.0f} duplicates)"
    )
