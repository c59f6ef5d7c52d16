"""``drctl audit show``/``export`` and the audit list's failure column, without a stack: stories built
from histories the time-skipping server records with fake activities, and a fake visibility."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import typer
from rich.console import Console
from temporalio.client import Client, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from drctl.cli import audit
from drctl.cli.audit_story import RunStory, build_story, parse_reporter
from drctl.cli.common import show
from drctl.cli.render import audit_story_lines, audit_story_markdown, audit_table
from drctl.payloads import FailoverRequest, Role, StepTiming, SwitchRecord, Trigger
from drctl.settings import DrctlSettings
from drctl.temporal.converter import drctl_data_converter
from drctl.temporal.history import read_run
from drctl.workflows.failover import FailoverWorkflow
from tests.workflows.fakes import FakeFleet


def drctl_client(env: WorkflowEnvironment) -> Client:
    return Client(**{**env.client.config(), "data_converter": drctl_data_converter})


def text_of(lines: list[Any]) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    show(lines, console)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(output, str)
    return output


@pytest.mark.parametrize(
    ("reporter", "expected"),
    [
        ("alert 3f9ac1 (default)", {"kind": "alert", "fingerprint": "3f9ac1", "receiver": "default"}),
        ("cli ann@ops-1", {"kind": "cli", "user": "ann@ops-1"}),
        ("prober", {"kind": "prober"}),
        ("workflow failover-llama-2-7b-llama-2-7b-0", {"kind": "workflow"}),
        ("drill-kill-serving-20260101", {"kind": "drill", "drill": "drill-kill-serving-20260101"}),
    ],
)
def test_reporters_in_plain_fields(reporter: str, expected: dict[str, str]) -> None:
    parsed = parse_reporter(reporter).model_dump()
    assert {k: parsed[k] for k in expected} == expected


async def test_story_of_a_failover_whose_first_standby_fails(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.WARM))
    fleet.broken.add("llama-2-7b-1")
    client = drctl_client(time_skipping_env)
    queue, workflow_id = f"test-{uuid.uuid4()}", f"failover-llama-2-7b-0-{uuid.uuid4().hex[:6]}"
    async with Worker(client, task_queue=queue, workflows=[FailoverWorkflow], activities=fleet.activities()):
        handle = await client.start_workflow(
            FailoverWorkflow.run,
            FailoverRequest(model="llama-2-7b", instance="llama-2-7b-0", reason="pager", epoch=3),
            id=workflow_id,
            task_queue=queue,
        )
        await handle.signal("joined", "alert 3f9ac1 (default)")
        await handle.result()

    story = build_story(await read_run(client, workflow_id), rto_target_ms=120_000.0)

    assert story.model == "llama-2-7b" and story.instance == "llama-2-7b-0" and story.trigger == "manual"
    assert story.started_by == "started directly with fencing epoch 3"
    assert [r.kind for r in story.reporters] == ["alert"] and story.reporters[0].fingerprint == "3f9ac1"
    assert story.outcome == "recovered"
    assert story.standby == "llama-2-7b-2" and story.standby_tier == "warm"
    assert story.standby_why is not None and "llama-2-7b-1 (hot)" in story.standby_why
    assert "passed over" in story.standby_why
    assert story.rto_met is True and story.rto_target_ms == 120_000.0
    promote = [s for s in story.steps if s.step == "promote"]
    assert [s.ok for s in promote] == [False, True]
    assert promote[0].activity == "promote_standby" and promote[0].attempts == 1
    assert all(s.activity is not None for s in story.steps if s.step not in {"pick"})

    text = text_of(audit_story_lines(story))
    assert "standby chosen llama-2-7b-2 (warm)" in " ".join(text.split())
    assert "against a target of 120.0 s: met" in text
    assert "alert 3f9ac1 via the alert receiver (default)" in text
    assert "✗ promote" in text
    markdown = audit_story_markdown(story)
    assert markdown.startswith(f"## FailoverWorkflow `{workflow_id}`")
    assert "| promote | **failed** | 1 |" in markdown
    assert json.loads(story.model_dump_json())["steps"][0]["step"] == "confirm"


async def test_story_of_bad_input_and_of_another_runbook(time_skipping_env: WorkflowEnvironment) -> None:
    client = drctl_client(time_skipping_env)
    queue = f"test-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, workflows=[FailoverWorkflow], activities=[]):
        handle = await client.start_workflow(
            "FailoverWorkflow",
            {"model": "NOPE!", "instance": "x-0"},
            id=f"bad-{uuid.uuid4().hex[:6]}",
            task_queue=queue,
        )
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    story = build_story(await read_run(client, handle.id))
    assert story.status == "failed" and story.outcome == "failed"
    assert story.outcome_reason is not None and story.outcome_reason.startswith(
        "invalid FailoverRequest: model 'NOPE!'"
    )
    assert story.model == "NOPE!"
    assert "invalid FailoverRequest" in text_of(audit_story_lines(story))


async def test_unknown_workflow_exits_1_with_one_line(
    time_skipping_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def connect(settings: DrctlSettings) -> Client:
        return drctl_client(time_skipping_env)

    monkeypatch.setattr(audit, "connect", connect)
    with pytest.raises(typer.Exit) as caught:
        await audit.read_story(DrctlSettings(), "no-such-workflow", None)
    assert caught.value.exit_code == 1


class FakeExecution:
    def __init__(self, index: int, failed: bool = False) -> None:
        from temporalio.client import WorkflowExecutionStatus
        from temporalio.common import TypedSearchAttributes

        self.id, self.run_id, self.workflow_type = f"failover-m-{index}", f"run-{index}", "FailoverWorkflow"
        self.status = WorkflowExecutionStatus.FAILED if failed else WorkflowExecutionStatus.COMPLETED
        self.start_time = datetime(2026, 1, 1, 0, 0, index % 60, tzinfo=UTC)
        self.close_time = datetime(2026, 1, 1, 0, 1, index % 60, tzinfo=UTC)
        from temporalio.common import SearchAttributePair

        pairs = [SearchAttributePair(audit.KEYS["model"], "m"), SearchAttributePair(audit.RTO_KEY, 1234)]
        self.typed_search_attributes = TypedSearchAttributes([] if failed else pairs)


async def test_export_streams_rows_as_pages_come(monkeypatch: pytest.MonkeyPatch) -> None:
    pulled: list[int] = []

    async def rows() -> AsyncIterator[dict[str, Any]]:
        for index in range(250):
            pulled.append(index)
            yield audit.visibility_row(FakeExecution(index))  # type: ignore[arg-type]

    class Sink(io.StringIO):
        def write(self, text: str) -> int:
            assert len(pulled) <= 1 + self.getvalue().count("\n"), "rows were gathered before writing"
            return super().write(text)

    sink = Sink()
    assert await audit.write_rows(rows(), "csv", sink) == 250
    table = list(csv.DictReader(io.StringIO(sink.getvalue())))
    assert len(table) == 250
    assert table[0]["model"] == "m" and table[0]["rto_ms"] == "1234" and table[0]["duration_ms"] == "60000.0"
    assert table[0]["workflow_type"] == "FailoverWorkflow" and table[0]["failure"] == ""
    lines = io.StringIO()
    pulled.clear()
    assert await audit.write_rows(rows(), "jsonl", lines) == 250
    assert json.loads(lines.getvalue().splitlines()[1])["workflow_id"] == "failover-m-1"


def test_export_query_covers_every_runbook_since_the_window() -> None:
    query = audit.export_query("30d", now=datetime(2026, 2, 1, tzinfo=UTC))
    for name in ("FailoverWorkflow", "ZoneFailoverWorkflow", "DrainGpuWorkflow", "ReconcileStandbysWorkflow"):
        assert f"WorkflowType = '{name}'" in query
    assert "ModelGuardianWorkflow" not in query
    assert query.endswith("AND StartTime > '2026-01-02T00:00:00Z'")


def test_a_run_that_failed_on_bad_input_shows_why_not_dashes() -> None:
    row = audit.visibility_row(FakeExecution(1, failed=True))  # type: ignore[arg-type]
    row["failure"] = "invalid FailoverRequest: model 'NOPE!': string should match pattern"
    output = text_of([audit_table("q", [row])])
    assert "invalid FailoverRequest: model 'NOPE!'" in output


async def test_story_of_a_switch_recorded_for_a_zone_failovers_batch(time_skipping_env: WorkflowEnvironment) -> None:
    """A zone failover switched llama in its batch; the record's story has the batch's steps, the
    standby, the RTO, and says it was the zone failover's switch (not a run "started directly")."""
    client = drctl_client(time_skipping_env)
    queue, workflow_id = f"test-{uuid.uuid4()}", f"failover-llama-2-7b-0-{uuid.uuid4().hex[:6]}"
    began = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
    steps = [
        StepTiming(step="pick", started_at=began, duration_ms=0.0, detail="hot standby llama-2-7b-1, epoch 4"),
        StepTiming(step="promote", started_at=began, duration_ms=3.0, activity_ms=2.5, detail="promoted"),
        StepTiming(step="verify", started_at=began + timedelta(milliseconds=3), duration_ms=40.0, detail="200"),
        StepTiming(step="eject", started_at=began + timedelta(milliseconds=43), duration_ms=2.0, detail="ejected"),
    ]
    record = FailoverRequest(
        model="llama-2-7b",
        instance="llama-2-7b-0",
        trigger=Trigger.ZONE_FAILOVER,
        confirmed=True,
        epoch=4,
        switched=SwitchRecord(
            standby="llama-2-7b-1",
            epoch=4,
            steps=steps,
            started_at=began,
            verified_at=began + timedelta(milliseconds=43),
            handled_by="zone-failover-az-1",
        ),
    )
    async with Worker(client, task_queue=queue, workflows=[FailoverWorkflow]):
        result = await client.execute_workflow(FailoverWorkflow.run, record, id=workflow_id, task_queue=queue)
    assert result.outcome == "recovered" and result.rto_ms == 43.0 and result.switch_ms == 43.0
    story = build_story(await read_run(client, workflow_id), rto_target_ms=120_000.0)
    assert story.trigger == "zone-failover" and story.outcome == "recovered"
    assert story.started_by.startswith("the zone failover zone-failover-az-1, which switched it in its batch")
    assert [s.step for s in story.steps] == ["pick", "promote", "verify", "eject"]
    assert story.standby == "llama-2-7b-1" and story.standby_tier == "hot" and story.rto_met is True


@pytest.mark.parametrize(
    ("rto_ms", "target_ms", "met", "says"),
    [
        (800.0, 30_000.0, True, "800 ms against a target of 30.0 s: met"),
        (45_000.0, 30_000.0, False, "45.0 s against a target of 30.0 s: MISSED"),
        (800.0, None, None, "800 ms (no target known for the model)"),
        (None, 30_000.0, None, "none measured (nothing was recovered); the model's target is 30.0 s"),
    ],
)
def test_the_rto_line_says_what_was_measured_and_against_what(
    rto_ms: float | None, target_ms: float | None, met: bool | None, says: str
) -> None:
    """A false alarm has a target but no RTO: it must not read "against a target of 30 s: no target"."""
    story = RunStory(
        workflow_id="failover-x", run_id="r", workflow_type="FailoverWorkflow", status="completed",
        rto_ms=rto_ms, rto_target_ms=target_ms, rto_met=met,
    )  # fmt: skip
    text = " ".join(text_of(audit_story_lines(story)).split())
    assert f"RTO {says}" in text
    assert "no target known against" not in text and "against a target of - " not in text
