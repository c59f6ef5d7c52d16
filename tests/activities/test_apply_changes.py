"""``applied_side_by_side``: a reconciliation pass's batch of changes, made in one activity."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from temporalio.exceptions import ApplicationError

from drctl.activities.reconcile import CHANGE_ATTEMPTS, applied_side_by_side
from drctl.payloads import ChangeBatch, ErrorType, ReconcileAction, ReconcileActionKind, Role, StepReport


def create(instance: str, node: str, tier: Role = Role.HOT) -> ReconcileAction:
    return ReconcileAction(kind=ReconcileActionKind.CREATE, model="m", instance=instance, tier=tier, node=node)


async def test_loads_at_most_loads_per_node_on_one_node_and_the_rest_side_by_side() -> None:
    in_flight: Counter[str] = Counter()
    peaks: Counter[str] = Counter()

    async def change(action: ReconcileAction) -> StepReport:
        key = action.node if action.tier != Role.COLD else "cold"
        assert key is not None
        in_flight[key] += 1
        peaks[key] = max(peaks[key], in_flight[key])
        await asyncio.sleep(0.05)
        in_flight[key] -= 1
        return StepReport(detail=f"made {action.instance}")

    actions = [create(f"a{i}", "node-a") for i in range(5)] + [create(f"b{i}", "node-b") for i in range(2)]
    actions += [create(f"c{i}", "node-a", Role.COLD) for i in range(4)]  # a reservation loads nothing
    outcomes = await applied_side_by_side(ChangeBatch(actions=actions, loads_per_node=2), change)
    assert [o.instance for o in outcomes.outcomes] == [a.instance for a in actions]
    assert all(o.error is None and o.detail == f"made {o.instance}" for o in outcomes.outcomes)
    assert peaks == {"node-a": 2, "node-b": 2, "cold": 4}


async def test_a_failed_change_is_its_outcome_and_a_transient_one_is_tried_again() -> None:
    tries: Counter[str] = Counter()

    async def change(action: ReconcileAction) -> StepReport:
        tries[action.instance] += 1
        if action.instance == "broken":
            raise ApplicationError("does not load", type=ErrorType.MODEL_LOAD_FAILED, non_retryable=True)
        if action.instance == "flaky" and tries["flaky"] == 1:
            raise ConnectionError("pool restarting")
        if action.instance == "down":
            raise TimeoutError("no answer")
        return StepReport(detail="made")

    names = ["ok", "broken", "flaky", "down"]
    batch = ChangeBatch(actions=[create(n, "node-a") for n in names], loads_per_node=4)
    outcomes = {o.instance: o for o in (await applied_side_by_side(batch, change)).outcomes}
    assert outcomes["ok"].detail == "made" and outcomes["flaky"].detail == "made"
    assert (
        outcomes["broken"].error == "ModelLoadFailed: does not load"
        and outcomes["broken"].error_type == ErrorType.MODEL_LOAD_FAILED
    )
    assert outcomes["down"].error == "TimeoutError: no answer" and outcomes["down"].error_type is None
    assert tries == {"ok": 1, "broken": 1, "flaky": 2, "down": CHANGE_ATTEMPTS}


async def test_creates_and_deletes_go_to_the_platform_together_deletes_first_a_failed_one_tried_again_alone() -> None:
    """Where the platform makes many changes at once, the batch's deletes go to it together, then
    its creates; a change whose first try failed transiently is tried again on its own (twice
    more at most), a final error is its outcome at once, and other kinds are made one by one."""
    calls: list[tuple[str, list[str]]] = []
    alone: Counter[str] = Counter()

    def delete(instance: str) -> ReconcileAction:
        return ReconcileAction(kind=ReconcileActionKind.DELETE, model="m", instance=instance, tier=Role.HOT)

    async def together_made(actions: list[ReconcileAction]) -> list[str | Exception]:
        calls.append((actions[0].kind.value, [a.instance for a in actions]))
        results: list[str | Exception] = []
        for a in actions:
            if a.instance in ("flaky", "down"):
                results.append(ConnectionError("pool restarting"))
            elif a.instance == "broken":
                results.append(ApplicationError("bad", type=ErrorType.MODEL_LOAD_FAILED, non_retryable=True))
            else:
                results.append(f"together {a.instance}")
        return results

    async def change(action: ReconcileAction) -> StepReport:
        alone[action.instance] += 1
        if action.instance == "down":
            raise TimeoutError("no answer")
        return StepReport(detail=f"alone {action.instance}")

    def together(action: ReconcileAction) -> Any:
        return together_made if action.kind != ReconcileActionKind.RETIER else None

    retier = ReconcileAction(kind=ReconcileActionKind.RETIER, model="m", instance="wake", tier=Role.HOT, node="n")
    actions = [create("c1", "n"), delete("d1"), create("flaky", "n"), retier, create("broken", "n"), delete("d2")]
    down = create("down", "n")
    outcomes = await applied_side_by_side(ChangeBatch(actions=[*actions, down], loads_per_node=4), change, together)

    assert calls == [("delete", ["d1", "d2"]), ("create", ["c1", "flaky", "broken", "down"])]
    by = {o.instance: o for o in outcomes.outcomes}
    assert [o.instance for o in outcomes.outcomes] == [a.instance for a in [*actions, down]]
    assert by["c1"].detail == "together c1" and by["d2"].detail == "together d2"
    assert by["flaky"].detail == "alone flaky" and alone["flaky"] == 1
    assert by["broken"].error_type == ErrorType.MODEL_LOAD_FAILED and alone["broken"] == 0
    assert by["wake"].detail == "alone wake" and alone["wake"] == 1
    assert by["down"].error == "TimeoutError: no answer" and alone["down"] == CHANGE_ATTEMPTS - 1
