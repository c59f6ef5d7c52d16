"""``drctl audit``: past failovers, newest first, from Temporal's visibility store.

Every failover runbook sets search attributes (model, instance, trigger, outcome, tier, RTO), so
the audit is a visibility query, not a log of drctl's own that could drift from the histories.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from temporalio.common import SearchAttributeKey

from drctl.cli.common import EXIT_BAD_INPUT, connect, fail, make_settings, out
from drctl.cli.render import audit_table
from drctl.payloads import FailoverOutcome, SearchAttr
from drctl.policies.durations import parse_duration
from drctl.settings import DrctlSettings


def audit(
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    outcome: Annotated[
        str | None, typer.Option(help="only this outcome: " + ", ".join(o.value for o in FailoverOutcome))
    ] = None,
    since: Annotated[str | None, typer.Option(help="only failovers started within this long, e.g. 1h, 30m, 7d")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """List past failovers from Temporal visibility (search attributes), newest first."""
    query = audit_query(model, outcome, since)
    rows = asyncio.run(audit_rows(make_settings(), query, limit))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    out.print(audit_table(query, rows))


def audit_query(model: str | None, outcome: str | None, since: str | None, now: datetime | None = None) -> str:
    """The visibility query for the filters; exits 2 on a filter that could not be in it safely."""
    from drctl.temporal.refs import workflow_type
    from drctl.workflows.failover import FailoverWorkflow

    clauses = [f"WorkflowType = '{workflow_type(FailoverWorkflow)}'"]
    if model:
        if not model.replace("-", "").replace(".", "").isalnum():
            fail(f"invalid model name {model!r}", EXIT_BAD_INPUT)
        clauses.append(f"{SearchAttr.MODEL} = '{model}'")
    if outcome:
        if outcome not in {o.value for o in FailoverOutcome}:
            fail(f"unknown outcome {outcome!r}; one of {', '.join(o.value for o in FailoverOutcome)}", EXIT_BAD_INPUT)
        clauses.append(f"{SearchAttr.OUTCOME} = '{outcome}'")
    if since:
        try:
            window = parse_duration(since)
        except ValueError as exc:
            fail(f"--since: {exc}", EXIT_BAD_INPUT)
        cutoff = (now or datetime.now(UTC)) - window
        clauses.append(f"StartTime > '{cutoff.strftime('%Y-%m-%dT%H:%M:%SZ')}'")
    return " AND ".join(clauses)


async def audit_rows(settings: DrctlSettings, query: str, limit: int) -> list[dict[str, object]]:
    """One row per failover the query finds: its search attributes, status and times."""
    client = await connect(settings)
    rows: list[dict[str, object]] = []
    keys = {
        "model": SearchAttributeKey.for_keyword(SearchAttr.MODEL),
        "instance": SearchAttributeKey.for_keyword(SearchAttr.INSTANCE),
        "trigger": SearchAttributeKey.for_keyword(SearchAttr.TRIGGER),
        "outcome": SearchAttributeKey.for_keyword(SearchAttr.OUTCOME),
        "tier": SearchAttributeKey.for_keyword(SearchAttr.TIER),
    }
    rto_key = SearchAttributeKey.for_int(SearchAttr.RTO_MS)
    async for wf in client.list_workflows(query, limit=limit):
        attrs = wf.typed_search_attributes
        row: dict[str, object] = {"workflow_id": wf.id, "run_id": wf.run_id}
        row |= {name: attrs.get(key) for name, key in keys.items()}
        row["rto_ms"] = attrs.get(rto_key)
        row["status"] = wf.status.name.lower() if wf.status is not None else None
        row["started"] = wf.start_time.isoformat()
        row["closed"] = wf.close_time.isoformat() if wf.close_time else None
        rows.append(row)
    return rows
