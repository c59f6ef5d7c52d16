"""What ``drctl failover`` says of its report: a new recovery, one already open, or a failure already
handled (the runbook had ended before the report came: an operator a second behind the prober)."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from drctl.cli import failover as failover_cli
from drctl.payloads import FailoverOutcome, FailoverRequest, IncidentState, IncidentTicket, Trigger
from drctl.settings import DrctlSettings


class Handle:
    id = "failover-llama-llama-0"


@pytest.mark.parametrize(
    ("joined", "state", "outcome", "said"),
    [
        (False, IncidentState.QUEUED, None, "opened a recovery"),
        (True, IncidentState.RUNNING, None, "joined the recovery already open"),
        (
            True,
            IncidentState.DONE,
            FailoverOutcome.RECOVERED,
            "this failure was already handled (the runbook ended recovered); nothing more to do",
        ),
    ],
)
async def test_the_report_says_what_became_of_it(
    monkeypatch: pytest.MonkeyPatch,
    joined: bool,
    state: IncidentState,
    outcome: FailoverOutcome | None,
    said: str,
) -> None:
    ticket = IncidentTicket(
        model="llama",
        instance="llama-0",
        workflow_id=Handle.id,
        joined=joined,
        state=state,
        outcome=outcome,
        opened_at=datetime.now(UTC),
    )

    async def connect(*_: Any) -> object:
        return object()

    async def report(*_: Any, **__: Any) -> IncidentTicket:
        return ticket

    async def handle_of(*_: Any) -> Handle:
        return Handle()

    printed = io.StringIO()
    monkeypatch.setattr(failover_cli, "connect", connect)
    monkeypatch.setattr(failover_cli, "report_failover", report)
    monkeypatch.setattr(failover_cli, "start_failover_handle", handle_of)
    monkeypatch.setattr(failover_cli, "out", Console(file=printed, width=200))
    request = FailoverRequest(model="llama", instance="llama-0", trigger=Trigger.MANUAL)
    await failover_cli._run_failover(DrctlSettings(), request, wait=False, as_json=False)
    assert f"reported to guardian-llama: {said}\n" in printed.getvalue()
