"""What a guardian answers a detector's report with, for tests that stand in for the guardian."""

from __future__ import annotations

from datetime import UTC, datetime

from drctl.payloads import FailoverRequest, IncidentState, IncidentTicket


def queued_ticket(request: FailoverRequest, joined: bool = False) -> IncidentTicket:
    """The ticket of a new (or, with ``joined``, an already open) incident for ``request``."""
    return IncidentTicket(
        model=request.model,
        instance=request.instance,
        workflow_id=f"failover-{request.instance}",
        joined=joined,
        state=IncidentState.QUEUED,
        opened_at=datetime.now(UTC),
    )
