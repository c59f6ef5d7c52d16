"""Determinism guard: every recorded history replays against the current workflow classes.

A workflow running in production when a new worker is deployed is replayed by the new code: if the
new code issues other commands than the history recorded (an activity added, dropped or moved, a
timer, a child, a different branch), the workflow task fails with a ``NondeterminismError`` and the
run is stuck. The histories in this folder (``record.py``, ``make histories``) are representative
runs of every workflow the worker registers; a change to a workflow that would break them fails
here. Change workflows with ``workflow.patched`` (docs/workflows.md), not by re-recording.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

import drctl.workflows
from drctl.payloads import ActivityName, FailoverRequest, FailoverResult, InstanceList, InstanceRef, ModelRef
from drctl.temporal.converter import drctl_data_converter
from drctl.workers.runbook_worker import WORKFLOWS
from drctl.workflows.failover import FailoverWorkflow, R
from tests.histories import REPLAY_QUEUE_PREFIX, workflow_type
from tests.histories.before_patches import BEFORE_PATCHES

HERE = Path(__file__).resolve().parent
WORKFLOWS_DIR = Path(drctl.workflows.__file__).resolve().parent
MANIFEST: dict[str, dict[str, str]] = json.loads((HERE / "manifest.json").read_text())


def history(name: str) -> WorkflowHistory:
    return WorkflowHistory.from_json(MANIFEST[name]["workflow_id"], (HERE / f"{name}.json").read_text())


def replayer(name: str, *workflows: type) -> Replayer:
    """A replayer of the worker's workflows (or the ones given) for history ``name``.

    The SDK's ``Replayer`` runs workflows on task queue ``replay-<build_id>``; the histories were
    recorded on ``replay-<scenario>`` (``record.py``), so ``build_id`` makes
    ``workflow.info().task_queue`` what it was when recorded: reconciliation names its pass (a
    child workflow, whose ID replay checks) after the task queue."""
    queue = MANIFEST[name]["task_queue"]
    assert queue.startswith(REPLAY_QUEUE_PREFIX), f"{name} was recorded on {queue}: re-record it (make histories)"
    return Replayer(
        workflows=list(workflows) or WORKFLOWS,
        data_converter=drctl_data_converter,
        build_id=queue.removeprefix(REPLAY_QUEUE_PREFIX),
    )


def test_every_history_is_in_the_manifest_and_every_workflow_has_one() -> None:
    files = {p.stem for p in HERE.glob("*.json")} - {"manifest"}
    assert files == set(MANIFEST), "run `make histories` (tests/histories/record.py) to bring them in line"
    recorded = {entry["workflow_type"] for entry in MANIFEST.values()}
    registered = {workflow_type(cls) for cls in WORKFLOWS}
    assert registered <= recorded, f"no recorded history of {sorted(registered - recorded)}: add a scenario"


def patch_ids() -> set[str]:
    """Every ``workflow.patched(ID)`` / ``workflow.deprecate_patch(ID)`` in drctl/workflows (ID a
    module constant or a string)."""
    found = set()
    for path in sorted(WORKFLOWS_DIR.glob("*.py")):
        module = importlib.import_module(f"drctl.workflows.{path.stem}")
        for arg in re.findall(r"workflow\.(?:patched|deprecate_patch)\(\s*([^)]+?)\s*\)", path.read_text()):
            found.add(ast.literal_eval(arg) if arg[0] in "'\"" else getattr(module, arg))
    return found


def test_every_patch_has_a_run_recorded_from_before_it() -> None:
    """A new ``workflow.patched`` branch needs a history of a run that started before it (the old
    code in ``before_patches.py``, a scenario in ``record.py``): that is the run it exists for."""
    covered = {entry.get("before_patch") for entry in MANIFEST.values()}
    assert patch_ids() == set(BEFORE_PATCHES), "add the workflow as it was before the patch to before_patches.py"
    assert patch_ids() <= covered, f"no run recorded from before {sorted(patch_ids() - covered)}"


@pytest.mark.parametrize("name", sorted(MANIFEST))
async def test_recorded_history_replays(name: str) -> None:
    """Fails with the history's name and the SDK's ``NondeterminismError`` when it does not."""
    await replayer(name).replay_workflow(history(name))


# -- the guard fails when it should -----------------------------------------------------------------


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class LoadsAfterRegistering(FailoverWorkflow):
    """An edit without a patch: the promoted standby is registered before it is loaded."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    async def _load(self, ref: InstanceRef, long: bool) -> None:
        self._deferred_load = ref  # loaded after the register (below); the history has the load first

    async def _step(
        self, step: str, activity: str, arg: BaseModel | None, result_type: type[R], *args: Any, **kwargs: Any
    ) -> R:
        out = await super()._step(step, activity, arg, result_type, *args, **kwargs)
        if step == "register":
            await super()._load(self._deferred_load, long=True)
        return out


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class ListsWithoutThePatch(FailoverWorkflow):
    """The branch that ``workflow.patched("failover-listing-as-activity")`` guards, dropped: the
    listing is a local activity again, as before the patch. The recorded run took the patched branch
    (its history holds the patch marker and a scheduled activity); this code issues neither."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    async def _list_step(self, model: str) -> InstanceList:
        listing: InstanceList = await workflow.execute_local_activity(
            ActivityName.LIST_INSTANCES,
            ModelRef(model=model),
            result_type=InstanceList,
            start_to_close_timeout=timedelta(seconds=10),
        )
        return listing


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class WithoutReplenish(FailoverWorkflow):
    """A step dropped: the failover no longer asks reconciliation to replenish."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    async def _replenish(self, model: str) -> None:
        return None


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class OldBranchDropped(FailoverWorkflow):
    """The patch's old branch removed while runs from before it may still run (what
    ``deprecate_patch`` is for, and only once none is left): the listing always the recorded one."""

    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)

    async def _list_step(self, model: str) -> InstanceList:
        return await self._step("list", ActivityName.LIST_INSTANCES, ModelRef(model=model), InstanceList, long=True)


@pytest.mark.parametrize(
    ("changed", "name", "says"),
    [
        (LoadsAfterRegistering, "failover-hot-regular", "'load_model' does not match activity type"),
        (ListsWithoutThePatch, "failover-hot", "patch marker encountered for change failover-listing-as-activity"),
        (WithoutReplenish, "failover-hot-regular", "ActivityTaskScheduled"),
        (OldBranchDropped, "failover-hot-before-patch", "Missing associated machine for LocalActivity"),
    ],
)
async def test_a_changed_workflow_fails_to_replay(changed: type, name: str, says: str) -> None:
    """What CI would report for each of these edits, had it been made to ``FailoverWorkflow``."""
    result = await replayer(name, changed).replay_workflow(history(name), raise_on_replay_failure=False)
    assert isinstance(result.replay_failure, workflow.NondeterminismError), result.replay_failure
    assert says in str(result.replay_failure)


@workflow.defn(name="FailoverWorkflow", sandboxed=False)
class Unchanged(FailoverWorkflow):
    @workflow.run
    async def run(self, request: FailoverRequest) -> FailoverResult:
        return await super().run(request)


@pytest.mark.parametrize("name", ["failover-hot-regular", "failover-hot"])
async def test_the_unchanged_subclass_replays(name: str) -> None:
    """The failures above come from the changes, not from replaying a subclass of the workflow."""
    await replayer(name, Unchanged).replay_workflow(history(name))
