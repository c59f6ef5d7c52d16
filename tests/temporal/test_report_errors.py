"""A report whose update-with-start fails leaves no "Future exception was never retrieved" behind.

temporalio sets the failure on the start operation's handle as well as raising it from the update;
nothing in drctl awaits that handle, and asyncio logged the error again, with a traceback, when the
operation was collected (the alert receiver's log, when a report timed out while the worker was down).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from temporalio.client import WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from drctl.payloads import GuardianState
from drctl.temporal.incidents import _forget_start_error
from drctl.workflows.guardian import ModelGuardianWorkflow


def _operation() -> WithStartWorkflowOperation[Any, Any]:
    return WithStartWorkflowOperation(
        ModelGuardianWorkflow.run,
        GuardianState(model="m"),
        id="guardian-m",
        task_queue="q",
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


async def _logged_after_collection(forget: bool) -> list[str]:
    loop = asyncio.get_running_loop()
    logged: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: logged.append(str(context.get("message"))))
    try:
        operation = _operation()
        operation._workflow_handle.set_exception(RuntimeError("Timeout expired"))  # as the SDK does
        if forget:
            _forget_start_error(operation)
        del operation
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    return logged


async def test_a_failed_reports_start_error_is_not_logged_again() -> None:
    assert any("never retrieved" in line for line in await _logged_after_collection(forget=False))
    assert await _logged_after_collection(forget=True) == []


def test_a_start_still_pending_is_left_alone() -> None:
    async def pending() -> None:
        operation = _operation()
        _forget_start_error(operation)  # not done: nothing to mark, and it must not block or raise
        assert not operation._workflow_handle.done()

    asyncio.run(pending())
