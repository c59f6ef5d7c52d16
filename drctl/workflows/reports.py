"""Runbooks that fail instances over (a zone failover, a GPU drain) do it through the guardians.

They never start ``FailoverWorkflow`` themselves: each failed instance is reported to its model's
guardian, which opens one incident (or joins the one the prober or an alert opened already) and runs
its one runbook within the fleet's budget. The caller then waits for that runbook's end.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from drctl.payloads import (
        ActivityName,
        FailoverOutcome,
        FailoverRequest,
        FailureReport,
        IncidentTickets,
        ReportBatch,
        RunbookIds,
        RunbookOutcomes,
        Trigger,
    )

REPORT_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=5))
"""Reporting retries until it gets through: a recovery is delayed, never dropped."""


async def recover_through_guardians(
    gate: asyncio.Semaphore,
    model: str,
    instance: str,
    trigger: Trigger,
    reason: str,
    recovered: list[str],
    failed: list[str],
    prefer_zone: str | None = None,
    zone_level: bool = False,
) -> None:
    """Report ``instance`` (its failure established by the caller) to its guardian and wait for the
    runbook that recovers it, at most ``gate`` at a time; record ``instance → replacement (outcome)``
    in ``recovered`` or ``failed``."""
    request = FailoverRequest(
        model=model,
        instance=instance,
        trigger=trigger,
        confirmed=True,
        reason=reason[:500],
        prefer_zone=prefer_zone,
    )
    report = FailureReport(request=request, reporter=workflow.info().workflow_id, zone_level=zone_level)
    async with gate:
        try:
            tickets: IncidentTickets = await workflow.execute_local_activity(
                ActivityName.REPORT_FAILURE,
                ReportBatch(reports=[report]),
                result_type=IncidentTickets,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=REPORT_RETRY,
            )
            ticket = tickets.tickets[0]
            outcomes: RunbookOutcomes = await workflow.execute_activity(
                ActivityName.AWAIT_RUNBOOKS,
                RunbookIds(tickets=[ticket]),
                result_type=RunbookOutcomes,
                start_to_close_timeout=timedelta(hours=1),
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=REPORT_RETRY,
            )
        except Exception as exc:
            failed.append(f"{instance}: {exc}")
            return
    end = outcomes.outcomes[0]
    line = f"{instance} → {end.promoted or '-'} ({end.outcome})"
    (recovered if end.outcome == FailoverOutcome.RECOVERED.value else failed).append(line)
