"""Traces over real OTLP/HTTP from a running stack: one failover is one trace, from the trigger's
span through the guardian, the failover workflow, its activities and their platform calls.

The test runs a tiny OTLP/HTTP receiver (``POST /v1/traces``, protobuf) and starts a private stack
with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at it, as a user would point it at a collector.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from drctl.payloads import ActivityName, FailoverOutcome, FailoverRequest, Role, Trigger
from drctl.policies.loader import load_policy_file
from drctl.telemetry.tracing import current_trace_id, setup_tracing, span
from drctl.temporal.client import connect
from drctl.temporal.runbooks import start_failover
from drctl.workers.stack import LocalStack, isolated_settings
from tests.integration.conftest import EXAMPLE_POLICY

pytestmark = pytest.mark.integration
MODEL = "llama-2-7b"


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


@dataclass
class OtlpReceiver:
    """Collects the spans of every OTLP/HTTP export it is sent."""

    spans: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(body)
        self.requests += 1
        for resource_spans in export.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(
                        {
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_id": s.parent_span_id.hex() or None,
                            "name": s.name,
                            "service": resource.get("service.name"),
                            "attributes": {kv.key: _value(kv.value) for kv in s.attributes},
                        }
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )


@pytest.fixture(scope="module")
async def traced_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[LocalStack, OtlpReceiver]]:
    receiver = OtlpReceiver()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settings = isolated_settings(tmp_path_factory.mktemp("drctl-state"), EXAMPLE_POLICY)
    stack = LocalStack(settings, load_policy_file(EXAMPLE_POLICY), say=lambda _: None)
    with pytest.MonkeyPatch.context() as env:
        # What `drctl up` hands its parts (drctl.workers.part_env): the standard OTEL_* variables.
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        env.delenv("OTEL_SDK_DISABLED", raising=False)
        try:
            await stack.start()
            yield stack, receiver
        finally:
            await stack.stop()
            await runner.cleanup()


def _ancestors(span: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> list[str]:
    names = []
    while span.get("parent_id") in by_id:
        span = by_id[span["parent_id"]]
        names.append(span["name"])
    return names


async def test_one_failover_is_one_trace_from_the_trigger_to_the_platform_calls(
    traced_stack: tuple[LocalStack, OtlpReceiver],
) -> None:
    stack, receiver = traced_stack
    settings = stack.settings
    tracing = setup_tracing("test", settings.state_dir)
    assert tracing.destination.startswith("OTLP/HTTP http://127.0.0.1:")
    client = await connect(settings, interceptors=tracing.interceptors())
    [serving] = [i.id for i in stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]
    # A confirmed report of a healthy instance: the runbook promotes a standby without a kill (so the
    # prober, which would report a dead one itself, stays out of this trace).
    with span("test: report failure", model=MODEL, instance=serving, trigger=Trigger.MANUAL.value):
        trace_id = current_trace_id()
        handle = await start_failover(
            client,
            settings,
            FailoverRequest(model=MODEL, instance=serving, reason="tracing test", confirmed=True),
        )
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.outcome == FailoverOutcome.RECOVERED and result.promoted is not None
    # In a thread: shutting down exports what is left, to the receiver, which answers on this
    # event loop (called here, the export waited on a loop it was blocking and the spans were lost
    # whenever the periodic export had not sent them yet: a fast failover).
    await asyncio.to_thread(tracing.shutdown)

    wanted = {f"RunActivity:{a}" for a in (ActivityName.PROMOTE_STANDBY, ActivityName.REGISTER_INSTANCE)}
    wanted |= {f"RunActivity:{ActivityName.VERIFY_SERVING}", "platform.verify"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
        if wanted <= {s["name"] for s in spans} or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    by_id = {s["span_id"]: s for s in spans}
    names = {s["name"] for s in spans}
    assert wanted <= names, sorted(names)

    # The failover workflow's span is in the trigger's trace, below the guardian's.
    [run] = [
        s
        for s in spans
        if s["name"] == "RunWorkflow:FailoverWorkflow" and s["attributes"].get("temporalWorkflowID") == handle.id
    ]
    chain = _ancestors(run, by_id)
    assert chain[-1] == "test: report failure", chain
    assert any(n.startswith("StartChildWorkflow:FailoverWorkflow") for n in chain), chain
    assert any("ModelGuardianWorkflow" in n for n in chain), chain

    # Each step's activity runs under the failover workflow, with its platform call under it,
    # carrying the model, the instance, its tier and the runbook's epoch.
    for activity, call, instance in [
        (ActivityName.PROMOTE_STANDBY, "platform.promote", result.promoted),
        (ActivityName.REGISTER_INSTANCE, "platform.register", result.promoted),
        (ActivityName.VERIFY_SERVING, "platform.verify", result.promoted),
    ]:
        [act] = [s for s in spans if s["name"] == f"RunActivity:{activity}"]
        assert act["attributes"]["temporalWorkflowID"] == handle.id
        # (The SDK's workflow spans take no time: RunWorkflow and each StartActivity are siblings
        # under the span that started the workflow, here the guardian's StartChildWorkflow.)
        assert _ancestors(act, by_id)[:2] == [f"StartActivity:{activity}", by_id[run["parent_id"]]["name"]]
        assert act["service"] == "drctl-worker"
        [platform_call] = [s for s in spans if s["name"] == call and s["parent_id"] == act["span_id"]]
        attributes = platform_call["attributes"]
        assert attributes["drctl.model"] == MODEL and attributes["drctl.instance"] == instance
        assert attributes["drctl.tier"] in {r.value for r in Role}
        if call != "platform.verify":
            assert isinstance(attributes["drctl.epoch"], int)
    assert receiver.requests > 0
