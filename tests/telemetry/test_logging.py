"""Logs: one structured line per event (JSON with ``--log-format json``), with workflow and trace ids.

Every long-running command takes ``--log-format`` (``drctl up`` hands it on to the parts it starts),
the services' command lines are real ones (``--help``, unknown options refused), and the lines that
matter carry their ids: a runbook step's line its workflow, activity and trace; the prober's and
the alert receiver's report of a failure the incident's workflow id and the report's trace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from temporalio.testing import ActivityEnvironment
from typer.testing import CliRunner

from drctl.activities.failover import FailoverActivities
from drctl.cli.app import app
from drctl.detectors import alert_receiver
from drctl.detectors.prober import Prober
from drctl.payloads import FailoverRequest, IncidentTicket, Instance, InstanceRef, Role
from drctl.platforms.base import Platform
from drctl.platforms.local.registry import InstanceRegistry
from drctl.policies.loader import load_policy_file
from drctl.service import JsonFormatter
from drctl.settings import DrctlSettings
from drctl.telemetry.tracing import current_trace_id, setup_tracing, span
from drctl.workers.stack import LocalStack
from tests.detectors.tickets import queued_ticket

ROOT = Path(__file__).resolve().parents[2]
POLICY_FILE = ROOT / "examples" / "dr-policy.yaml"
SERVICES = ["drctl.detectors.prober", "drctl.workers.runbook_worker", "drctl.workers.xds_server"]


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without a log format of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "DRCTL_LOG_FORMAT"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class _JsonLines(logging.Handler):
    """Formats each record as it is logged (the span current then is the one the line gets)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@contextmanager
def json_lines(logger_name: str) -> Iterator[list[dict[str, Any]]]:
    handler = _JsonLines()
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- the services' command lines -------------------------------------------------------------------


def _service(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a service module with ``args``, Temporal unreachable (one that started anyway would fail,
    not pass)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(DRCTL_TEMPORAL_ADDRESS="127.0.0.1:1"),
    )


@pytest.mark.parametrize("module", SERVICES)
def test_service_help_prints_help_and_exits_at_once(module: str) -> None:
    """It used to ignore --help and start the real service (which then ran until killed)."""
    started = time.monotonic()
    result = _service(module, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module} [-h] [--log-format {{text,json}}]"), result.stdout
    assert "--log-format" in result.stdout and "DRCTL_" in result.stdout
    assert result.stderr == ""
    assert time.monotonic() - started < 20


def test_service_help_has_its_description() -> None:
    result = _service("drctl.detectors.prober", "--help")
    assert "The health prober" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
    ],
)
def test_service_refuses_a_bad_command_line(args: list[str], message: str) -> None:
    result = _service("drctl.detectors.prober", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "usage: python -m drctl.detectors.prober" in result.stderr


SERVICE_SCRIPT = """
import logging, sys
from drctl.service import run_service

async def service(settings, stop):
    logging.getLogger("drctl.test").info("hello %s", "there", extra={"workflow_id": "failover-x", "model": "m"})

run_service(service, sys.argv[1:], prog="svc", description="A test service.")
"""


@pytest.mark.parametrize(
    ("args", "env", "json_lines_expected"),
    [
        (["--log-format", "json"], {}, True),
        ([], {"DRCTL_LOG_FORMAT": "json"}, True),
        (["--log-format", "text"], {"DRCTL_LOG_FORMAT": "json"}, False),  # the option wins
        ([], {}, False),
    ],
)
def test_run_service_logs_as_asked(args: list[str], env: dict[str, str], json_lines_expected: bool) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVICE_SCRIPT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(**env),
    )
    assert result.returncode == 0, result.stderr
    [line] = [raw for raw in result.stderr.splitlines() if "hello there" in raw]
    if not json_lines_expected:
        assert line.endswith("INFO drctl.test: hello there") and not line.startswith("{")
        return
    record = json.loads(line)
    assert record["message"] == "hello there" and record["level"] == "INFO" and record["logger"] == "drctl.test"
    assert record["workflow_id"] == "failover-x" and record["model"] == "m"


# -- the formatter ---------------------------------------------------------------------------------


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("drctl.prober", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_plain_extras_are_keys_but_never_replace_the_sdk_ids_or_the_basics() -> None:
    activity = {"workflow_id": "failover-a", "workflow_run_id": "r1", "activity_type": "eject_instance"}
    message = f"eject done ({activity})"  # the SDK appends its details to the message
    line = json.loads(
        JsonFormatter().format(
            _record(
                message,
                temporal_activity=activity,
                workflow_id="something-else",
                model="llama-2-7b",
                instance="llama-2-7b-0",
                duration_ms=12.5,
                level="DEBUG",
                payload={"not": "a scalar"},
                skipped=None,
            )
        )
    )
    assert line["message"] == "eject done"
    assert line["workflow_id"] == "failover-a" and line["run_id"] == "r1" and line["activity"] == "eject_instance"
    assert line["model"] == "llama-2-7b" and line["instance"] == "llama-2-7b-0" and line["duration_ms"] == 12.5
    assert line["level"] == "INFO" and "payload" not in line and "skipped" not in line
    assert not {"msg", "args", "pathname", "lineno", "thread", "created"} & set(line)
    plain = json.loads(JsonFormatter().format(_record("opened", workflow_id="failover-b", instance="i")))
    assert plain["workflow_id"] == "failover-b" and plain["instance"] == "i" and plain["message"] == "opened"


class _Platform:
    """What ``promote_standby`` asks of a platform."""

    async def get_instance(self, model: str, instance_id: str) -> Instance:
        return Instance(id=instance_id, model=model, role=Role.HOT)

    async def promote(self, instance: Instance, epoch: int | None) -> str:
        await asyncio.sleep(0.01)
        return f"promoted {instance.id} at epoch {epoch}"


async def test_a_runbook_step_logs_one_line_with_its_workflow_activity_and_trace(tmp_path: Path) -> None:
    tracing = setup_tracing("worker", tmp_path, environ={})
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, workflow_id="failover-llama-2-7b-0", workflow_run_id="run-7", activity_type="promote_standby"
    )
    activities = FailoverActivities(cast(Platform, _Platform()))
    ref = InstanceRef(model="llama-2-7b", instance="llama-2-7b-1", epoch=3)
    try:
        with json_lines("temporalio.activity") as lines, span("test.runbook"):
            trace_id = current_trace_id()
            report = await env.run(activities.promote_standby, ref)
    finally:
        tracing.shutdown()
    assert trace_id is not None
    [line] = lines
    assert line["level"] == "INFO" and line["logger"] == "temporalio.activity"
    assert line["workflow_id"] == "failover-llama-2-7b-0" and line["run_id"] == "run-7"
    assert line["activity"] == "promote_standby" and line["attempt"] == 1
    assert line["trace_id"] == trace_id and "span_id" in line  # the step's own span, in the runbook's trace
    assert line["step"] == "promote" and line["model"] == "llama-2-7b" and line["instance"] == "llama-2-7b-1"
    assert line["epoch"] == 3 and line["duration_ms"] == report.duration_ms and line["duration_ms"] >= 10
    assert line["message"].startswith("promote llama-2-7b/llama-2-7b-1 done in ")
    assert line["message"].endswith(" ms: promoted llama-2-7b-1 at epoch 3")  # without the SDK's dict


# -- the detectors' report lines ---------------------------------------------------------------------


async def test_the_probers_report_line_has_the_incident_and_the_reports_trace(tmp_path: Path) -> None:
    tracing = setup_tracing("prober", tmp_path, environ={})
    down = True
    traces: list[str | None] = []

    async def report(request: FailoverRequest) -> IncidentTicket:
        traces.append(current_trace_id())
        if down:
            raise RuntimeError("Temporal unreachable")
        return queued_ticket(request)

    policy = load_policy_file(POLICY_FILE)
    prober = Prober(policy, InstanceRegistry(tmp_path / "instances.json"), report)
    request = FailoverRequest(model="llama-2-7b", instance="llama-2-7b-0", reason="process exited")
    try:
        with json_lines("drctl.prober") as lines:
            prober.unreported[request.instance] = request
            await prober._report_pending()
            down = False
            await prober._report_pending()
    finally:
        await prober.aclose()
        tracing.shutdown()
    assert not prober.unreported and traces[0] is not None and traces[1] is not None
    failed, opened = lines
    assert failed["level"] == "WARNING" and "could not report llama-2-7b-0 yet" in failed["message"]
    assert failed["trace_id"] == traces[0] and failed["instance"] == "llama-2-7b-0"
    assert opened["message"] == "llama-2-7b-0: opened incident failover-llama-2-7b-0 (queued)"
    assert opened["workflow_id"] == "failover-llama-2-7b-0" and opened["trace_id"] == traces[1]
    assert opened["model"] == "llama-2-7b" and opened["instance"] == "llama-2-7b-0"


def test_the_alert_receivers_event_line_has_the_workflow_and_the_trace(tmp_path: Path) -> None:
    tracing = setup_tracing("alert-receiver", tmp_path, environ={})
    try:
        with json_lines("drctl.alert_receiver") as lines, span("alert.act"):
            trace_id = current_trace_id()
            alert_receiver._event(
                logging.INFO,
                "incident_opened",
                fingerprint="abc",
                model="llama-2-7b",
                instance="llama-2-7b-0",
                workflow_id="failover-llama-2-7b-0",
                alert_to_start_s=0.5,
            )
    finally:
        tracing.shutdown()
    [line] = lines
    assert line["event"] == "incident_opened" and line["workflow_id"] == "failover-llama-2-7b-0"
    assert line["model"] == "llama-2-7b" and line["instance"] == "llama-2-7b-0" and line["trace_id"] == trace_id
    assert json.loads(line["message"])["alert_to_start_s"] == 0.5  # the message is the event, as before


# -- the node agent ----------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_node_agent_logs_json_lines_with_drctl_log_format() -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "drctl.detectors.gpu_node_agent", "--node", "gpu-node-1", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(DRCTL_LOG_FORMAT="json", DRCTL_POLICY=str(POLICY_FILE)),
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the node agent did not answer in 20 s"
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    [startup] = [line for line in stderr.splitlines() if "node agent for gpu-node-1" in line]
    record = json.loads(startup)
    assert record["level"] == "INFO" and record["logger"] == "drctl.node_agent"
    assert record["message"].startswith(f"node agent for gpu-node-1 on http://127.0.0.1:{port}")
    assert all(json.loads(line)["level"] for line in stderr.splitlines() if line.startswith("{"))


def test_the_node_agent_takes_log_format_on_its_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "drctl.detectors.gpu_node_agent", "--node", "n", "--log-format", "xml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "argument --log-format: invalid choice: 'xml'" in result.stderr
    help_ = CliRunner().invoke(app, ["node-agent", "--help"])
    assert "--log-format" in help_.output


# -- drctl's commands --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["up", "worker"])
def test_the_long_running_commands_list_log_format(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--log-format" in result.output and "text|json" in result.output
    refused = CliRunner().invoke(app, [command, "--log-format", "xml"], env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "Invalid value for '--log-format'" in refused.output


def test_drctl_worker_hands_its_log_format_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import drctl.workers.runbook_worker as runbook_worker

    monkeypatch.setenv("DRCTL_POLICY", str(POLICY_FILE))  # drctl worker sets it: restored after the test
    argv: list[list[str]] = []
    monkeypatch.setattr(runbook_worker, "main", lambda args=None: argv.append(list(args or [])))
    assert CliRunner().invoke(app, ["worker", "--log-format", "json"]).exit_code == 0
    assert CliRunner().invoke(app, ["worker"]).exit_code == 0
    assert argv == [["--log-format", "json"], []]


@pytest.mark.parametrize(("log_format", "expected"), [("json", "json"), (None, None)])
def test_drctl_up_hands_its_log_format_to_every_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_format: str | None, expected: str | None
) -> None:
    monkeypatch.delenv("DRCTL_LOG_FORMAT", raising=False)
    settings = DrctlSettings(policy=POLICY_FILE, state_dir=tmp_path)
    stack = LocalStack(settings, load_policy_file(POLICY_FILE), say=lambda _: None, log_format=log_format)
    started: dict[str, dict[str, str]] = {}

    def spawn(name: str, command: list[str], log_name: str, env: dict[str, str] | None = None) -> int:
        started[name] = dict(env or {})
        return 1

    monkeypatch.setattr(stack, "_spawn_part", spawn)
    stack.start_worker()
    stack.start_prober()
    stack.start_alert_receiver()
    stack._start_python_process("xds", "drctl.workers.xds_server")
    node = next(iter(stack.node_agent_ports))
    stack._start_node_agent(node)
    assert set(started) == {"worker", "prober", "alert_receiver", "xds", node}
    assert {name: env.get("DRCTL_LOG_FORMAT") for name, env in started.items()} == dict.fromkeys(started, expected)
