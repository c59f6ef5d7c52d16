"""Alertmanager webhook notifications (payload version 4) and what drctl does about each alert.

Pure: the payload's pydantic models, label checks, which runbook an alert's labels name, the episode
key that deduplicates re-deliveries, and the bearer-token format. No I/O and no Temporal; the HTTP
service that acts on the plans is ``drctl.detectors.alert_receiver``.

Which runbook an alert names (first match wins):

- ``model`` + ``instance`` → instance failure → reported to the model's guardian, which runs (or
  joins) the one ``FailoverWorkflow`` for it;
- ``node`` + ``gpu`` (no instance) → GPU failure → ``DrainGpuWorkflow``, once per alert episode;
- ``zone`` (no instance) → zone failure → ``ZoneFailoverWorkflow`` (with the policy's approval
  gate), once per alert episode;
- anything else → no runbook.

A GPU alert usually carries its node's ``zone`` too, so GPU is matched before zone: a dead GPU must
never look like a dead zone. A new runbook plugs in at ``runbook_for``.

Hostile input is bounded before any of it is believed: JSON nested deeper than :data:`MAX_DEPTH`
is a 400 (found by a scan of the bytes before parsing, so it never reaches the parser's
recursion), more than :data:`MAX_ALERTS` alerts a 413 (counted before the alerts are validated), a
label or annotation name over :data:`MAX_LABEL_NAME` or value over :data:`MAX_LABEL_VALUE`
characters a 422 naming it. Whatever a client sent reaches a log line or an error message only
through :func:`clip` (:data:`MAX_LOGGED` characters, then an ellipsis).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from http import HTTPStatus
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from drctl.payloads import (
    INSTANCE_ID_PATTERN,
    MODEL_NAME_PATTERN,
    AlertResolved,
    DrainGpuRequest,
    FailoverRequest,
    SearchAttr,
    Trigger,
    ZoneFailoverRequest,
    drain_workflow_id,
    failover_workflow_id,
    zone_failover_workflow_id,
)
from drctl.policies.placement import gpu_inventory
from drctl.policies.schema import DRPolicy
from drctl.temporal.refs import workflow_type
from drctl.workflows.drain import DrainGpuWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.zone import ZoneFailoverWorkflow

MAX_BODY_BYTES = 1 << 20
"""Largest notification accepted (413 above). Alertmanager sends a few KiB per alert."""
MAX_ALERTS = 1000
"""Most alerts in one notification (413 above): Alertmanager's ``max_alerts`` for this receiver."""
MAX_DEPTH = 64
"""Deepest JSON nesting accepted (400 above); a notification is four levels deep."""
MAX_LABEL_NAME = 256
MAX_LABEL_VALUE = 4096
"""Longest label or annotation name and value (422 above); a long runbook annotation fits."""
MAX_LOGGED = 200
"""Most characters of any one client value in a log line or an error message."""

SAFE_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
ROUTING_LABELS = ("model", "instance", "zone", "node", "gpu", "alertname", "severity")
"""The labels the receiver reads; each must match ``SAFE_LABEL_VALUE`` when present. Other labels
are carried along by Alertmanager but never used, so they are not checked."""

FINGERPRINT_PATTERN = r"^[0-9a-fA-F]{1,64}$"
EPISODE_LENGTH = 12
MAX_REASON = 500
MAX_ERRORS_SHOWN = 10

RESOLVED_SIGNAL = "alert_resolved"
NO_RUNBOOK_YET = "no running runbook takes this alert (zone failovers end only by failback)"
NO_RUNBOOK = "labels name no runbook (needs model+instance, node+gpu, or zone)"


# -- the webhook payload -------------------------------------------------------------------------


class AlertStatus(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class _Wire(BaseModel):
    # Unknown fields are ignored: a newer Alertmanager may add some.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


LabelName = Annotated[str, StringConstraints(max_length=MAX_LABEL_NAME)]
LabelValue = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE)]
Labels = dict[LabelName, LabelValue]
"""Labels or annotations: every name and value of bounded length."""
Text = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE)]


class WebhookAlert(_Wire):
    status: AlertStatus
    labels: Labels
    annotations: Labels = Field(default_factory=dict)
    starts_at: AwareDatetime = Field(alias="startsAt")
    ends_at: AwareDatetime | None = Field(None, alias="endsAt")
    """``0001-01-01T00:00:00Z`` for a firing alert without an end."""
    generator_url: Text = Field("", alias="generatorURL")
    fingerprint: Annotated[str, Field(pattern=FINGERPRINT_PATTERN)]


class WebhookNotification(_Wire):
    """What Alertmanager POSTs to a ``webhook_configs`` URL."""

    version: Literal["4"]
    group_key: Annotated[str, StringConstraints(max_length=4 * MAX_LABEL_VALUE)] = Field(alias="groupKey")
    truncated_alerts: int = Field(0, alias="truncatedAlerts")
    status: AlertStatus
    receiver: Text
    group_labels: Labels = Field(default_factory=dict, alias="groupLabels")
    common_labels: Labels = Field(default_factory=dict, alias="commonLabels")
    common_annotations: Labels = Field(default_factory=dict, alias="commonAnnotations")
    external_url: Text = Field("", alias="externalURL")
    alerts: Annotated[list[WebhookAlert], Field(min_length=1, max_length=MAX_ALERTS)]


class Rejection(Exception):
    """The whole notification is refused with ``status``; nothing is started for any of its alerts."""

    def __init__(self, status: HTTPStatus, reason: str, problems: list[str] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.problems = problems or []
        super().__init__(reason)

    def message(self) -> str:
        shown = self.problems[:MAX_ERRORS_SHOWN]
        more = len(self.problems) - len(shown)
        detail = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
        return f"{self.reason}: {detail}" if detail else self.reason


def parse_notification(body: bytes) -> WebhookNotification:
    """Parse and shape-check a notification: 400 for JSON that does not parse or is nested deeper
    than :data:`MAX_DEPTH`, 413 for more than :data:`MAX_ALERTS` alerts, 422 for a wrong shape (a
    label value over :data:`MAX_LABEL_VALUE` characters among them, named by its path)."""
    if json_deeper_than(body, MAX_DEPTH):
        raise Rejection(HTTPStatus.BAD_REQUEST, f"body is nested more than {MAX_DEPTH} levels deep")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejection(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({exc})") from None
    except RecursionError:  # brackets that never close: the scan leaves them to the parser
        raise Rejection(HTTPStatus.BAD_REQUEST, f"body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # a number of more than 4,300 digits (Python's limit on int parsing)
        raise Rejection(HTTPStatus.BAD_REQUEST, f"body is not acceptable JSON ({str(exc).split(';')[0]})") from None
    alerts = document.get("alerts") if isinstance(document, dict) else None
    if isinstance(alerts, list) and len(alerts) > MAX_ALERTS:
        raise Rejection(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{len(alerts)} alerts in one notification; at most {MAX_ALERTS} "
            f"(set max_alerts: {MAX_ALERTS} in the webhook config)",
        )
    try:
        return WebhookNotification.model_validate(document)
    except ValidationError as exc:
        problems = [f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False, include_input=False)]
        raise Rejection(
            HTTPStatus.UNPROCESSABLE_ENTITY, "not an Alertmanager v4 webhook notification", problems
        ) from None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def json_deeper_than(body: bytes, limit: int) -> bool:
    """Whether ``body``'s arrays and objects nest deeper than ``limit``, from its bytes alone (strings
    skipped): no parser recursion, and ``limit`` passes of C-speed byte replaces at most. Each pass
    removes the innermost ``()`` pairs, so a balanced body of depth d is empty after d passes, and
    brackets that never close are still counted when ``limit`` + 1 openers remain in a row; any
    other mismatch is invalid JSON the parser refuses without going deep."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(_PARENS, _NOT_BRACKETS)
    too_deep = b"(" * (limit + 1)  # that many openers in a row: the usual attack, found in one search
    for _ in range(limit):
        if too_deep in brackets:
            return True
        reduced = brackets.replace(b"()", b"")
        if len(reduced) == len(brackets):  # no pair left: empty, or unmatched (shorter runs than the limit)
            return False
        brackets = reduced
    return b"()" in brackets or too_deep in brackets


def _loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = clip_text(str(part), 64)  # a label name is the client's: never echo a long one
            text += f".{name}" if text else name
    return text or "<body>"


def clip_text(text: str, limit: int = MAX_LOGGED) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis when it was longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip(value: object, limit: int = MAX_LOGGED) -> object:
    """A client value as a log line or a message may show it: strings cut to ``limit`` characters
    with an ellipsis, inside lists and dicts too (keys included), at most ``limit`` items of each."""
    if isinstance(value, str):
        return clip_text(value, limit)
    if isinstance(value, Mapping):
        items = list(value.items())
        clipped = {clip_text(str(k), limit): clip(v, limit) for k, v in items[:limit]}
        if len(items) > limit:
            clipped["…"] = f"{len(items) - limit} more"
        return clipped
    if isinstance(value, list | tuple):
        shown: list[object] = [clip(v, limit) for v in value[:limit]]
        return shown + [f"… {len(value) - limit} more"] if len(value) > limit else shown
    return value


# -- what an alert is about ------------------------------------------------------------------------


class FailureKind(StrEnum):
    INSTANCE = "instance"
    GPU = "gpu"
    ZONE = "zone"


@dataclass(frozen=True)
class InstanceFailure:
    model: str
    instance: str
    kind: FailureKind = FailureKind.INSTANCE


@dataclass(frozen=True)
class GpuFailure:
    node: str
    gpu: str
    kind: FailureKind = FailureKind.GPU


@dataclass(frozen=True)
class ZoneFailure:
    zone: str
    kind: FailureKind = FailureKind.ZONE


Failure = InstanceFailure | GpuFailure | ZoneFailure


def classify(labels: Mapping[str, str]) -> Failure | None:
    """The failure an alert's labels describe, or None when they name no runbook."""
    if "model" in labels and "instance" in labels:
        return InstanceFailure(model=labels["model"], instance=labels["instance"])
    if "instance" not in labels:
        if "node" in labels and "gpu" in labels:
            return GpuFailure(node=labels["node"], gpu=labels["gpu"])
        if "zone" in labels:
            return ZoneFailure(zone=labels["zone"])
    return None


def episode_key(fingerprint: str, starts_at: datetime) -> str:
    """Short stable hash of one firing episode of one alert: its fingerprint and when it began.

    Every re-send (``repeat_interval``) and every peer of an HA pair carries the same pair; a new
    episode after the alert resolved has a new ``startsAt``. The time is normalised to UTC with
    microseconds, so two peers writing it in different time zones still agree.
    """
    moment = starts_at.astimezone(UTC).isoformat(timespec="microseconds")
    return hashlib.sha256(f"{fingerprint.lower()}|{moment}".encode()).hexdigest()[:EPISODE_LENGTH]


def alert_failover_workflow_id(model: str, instance: str, episode: str) -> str:
    return f"{failover_workflow_id(model, instance)}-{episode}"


# -- plans -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunbookStart:
    """Everything needed to start one runbook for one alert episode."""

    workflow_type: str
    workflow_id: str
    input: BaseModel
    search_attributes: dict[str, str]
    """Keyword search attributes, by name."""
    memo: dict[str, str] = field(default_factory=dict)
    covered_by: str | None = None
    """A workflow that, while running, already handles this failure (the prober's or the CLI's
    ``failover-{model}-{instance}``): then nothing new is started."""


class PlanKind(StrEnum):
    START = "start"
    SIGNAL_RESOLVED = "signal-resolved"
    IGNORE = "ignore"


@dataclass(frozen=True)
class AlertPlan:
    """What to do about one alert of an accepted notification."""

    index: int
    alert: WebhookAlert
    kind: PlanKind
    target: Failure | None
    episode: str
    workflow_id: str | None = None
    start: RunbookStart | None = None
    resolved: AlertResolved | None = None
    detail: str = ""


def runbook_for(target: Failure, alert: WebhookAlert, episode: str, tenant: str) -> RunbookStart | None:
    """The runbook that handles ``target``; None while there is none for its kind."""
    match target:
        case InstanceFailure():
            return _failover_runbook(target, alert, episode, tenant)
        case GpuFailure():
            return _drain_runbook(target, alert, episode)
        case ZoneFailure():
            return _zone_runbook(target, alert, episode)


def resolved_workflow_id(target: Failure, episode: str) -> str | None:
    """The workflow a resolved alert's episode started, if its kind has a runbook."""
    match target:
        case InstanceFailure():
            return alert_failover_workflow_id(target.model, target.instance, episode)
        case GpuFailure():
            return f"{drain_workflow_id(f'{target.node}/{target.gpu}')}-{episode}"
        case ZoneFailure():
            return None


def _zone_runbook(target: ZoneFailure, alert: WebhookAlert, episode: str) -> RunbookStart:
    reason = alert.labels.get("alertname", "alert")
    summary = alert.annotations.get("summary", "").strip()
    request = ZoneFailoverRequest(zone=target.zone, reason=(f"{reason}: {summary}" if summary else reason)[:MAX_REASON])
    return RunbookStart(
        workflow_type=workflow_type(ZoneFailoverWorkflow),
        workflow_id=f"{zone_failover_workflow_id(target.zone)}-{episode}",
        input=request,
        search_attributes={SearchAttr.TRIGGER: Trigger.ALERT.value},
        memo={"fingerprint": alert.fingerprint, "startsAt": alert.starts_at.isoformat(), "zone": target.zone},
        covered_by=zone_failover_workflow_id(target.zone),
    )


def _drain_runbook(target: GpuFailure, alert: WebhookAlert, episode: str) -> RunbookStart:
    gpu = f"{target.node}/{target.gpu}"
    reason = alert.labels.get("alertname", "alert")
    summary = alert.annotations.get("summary", "").strip()
    request = DrainGpuRequest(gpu=gpu, reason=(f"{reason}: {summary}" if summary else reason)[:MAX_REASON])
    return RunbookStart(
        workflow_type=workflow_type(DrainGpuWorkflow),
        workflow_id=f"{drain_workflow_id(gpu)}-{episode}",
        input=request,
        search_attributes={SearchAttr.TRIGGER: Trigger.ALERT.value},
        memo={"fingerprint": alert.fingerprint, "startsAt": alert.starts_at.isoformat(), "gpu": gpu},
        covered_by=drain_workflow_id(gpu),
    )


def _failover_runbook(target: InstanceFailure, alert: WebhookAlert, episode: str, tenant: str) -> RunbookStart:
    alertname = alert.labels.get("alertname", "alert")
    summary = alert.annotations.get("summary", "").strip()
    reason = f"{alertname}: {summary}" if summary else alertname
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 1] + "…"
    request = FailoverRequest(
        model=target.model,
        instance=target.instance,
        trigger=Trigger.ALERT,
        failed_at=alert.starts_at,
        reason=reason,
    )
    return RunbookStart(
        workflow_type=workflow_type(FailoverWorkflow),
        workflow_id=alert_failover_workflow_id(target.model, target.instance, episode),
        input=request,
        search_attributes={
            SearchAttr.MODEL: request.model,
            SearchAttr.INSTANCE: request.instance,
            SearchAttr.TRIGGER: request.trigger.value,
        },
        memo={
            "alert_fingerprint": alert.fingerprint,
            "alert_starts_at": alert.starts_at.isoformat(),
            "alert_generator_url": alert.generator_url[:1000],
            "tenant": tenant,
        },
        covered_by=failover_workflow_id(target.model, target.instance),
    )


PLATFORM_TENANT = "platform"
"""The token name of the platform team: the only one that may send GPU (and later zone) alerts.
It needs no tenant in the policy."""


def plan_notification(notification: WebhookNotification, policy: DRPolicy, tenant: str) -> list[AlertPlan]:
    """Check every alert of the notification, then say what to do about each.

    Raises ``Rejection`` (and nothing is done for any alert) when a routing label has an unsafe value
    or an instance id is not one (422), an alert names a model the policy lacks (422), or one of the
    tenant's alerts is about another tenant's model (403).
    """
    bad: list[str] = []
    unknown: list[str] = []
    forbidden: list[str] = []
    models = {model.name: model for model in policy.models}  # once, not per alert: a lookup per alert
    gpus: set[str] | None = None
    for i, alert in enumerate(notification.alerts):
        where = f"alerts[{i}]"
        unsafe = [
            f"{where}.labels.{name}: {value[:80]!r} does not match {SAFE_LABEL_VALUE.pattern}"
            for name in ROUTING_LABELS
            if (value := alert.labels.get(name)) is not None and not SAFE_LABEL_VALUE.fullmatch(value)
        ]
        if unsafe:
            bad += unsafe
            continue
        model_name = alert.labels.get("model")
        if model_name is not None:
            if not re.fullmatch(MODEL_NAME_PATTERN, model_name) or model_name not in models:
                unknown.append(f"{where}: unknown model {model_name!r}")
            elif models[model_name].tenant != tenant:
                forbidden.append(f"{where}: model {model_name!r} does not belong to tenant {tenant!r}")
        target = classify(alert.labels)
        if isinstance(target, GpuFailure | ZoneFailure):
            # GPUs and zones are shared by tenants: only the platform team's token may act on them.
            kind = "GPU" if isinstance(target, GpuFailure) else "zone"
            if tenant != PLATFORM_TENANT:
                forbidden.append(f"{where}: {kind} alerts need the {PLATFORM_TENANT!r} token, not tenant {tenant!r}")
            elif isinstance(target, GpuFailure) and f"{target.node}/{target.gpu}" not in (
                gpus := gpus if gpus is not None else {slot.id for slot in gpu_inventory(policy.gpu_pool)}
            ):
                unknown.append(f"{where}: unknown GPU {target.node}/{target.gpu} (not in gpuPool)")
            elif isinstance(target, ZoneFailure) and target.zone not in policy.zones:
                unknown.append(f"{where}: unknown zone {target.zone!r} (known: {', '.join(sorted(policy.zones))})")
        if isinstance(target, InstanceFailure) and not re.fullmatch(INSTANCE_ID_PATTERN, target.instance):
            bad.append(
                f"{where}.labels.instance: {target.instance!r} is not a drctl instance id ({INSTANCE_ID_PATTERN})"
            )
    if bad:
        raise Rejection(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid alert labels", bad)
    if unknown:
        if any("unknown model" in line for line in unknown):
            known = ", ".join(policy.model_names[:20]) + (" …" if len(policy.models) > 20 else "")
            summary = f"unknown model, GPU or zone (the policy's models: {known})"
        else:  # each line names what is known of its GPU or zone
            summary = "unknown GPU or zone"
        raise Rejection(HTTPStatus.UNPROCESSABLE_ENTITY, summary, unknown)
    if forbidden:
        raise Rejection(HTTPStatus.FORBIDDEN, "alerts this token may not send", forbidden)
    return [_plan_alert(i, alert, tenant) for i, alert in enumerate(notification.alerts)]


def _plan_alert(index: int, alert: WebhookAlert, tenant: str) -> AlertPlan:
    target = classify(alert.labels)
    episode = episode_key(alert.fingerprint, alert.starts_at)
    if target is None:
        return AlertPlan(index, alert, PlanKind.IGNORE, None, episode, detail=NO_RUNBOOK)
    if alert.status == AlertStatus.RESOLVED:
        workflow_id = resolved_workflow_id(target, episode)
        if workflow_id is None:
            return AlertPlan(index, alert, PlanKind.IGNORE, target, episode, detail=NO_RUNBOOK_YET)
        resolved = AlertResolved(fingerprint=alert.fingerprint, ends_at=_real_time(alert.ends_at))
        return AlertPlan(index, alert, PlanKind.SIGNAL_RESOLVED, target, episode, workflow_id, resolved=resolved)
    start = runbook_for(target, alert, episode, tenant)
    if start is None:
        return AlertPlan(index, alert, PlanKind.IGNORE, target, episode, detail=NO_RUNBOOK_YET)
    return AlertPlan(index, alert, PlanKind.START, target, episode, start.workflow_id, start=start)


def _real_time(moment: datetime | None) -> datetime | None:
    """Alertmanager's zero time (year 1) means "not set"."""
    return None if moment is None or moment.year <= 1 else moment


# -- bearer tokens ---------------------------------------------------------------------------------

TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,512}$")
"""RFC 6750 token characters, at least 16 of them."""


class TokenError(ValueError):
    """A token setting that cannot be used; the message names the source and the line."""


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """Tenant → token from a JSON object, or from ``tenant: token`` lines (``#`` starts a comment)."""
    pairs: list[tuple[str, str, str]] = []  # (tenant, token, where)
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TokenError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(document, dict):
            raise TokenError(f'{source}: expected a JSON object {{"tenant": "token", ...}}')
        for tenant, token in document.items():
            if not isinstance(token, str):
                raise TokenError(f"{source}: the token of tenant {tenant!r} must be a string")
            pairs.append((tenant, token, ""))
    else:
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            tenant, sep, token = line.partition(":")
            if not sep:
                raise TokenError(f"{source} line {number}: expected 'tenant: token'")
            pairs.append((tenant.strip(), token.strip(), f" line {number}"))
    tokens: dict[str, str] = {}
    for tenant, token, where in pairs:
        if not re.fullmatch(MODEL_NAME_PATTERN, tenant):
            raise TokenError(f"{source}{where}: {tenant!r} is not a tenant name ({MODEL_NAME_PATTERN})")
        if tenant in tokens:
            raise TokenError(f"{source}{where}: tenant {tenant!r} is listed twice")
        if not TOKEN_PATTERN.fullmatch(token):
            raise TokenError(
                f"{source}{where}: the token of tenant {tenant!r} must be 16 to 512 characters of "
                "A-Z a-z 0-9 . _ ~ + / = -"
            )
        if token in tokens.values():
            raise TokenError(f"{source}{where}: tenant {tenant!r} has the same token as another tenant")
        tokens[tenant] = token
    if not tokens:
        raise TokenError(f"{source}: no tokens")
    return tokens


class TokenSet:
    """Bearer tokens per tenant, looked up in constant time (only their SHA-256 digests are kept)."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._digests = [(tenant, _digest(token)) for tenant, token in tokens.items()]

    @property
    def tenants(self) -> set[str]:
        return {tenant for tenant, _ in self._digests}

    def tenant_for(self, token: str) -> str | None:
        """The tenant whose token this is. Every entry is compared, so the time taken does not say
        which tenant matched or how much of a token was right."""
        presented = _digest(token)
        found: str | None = None
        for tenant, digest in self._digests:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
