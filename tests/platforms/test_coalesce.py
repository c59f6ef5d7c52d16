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


async def test_items_asked_for_while_a_batch_is_applied_wait_for_it_and_go_together_in_the_next() -> None:
    """A group commit: never two applies at once, and the busier the callers the larger the batch."""
    running, most_at_once = 0, 0
    batches: list[list[int]] = []
    first_started = asyncio.Event()
    release = asyncio.Event()

    async def apply(items: list[int]) -> list[int]:
        nonlocal running, most_at_once
        running += 1
        most_at_once = max(most_at_once, running)
        batches.append(items)
        first_started.set()
        await release.wait()
        running -= 1
        return items

    coalescer: Coalescer[int, int] = Coalescer(apply)
    first = asyncio.ensure_future(coalescer(1))
    await first_started.wait()
    later = [asyncio.ensure_future(coalescer(i)) for i in (2, 3, 4)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert batches == [[1]]  # 2, 3 and 4 wait for the write in flight
    release.set()
    assert await asyncio.gather(first, *later) == [1, 2, 3, 4]
    assert batches == [[1], [2, 3, 4]]
    assert most_at_once == 1


async def test_a_cancelled_apply_cancels_its_callers_and_the_next_call_starts_afresh() -> None:
    started = asyncio.Event()

    async def apply(items: list[int]) -> list[int]:
        started.set()
        await asyncio.sleep(3600)
        return items

    coalescer: Coalescer[int, int] = Coalescer(apply)
    waiting = asyncio.ensure_future(coalescer(1))
    await started.wait()
    queued = asyncio.ensure_future(coalescer(2))
    await asyncio.sleep(0)
    assert coalescer._draining is not None
    coalescer._draining.cancel()  # as the event loop's shutdown does
    for call in (waiting, queued):
        with pytest.raises(asyncio.CancelledError):
            await call
    assert coalescer._draining is None
