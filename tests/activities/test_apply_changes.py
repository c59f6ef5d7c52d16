"""``applied_side_by_side``: a reconciliation pass's batch of changes, made in one activity."""

from __future__ import annotations

import asyncio
from collections import Counter

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
