"""Changes asked for side by side, applied together: one write for all of them.

Both platforms keep state a change must read and rewrite whole: the local registry file (~150 KB
at 1,000 instances) and the Kubernetes ConfigMap ``drctl-fencing`` (a replace guarded by its
``resourceVersion``). A zone failover's batch asks for hundreds of such changes at once; one write
each cost the local worker a quarter of its samples, and on Kubernetes the claims refused each
other (409) until some ran out of tries. A :class:`Coalescer` holds what is asked for until the
next turn of the event loop and applies it all in one call, each caller getting its own answer
or its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """``await coalescer(item)``: ``apply`` gets every item asked for in one turn of the event
    loop, in order, and answers with one result (or the exception that refused it) per item. When
    ``apply`` itself fails, every item of its batch gets that error."""

    def __init__(self, apply: Callable[[list[Item]], Awaitable[Sequence[Result | Exception]]]) -> None:
        self._apply = apply
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        """Batches being applied (kept so that they are not collected mid-way)."""

    async def __call__(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._start_flush, loop)
        self._pending.append((item, future))
        return await future

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            results = list(await self._apply([item for item, _ in batch]))
        except Exception as err:  # nothing of the batch was applied
            results = [err] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
