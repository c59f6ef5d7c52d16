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
LOG_FORMATS = ("text", "json")
LOG_FORMAT_HELP = (
    "text, or json: one JSON object a line, with workflow and trace ids (default: $DRCTL_LOG_FORMAT, else text)"
)
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "temporal_workflow",
    "temporal_activity",
    "workflow_info",
    "activity_info",
}
"""What every record has (and what a formatter adds to it): the rest is a caller's ``extra``."""


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``message``; the workflow or activity
    (the SDK's ``workflow.logger``/``activity.logger`` extras ``temporal_workflow``/``temporal_activity``:
    ``workflow_id``, ``run_id``, ``workflow_type``, ``activity``, ``activity_id``, ``attempt``); the
    trace and span ids when a span is current; every plain ``extra`` whose value is a string, number
    or boolean (``extra={"workflow_id": ..., "model": ..., "instance": ...}``) under its own name,
    except that it never replaces a key set above; ``exception`` with the traceback.

    The SDK's loggers also append their details to the message (``... ({'workflow_id': ...})``):
    the line has them as keys, so the message is given without that suffix."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        workflow = getattr(record, "temporal_workflow", None)
        if isinstance(workflow, dict):
            line["message"] = _without_details(message, workflow)
            line["workflow_id"] = workflow.get("workflow_id")
            line["run_id"] = workflow.get("run_id")
            line["workflow_type"] = workflow.get("workflow_type")
        activity = getattr(record, "temporal_activity", None)
        if isinstance(activity, dict):
            line["message"] = _without_details(message, activity)
            line["workflow_id"] = activity.get("workflow_id")
            line["run_id"] = activity.get("workflow_run_id")
            line["workflow_type"] = activity.get("workflow_type")
            line["activity"] = activity.get("activity_type")
            line["activity_id"] = activity.get("activity_id")
            line["attempt"] = activity.get("attempt")
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = f"{context.trace_id:032x}"
            line["span_id"] = f"{context.span_id:016x}"
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRIBUTES or key.startswith("_") or line.get(key) is not None:
                continue
            if value is None or isinstance(value, str | int | float | bool):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps({k: v for k, v in line.items() if v is not None}, default=str)


def _without_details(message: str, details: dict[str, Any]) -> str:
    """``message`` less the `` ({...})`` the SDK's logger adapters append (their extra, as a dict)."""
    return message.removesuffix(f" ({details})")


def configure_logging(log_format: str | None = None) -> None:
    """Log to stderr as text, or as JSON lines with ``json`` (default: ``DRCTL_LOG_FORMAT``, else text)."""
    chosen = (log_format or os.environ.get("DRCTL_LOG_FORMAT") or "text").strip().lower()
    if chosen not in ("text", "json"):
        raise SystemExit(f"error: unknown log format {chosen!r} (text or json)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe request is noise


def add_log_format_option(parser: argparse.ArgumentParser) -> None:
    """``--log-format text|json`` on a process's command line (for :func:`configure_logging`)."""
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None, help=LOG_FORMAT_HELP)


def service_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """The command line of a service: ``--help`` and ``--log-format``; its settings are ``DRCTL_*``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Settings come from DRCTL_* environment variables (README: Configuration). Stops on SIGINT or SIGTERM.",
    )
    add_log_format_option(parser)
    return parser


def run_service(
    service: Service,
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
) -> None:
    """Parse the command line ``argv`` (default ``sys.argv[1:]``: ``--help`` prints ``description``
    and exits 0, an unknown option exits 2), log to stderr (``--log-format json`` or
    ``DRCTL_LOG_FORMAT=json``: JSON lines), read settings from ``DRCTL_*``, and run ``service``
    until a stop signal."""
    args = service_parser(prog, description).parse_args(argv)
    configure_logging(args.log_format)
    settings = DrctlSettings()

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service(settings, stop)

    asyncio.run(_main())
