"""The failover runbook's activities, written once against the :class:`Platform` interface.

Each activity is idempotent (Temporal runs it at least once), measures its own duration so the
workflow can tell orchestration overhead from work, and heartbeats while it waits. Each platform call
is a span (``platform.{call}``, a child of the SDK's ``RunActivity`` span) with the model, instance,
tier and epoch: the gap between the two is the adapter's own cost. Each step logs one line when it
is done (:func:`log_step`), with its workflow, model, instance and duration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from temporalio import activity

from drctl.activities.listing import ModelListing
from drctl.payloads import (
    ActivityName,
    EjectRequest,
    Instance,
    InstanceList,
    InstanceRef,
    ModelRef,
    ProbeResult,
    RegisterRequest,
    StepReport,
)
from drctl.platforms.base import Platform
from drctl.telemetry.tracing import set_attributes, span

T = TypeVar("T")


def _elapsed_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


async def with_heartbeats(work: Awaitable[T], every_s: float = 0.25) -> T:
    """Await ``work``, heartbeating meanwhile when this is a regular activity."""
    if activity.info().is_local:
        return await work
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=every_s)
        if done:
            return task.result()
        activity.heartbeat()


def log_step(step: str, duration_ms: float, detail: str = "", **fields: str | int | None) -> None:
    """One INFO line for a runbook step that is done, through the SDK's ``activity.logger`` (which
    adds the workflow and activity: ``--log-format json`` has them as keys, and the trace id, since
    the step's span is current). ``fields`` (``model``, ``instance``, ``epoch``, ``gpu``…) and
    ``step`` and ``duration_ms`` are keys of the JSON line too; None ones are left out."""
    context = {name: value for name, value in fields.items() if value is not None}
    target = "/".join(str(context[k]) for k in ("model", "instance", "gpu") if k in context)
    activity.logger.info(
        "%s%s done in %.1f ms%s",
        step,
        f" {target}" if target else "",
        duration_ms,
        f": {detail[:200]}" if detail else "",
        extra={"step": step, "duration_ms": duration_ms, **context},
    )


_PROGRESS_HEARTBEATS: ContextVar[bool] = ContextVar("progress_heartbeats", default=True)


def heartbeat_progress(fraction: float, what: str) -> None:
    """A step's progress as its activity's heartbeat (see :func:`without_progress_heartbeats`)."""
    if _PROGRESS_HEARTBEATS.get() and not activity.info().is_local:  # local activities cannot heartbeat
        activity.heartbeat({"progress": round(fraction, 3), "detail": what})


@contextmanager
def without_progress_heartbeats() -> Iterator[None]:
    """Within: the steps' progress is not heartbeated (the tasks started within inherit it). For
    an activity that runs many steps side by side (a zone failover's batch) and heartbeats for all
    of them itself: hundreds of switches each heartbeating every poll of its load check and verify
    were ~3 % of the worker's samples at 1,000 instances, each detail overwriting the last."""
    token = _PROGRESS_HEARTBEATS.set(False)
    try:
        yield
    finally:
        _PROGRESS_HEARTBEATS.reset(token)


class FailoverActivities:
    """Bind the runbook's activities to one platform; register ``.all()`` on a worker."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._listing = ModelListing(platform)

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.probe_instance,
            self.list_instances,
            self.eject_instance,
            self.promote_standby,
            self.load_model,
            self.restore_checkpoint,
            self.register_instance,
            self.verify_serving,
        ]

    @activity.defn(name=ActivityName.PROBE_INSTANCE)
    async def probe_instance(self, ref: InstanceRef) -> ProbeResult:
        """As a regular activity (the confirm step of a runbook whose listing came with its start)
        it heartbeats while the instance answers, as the listing step does: a worker that dies
        holding it costs the heartbeat timeout (1 s), not the step's 10 s."""
        start = time.monotonic()
        with span("platform.probe", model=ref.model, instance=ref.instance) as current:
            instance = await self.platform.get_instance(ref.model, ref.instance)
            set_attributes(current, tier=instance.role.value)
            healthy, detail = await with_heartbeats(self.platform.probe(instance))
            result = ProbeResult(instance=ref.instance, healthy=healthy, detail=detail, duration_ms=_elapsed_ms(start))
            log_step("probe", result.duration_ms, detail, model=ref.model, instance=ref.instance)
        return result

    @activity.defn(name=ActivityName.LIST_INSTANCES)
    async def list_instances(self, ref: ModelRef) -> InstanceList:
        """As a regular activity (the failover records its listing in the history) it heartbeats
        while the platform answers, so a worker that dies holding it is noticed within the heartbeat
        timeout (1 s) rather than the step's timeout. The listing carries where serving belongs
        under the policy now (``serving_zones``): the failover prefers a standby there."""
        with span("platform.list_instances", model=ref.model):
            listed = await with_heartbeats(self._listing(ref.model))
            log_step("list_instances", listed.duration_ms, f"{len(listed.instances)} instance(s)", model=ref.model)
        return listed

    @activity.defn(name=ActivityName.EJECT_INSTANCE)
    async def eject_instance(self, request: EjectRequest) -> StepReport:
        return await self._on_instance(
            "eject",
            request.model,
            request.instance,
            lambda i: self.platform.eject(i, request.reason, request.epoch),
            request.epoch,
        )

    @activity.defn(name=ActivityName.PROMOTE_STANDBY)
    async def promote_standby(self, ref: InstanceRef) -> StepReport:
        return await self._on_instance(
            "promote", ref.model, ref.instance, lambda i: self.platform.promote(i, ref.epoch), ref.epoch
        )

    @activity.defn(name=ActivityName.LOAD_MODEL)
    async def load_model(self, ref: InstanceRef) -> StepReport:
        return await self._on_instance(
            "wait_loaded",
            ref.model,
            ref.instance,
            lambda i: self.platform.wait_loaded(i, heartbeat_progress),
            ref.epoch,
        )

    @activity.defn(name=ActivityName.RESTORE_CHECKPOINT)
    async def restore_checkpoint(self, ref: InstanceRef) -> StepReport:
        return await self._on_instance(
            "restore_checkpoint", ref.model, ref.instance, self.platform.restore_checkpoint, ref.epoch
        )

    @activity.defn(name=ActivityName.REGISTER_INSTANCE)
    async def register_instance(self, request: RegisterRequest) -> StepReport:
        return await self._on_instance(
            "register",
            request.model,
            request.instance,
            lambda i: self.platform.register(i, request.priority, request.epoch),
            request.epoch,
        )

    @activity.defn(name=ActivityName.VERIFY_SERVING)
    async def verify_serving(self, ref: InstanceRef) -> StepReport:
        return await self._on_instance(
            "verify", ref.model, ref.instance, lambda i: self.platform.verify(i, heartbeat_progress), ref.epoch
        )

    async def _on_instance(
        self,
        call: str,
        model: str,
        instance_id: str,
        action: Callable[[Instance], Awaitable[str]],
        epoch: int | None = None,
    ) -> StepReport:
        """Look the instance up afresh (a retry sees what the last attempt changed), act, time it;
        one span ``platform.{call}`` around both, with the instance's tier once it is known; one log
        line when done (:func:`log_step`)."""
        start = time.monotonic()
        with span(f"platform.{call}", model=model, instance=instance_id, epoch=epoch) as current:
            instance = await self.platform.get_instance(model, instance_id)
            set_attributes(current, tier=instance.role.value)
            detail = await action(instance)
            report = StepReport(detail=detail, duration_ms=_elapsed_ms(start))
            log_step(call, report.duration_ms, detail, model=model, instance=instance_id, epoch=epoch)
        return report
