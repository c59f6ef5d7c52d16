"""``--log-format json``: one JSON object a line, with the workflow, activity and trace ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from drctl.service import JsonFormatter, service_parser
from drctl.telemetry.tracing import current_trace_id, setup_tracing, span


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("drctl.worker", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_workflow_activity_and_trace(tmp_path: Path) -> None:
    tracing = setup_tracing("w", tmp_path, environ={})
    activity = {"workflow_id": "failover-x", "workflow_run_id": "r1", "activity_type": "promote_standby"}
    with span("platform.promote"):
        trace_id = current_trace_id()
        line = json.loads(JsonFormatter().format(_record("promoted %s", temporal_activity=activity)))
    tracing.shutdown()
    assert line["level"] == "INFO" and line["logger"] == "drctl.worker" and line["message"] == "promoted %s"
    assert line["workflow_id"] == "failover-x" and line["activity"] == "promote_standby"
    assert line["trace_id"] == trace_id and "time" in line
    workflow = {"workflow_id": "guardian-x", "run_id": "r2", "workflow_type": "ModelGuardianWorkflow"}
    plain = json.loads(JsonFormatter().format(_record("hello", temporal_workflow=workflow)))
    assert plain["workflow_id"] == "guardian-x" and "trace_id" not in plain


def test_log_format_option() -> None:
    assert service_parser().parse_args(["--log-format", "json"]).log_format == "json"
    assert service_parser().parse_args([]).log_format is None
