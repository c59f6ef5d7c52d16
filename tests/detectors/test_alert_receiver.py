"""The alert receiver on a real loopback port against the time-skipping Temporal server.

Instance alerts are reported to the model's guardian (a real ``ModelGuardianWorkflow`` on a worker
whose budget never grants, so incidents stay queued: what the receiver is responsible for). Other
runbooks (zone failover, drain) are started and just wait in their queue, as no worker runs them.
Each test uses its own task queue and its own instance names, so the
workflow IDs of one test never meet another's on the shared server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.detectors.alert_receiver import (
    RECEIVER,
    AlertReceiver,
    AlertReceiverSettings,
    build_app,
    load_tokens,
)
from drctl.detectors.alerts import (
    GpuFailure,
    InstanceFailure,
    TokenError,
    TokenSet,
    ZoneFailure,
    bearer_token,
    classify,
    clip,
    episode_key,
    json_deeper_than,
    parse_tokens,
)
from drctl.payloads import (
    ActivityName,
    AlertResolved,
    FailoverRequest,
    FailureReport,
    GuardianState,
    InstanceAlertResolved,
    LeaseAnswer,
    LeaseRequest,
    Trigger,
    failover_workflow_id,
    guardian_workflow_id,
)
from drctl.policies.schema import DRPolicy
from drctl.temporal import incidents as temporal_incidents
from drctl.temporal.incidents import guardian_state, report_failure
from drctl.temporal.search_attributes import register_search_attributes
from drctl.workers.binaries import find_binary
from drctl.workflows.guardian import ModelGuardianWorkflow

TOKEN_A = "team-a-0123456789abcdef0123456789"
TOKEN_B = "team-b-fedcba9876543210fedcba9876"
TOKEN_PLATFORM = "platform-0123456789abcdef01234567"
TOKENS = {"team-a": TOKEN_A, "team-b": TOKEN_B, "platform": TOKEN_PLATFORM}
POLICY = DRPolicy.model_validate(
    {
        "models": [
            {"name": "llama-2-7b", "tenant": "team-a", "hotStandby": 1},
            {"name": "mistral-7b", "tenant": "team-b", "hotStandby": 1},
        ],
        "tenants": [{"name": "team-a"}, {"name": "team-b"}],
    }
)


# -- payload helpers -------------------------------------------------------------------------------


def unique_instance(model: str = "llama-2-7b") -> str:
    return f"{model}-{uuid.uuid4().hex[:8]}"


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=123456)


def alert(
    labels: dict[str, str] | None = None,
    *,
    fingerprint: str | None = None,
    starts_at: datetime | None = None,
    ends_at: str = "0001-01-01T00:00:00Z",
    status: str = "firing",
    summary: str = "llama instance stopped answering",
) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": "InstanceDown", "severity": "critical", **(labels or {})},
        "annotations": {"summary": summary},
        "startsAt": (starts_at or now()).isoformat().replace("+00:00", "Z"),
        "endsAt": ends_at,
        "generatorURL": "http://prometheus.example:9090/graph?g0.expr=up+%3D%3D+0",
        "fingerprint": fingerprint or uuid.uuid4().hex[:16],
    }


def instance_alert(model: str = "llama-2-7b", instance: str | None = None, **kwargs: Any) -> dict[str, Any]:
    return alert({"model": model, "instance": instance or unique_instance(model)}, **kwargs)


def notification(*alerts: dict[str, Any], receiver: str = "drctl") -> dict[str, Any]:
    firing = any(a["status"] == "firing" for a in alerts)
    common = {k: v for k, v in alerts[0]["labels"].items() if all(a["labels"].get(k) == v for a in alerts)}
    return {
        "version": "4",
        "groupKey": '{}:{alertname="InstanceDown"}',
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": receiver,
        "groupLabels": {"alertname": "InstanceDown"},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example:9093",
        "alerts": list(alerts),
    }


def expected_id(a: dict[str, Any]) -> str:
    starts_at = datetime.fromisoformat(a["startsAt"].replace("Z", "+00:00"))
    episode = episode_key(a["fingerprint"], starts_at)
    return f"{failover_workflow_id(a['labels']['model'], a['labels']['instance'])}-{episode}"


# -- the receiver on a loopback port ---------------------------------------------------------------


@dataclass
class Receiver:
    url: str
    app: web.Application
    http: httpx.AsyncClient
    client: Client
    queue: str

    @property
    def receiver(self) -> AlertReceiver:
        return self.app[RECEIVER]

    async def post(self, body: Any, token: str | None = TOKEN_A, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        headers |= kwargs.pop("headers", {})
        if not isinstance(body, dict):  # raw bytes, or an async iterator of them (chunked)
            return await self.http.post("/alerts", content=body, headers=headers, **kwargs)
        return await self.http.post("/alerts", json=body, headers=headers, **kwargs)

    async def status_of(self, workflow_id: str) -> WorkflowExecutionStatus | None:
        try:
            description = await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        return description.status

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = (await self.http.get("/metrics")).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@activity.defn(name=ActivityName.REQUEST_LEASE)
async def never_granted(request: LeaseRequest) -> LeaseAnswer:
    """The budget is out of the picture: incidents stay queued, which is all the receiver is about."""
    return LeaseAnswer(granted=False, detail="test: waiting for the budget forever")


@pytest.fixture
async def rx(time_skipping_env: WorkflowEnvironment) -> AsyncIterator[Receiver]:
    queue = f"alerts-{uuid.uuid4()}"
    app = await build_app(time_skipping_env.client, POLICY, TOKENS, task_queue=queue)
    runner, url = await serve(app)
    try:
        async with (
            Worker(
                time_skipping_env.client,
                task_queue=queue,
                workflows=[ModelGuardianWorkflow],
                activities=[never_granted],
            ),
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            yield Receiver(url, app, http, time_skipping_env.client, queue)
    finally:
        await runner.cleanup()


# -- starting --------------------------------------------------------------------------------------


async def incidents(rx: Receiver, model: str = "llama-2-7b") -> GuardianState:
    state = await guardian_state(rx.client, rx.queue, model)
    assert state is not None, f"no guardian for {model}"
    return state


async def test_firing_alert_reports_one_failure_to_the_guardian_with_the_alert_as_input(rx: Receiver) -> None:
    a = instance_alert()
    response = await rx.post(notification(a))

    assert response.status_code == 200, response.text
    [result] = response.json()["alerts"]
    assert result["action"] == "started"
    workflow_id = failover_workflow_id("llama-2-7b", a["labels"]["instance"])
    assert result["workflow_id"] == workflow_id

    description = await rx.client.get_workflow_handle(guardian_workflow_id("llama-2-7b", rx.queue)).describe()
    assert description.status == WorkflowExecutionStatus.RUNNING
    assert description.workflow_type == "ModelGuardianWorkflow"
    assert description.task_queue == rx.queue
    [incident] = (await incidents(rx)).queue
    assert incident.workflow_id == workflow_id and incident.state == "queued"
    assert incident.reporter == f"alert {a['fingerprint']} (team-a)"
    assert incident.request == FailoverRequest(
        model="llama-2-7b",
        instance=a["labels"]["instance"],
        trigger=Trigger.ALERT,
        failed_at=datetime.fromisoformat(a["startsAt"].replace("Z", "+00:00")),
        reason="InstanceDown: llama instance stopped answering",
    )
    [record] = rx.receiver.starts
    assert record.workflow_id == workflow_id
    assert record.received_at <= record.started_at


async def test_the_same_notification_100_times_at_once_opens_one_incident(rx: Receiver) -> None:
    a = instance_alert()
    body = notification(a)
    responses = await asyncio.gather(*(rx.post(body) for _ in range(100)))

    assert {r.status_code for r in responses} == {200}
    results = [r.json()["alerts"][0] for r in responses]
    actions = [r["action"] for r in results]
    assert actions.count("started") == 1
    assert actions.count("duplicate") == 99
    assert {r["workflow_id"] for r in results} == {failover_workflow_id("llama-2-7b", a["labels"]["instance"])}
    assert len(rx.receiver.starts) == 1
    [incident] = (await incidents(rx)).queue
    assert incident.joined_total == 99
    metrics = await rx.metrics()
    assert metrics[("drctl_alerts_total", (("action", "started"),))] == 1
    assert metrics[("drctl_alerts_total", (("action", "duplicate"),))] == 99
    assert metrics[("drctl_alert_notifications_total", (("code", "200"),))] == 100


async def test_one_notification_of_9000_alerts_for_one_instance_reports_it_once(rx: Receiver) -> None:
    """Seen: 9,000 alerts with distinct startsAt started 9,000 workflows. Past 1,000 it is a 413;
    up to that, one notification is one report per instance."""
    instance = unique_instance()
    many = [instance_alert(instance=instance, starts_at=now() + timedelta(seconds=i)) for i in range(1000)]
    response = await rx.post(notification(*many))
    assert response.status_code == 200, response.text[:300]
    actions = [r["action"] for r in response.json()["alerts"]]
    assert actions.count("started") == 1 and actions.count("duplicate") == 999
    [incident] = (await incidents(rx)).queue
    assert incident.instance == instance and incident.joined_total == 0  # the 999 never reached Temporal
    too_many = [instance_alert(instance=instance, starts_at=now() + timedelta(seconds=i)) for i in range(9000)]
    assert (await rx.post(notification(*too_many))).status_code == 413


async def test_ha_peer_delivery_and_a_new_episode_join_the_open_incident(rx: Receiver) -> None:
    instance = unique_instance()
    first = instance_alert(instance=instance, fingerprint="a1b2c3d4e5f60718")
    started = (await rx.post(notification(first))).json()["alerts"][0]
    assert started["action"] == "started"

    # The other Alertmanager of the HA pair delivers the very same notification.
    peer = (await rx.post(notification(first))).json()["alerts"][0]
    assert peer["action"] == "duplicate" and peer["workflow_id"] == started["workflow_id"]

    # Same alert, new firing episode while the first is still being recovered: the same failure.
    again = instance_alert(instance=instance, fingerprint="a1b2c3d4e5f60718", starts_at=now() + timedelta(minutes=5))
    second = (await rx.post(notification(again))).json()["alerts"][0]
    assert second["action"] == "duplicate" and second["workflow_id"] == started["workflow_id"]
    [incident] = (await incidents(rx)).queue
    assert incident.joined_total == 2
    assert [s.workflow_id for s in rx.receiver.starts] == [started["workflow_id"]]


async def test_a_failure_the_prober_reported_first_is_joined(rx: Receiver) -> None:
    instance = unique_instance()
    prober = FailoverRequest(model="llama-2-7b", instance=instance, trigger=Trigger.PROBE, confirmed=True)
    ticket = await report_failure(rx.client, rx.queue, FailureReport(request=prober, reporter="prober"))
    assert not ticket.joined
    a = instance_alert(instance=instance)
    [result] = (await rx.post(notification(a))).json()["alerts"]
    assert result["action"] == "duplicate"
    assert result["workflow_id"] == ticket.workflow_id == failover_workflow_id("llama-2-7b", instance)
    [incident] = (await incidents(rx)).queue
    assert incident.reporter == "prober" and incident.joined == [f"alert {a['fingerprint']} (team-a)"]
    assert not rx.receiver.starts


async def test_an_alert_for_an_instance_that_does_not_exist_is_422_and_reports_nothing(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    queue = f"alerts-{uuid.uuid4()}"
    known = {"llama-2-7b": {"llama-2-7b-0", "llama-2-7b-1"}, "mistral-7b": {"mistral-7b-0"}}

    async def known_instances(model: str) -> set[str]:
        return known.get(model, set())

    app = await build_app(time_skipping_env.client, POLICY, TOKENS, task_queue=queue, known_instances=known_instances)
    runner, url = await serve(app)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            headers = {"Authorization": f"Bearer {TOKEN_A}"}
            for instance in ("llama-2-7b-9", "mistral-7b-0"):  # missing, and another model's
                body = notification(instance_alert(instance=instance))
                response = await http.post("/alerts", json=body, headers=headers)
                assert response.status_code == 422, response.text
                assert f"llama-2-7b has no instance {instance!r}" in response.text
        assert await guardian_state(time_skipping_env.client, queue, "llama-2-7b") is None
    finally:
        await runner.cleanup()


async def test_zone_alert_needs_the_platform_token_and_starts_the_zone_failover(rx: Receiver) -> None:
    zone = alert({"zone": "az-1", "alertname": "ZoneDown"})
    refused = await rx.post(notification(zone))
    assert refused.status_code == 403 and "platform" in refused.text
    unknown = await rx.post(notification(alert({"zone": "az-9"})), token=TOKEN_PLATFORM)
    assert unknown.status_code == 422 and "az-9" in unknown.text
    assert not rx.receiver.starts

    response = await rx.post(notification(zone), token=TOKEN_PLATFORM)
    assert response.status_code == 200, response.text
    [result] = response.json()["alerts"]
    assert result["action"] == "started" and result["workflow_id"].startswith("zone-failover-az-1-")
    described = await rx.client.get_workflow_handle(result["workflow_id"]).describe()
    assert described.workflow_type == "ZoneFailoverWorkflow"


async def test_alert_without_a_runbook_is_accepted_with_202_and_starts_nothing(rx: Receiver) -> None:
    response = await rx.post(notification(alert({"job": "node", "alertname": "Watchdog"})))
    assert response.status_code == 202, response.text
    assert [r["action"] for r in response.json()["alerts"]] == ["ignored"]
    assert not rx.receiver.starts
    metrics = await rx.metrics()
    assert metrics[("drctl_alerts_total", (("action", "ignored"),))] == 1
    assert metrics[("drctl_alert_notifications_total", (("code", "202"),))] == 1


async def test_gpu_alert_needs_the_platform_token_and_starts_the_drain(rx: Receiver) -> None:
    gpu = alert({"node": "gpu-node-1", "gpu": "3", "zone": "az-2", "alertname": "GpuXidError"})
    refused = await rx.post(notification(gpu))
    assert refused.status_code == 403 and "platform" in refused.text
    assert not rx.receiver.starts

    unknown = await rx.post(notification(alert({"node": "gpu-node-9", "gpu": "0"})), token=TOKEN_PLATFORM)
    assert unknown.status_code == 422 and "gpu-node-9/0" in unknown.text

    response = await rx.post(notification(gpu), token=TOKEN_PLATFORM)
    assert response.status_code == 200, response.text
    [result] = response.json()["alerts"]
    assert result["action"] == "started" and result["workflow_id"].startswith("drain-gpu-gpu-node-1-3-")
    described = await rx.client.get_workflow_handle(result["workflow_id"]).describe()
    assert described.workflow_type == "DrainGpuWorkflow"
    again = await rx.post(notification(gpu), token=TOKEN_PLATFORM)
    assert [r["action"] for r in again.json()["alerts"]] == ["duplicate"]


async def test_mixed_notification_acts_on_instance_alerts_and_ignores_the_rest(rx: Receiver) -> None:
    a = instance_alert()
    response = await rx.post(notification(a, alert({"alertname": "Watchdog"}), alert({"job": "node"})))
    assert response.status_code == 200
    assert [r["action"] for r in response.json()["alerts"]] == ["started", "ignored", "ignored"]


# -- resolved --------------------------------------------------------------------------------------


async def test_resolved_alert_is_signalled_to_the_guardian(rx: Receiver) -> None:
    a = instance_alert()
    await rx.post(notification(a))
    ends_at = "2030-01-01T00:00:05Z"
    resolved = {**a, "status": "resolved", "endsAt": ends_at}

    response = await rx.post(notification(resolved))
    assert response.status_code == 200, response.text
    [result] = response.json()["alerts"]
    assert result["action"] == "resolved-signalled"
    guardian = guardian_workflow_id("llama-2-7b", rx.queue)
    assert result["workflow_id"] == guardian

    history = await rx.client.get_workflow_handle(guardian).fetch_history()
    signals = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED]
    [event] = signals
    attributes = event.workflow_execution_signaled_event_attributes
    assert attributes.signal_name == "alert_resolved"
    [payload] = await pydantic_data_converter.decode(attributes.input.payloads, [InstanceAlertResolved])
    assert payload == InstanceAlertResolved(
        instance=a["labels"]["instance"],
        resolved=AlertResolved(fingerprint=a["fingerprint"], ends_at=datetime(2030, 1, 1, 0, 0, 5, tzinfo=UTC)),
    )


async def test_resolved_alert_without_a_guardian_is_acknowledged(rx: Receiver) -> None:
    a = instance_alert(model="mistral-7b", status="resolved", ends_at="2030-01-01T00:00:00Z")
    response = await rx.post(notification(a), token=TOKEN_B)
    assert response.status_code == 200
    [result] = response.json()["alerts"]
    assert result["action"] == "ignored"
    assert "no guardian" in result["detail"]


# -- rejections: nothing started -------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-0123456789abcdef"}, {"Authorization": f"Basic {TOKEN_A}"}],
    ids=["missing", "wrong", "other-scheme"],
)
async def test_without_a_valid_token_401(rx: Receiver, headers: dict[str, str]) -> None:
    a = instance_alert()
    response = await rx.post(notification(a), token=None, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["status"] == 401
    assert await rx.status_of(expected_id(a)) is None


async def test_another_tenants_model_is_403_and_nothing_of_the_notification_starts(rx: Receiver) -> None:
    mine = instance_alert("llama-2-7b")
    theirs = instance_alert("mistral-7b")
    response = await rx.post(notification(mine, theirs), token=TOKEN_A)

    assert response.status_code == 403
    assert "mistral-7b" in response.json()["error"]
    assert await rx.status_of(expected_id(mine)) is None
    assert await rx.status_of(expected_id(theirs)) is None
    # The owner's token is fine.
    assert (await rx.post(notification(theirs), token=TOKEN_B)).status_code == 200


async def test_malformed_json_is_400(rx: Receiver) -> None:
    response = await rx.post(b'{"version": "4", "alerts": [', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


async def test_a_number_longer_than_python_reads_is_400_not_500(rx: Receiver) -> None:
    """More than 4,300 digits: ``json.loads`` raises ``ValueError`` (not ``JSONDecodeError``)."""
    body = b'{"version": "4", "truncatedAlerts": ' + b"9" * 5000 + b', "alerts": []}'
    response = await rx.post(body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "4300 digits" in response.json()["error"] and "set_int_max_str_digits" not in response.json()["error"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda n: n.pop("alerts"), "alerts: Field required"),
        (lambda n: n.update(version="3"), "version"),
        (lambda n: n.update(alerts=[]), "alerts"),
        (lambda n: n["alerts"][0].pop("startsAt"), "alerts[0].startsAt: Field required"),
        (lambda n: n["alerts"][0].update(startsAt="yesterday"), "alerts[0].startsAt"),
        (lambda n: n["alerts"][0].update(fingerprint="not hex!"), "alerts[0].fingerprint"),
        (lambda n: n["alerts"][0].update(labels=["model"]), "alerts[0].labels"),
        (lambda n: n.update(status="exploded"), "status"),
    ],
    ids=["no-alerts", "version", "empty-alerts", "no-startsAt", "bad-startsAt", "fingerprint", "labels", "status"],
)
async def test_wrong_shape_is_422(rx: Receiver, mutate: Any, expected: str) -> None:
    body = notification(instance_alert())
    mutate(body)
    response = await rx.post(body)
    assert response.status_code == 422, response.text
    assert expected in response.json()["error"]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"model": "llama-2-7b", "instance": "llama 2 7b; rm -rf"}, "alerts[1].labels.instance"),
        ({"model": "llama-2-7b", "instance": "x" * 129}, "alerts[1].labels.instance"),
        ({"model": "llama-2-7b", "instance": "10.0.0.5:9100"}, "is not a drctl instance id"),
        ({"model": "llama-2-7b", "instance": "llama-2-7b-0", "severity": "very bad"}, "alerts[1].labels.severity"),
        ({"model": "gpt-9", "instance": "gpt-9-0"}, "unknown model 'gpt-9'"),
        ({"zone": "az 1"}, "alerts[1].labels.zone"),
    ],
    ids=["unsafe-instance", "long-instance", "not-an-instance-id", "unsafe-severity", "unknown-model", "unsafe-zone"],
)
async def test_bad_labels_or_unknown_model_is_422_and_nothing_starts(
    rx: Receiver, labels: dict[str, str], expected: str
) -> None:
    good = instance_alert()
    response = await rx.post(notification(good, alert(labels)))
    assert response.status_code == 422, response.text
    assert expected in response.json()["error"]
    assert await rx.status_of(expected_id(good)) is None
    assert not rx.receiver.starts


async def test_oversized_body_is_413(rx: Receiver) -> None:
    a = instance_alert(summary="x" * (2 << 20))
    body = json.dumps(notification(a)).encode()
    response = await rx.post(body)
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
        for i in range(0, len(body), 64 << 10):
            yield body[i : i + (64 << 10)]

    response = await rx.post(chunks())
    assert response.status_code == 413
    assert await rx.status_of(expected_id(a)) is None


async def test_rejections_are_logged_with_remote_and_reason(rx: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="drctl.alert_receiver")
    await rx.post(notification(instance_alert()), token="nope-nope-nope-nope-nope")
    [record] = [r for r in caplog.records if getattr(r, "drctl", {}).get("event") == "alert_notification_rejected"]
    fields = record.drctl  # type: ignore[attr-defined]
    assert fields["remote"] == "127.0.0.1"
    assert fields["status"] == 401
    assert fields["reason"] == "invalid bearer token"
    assert TOKEN_A not in caplog.text


# -- hostile input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000 + b"]" * 200_000,  # what was seen: a 500 (RecursionError)
        b"[" * 200_000,  # never closed
        b'{"version": "4", "alerts": ' + b"[" * 65 + b"]" * 65 + b"}",
        b'{"version": "4", "alerts": [' + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"]}",
    ],
    ids=["200k-arrays", "200k-unclosed", "65-deep", "70-deep-objects"],
)
async def test_deeply_nested_json_is_400_not_500(rx: Receiver, body: bytes) -> None:
    response = await rx.post(body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "body is nested more than 64 levels deep"


async def test_nesting_inside_strings_does_not_count(rx: Receiver) -> None:
    a = alert({"job": "x"}, summary="[" * 2000 + "{" * 2000)
    response = await rx.post(notification(a))
    assert response.status_code == 202, response.text
    assert response.json()["alerts"][0]["action"] == "ignored"


async def test_more_than_1000_alerts_is_413_before_they_are_validated(rx: Receiver) -> None:
    body = notification(instance_alert())
    body["alerts"] = [{}] * 1001  # not even alerts: counted before anything is validated
    response = await rx.post(body)
    assert response.status_code == 413, response.text
    assert (
        response.json()["error"]
        == "1001 alerts in one notification; at most 1000 (set max_alerts: 1000 in the webhook config)"
    )
    # 1,000 are read and checked (here all for a model the policy lacks, so nothing starts).
    body["alerts"] = [instance_alert("gpt-9", f"gpt-9-{i}") for i in range(1000)]
    response = await rx.post(body)
    assert response.status_code == 422 and "unknown model 'gpt-9'" in response.json()["error"]
    assert not rx.receiver.starts


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda a: a["labels"].update(team="t" * 4097), "alerts[0].labels.team"),
        (lambda a: a["annotations"].update(description="d" * 4097), "alerts[0].annotations.description"),
        (lambda a: a.update(generatorURL="http://x/" + "g" * 5000), "alerts[0].generatorURL"),
    ],
    ids=["label", "annotation", "generator-url"],
)
async def test_a_value_over_4_kib_is_422_naming_it(rx: Receiver, mutate: Any, where: str) -> None:
    a = instance_alert()
    mutate(a)
    response = await rx.post(notification(a))
    assert response.status_code == 422, response.text
    assert f"{where}: String should have at most 4096 characters" in response.json()["error"]
    assert await rx.status_of(expected_id(a)) is None
    # 4 KiB itself is fine.
    ok = alert({"job": "x", "team": "t" * 4096}, summary="s" * 4096)
    assert (await rx.post(notification(ok))).status_code == 202


async def test_no_log_line_carries_a_long_client_value(rx: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """What was seen: a 1 MB label value logged as a 1 MB line. Rejected or accepted, what a client
    sent reaches the log (and the error message) clipped."""
    caplog.set_level("INFO", logger="drctl.alert_receiver")
    huge_name = "n" * 500_000
    rejected = notification(alert({"job": "x"}))
    rejected["alerts"][0]["labels"][huge_name] = "v"
    rejected["alerts"][0]["annotations"]["summary"] = "s" * 400_000
    response = await rx.post(rejected)
    assert response.status_code == 422 and len(response.text) < 2000, response.text[:300]
    assert "alerts[0].labels.nnnn" in response.json()["error"]
    # Accepted (no runbook): the ignored alert is logged with its labels, each value clipped.
    ignored = notification(alert({"job": "x", "team": "t" * 4096}, summary="s" * 4096))
    assert (await rx.post(ignored)).status_code == 202
    lines = [r.getMessage() for r in caplog.records]
    assert any('"event": "alert_ignored"' in line for line in lines)
    assert any('"event": "alert_notification_rejected"' in line for line in lines)
    assert max(len(line) for line in lines) < 3000
    assert not any("t" * 300 in line or "n" * 300 in line or "s" * 300 in line for line in lines)


# -- health and metrics ----------------------------------------------------------------------------


async def test_metrics_count_notifications_actions_and_latency(rx: Receiver) -> None:
    a = instance_alert(starts_at=datetime.now(UTC) - timedelta(seconds=2))
    await rx.post(notification(a))
    await rx.post(notification(a))
    await rx.post(notification(a), token=None)
    await rx.post(notification(instance_alert("gpt-9")))

    response = await rx.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    metrics = await rx.metrics()
    assert metrics[("drctl_alert_notifications_total", (("code", "200"),))] == 2
    assert metrics[("drctl_alert_notifications_total", (("code", "401"),))] == 1
    assert metrics[("drctl_alert_notifications_total", (("code", "422"),))] == 1
    assert metrics[("drctl_alerts_total", (("action", "started"),))] == 1
    assert metrics[("drctl_alerts_total", (("action", "duplicate"),))] == 1
    assert metrics[("drctl_alerts_total", (("action", "rejected"),))] == 1
    assert metrics[("drctl_alerts_total", (("action", "resolved-signalled"),))] == 0
    assert metrics[("drctl_alert_to_workflow_start_seconds_count", ())] == 1
    latency = metrics[("drctl_alert_to_workflow_start_seconds_sum", ())]
    assert 2.0 <= latency < 30.0


async def test_healthz_is_200_when_temporal_answers(rx: Receiver) -> None:
    response = await rx.http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["temporal"] == "reachable"


async def test_healthz_is_503_when_temporal_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = await Client.connect(f"127.0.0.1:{port}", lazy=True)
    runner, url = await serve(await build_app(client, POLICY, TOKENS))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            response = await http.get("/healthz")
    finally:
        await runner.cleanup()
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"


async def _one_alert_posted(app: web.Application) -> httpx.Response:
    """The answer to one instance alert posted to ``app``, served for it alone."""
    runner, url = await serve(app)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await http.post(
                "/alerts", json=notification(instance_alert()), headers={"Authorization": f"Bearer {TOKEN_A}"}
            )
    finally:
        await runner.cleanup()


async def test_temporal_failure_answers_503_so_alertmanager_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = await Client.connect(f"127.0.0.1:{port}", lazy=True, data_converter=pydantic_data_converter)
    response = await _one_alert_posted(await build_app(client, POLICY, TOKENS))
    assert response.status_code == 503
    body = response.json()
    assert body["error"].startswith("Temporal failed; retry")
    [result] = body["alerts"]
    assert result["action"] == "error"
    assert "connect" in result["detail"]


async def test_a_guardian_no_worker_answers_in_time_is_503_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Temporal up, drctl's worker down (killed, restarting): the report's Update times out. That is
    Temporal's failure, answered 503 for Alertmanager to deliver again, not logged as a bug."""
    monkeypatch.setattr(temporal_incidents, "RPC_TIMEOUT", timedelta(seconds=1))
    # The dev server drctl runs (the time-skipping test server, skipping time, failed the Update
    # otherwise than by the client's time-out, now and then).
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"), data_converter=pydantic_data_converter
    ) as env:
        await register_search_attributes(env.client, "default")
        response = await _one_alert_posted(
            await build_app(env.client, POLICY, TOKENS, task_queue=f"no-worker-{uuid.uuid4()}")
        )
    assert response.status_code == 503
    [result] = response.json()["alerts"]
    assert result["action"] == "error" and "Timeout" in result["detail"]
    assert "unexpected error" not in caplog.text and "Traceback" not in caplog.text


# -- pure parts ------------------------------------------------------------------------------------


def test_classify_labels() -> None:
    assert classify({"model": "m", "instance": "m-0", "zone": "az-1", "node": "n", "gpu": "0"}) == InstanceFailure(
        "m", "m-0"
    )
    assert classify({"node": "gpu-node-1", "gpu": "3", "zone": "az-1"}) == GpuFailure("gpu-node-1", "3")
    assert classify({"zone": "az-1"}) == ZoneFailure("az-1")
    assert classify({"zone": "az-1", "instance": "10.0.0.1:9100"}) is None
    assert classify({"model": "m"}) is None
    assert classify({"alertname": "Watchdog"}) is None


def test_episode_key_is_stable_across_time_zones_and_changes_with_the_episode() -> None:
    t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    same = t.astimezone(timezone(timedelta(hours=2)))
    assert episode_key("abc123", t) == episode_key("abc123", same) == episode_key("ABC123", t)
    assert len(episode_key("abc123", t)) == 12
    assert episode_key("abc123", t) != episode_key("abc123", t + timedelta(seconds=1))
    assert episode_key("abc123", t) != episode_key("abc124", t)


def test_bearer_token_header() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_token_set_finds_the_tenant() -> None:
    tokens = TokenSet(TOKENS)
    assert tokens.tenant_for(TOKEN_A) == "team-a"
    assert tokens.tenant_for(TOKEN_B) == "team-b"
    assert tokens.tenant_for(TOKEN_A + "x") is None
    assert tokens.tenant_for("") is None
    assert tokens.tenant_for(TOKEN_PLATFORM) == "platform"
    assert tokens.tenants == {"team-a", "team-b", "platform"}


def test_parse_tokens_lines_and_json() -> None:
    text = f"# tenants\nteam-a: {TOKEN_A}\n\n  team-b :  {TOKEN_B}  \nplatform: {TOKEN_PLATFORM}\n"
    assert parse_tokens(text, "f") == TOKENS
    assert parse_tokens(json.dumps(TOKENS), "env") == TOKENS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("team-a " + TOKEN_A, "f line 1: expected 'tenant: token'"),
        ("team-a: short", "must be 16 to 512 characters"),
        (f"team-a: {TOKEN_A}\nteam-a: {TOKEN_B}", "line 2: tenant 'team-a' is listed twice"),
        (f"team-a: {TOKEN_A}\nteam-b: {TOKEN_A}", "same token as another tenant"),
        (f"Team_A: {TOKEN_A}", "is not a tenant name"),
        ('{"team-a": ', "not valid JSON"),
        ('{"team-a": 5}', "must be a string"),
        ("# nothing\n", "no tokens"),
    ],
)
def test_parse_tokens_errors_name_the_problem(text: str, expected: str) -> None:
    with pytest.raises(TokenError) as info:
        parse_tokens(text, "f")
    assert expected in str(info.value)
    assert TOKEN_A not in str(info.value)


def test_load_tokens_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRCTL_ALERT_TOKENS_FILE", raising=False)
    monkeypatch.setenv("DRCTL_ALERT_TOKENS", json.dumps(TOKENS))
    assert load_tokens(AlertReceiverSettings()).tenant_for(TOKEN_B) == "team-b"

    monkeypatch.delenv("DRCTL_ALERT_TOKENS")
    path = tmp_path / "tokens"
    path.write_text(f"team-a: {TOKEN_A}\n")
    path.chmod(0o600)
    monkeypatch.setenv("DRCTL_ALERT_TOKENS_FILE", str(path))
    assert load_tokens(AlertReceiverSettings()).tenants == {"team-a"}

    with pytest.raises(TokenError, match="not both"):
        load_tokens(AlertReceiverSettings(alert_tokens=SecretStr(json.dumps(TOKENS))))
    monkeypatch.delenv("DRCTL_ALERT_TOKENS_FILE")
    with pytest.raises(TokenError, match="no alert tokens"):
        load_tokens(AlertReceiverSettings())
    with pytest.raises(TokenError, match="cannot read it"):
        load_tokens(AlertReceiverSettings(alert_tokens_file=tmp_path / "missing"))


async def test_build_app_refuses_tokens_for_tenants_the_policy_lacks(time_skipping_env: WorkflowEnvironment) -> None:
    with pytest.raises(TokenError, match="team-c"):
        await build_app(time_skipping_env.client, POLICY, {**TOKENS, "team-c": "team-c-0123456789abcdef"})


def test_json_deeper_than() -> None:
    assert not json_deeper_than(b"[" * 64 + b"]" * 64, 64)
    assert json_deeper_than(b"[" * 65 + b"]" * 65, 64)
    assert json_deeper_than(b"[{" * 40 + b"}]" * 40, 64)
    assert not json_deeper_than(b'["' + b"[" * 100 + b'"]', 64)  # inside a string
    assert not json_deeper_than(b'["\\"' + b"[" * 100 + b'"]', 64)  # an escaped quote stays inside
    assert not json_deeper_than(json.dumps([[{"a": [1, {}]}]] * 5000).encode(), 64)  # wide, not deep
    assert json_deeper_than(b"[" * 200_000 + b"]" * 200_000, 64)
    assert json_deeper_than(b"[" * 65, 64) and not json_deeper_than(b"[" * 64, 64)  # never closed
    assert json_deeper_than(b"[[]" * 100, 64) and not json_deeper_than(b"[[]" * 30, 64)  # closed in part


def test_clip() -> None:
    assert clip("x" * 10, 5) == "xxxx…" and clip("abc", 5) == "abc" and clip(7) == 7
    assert clip({"k" * 10: ["v" * 10, 1]}, 5) == {"kkkk…": ["vvvv…", 1]}
    assert clip(list(range(7)), 5) == [0, 1, 2, 3, 4, "… 2 more"]
    assert len(clip({str(i): i for i in range(10)}, 5)) == 6  # type: ignore[arg-type]
