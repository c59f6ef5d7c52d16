"""Shared fixtures: a Temporal time-skipping test server, started once per session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from drctl.temporal.search_attributes import register_search_attributes
from drctl.workers.binaries import find_binary


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    path = find_binary("temporal-test-server")
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=path, data_converter=pydantic_data_converter
    )
    await register_search_attributes(env.client, "default")
    try:
        yield env
    finally:
        await env.shutdown()
