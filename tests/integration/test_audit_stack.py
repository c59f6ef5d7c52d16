"""``drctl audit show`` and ``audit export`` against a failover on a private local stack, and a run
started with bad input (as from the Temporal UI) shown with its one-line reason."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from drctl.payloads import FailoverOutcome, FailoverRequest, FailoverResult, Role, Trigger
from drctl.temporal.runbooks import start_failover
from drctl.workers.stack import LocalStack

pytestmark = pytest.mark.integration
MODEL = "llama-2-7b"


def _cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    s = stack.settings
    env = {
        **os.environ,
        "DRCTL_POLICY": str(s.policy),
        "DRCTL_STATE_DIR": str(s.state_dir),
        "DRCTL_TEMPORAL_ADDRESS": s.temporal_address,
        "DRCTL_TASK_QUEUE": s.task_queue,
    }
    drctl = str(Path(sys.executable).parent / "drctl")
    return subprocess.run([drctl, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


async def test_audit_show_and_export_tell_the_failover(local_stack: LocalStack) -> None:
    assert local_stack.client is not None
    [victim] = [i.id for i in local_stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]
    handle = await start_failover(
        local_stack.client,
        local_stack.settings,
        FailoverRequest(model=MODEL, instance=victim, reason="audit test", trigger=Trigger.DRILL, confirmed=True),
    )
    result: FailoverResult = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.outcome == FailoverOutcome.RECOVERED

    shown = _cli(local_stack, "audit", "show", handle.id, "--json")
    assert shown.returncode == 0, shown.stderr
    story = json.loads(shown.stdout)
    assert story["model"] == MODEL and story["instance"] == victim and story["trigger"] == "drill"
    assert story["outcome"] == "recovered" and story["standby"] == result.promoted
    assert story["rto_target_ms"] is not None and story["rto_met"] is True
    assert [s["step"] for s in story["steps"]] == [s.step for s in result.steps]
    assert all(s["attempts"] >= 1 for s in story["steps"] if s["activity"])
    text = _cli(local_stack, "audit", "show", handle.id)
    assert text.returncode == 0 and "standby chosen" in text.stdout
    markdown = _cli(local_stack, "audit", "show", handle.id, "--markdown")
    assert markdown.stdout.startswith("## FailoverWorkflow")

    await asyncio.sleep(1.5)  # visibility is eventually consistent
    exported = _cli(local_stack, "audit", "export", "--since", "1h", "--format", "csv")
    assert exported.returncode == 0, exported.stderr
    rows = {r["workflow_id"]: r for r in csv.DictReader(io.StringIO(exported.stdout))}
    row = rows[handle.id]
    assert row["model"] == MODEL and row["outcome"] == "recovered" and row["status"] == "completed"
    assert float(row["duration_ms"]) > 0 and row["rto_ms"]


async def test_bad_input_from_the_ui_fails_with_one_line_and_shows_in_the_audit(local_stack: LocalStack) -> None:
    assert local_stack.client is not None
    handle = await local_stack.client.start_workflow(
        "FailoverWorkflow",
        {"model": "NOPE!", "instance": "x-0"},
        id="failover-bad-input-from-ui",
        task_queue=local_stack.settings.task_queue,
    )
    with pytest.raises(WorkflowFailureError) as caught:
        await asyncio.wait_for(handle.result(), timeout=30)
    message = getattr(caught.value.cause, "message", "")
    assert message.startswith("invalid FailoverRequest: model 'NOPE!'") and "\n" not in message
    await asyncio.sleep(1.5)
    listed = _cli(local_stack, "audit", "--json")
    [row] = [r for r in json.loads(listed.stdout) if r["workflow_id"] == handle.id]
    assert row["failure"].startswith("invalid FailoverRequest: model 'NOPE!'")
    # The filter the "runbook failed" alert points to finds it, though it recorded no outcome.
    failed = _cli(local_stack, "audit", "--outcome", "failed", "--json")
    assert handle.id in [r["workflow_id"] for r in json.loads(failed.stdout)]
    shown = _cli(local_stack, "audit", "show", handle.id)
    assert "invalid FailoverRequest" in shown.stdout and "Traceback" not in shown.stderr
    # A plan changed nothing: not among the failovers, unless asked for.
    [serving] = [i.id for i in local_stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]
    planned = _cli(local_stack, "failover", MODEL, serving, "--plan", "--json")
    assert planned.returncode == 0, planned.stderr
    await asyncio.sleep(1.5)
    plans = [r for r in json.loads(_cli(local_stack, "audit", "--outcome", "planned", "--json").stdout)]
    assert plans and all(r["outcome"] == "planned" for r in plans)
    default = json.loads(_cli(local_stack, "audit", "--json").stdout)
    assert handle.id in [r["workflow_id"] for r in default]  # no outcome recorded: still listed
    assert not {r["workflow_id"] for r in plans} & {r["workflow_id"] for r in default}
    missing = _cli(local_stack, "audit", "show", "no-such-run")
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no workflow 'no-such-run'"
