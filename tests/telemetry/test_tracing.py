"""Tracing setup, the JSON-lines span file, and ``drctl trace`` reading it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drctl.cli.app import app
from drctl.cli.trace import traces_of
from drctl.settings import DrctlSettings
from drctl.telemetry.tracing import (
    JsonLinesSpanExporter,
    read_spans,
    set_attributes,
    setup_tracing,
    span,
    traces_dir,
)
from drctl.workers.part_env import part_environment


def _fake_workflow_trace(state: Path) -> str:
    """A trigger span, a workflow span and two activities with platform calls, as the interceptor
    would nest them, written through the real file exporter."""
    tracing = setup_tracing("cli", state, environ={})
    assert tracing.enabled and tracing.destination.endswith("cli.jsonl")
    with span("drctl failover", model="llama", instance="llama-0", trigger="manual"):
        with span("StartWorkflow:FailoverWorkflow") as start:
            start.set_attribute("temporalWorkflowID", "failover-llama-0")
            with span("RunWorkflow:FailoverWorkflow") as run:
                run.set_attribute("temporalWorkflowID", "failover-llama-0")
                for step in ("promote", "register"):
                    with span(f"RunActivity:{step}") as act:
                        act.set_attribute("temporalWorkflowID", "failover-llama-0")
                        with span(f"platform.{step}", model="llama", instance="llama-1", epoch=3) as call:
                            set_attributes(call, tier="hot")
    with span("unrelated"):
        pass
    tracing.shutdown()
    return "failover-llama-0"


def test_file_exporter_writes_one_span_a_line_with_ids_and_attributes(tmp_path: Path) -> None:
    _fake_workflow_trace(tmp_path)
    lines = (traces_dir(tmp_path) / "cli.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 8
    by_name = {r["name"]: r for r in records}
    root, promote = by_name["drctl failover"], by_name["platform.promote"]
    assert root["parent_id"] is None and len(root["trace_id"]) == 32 and len(root["span_id"]) == 16
    assert promote["trace_id"] == root["trace_id"]
    assert promote["parent_id"] == by_name["RunActivity:promote"]["span_id"]
    assert promote["attributes"] == {
        "drctl.model": "llama",
        "drctl.instance": "llama-1",
        "drctl.epoch": 3,
        "drctl.tier": "hot",
    }
    assert promote["end_ns"] >= promote["start_ns"] and promote["service"] == "drctl-cli"
    assert by_name["unrelated"]["trace_id"] != root["trace_id"]


def test_file_exporter_rotates_past_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "traces" / "w.jsonl"
    exporter = JsonLinesSpanExporter(path, max_bytes=2000)
    tracing = setup_tracing("w", tmp_path, environ={}, exporter=exporter)
    for n in range(40):
        with span(f"span-{n}", model="m"):
            pass
        tracing.provider.force_flush()  # type: ignore[union-attr]
    tracing.shutdown()
    assert path.stat().st_size <= 2000
    rotated = path.with_name("w.jsonl.1")
    assert rotated.exists() and rotated.stat().st_size <= 2000
    names = {r["name"] for r in read_spans(path.parent)}
    assert "span-39" in names and "span-0" not in names  # bounded: the oldest are gone


def test_disabled_and_otlp_settings(tmp_path: Path) -> None:
    off = setup_tracing("w", tmp_path, environ={"OTEL_SDK_DISABLED": "true"})
    assert not off.enabled and off.interceptors() == []
    otlp = setup_tracing(
        "w", tmp_path, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SERVICE_NAME": "x"}
    )
    assert otlp.destination == "OTLP/HTTP http://127.0.0.1:1" and len(otlp.interceptors()) == 1
    assert otlp.provider is not None and otlp.provider.resource.attributes["service.name"] == "x"
    otlp.provider.shutdown()


def test_read_spans_skips_a_cut_line(tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"trace_id": "t", "span_id": "s", "name": "ok"}\n{"trace_id": "t", "sp')
    assert [r["name"] for r in read_spans(folder)] == ["ok"]


def test_traces_of_builds_the_tree_of_the_workflow(tmp_path: Path) -> None:
    workflow_id = _fake_workflow_trace(tmp_path)
    trees = traces_of(read_spans(traces_dir(tmp_path)), workflow_id)
    [(_, [root])] = trees.items()
    assert root.record["name"] == "drctl failover"
    [start] = root.children
    [run] = start.children
    assert [c.record["name"] for c in run.children] == ["RunActivity:promote", "RunActivity:register"]
    assert run.children[0].children[0].record["name"] == "platform.promote"


def test_drctl_trace_prints_the_tree_and_json(tmp_path: Path) -> None:
    workflow_id = _fake_workflow_trace(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["trace", workflow_id, "--state-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("drctl failover", "RunWorkflow:FailoverWorkflow", "RunActivity:promote", "platform.register"):
        assert name in result.output
    assert "workflow=failover-llama-0" in result.output and "tier=hot" in result.output and " ms" in result.output
    result = runner.invoke(app, ["trace", workflow_id, "--json", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    [trace] = body["traces"]
    [root] = trace["spans"]
    assert root["name"] == "drctl failover" and root["children"][0]["name"] == "StartWorkflow:FailoverWorkflow"


def test_drctl_trace_says_how_to_turn_tracing_on(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["trace", "nope", "--state-dir", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code != 0
    assert "tracing wrote nothing" in result.output and "OTEL_EXPORTER_OTLP_ENDPOINT" in result.output
    _fake_workflow_trace(tmp_path)
    result = runner.invoke(app, ["trace", "nope", "--state-dir", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code != 0 and "no span of workflow 'nope'" in result.output


@pytest.mark.parametrize("part", ["worker", "prober", "alert_receiver", "node-0"])
def test_stack_parts_get_otel_variables_and_only_exporters_get_the_headers(tmp_path: Path, part: str) -> None:
    settings = DrctlSettings(policy=Path("examples/dr-policy.yaml"), state_dir=tmp_path)
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_SERVICE_NAME": "drctl",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cret",
        "PATH": "/usr/bin",
    }
    env = part_environment(settings, part, node_names=["node-0"], environ=environ)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318" and env["OTEL_SERVICE_NAME"] == "drctl"
    assert ("OTEL_EXPORTER_OTLP_HEADERS" in env) == (part != "node-0")
