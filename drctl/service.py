"""Run a long-lived drctl process (worker, prober) until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from drctl.settings import DrctlSettings

Service = Callable[[DrctlSettings, asyncio.Event], Awaitable[None]]


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``message``; the workflow or activity
    (the SDK's ``workflow.logger``/``activity.logger`` extras ``temporal_workflow``/``temporal_activity``)
    and the trace and span ids when a span is current; ``exception`` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        workflow = getattr(record, "temporal_workflow", None)
        if isinstance(workflow, dict):
            line["workflow_id"] = workflow.get("workflow_id")
            line["run_id"] = workflow.get("run_id")
            line["workflow_type"] = workflow.get("workflow_type")
        activity = getattr(record, "temporal_activity", None)
        if isinstance(activity, dict):
            line["workflow_id"] = activity.get("workflow_id")
            line["run_id"] = activity.get("workflow_run_id")
            line["activity"] = activity.get("activity_type")
            line["activity_id"] = activity.get("activity_id")
            line["attempt"] = activity.get("attempt")
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = f"{context.trace_id:032x}"
            line["span_id"] = f"{context.span_id:016x}"
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps({k: v for k, v in line.items() if v is not None}, default=str)


def configure_logging(log_format: str | None = None) -> None:
    """Log to stderr as text, or as JSON lines with ``json`` (default: ``DRCTL_LOG_FORMAT``, else text)."""
    chosen = (log_format or os.environ.get("DRCTL_LOG_FORMAT") or "text").strip().lower()
    if chosen not in ("text", "json"):
        raise SystemExit(f"error: unknown log format {chosen!r} (text or json)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe request is noise


def log_format_option(argv: Sequence[str] | None = None) -> str | None:
    """``--log-format text|json`` from the command line, if given."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--log-format", choices=("text", "json"), default=None)
    known, _ = parser.parse_known_args(argv)
    return known.log_format  # type: ignore[no-any-return]


def run_service(service: Service, argv: Sequence[str] | None = None) -> None:
    """Log to stderr (``--log-format json`` or ``DRCTL_LOG_FORMAT=json``: JSON lines), read settings
    from ``DRCTL_*``, and run ``service`` until a stop signal."""
    configure_logging(log_format_option(argv))
    settings = DrctlSettings()

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service(settings, stop)

    asyncio.run(_main())
