"""OpenTelemetry traces: one trace from the trigger through the runbook and every activity.

Each long-running part (worker, prober, alert receiver) and each CLI command that starts a runbook
calls :func:`setup_tracing` once; its :meth:`Tracing.interceptors` go to
:func:`drctl.temporal.client.connect`, where ``temporalio.contrib.opentelemetry.TracingInterceptor``
carries the trace context in the Temporal headers: client start/update → workflow → activity.

The standard OpenTelemetry variables decide where spans go:

================================== =================================================================
variable                           effect
================================== =================================================================
``OTEL_EXPORTER_OTLP_ENDPOINT``    OTLP/HTTP (protobuf) to ``{endpoint}/v1/traces``
``OTEL_EXPORTER_OTLP_TRACES_...``  ``..._ENDPOINT`` (the full URL), ``..._HEADERS``, ``..._TIMEOUT``…
``OTEL_SERVICE_NAME``              the ``service.name`` (default ``drctl-{part}``)
``OTEL_SDK_DISABLED=true``         no tracing at all (``OTEL_TRACES_EXPORTER=none`` too)
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` as the SDK reads them
================================== =================================================================

Without an endpoint, spans go to JSON lines in the state folder: ``{state}/traces/{part}.jsonl``,
one span a line, rotated to ``.jsonl.1`` past :data:`MAX_FILE_BYTES` (so at most twice that per
part). ``drctl trace WORKFLOW_ID`` reads them back.

drctl's own spans carry ``drctl.model``, ``drctl.instance``, ``drctl.tier``, ``drctl.trigger`` and
``drctl.epoch`` where they are known (:data:`ATTRIBUTES`); the SDK's carry ``temporalWorkflowID``,
``temporalRunID`` and ``temporalActivityID``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind
from temporalio.client import OutboundInterceptor, QueryWorkflowInput
from temporalio.contrib.opentelemetry import TracingInterceptor, TracingWorkflowInboundInterceptor
from temporalio.contrib.opentelemetry._context import attached_context
from temporalio.worker import HandleSignalInput, HandleUpdateInput, WorkflowInterceptorClassInput

TRACES_DIR = "traces"
MAX_FILE_BYTES = 8 * 1024 * 1024
"""A spans file is rotated (to ``.1``, replacing the previous one) once it would pass this."""
TRACER_NAME = "drctl"
ATTRIBUTES = ("model", "instance", "tier", "trigger", "epoch")
"""drctl's span attributes, each as ``drctl.{name}``."""

_TRUE = ("true", "1", "yes", "on")


def traces_dir(state_dir: Path) -> Path:
    return state_dir / TRACES_DIR


def otlp_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP endpoint the standard variables name (the traces-only one first), or None."""
    return environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def disabled(environ: Mapping[str, str]) -> bool:
    return (
        environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE
        or environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none"
    )


# -- the file exporter ------------------------------------------------------------------------------


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One span as a JSON-able dict: the line :class:`JsonLinesSpanExporter` writes."""
    context = span.get_span_context()
    parent = span.parent
    start, end = span.start_time or 0, span.end_time or span.start_time or 0
    return {
        "trace_id": f"{context.trace_id:032x}" if context else None,
        "span_id": f"{context.span_id:016x}" if context else None,
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": start,
        "end_ns": end,
        "duration_ms": round((end - start) / 1e6, 3),
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "service": span.resource.attributes.get(SERVICE_NAME) if span.resource else None,
        "attributes": {k: _jsonable(v) for k, v in (span.attributes or {}).items()},
        "events": [
            {"name": e.name, "attributes": {k: _jsonable(v) for k, v in (e.attributes or {}).items()}}
            for e in span.events
        ],
    }


def _jsonable(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans to a JSON-lines file, one span a line, rotating it past ``max_bytes``.

    Each export is one ``write`` in append mode, so processes that share a file (two CLI commands)
    do not interleave within a line."""

    def __init__(self, path: Path, max_bytes: int = MAX_FILE_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        data = "".join(json.dumps(span_record(s), separators=(",", ":"), default=str) + "\n" for s in spans)
        encoded = data.encode()
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    size = self.path.stat().st_size
                except FileNotFoundError:
                    size = 0
                if size and size + len(encoded) > self.max_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, encoded)
                finally:
                    os.close(fd)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def read_spans(folder: Path) -> list[dict[str, Any]]:
    """Every span in the spans files under ``folder`` (rotated ones too); unreadable lines skipped."""
    spans: list[dict[str, Any]] = []
    if not folder.is_dir():
        return spans
    for path in sorted([*folder.glob("*.jsonl"), *folder.glob("*.jsonl.1")]):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write
            if isinstance(record, dict) and record.get("span_id") and record.get("trace_id"):
                spans.append(record)
    return spans


# -- the Temporal interceptor ----------------------------------------------------------------------


class DrctlTracingInterceptor(TracingInterceptor):
    """The SDK's tracing interceptor, less the client's query spans: drctl polls queries (a runbook's
    progress every 150 ms, a guardian's state while a report waits for its runbook, the budget for
    the metrics), and each would be a span, most of them the root of a trace of their own. And an
    Update's handler runs in the trace of the request that sent it (:class:`UpdatesInSendersTrace`).
    Starts, signals, workflows and activities are traced as the SDK does."""

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _UntracedQueries(super().intercept_client(next), next)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[TracingWorkflowInboundInterceptor]:
        super().workflow_interceptor_class(input)  # registers the extern function its spans need
        return UpdatesInSendersTrace


class UpdatesInSendersTrace(TracingWorkflowInboundInterceptor):
    """The SDK's workflow tracing, but an Update's handler runs in the trace of the request that sent
    the Update, not in the trace of the workflow's start.

    The SDK runs every handler under the context of the workflow's *start* and only links the
    sender's span. For a workflow that lives long and is told things by Updates — a model's guardian
    is started by the first report of a failure and receives every later report as an Update — that
    put every later report's work in the first report's trace. Here the handler's span
    (``HandleUpdate:report``) is the child of the sender's span (linked to the start's), and the
    sender's context is current while the handler runs, so the guardian can keep it for the runbook
    the report opens (``ModelGuardianWorkflow``). An Update sent without a trace context (from the UI,
    or a client without tracing) is handled as the SDK does. No command changes: only spans and the
    trace headers of what the handler starts."""

    async def handle_update_handler(self, input: HandleUpdateInput) -> Any:
        context = self._senders_context(input.headers)
        if context is None:
            return await super().handle_update_handler(input)
        with attached_context(context):
            self._completed_span(
                f"HandleUpdate:{input.update}",
                link_context_carrier=self._load_workflow_context_carrier(),
                kind=SpanKind.SERVER,
            )
            return await self.next.handle_update_handler(input)

    def handle_update_validator(self, input: HandleUpdateInput) -> None:
        context = self._senders_context(input.headers)
        if context is None:
            return super().handle_update_validator(input)
        with attached_context(context):
            self._completed_span(
                f"ValidateUpdate:{input.update}",
                link_context_carrier=self._load_workflow_context_carrier(),
                kind=SpanKind.SERVER,
            )
            return self.next.handle_update_validator(input)

    async def handle_signal(self, input: HandleSignalInput) -> None:
        """Signals too: the budget is told of each released lease by a signal from a guardian's
        recovery, which runs in its report's trace; the release belongs there, not under the trace
        of whatever first started the budget."""
        context = self._senders_context(input.headers)
        if context is None:
            return await super().handle_signal(input)
        with attached_context(context):
            self._completed_span(
                f"HandleSignal:{input.signal}",
                link_context_carrier=self._load_workflow_context_carrier(),
                kind=SpanKind.SERVER,
            )
            return await self.next.handle_signal(input)

    def _senders_context(self, headers: Mapping[str, Any]) -> Any:
        """The trace context the sender put in the headers, or None without one."""
        header = headers.get(self.header_key)
        carrier = self.payload_converter.from_payloads([header])[0] if header else None
        if not carrier:
            return None
        return self._set_on_context(self.text_map_propagator.extract(carrier))


class _UntracedQueries(OutboundInterceptor):
    def __init__(self, traced: OutboundInterceptor, plain: OutboundInterceptor) -> None:
        super().__init__(traced)
        self._plain = plain

    async def query_workflow(self, input: QueryWorkflowInput) -> Any:
        return await self._plain.query_workflow(input)


# -- setup -----------------------------------------------------------------------------------------


@dataclass
class Tracing:
    """The tracing of one process: where its spans go, and the interceptors for its Temporal client."""

    provider: TracerProvider | None
    destination: str
    _interceptor: DrctlTracingInterceptor | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def interceptors(self) -> list[DrctlTracingInterceptor]:
        """For :func:`drctl.temporal.client.connect` (client and, through the client, the worker)."""
        return [self._interceptor] if self._interceptor is not None else []

    def shutdown(self) -> None:
        """Export what is buffered and stop (a CLI command calls it before it exits)."""
        global _tracer, _provider
        if self.provider is not None:
            self.provider.shutdown()
            if _provider is self.provider:
                _tracer, _provider = None, None


_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None


def setup_tracing(
    part: str,
    state_dir: Path,
    environ: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> Tracing:
    """Tracing for drctl part ``part`` (``worker``, ``prober``, ``alert-receiver``, ``cli``) from the
    standard ``OTEL_*`` variables; ``exporter`` replaces the one they choose (tests)."""
    global _tracer, _provider
    env = os.environ if environ is None else environ
    if disabled(env):
        return Tracing(None, "off (OTEL_SDK_DISABLED or OTEL_TRACES_EXPORTER=none)")
    service = env.get("OTEL_SERVICE_NAME") or f"drctl-{part}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    endpoint = otlp_endpoint(env)
    if exporter is not None:
        destination = f"{type(exporter).__name__}"
    elif endpoint is not None:
        # Imported here: the OTLP exporter pulls in requests and protobuf, which a run without it
        # does not need. It reads the OTEL_EXPORTER_OTLP_* variables itself (headers, timeout…).
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
        destination = f"OTLP/HTTP {endpoint}"
    else:
        path = traces_dir(state_dir).resolve() / f"{part}.jsonl"
        exporter = JsonLinesSpanExporter(path)
        destination = str(path)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer(TRACER_NAME)
    _tracer, _provider = tracer, provider
    return Tracing(provider, destination, DrctlTracingInterceptor(tracer))


def tracer() -> trace.Tracer:
    """The tracer :func:`setup_tracing` made (a no-op one before, or when tracing is off)."""
    return _tracer if _tracer is not None else trace.NoOpTracer()


def drctl_attributes(**values: object) -> dict[str, str | int | float | bool]:
    """``drctl.{name}`` attributes from the values that are known (None ones are left out)."""
    out: dict[str, str | int | float | bool] = {}
    for name, value in values.items():
        if value is None:
            continue
        out[f"drctl.{name}"] = value if isinstance(value, str | int | float | bool) else str(value)
    return out


@contextmanager
def span(
    name: str, known: Mapping[str, object] | None = None, *, kind: SpanKind = SpanKind.INTERNAL, **attributes: object
) -> Iterator[Span]:
    """A span around a block, current inside it (so a workflow started there is its child), with
    ``drctl.*`` attributes (from ``known`` and the keywords); an exception marks it failed."""
    values = {**(known or {}), **attributes}
    with tracer().start_as_current_span(name, kind=kind, attributes=drctl_attributes(**values)) as current:
        yield current


def set_attributes(current: Span, **attributes: object) -> None:
    """Add ``drctl.*`` attributes learnt inside the span (the tier, once the instance is looked up)."""
    current.set_attributes(drctl_attributes(**attributes))


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits), or None outside a recorded span."""
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


@contextmanager
def server_span(name: str, headers: Mapping[str, str], **attributes: object) -> Iterator[Span]:
    """A SERVER span for an incoming request, the child of the caller's span when its headers carry
    a W3C ``traceparent`` (Alertmanager behind a tracing proxy), else the root of a new trace."""
    parent = propagate.extract(dict(headers))
    with tracer().start_as_current_span(
        name, context=parent, kind=SpanKind.SERVER, attributes=drctl_attributes(**attributes)
    ) as current:
        yield current
