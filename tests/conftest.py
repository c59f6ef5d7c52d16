"""Shared fixtures: a Temporal time-skipping test server, started once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from drctl.temporal.search_attributes import register_search_attributes
from drctl.workers.binaries import find_binary

# Envoy's endpoint files go in memory (``drctl.settings.memory_folder``), where nothing removes
# those of a stack that was never stopped cleanly (most tests' platforms): the session gives them
# a place of its own, in memory as for a user, and removes it at the end. Set before any stack
# part starts, so that every process of every test agrees on it.
_MEMORY_ROOT = tempfile.mkdtemp(prefix="drctl-tests-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
os.environ.setdefault("DRCTL_MEMORY_ROOT", _MEMORY_ROOT)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_MEMORY_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    async with time_skipping_server() as env:
        yield env


@pytest.fixture
async def own_time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server for one test alone. For a test that skips time on purpose
    (``env.sleep``): on the session's server a skip also fires the timers of the workflows earlier
    tests left running (guardians and budgets never end) on task queues no worker polls any more,
    and their workflow tasks, never taken, can hold the clock still until the skip times out."""
    async with time_skipping_server() as env:
        yield env


@asynccontextmanager
async def time_skipping_server() -> AsyncIterator[WorkflowEnvironment]:
    path = find_binary("temporal-test-server")
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=path, data_converter=pydantic_data_converter
    )
    await register_search_attributes(env.client, "default")
    try:
        yield env
    finally:
        await env.shutdown()
