"""Keep-alive HTTP/1.1 GETs for the prober: a connection per instance, kept between probes.

Why not httpx (or aiohttp), which drctl uses everywhere else: the prober sends one or two small GETs
per instance per probe interval, thousands a second at fleet scale, and a general-purpose client's
per-request cost is what limits it. Measured on this project's 2-core machine, client CPU per GET of
a small JSON answer over a kept-alive connection: httpx 1.4 ms, aiohttp 0.6 ms, this module about
0.1 ms (``bench/prober_bench.py``). At 1,000 instances that is the difference between a prober
that needs more than a core and one that needs a tenth of one.

It does only what probing needs: ``GET`` with no request body, a status line, headers, and a body
sized by ``Content-Length`` or chunked (what vLLM's uvicorn, SGLang and the demo server send; read
as :mod:`drctl.platforms.keepalive_http` reads it, which runbook steps use the same way), with
a deadline over the whole exchange. Any error or a missed deadline closes the connection (a hung
server's socket is never reused: the next probe connects again) and raises :class:`ProbeError`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from drctl.platforms.keepalive_http import Connection, ExchangeError, read_body, read_head

LATE_LOOP_MARGIN = 0.1
"""A deadline the event loop reaches later than this share of the timeout was missed by the prober,
not necessarily by the instance (see :class:`_Deadline`)."""


class ProbeError(Exception):
    """The GET did not complete: refused, reset, malformed, or past its deadline."""


@dataclass
class ProbeClient:
    """Connections by ``host:port``; one exchange at a time on each (a lock per address)."""

    _connections: dict[str, Connection] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    late_deadlines: int = 0
    """Deadlines the event loop reached late, each given one more timeout (:class:`_Deadline`)."""

    async def get(self, address: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        """``GET path`` on ``address`` (``host:port``): (status, body). Raises :class:`ProbeError`."""
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:
            try:
                async with _Deadline(timeout_s, self):
                    return await self._exchange(address, path)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, ProbeError, ExchangeError) as exc:
                self._drop(address)
                raise ProbeError(f"GET http://{address}{path}: {type(exc).__name__} {exc}".rstrip()) from exc

    async def _exchange(self, address: str, path: str) -> tuple[int, bytes]:
        connection = self._connections.get(address)
        if connection is None or not connection.usable():
            connection = self._connections[address] = await Connection.open(address)
        connection.writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: */*\r\n\r\n".encode("latin-1"))
        head = await read_head(connection.reader)
        body, close = await read_body(connection.reader, head)
        if close:
            self._drop(address)
        return head.status, body

    def _drop(self, address: str) -> None:
        connection = self._connections.pop(address, None)
        if connection is not None:
            connection.close()

    def forget(self, keep: set[str]) -> None:
        """Close the connections to every address not in ``keep`` (instances no longer probed)."""
        for address in set(self._connections) - keep:
            self._drop(address)
        for address in set(self._locks) - keep:
            self._locks.pop(address, None)

    async def aclose(self) -> None:
        for address in list(self._connections):
            self._drop(address)
        await asyncio.sleep(0)


class _Deadline:
    """``asyncio.timeout``, except that a deadline the event loop itself reached late is extended
    once, by the timeout again, counted from when the loop got to it.

    A busy loop runs its expired timers after the I/O that arrived meanwhile, but the probe's task
    resumes only after the timer has cancelled it: an answer that arrived in time, while the
    prober's loop was busy with a thousand others, read as a timeout. On a 2-core machine with
    2,000 healthy instances and four busy processes beside the prober, that judged 200-250 of them
    failed in 30 s (``bench/prober_bench.py --instances 2000 --busy 4``). A hung instance still
    fails: at most one timeout later, and only while the prober's loop is late."""

    def __init__(self, timeout_s: float, client: ProbeClient) -> None:
        self._timeout_s = timeout_s
        self._client = client
        self._expired = False
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._cancelling = 0

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        assert self._task is not None
        self._cancelling = self._task.cancelling()  # as asyncio.timeout: a cancel from outside stays one
        self._arm(extendable=True)

    def _arm(self, extendable: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        self._handle = loop.call_at(deadline, self._reached, deadline, extendable)

    def _reached(self, deadline: float, extendable: bool) -> None:
        late = asyncio.get_running_loop().time() - deadline
        if extendable and late > LATE_LOOP_MARGIN * self._timeout_s:
            self._client.late_deadlines += 1
            self._arm(extendable=False)
            return
        self._expired = True
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        assert self._handle is not None and self._task is not None
        self._handle.cancel()
        if self._expired and exc_type is asyncio.CancelledError and self._task.uncancel() <= self._cancelling:
            raise TimeoutError(f"no answer within {self._timeout_s:g} s") from exc
