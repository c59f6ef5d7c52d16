"""Changes asked for side by side, applied together: one write for all of them.

Both platforms keep state a change must read and rewrite whole: the local registry file (~150 KB
at 1,000 instances) and the Kubernetes ConfigMap ``drctl-fencing`` (a replace guarded by its
``resourceVersion``). A zone failover's batch asks for hundreds of such changes at once; one write
each cost the local worker a quarter of its samples, and on Kubernetes the claims refused each
other (409) until some ran out of tries. A :class:`Coalescer` is a group commit: what is asked for
in one turn of the event loop is applied in one call, and what is asked for while that call runs
waits for it and goes in the next one, so the busier the caller, the larger each write (and never
two writes of one coalescer racing each other). Each caller gets its own answer or its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """``await coalescer(item)``: ``apply`` gets every item asked for since its last call began (at
    least one turn of the event loop), in order, and answers with one result (or the exception that
    refused it) per item. At most one ``apply`` runs at a time. When ``apply`` itself fails, every
    item of its batch gets that error."""

    def __init__(self, apply: Callable[[list[Item]], Awaitable[Sequence[Result | Exception]]]) -> None:
        self._apply = apply
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._draining: asyncio.Task[None] | None = None
        """Applying batches until none is left (kept so that it is not collected mid-way)."""

    async def __call__(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((item, future))
        if self._draining is None:  # a task's first step runs next turn: this turn's items go with it
            self._draining = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._flush(batch)
        finally:
            self._draining = None
            for _, future in self._pending:  # only when cancelled (the loop closing): nobody waits forever
                future.cancel()
            self._pending = []

    async def _flush(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = list(await self._apply([item for item, _ in batch]))
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as err:  # nothing of the batch was applied
            results = [err] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
