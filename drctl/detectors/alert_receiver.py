"""The alert receiver: Prometheus Alertmanager webhooks in, failover runbooks out.

    python -m drctl.detectors.alert_receiver [--host 127.0.0.1] [--port 9095]

Settings come from ``DRCTL_*`` variables (Temporal address, namespace, task queue, policy file), plus
the tenants' bearer tokens: ``DRCTL_ALERT_TOKENS='{"tenant": "token", ...}'`` or
``DRCTL_ALERT_TOKENS_FILE=path`` (``tenant: token`` lines, or the same JSON).

Alertmanager's receiver config::

    receivers:
      - name: drctl
        webhook_configs:
          - url: http://127.0.0.1:9095/alerts
            send_resolved: true
            http_config: {authorization: {type: Bearer, credentials: <the tenant's token>}}

HTTP API:

- ``POST /alerts``: one Alertmanager notification (payload version 4). Checked in this order, and
  nothing at all is started or signalled when any check fails: bearer token (401, with
  ``WWW-Authenticate: Bearer``), body size (413 over 1 MiB), JSON (400), payload shape (422), then
  every alert's routing labels and models (422 for an unsafe label value, an instance label that is
  not an instance id, or a model the policy lacks; 403 for another tenant's model). Then per alert:
  a firing instance alert is reported to the model's guardian (one report per instance per
  notification), which opens the incident or joins the one already open — whoever reported it
  first, the prober, the CLI or another alert — so one failure is one ``FailoverWorkflow``; a firing
  GPU or zone alert starts ``DrainGpuWorkflow`` or ``ZoneFailoverWorkflow`` once per episode
  (fingerprint + startsAt; later deliveries are duplicates). A resolved instance alert is passed to
  the guardian (which tells the running runbook); a resolved GPU alert is signalled
  ``alert_resolved`` to its episode's drain if that still runs.
  Answers 200 with what was done for each alert; 202 when no alert names a runbook; 503 when
  Temporal fails, so Alertmanager retries (safe: reports join, and workflow IDs make starts
  idempotent). Errors are ``{"error": message, "status": code}``.
- ``GET /healthz``: 200 when Temporal answers, else 503.
- ``GET /metrics``: Prometheus metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import SecretStr
from temporalio.api.common.v1 import WorkflowType
from temporalio.api.enums.v1 import WorkflowIdConflictPolicy, WorkflowIdReusePolicy
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import StartWorkflowExecutionRequest
from temporalio.client import Client, RPCTimeoutOrCancelledError, WorkflowExecutionStatus
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.converter import encode_search_attributes
from temporalio.service import RPCError, RPCStatusCode

from drctl.detectors.alerts import (
    MAX_BODY_BYTES,
    NO_RUNBOOK_YET,
    PLATFORM_TENANT,
    RESOLVED_SIGNAL,
    AlertPlan,
    InstanceFailure,
    PlanKind,
    Rejection,
    RunbookStart,
    TokenError,
    TokenSet,
    bearer_token,
    clip,
    parse_notification,
    parse_tokens,
    plan_notification,
)
from drctl.payloads import (
    AlertResolved,
    FailoverRequest,
    FailureReport,
    InstanceAlertResolved,
    guardian_workflow_id,
)
from drctl.policies.loader import PolicyError, load_policy_file
from drctl.policies.schema import DRPolicy
from drctl.service import add_log_format_option, configure_logging
from drctl.settings import DrctlSettings
from drctl.telemetry.tracing import server_span, setup_tracing, span
from drctl.temporal.client import connect
from drctl.temporal.incidents import report_failure

log = logging.getLogger("drctl.alert_receiver")

ALERTS_PATH = "/alerts"
DEFAULT_PORT = 9095
RPC_TIMEOUT = timedelta(seconds=10)
HEALTH_TIMEOUT = timedelta(seconds=2)
MAX_CONCURRENT_RPCS = 64
RECENT_STARTS = 1000
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
BEARER_CHALLENGE = 'Bearer realm="drctl-alerts"'


class AlertAction(StrEnum):
    """What the receiver did about one alert (the ``action`` label of ``drctl_alerts_total``)."""

    STARTED = "started"
    DUPLICATE = "duplicate"
    RESOLVED_SIGNALLED = "resolved-signalled"
    IGNORED = "ignored"
    REJECTED = "rejected"
    ERROR = "error"
    """Temporal failed; the notification was answered 503 and Alertmanager retries it."""


# -- settings and tokens ---------------------------------------------------------------------------


class AlertReceiverSettings(DrctlSettings):
    """DrctlSettings plus the receiver's own (``DRCTL_ALERT_TOKENS``, ``DRCTL_ALERT_TOKENS_FILE``, …)."""

    alert_tokens: SecretStr | None = None
    """JSON object tenant → bearer token."""
    alert_tokens_file: Path | None = None
    """File with ``tenant: token`` lines (``#`` comments) or the JSON object."""
    alert_receiver_host: str = "127.0.0.1"
    alert_receiver_port: int = DEFAULT_PORT


def load_tokens(settings: AlertReceiverSettings) -> TokenSet:
    """The tenants' tokens from exactly one of DRCTL_ALERT_TOKENS or DRCTL_ALERT_TOKENS_FILE."""
    if settings.alert_tokens is not None and settings.alert_tokens_file is not None:
        raise TokenError("set one of DRCTL_ALERT_TOKENS and DRCTL_ALERT_TOKENS_FILE, not both")
    if settings.alert_tokens is not None:
        return TokenSet(parse_tokens(settings.alert_tokens.get_secret_value(), "DRCTL_ALERT_TOKENS"))
    if settings.alert_tokens_file is not None:
        path = settings.alert_tokens_file
        source = f"DRCTL_ALERT_TOKENS_FILE {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"{source}: cannot read it ({exc})") from None
        if path.stat().st_mode & 0o004:
            log.warning("%s is readable by every user; chmod 600 it", path)
        return TokenSet(parse_tokens(text, source))
    raise TokenError(
        'no alert tokens: set DRCTL_ALERT_TOKENS to a JSON object {"tenant": "token"} '
        "or DRCTL_ALERT_TOKENS_FILE to a file of 'tenant: token' lines"
    )


# -- starting and signalling -----------------------------------------------------------------------


@dataclass(frozen=True)
class StartOutcome:
    started: bool
    run_id: str | None
    closed: bool = False
    """The ID's run already ended; REJECT_DUPLICATE refused a second one."""


async def start_runbook(client: Client, start: RunbookStart, task_queue: str) -> StartOutcome:
    """Start a runbook workflow once per ID: a running one is joined, a closed one is not repeated.

    Goes through the workflow service directly for its ``started`` flag, which says whether this
    call started the run or found it running (the high-level ``start_workflow`` does not say).
    """
    request = StartWorkflowExecutionRequest(
        namespace=client.namespace,
        workflow_id=start.workflow_id,
        workflow_type=WorkflowType(name=start.workflow_type),
        task_queue=TaskQueue(name=task_queue),
        identity=client.identity,
        request_id=str(uuid.uuid4()),
        workflow_id_reuse_policy=WorkflowIdReusePolicy.WORKFLOW_ID_REUSE_POLICY_REJECT_DUPLICATE,
        workflow_id_conflict_policy=WorkflowIdConflictPolicy.WORKFLOW_ID_CONFLICT_POLICY_USE_EXISTING,
    )
    request.input.payloads.extend(await client.data_converter.encode([start.input]))
    encode_search_attributes(
        TypedSearchAttributes(
            [SearchAttributePair(SearchAttributeKey.for_keyword(k), v) for k, v in start.search_attributes.items()]
        ),
        request.search_attributes,
    )
    for key, value in start.memo.items():
        request.memo.fields[key].CopyFrom((await client.data_converter.encode([value]))[0])
    try:
        response = await client.workflow_service.start_workflow_execution(request, retry=True, timeout=RPC_TIMEOUT)
    except RPCError as err:
        if err.status == RPCStatusCode.ALREADY_EXISTS:
            return StartOutcome(started=False, run_id=None, closed=True)
        raise
    return StartOutcome(started=response.started, run_id=response.run_id)


async def is_running(client: Client, workflow_id: str) -> bool:
    try:
        description = await client.get_workflow_handle(workflow_id).describe(rpc_timeout=RPC_TIMEOUT)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return description.status == WorkflowExecutionStatus.RUNNING


async def signal_resolved(client: Client, workflow_id: str, resolved: AlertResolved | InstanceAlertResolved) -> bool:
    """Signal ``alert_resolved``; False when no workflow with that ID is running."""
    try:
        await client.get_workflow_handle(workflow_id).signal(RESOLVED_SIGNAL, resolved, rpc_timeout=RPC_TIMEOUT)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:  # never started, or already closed
            return False
        raise
    return True


# -- the service -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertResult:
    fingerprint: str
    status: str
    action: AlertAction
    workflow_id: str | None = None
    run_id: str | None = None
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "status": self.status,
            "action": self.action.value,
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class StartRecord:
    """One workflow this receiver started, with the times it saw (wall clock, seconds since epoch)."""

    workflow_id: str
    run_id: str | None
    starts_at: datetime
    """The alert's startsAt: when Alertmanager (or Prometheus) says the failure began."""
    received_at: float
    """When the notification that started it arrived."""
    started_at: float
    """When Temporal confirmed the start."""

    @property
    def alert_to_start_s(self) -> float:
        return self.started_at - self.starts_at.timestamp()


class ReceiverMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.notifications = Counter(
            "drctl_alert_notifications",
            "Alertmanager notifications received, by the HTTP status code answered",
            ["code"],
            registry=registry,
        )
        self.alerts = Counter(
            "drctl_alerts", "Alerts received, by what the receiver did about them", ["action"], registry=registry
        )
        for action in AlertAction:
            self.alerts.labels(action=action.value)
        self.alert_to_start = Histogram(
            "drctl_alert_to_workflow_start_seconds",
            "From the alert's startsAt to its runbook workflow started (receiver's clock)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class AlertReceiver:
    def __init__(
        self,
        client: Client,
        policy: DRPolicy,
        tokens: TokenSet,
        task_queue: str,
        registry: CollectorRegistry,
        known_instances: KnownInstances | None = None,
    ) -> None:
        self.known_instances = known_instances
        """Instance ids of a model, from the platform (None: not checked)."""
        self.client = client
        self.policy = policy
        self.tokens = tokens
        self.task_queue = task_queue
        self.metrics = ReceiverMetrics(registry)
        self.starts: deque[StartRecord] = deque(maxlen=RECENT_STARTS)
        """The workflows started lately, newest last (for tests and benchmarks)."""
        self._rpc_slots = asyncio.Semaphore(MAX_CONCURRENT_RPCS)

    # -- POST /alerts

    async def handle_alerts(self, request: web.Request) -> web.Response:
        received_at = time.time()
        # The trace of an alert-triggered recovery starts here: the guardian's update, the runbook
        # and its activities are this span's descendants.
        with server_span(f"POST {ALERTS_PATH}", request.headers, trigger="alert") as current:
            try:
                response = await self._alerts(request, received_at)
            except Rejection as rejection:
                response = self._reject(request, rejection)
            current.set_attribute("http.response.status_code", response.status)
        self.metrics.notifications.labels(code=str(response.status)).inc()
        return response

    async def _alerts(self, request: web.Request, received_at: float) -> web.Response:
        token = bearer_token(request.headers.get(hdrs.AUTHORIZATION))
        if token is None:
            raise Rejection(HTTPStatus.UNAUTHORIZED, "missing bearer token (Authorization: Bearer <token>)")
        tenant = self.tokens.tenant_for(token)
        if tenant is None:
            raise Rejection(HTTPStatus.UNAUTHORIZED, "invalid bearer token")
        too_large = Rejection(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise too_large
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        notification = parse_notification(body)
        if notification.truncated_alerts:
            _event(
                logging.WARNING,
                "alert_notification_truncated",
                remote=request.remote,
                tenant=tenant,
                truncated=notification.truncated_alerts,
                hint="set max_alerts: 0 in the webhook config, or alerts are never seen",
            )
        try:
            plans = plan_notification(notification, self.policy, tenant)
        except Rejection:
            self.metrics.alerts.labels(action=AlertAction.REJECTED.value).inc(len(notification.alerts))
            raise
        await self._check_instances_exist(plans)
        first_report: dict[tuple[str, str], int] = {}
        for plan in plans:
            if plan.kind == PlanKind.START and isinstance(plan.target, InstanceFailure):
                first_report.setdefault((plan.target.model, plan.target.instance), plan.index)

        async def act(plan: AlertPlan) -> AlertResult:
            target = plan.target
            if isinstance(target, InstanceFailure) and plan.kind == PlanKind.START:
                first = first_report[(target.model, target.instance)]
                if first != plan.index:  # one report per instance per notification, however many alerts
                    return AlertResult(
                        plan.alert.fingerprint,
                        plan.alert.status.value,
                        AlertAction.DUPLICATE,
                        workflow_id=guardian_workflow_id(target.model, self.task_queue),
                        detail=f"same instance as alerts[{first}] of this notification; reported once",
                    )
            model = getattr(target, "model", None)
            instance = getattr(target, "instance", None)
            with span("alert.act", model=model, instance=instance, trigger="alert") as current:
                current.set_attribute("drctl.alert.fingerprint", plan.alert.fingerprint)
                current.set_attribute("drctl.alert.plan", plan.kind.value)
                return await self._act(plan, received_at)

        outcomes = await asyncio.gather(*(act(plan) for plan in plans), return_exceptions=True)
        results: list[AlertResult] = []
        failures: list[str] = []
        for plan, outcome in zip(plans, outcomes, strict=True):
            if isinstance(outcome, AlertResult):
                results.append(outcome)
            elif isinstance(outcome, Exception):
                # Temporal down, or up without a worker to answer the guardian's Update in time:
                # said in the alert_temporal_error event below, and Alertmanager delivers again.
                if not isinstance(outcome, RPCError | RPCTimeoutOrCancelledError | RuntimeError | TimeoutError):
                    log.error("alerts[%d]: unexpected error", plan.index, exc_info=outcome)
                detail = f"{type(outcome).__name__}: {outcome}"
                failures.append(f"alerts[{plan.index}] ({plan.workflow_id}): {detail}")
                results.append(
                    AlertResult(
                        plan.alert.fingerprint,
                        plan.alert.status.value,
                        AlertAction.ERROR,
                        workflow_id=plan.workflow_id,
                        detail=detail,
                    )
                )
            else:
                raise outcome
        for result in results:
            self.metrics.alerts.labels(action=result.action.value).inc()
        body_json: dict[str, Any] = {"tenant": tenant, "alerts": [r.as_json() for r in results]}
        if failures:
            _event(logging.ERROR, "alert_temporal_error", remote=request.remote, tenant=tenant, failures=failures)
            message = "Temporal failed; retry (deliveries are idempotent): " + "; ".join(failures[:5])
            body_json |= {"error": message, "status": HTTPStatus.SERVICE_UNAVAILABLE.value}
            return web.json_response(body_json, status=HTTPStatus.SERVICE_UNAVAILABLE)
        if all(p.kind == PlanKind.IGNORE for p in plans):
            reasons = sorted({p.detail for p in plans}, key=lambda d: (d != NO_RUNBOOK_YET, d))
            body_json |= {"status": "accepted", "message": f"{'; '.join(reasons)}: nothing started"}
            return web.json_response(body_json, status=HTTPStatus.ACCEPTED)
        body_json["status"] = "ok"
        return web.json_response(body_json, status=HTTPStatus.OK)

    async def _act(self, plan: AlertPlan, received_at: float) -> AlertResult:
        alert = plan.alert
        fields = {"fingerprint": alert.fingerprint, "status": alert.status.value}
        if plan.kind == PlanKind.IGNORE:
            target = plan.target.kind.value if plan.target is not None else None
            _event(logging.INFO, "alert_ignored", **fields, target=target, labels=alert.labels, reason=plan.detail)
            return AlertResult(**fields, action=AlertAction.IGNORED, detail=plan.detail)
        assert plan.workflow_id is not None
        async with self._rpc_slots:
            if plan.kind == PlanKind.SIGNAL_RESOLVED and isinstance(plan.target, InstanceFailure):
                assert plan.resolved is not None
                guardian = guardian_workflow_id(plan.target.model, self.task_queue)
                resolved = InstanceAlertResolved(instance=plan.target.instance, resolved=plan.resolved)
                if await signal_resolved(self.client, guardian, resolved):
                    _event(logging.INFO, "alert_resolved_signalled", **fields, workflow_id=guardian)
                    return AlertResult(**fields, action=AlertAction.RESOLVED_SIGNALLED, workflow_id=guardian)
                return AlertResult(
                    **fields, action=AlertAction.IGNORED, workflow_id=guardian, detail="no guardian for this model"
                )
            if plan.kind == PlanKind.SIGNAL_RESOLVED:
                assert plan.resolved is not None
                if await signal_resolved(self.client, plan.workflow_id, plan.resolved):
                    _event(logging.INFO, "alert_resolved_signalled", **fields, workflow_id=plan.workflow_id)
                    return AlertResult(**fields, action=AlertAction.RESOLVED_SIGNALLED, workflow_id=plan.workflow_id)
                return AlertResult(
                    **fields,
                    action=AlertAction.IGNORED,
                    workflow_id=plan.workflow_id,
                    detail="no running workflow for this alert episode",
                )
            assert plan.start is not None
            return await self._start(plan, plan.start, received_at)

    async def _check_instances_exist(self, plans: list[AlertPlan]) -> None:
        """An instance alert must name an instance of its model that exists (422 otherwise, nothing
        started): a typo or a stale alert must not open an incident."""
        if self.known_instances is None:
            return
        wanted = {
            (p.target.model, p.target.instance)
            for p in plans
            if p.kind == PlanKind.START and isinstance(p.target, InstanceFailure)
        }
        known: dict[str, set[str]] = {}
        problems: list[str] = []
        for model, instance in sorted(wanted):
            if model not in known:
                known[model] = await self.known_instances(model)
            if instance not in known[model]:
                problems.append(f"{model} has no instance {instance[:80]!r}")
        if problems:
            raise Rejection(HTTPStatus.UNPROCESSABLE_ENTITY, "unknown instance", problems)

    async def _report(self, plan: AlertPlan, start: RunbookStart, received_at: float) -> AlertResult:
        """An instance failure goes to its model's guardian: one recovery per failure, whoever reports it."""
        alert = plan.alert
        fields = {"fingerprint": alert.fingerprint, "status": alert.status.value}
        assert isinstance(start.input, FailoverRequest)
        tenant = start.memo.get("tenant", "")
        report = FailureReport(request=start.input, reporter=f"alert {alert.fingerprint} ({tenant})"[:200])
        ticket = await report_failure(self.client, self.task_queue, report)
        # Logged in the span ``alert.act``: the line carries the trace id beside the incident's id.
        target = {"model": start.input.model, "instance": start.input.instance}
        if ticket.joined:
            _event(logging.INFO, "incident_joined", **fields, **target, workflow_id=ticket.workflow_id)
            detail = f"joined {ticket.workflow_id} ({ticket.state}); nothing new started"
            return AlertResult(**fields, action=AlertAction.DUPLICATE, workflow_id=ticket.workflow_id, detail=detail)
        record = StartRecord(ticket.workflow_id, None, alert.starts_at, received_at, time.time())
        self.starts.append(record)
        self.metrics.alert_to_start.observe(max(0.0, record.alert_to_start_s))
        _event(
            logging.INFO,
            "incident_opened",
            **fields,
            **target,
            workflow_id=ticket.workflow_id,
            alert_to_start_s=round(record.alert_to_start_s, 3),
            receive_to_start_s=round(record.started_at - received_at, 4),
        )
        return AlertResult(**fields, action=AlertAction.STARTED, workflow_id=ticket.workflow_id)

    async def _start(self, plan: AlertPlan, start: RunbookStart, received_at: float) -> AlertResult:
        if isinstance(plan.target, InstanceFailure):
            return await self._report(plan, start, received_at)
        alert = plan.alert
        fields = {"fingerprint": alert.fingerprint, "status": alert.status.value}
        if start.covered_by is not None and await is_running(self.client, start.covered_by):
            return AlertResult(
                **fields,
                action=AlertAction.DUPLICATE,
                workflow_id=start.covered_by,
                detail=f"{start.covered_by} is already failing this instance over; nothing started",
            )
        outcome = await start_runbook(self.client, start, self.task_queue)
        if outcome.closed:
            detail = "this alert episode's workflow already ran; nothing started"
            return AlertResult(**fields, action=AlertAction.DUPLICATE, workflow_id=start.workflow_id, detail=detail)
        if not outcome.started:
            detail = "this alert episode's workflow is running; joined it"
            return AlertResult(
                **fields,
                action=AlertAction.DUPLICATE,
                workflow_id=start.workflow_id,
                run_id=outcome.run_id,
                detail=detail,
            )
        record = StartRecord(start.workflow_id, outcome.run_id, alert.starts_at, received_at, time.time())
        self.starts.append(record)
        self.metrics.alert_to_start.observe(max(0.0, record.alert_to_start_s))
        _event(
            logging.INFO,
            "runbook_started",
            **fields,
            workflow_id=start.workflow_id,
            run_id=outcome.run_id,
            alert_to_start_s=round(record.alert_to_start_s, 3),
            receive_to_start_s=round(record.started_at - received_at, 4),
        )
        return AlertResult(**fields, action=AlertAction.STARTED, workflow_id=start.workflow_id, run_id=outcome.run_id)

    def _reject(self, request: web.Request, rejection: Rejection) -> web.Response:
        message = rejection.message()
        _event(
            logging.WARNING,
            "alert_notification_rejected",
            remote=request.remote,
            status=rejection.status.value,
            reason=message,
        )
        headers = {hdrs.WWW_AUTHENTICATE: BEARER_CHALLENGE} if rejection.status == HTTPStatus.UNAUTHORIZED else None
        return web.json_response(
            {"error": message, "status": rejection.status.value}, status=rejection.status, headers=headers
        )

    # -- GET /healthz, /metrics

    async def handle_healthz(self, request: web.Request) -> web.Response:
        try:
            ok = await self.client.service_client.check_health(timeout=HEALTH_TIMEOUT)
            problem = "" if ok else "health check answered not serving"
        except Exception as exc:
            ok, problem = False, f"{type(exc).__name__}: {exc}"
        if ok:
            return web.json_response({"status": "ok", "temporal": "reachable"})
        return web.json_response(
            {"status": "unavailable", "temporal": problem or "unreachable"}, status=HTTPStatus.SERVICE_UNAVAILABLE
        )

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST}
        )


LINE_FIELDS = ("event", "workflow_id", "run_id", "model", "instance", "tenant")
"""Fields of an event that are also keys of its line with ``--log-format json``
(:class:`drctl.service.JsonFormatter`), beside the trace id of the span it is logged in."""


def _event(level: int, event: str, **fields: Any) -> None:
    """One structured log line: the event and its fields as JSON (also on the record as ``drctl``,
    and :data:`LINE_FIELDS` as attributes of their own). Every field is clipped
    (:func:`drctl.detectors.alerts.clip`): a label value of a megabyte must not become a log line
    of a megabyte."""
    record = {"event": event, **{name: clip(value) for name, value in fields.items()}}
    extra = {name: record[name] for name in LINE_FIELDS if isinstance(record.get(name), str)}
    log.log(level, json.dumps(record, default=str, sort_keys=False), extra={"drctl": record, **extra})


def checked_tokens(settings: AlertReceiverSettings, policy: DRPolicy) -> TokenSet:
    """The configured tokens, refused (``TokenError``) as the receiver refuses them at its start;
    ``drctl up`` asks before it starts anything."""
    tokens = load_tokens(settings)
    check_token_tenants(tokens, policy)
    return tokens


def check_token_tenants(tokens: TokenSet, policy: DRPolicy) -> None:
    """A token for a tenant the policy lacks is a typo or a leftover: refuse to start."""
    unknown = tokens.tenants - {t.name for t in policy.tenants} - {PLATFORM_TENANT}
    if unknown:
        raise TokenError(
            f"alert tokens name tenant(s) the policy lacks: {', '.join(sorted(unknown))} "
            f"(policy tenants: {', '.join(t.name for t in policy.tenants)})"
        )


RECEIVER = web.AppKey("drctl_alert_receiver", AlertReceiver)


KnownInstances = Callable[[str], Awaitable[set[str]]]


def platform_instances(settings: DrctlSettings, policy: DRPolicy) -> KnownInstances:
    """The instance ids of a model as the platform knows them (the local registry, or the cluster)."""
    if settings.platform == "local":
        from drctl.platforms.local.registry import InstanceRegistry
        from drctl.settings import StateLayout

        registry = InstanceRegistry(StateLayout(settings.state_dir).instances_file)

        async def local(model: str) -> set[str]:
            return {i.id for i in registry.of_model(model)}

        return local
    from drctl.platforms.factory import make_platform

    platform = make_platform(settings, policy)

    async def cluster(model: str) -> set[str]:
        return {i.id for i in await platform.list_instances(model)}

    return cluster


async def build_app(
    client: Client,
    policy: DRPolicy,
    tokens: TokenSet | Mapping[str, str],
    *,
    task_queue: str = "drctl",
    registry: CollectorRegistry | None = None,
    known_instances: KnownInstances | None = None,
) -> web.Application:
    """The receiver as an aiohttp application; ``app[RECEIVER]`` is the receiver (metrics, starts).

    Each application gets its own metrics registry unless one is given.
    """
    token_set = tokens if isinstance(tokens, TokenSet) else TokenSet(tokens)
    check_token_tenants(token_set, policy)
    receiver = AlertReceiver(client, policy, token_set, task_queue, registry or CollectorRegistry(), known_instances)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[RECEIVER] = receiver
    app.router.add_post(ALERTS_PATH, receiver.handle_alerts)
    app.router.add_get("/healthz", receiver.handle_healthz)
    app.router.add_get("/metrics", receiver.handle_metrics)
    return app


# -- main ------------------------------------------------------------------------------------------


async def serve(settings: AlertReceiverSettings, policy: DRPolicy, tokens: TokenSet, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tracing = setup_tracing("alert-receiver", settings.state_dir)
    try:
        client = await connect(settings, interceptors=tracing.interceptors())
    except RuntimeError as exc:
        print(f"error: cannot reach Temporal at {settings.temporal_address} ({exc})", file=sys.stderr)
        raise SystemExit(1) from None
    app = await build_app(
        client, policy, tokens, task_queue=settings.task_queue, known_instances=platform_instances(settings, policy)
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info(
            "alert receiver on http://%s:%d%s for tenant(s) %s; task queue %r on %s",
            host,
            port,
            ALERTS_PATH,
            ", ".join(sorted(tokens.tenants)),
            settings.task_queue,
            settings.temporal_address,
        )
        await stop.wait()
    finally:
        await runner.cleanup()
        tracing.shutdown()


def main(argv: Sequence[str] | None = None, prog: str = "python -m drctl.detectors.alert_receiver") -> None:
    settings = AlertReceiverSettings()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Receive Alertmanager webhooks and start failover runbooks (settings: DRCTL_* variables).",
    )
    parser.add_argument("--host", default=settings.alert_receiver_host, help="address to listen on [%(default)s]")
    parser.add_argument("--port", type=int, default=settings.alert_receiver_port, help="port [%(default)s]")
    add_log_format_option(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_format)
    try:
        policy = load_policy_file(settings.policy)
        tokens = checked_tokens(settings, policy)
    except (TokenError, PolicyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        asyncio.run(serve(settings, policy, tokens, args.host, args.port))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port} ({exc})", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
