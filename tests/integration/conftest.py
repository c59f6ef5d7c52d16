"""A private local stack (real Temporal dev server, Envoy, demo model processes, worker) per module."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drctl.policies.loader import load_policy_file
from drctl.workers.stack import LocalStack, isolated_settings

EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"


@pytest.fixture(scope="module")
async def local_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    settings = isolated_settings(tmp_path_factory.mktemp("drctl-state"), EXAMPLE_POLICY)
    lines: list[str] = []
    stack = LocalStack(settings, load_policy_file(EXAMPLE_POLICY), say=lines.append)
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()
