"""The one mechanism both platforms batch their whole-state writes with."""

from __future__ import annotations

import asyncio

import pytest

from drctl.platforms.coalesce import Coalescer


async def test_items_asked_for_in_one_turn_are_applied_together_each_with_its_own_answer() -> None:
    batches: list[list[int]] = []

    async def apply(items: list[int]) -> list[int | Exception]:
        batches.append(items)
        return [ValueError(f"{i} is odd") if i % 2 else i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(apply)
    answers = await asyncio.gather(*(coalescer(i) for i in (2, 3, 4)), return_exceptions=True)
    assert batches == [[2, 3, 4]]
    assert answers[0] == 20 and answers[2] == 40
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "3 is odd"
    assert await coalescer(6) == 60 and batches[-1] == [6]  # asked alone: a batch of one


async def test_a_failed_apply_fails_every_item_of_its_batch_and_a_cancelled_caller_spoils_nothing() -> None:
    gate = asyncio.Event()

    async def apply(items: list[str]) -> list[str]:
        await gate.wait()
        if "boom" in items:
            raise OSError("disk full")
        return [i.upper() for i in items]

    coalescer: Coalescer[str, str] = Coalescer(apply)
    first, cancelled = asyncio.ensure_future(coalescer("a")), asyncio.ensure_future(coalescer("b"))
    await asyncio.sleep(0)
    cancelled.cancel()
    gate.set()
    assert await first == "A"
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    results = await asyncio.gather(coalescer("boom"), coalescer("c"), return_exceptions=True)
    assert all(isinstance(r, OSError) and str(r) == "disk full" for r in results)
