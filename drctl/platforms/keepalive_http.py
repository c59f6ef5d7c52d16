"""Plain HTTP/1.1 over kept-alive loopback connections, for the requests a runbook step makes in a
loop: the hot standby's load check, and verify's look at Envoy's cluster and its completion.

Why not httpx, which drctl uses everywhere else: in a zone failover's batch the worker's event loop
is the bottleneck (every switch waits on it), and httpx (through httpcore and anyio) spent 2-4 ms of
the loop per request: about a sixth of the worker's samples at 1,000 instances (py-spy, thirteenth
session of issue 12). Over a kept-alive connection this module's exchange is about 0.1 ms of client
CPU (the prober's measurement of the same reading code, ``bench/prober_bench.py``).

It does only what those requests need: ``http://`` (loopback: the local platform's instances,
Envoy's listener and admin API), a request with an optional JSON body, an answer sized by
``Content-Length``, chunked, or running to the connection's end. A connection is reused only after
a complete answer that did not say ``Connection: close``; any error, a cancellation or a missed
deadline closes it. A request on a reused connection that the server had closed meanwhile (the
request written, no answer) is tried once more on a new connection, as clients of kept-alive
connections do, and the address's other idle connections are closed with it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_BODY = 1 << 20
"""An answer larger than this fails the exchange (a health answer, a cluster's hosts and a one-token
completion are a few kilobytes)."""
IDLE_PER_ADDRESS = 32
"""Idle connections kept per address; more are closed when handed back."""


class ExchangeError(Exception):
    """The request did not complete: refused, reset, malformed, too large, or past its deadline."""


@dataclass(frozen=True)
class Answer:
    status_code: int
    headers: dict[str, str]
    """Lower-cased names; a repeated header keeps its last value."""
    body: bytes

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def raise_for_status(self) -> None:
        """``ExchangeError`` unless the status is 2xx."""
        if not 200 <= self.status_code < 300:
            raise ExchangeError(f"answered {self.status_code}: {self.text[:200]}")

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` if it is not)."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Head:
    """An answer's status line and the headers that say how its body ends."""

    status: int
    headers: dict[str, str]
    length: int | None
    chunked: bool
    close: bool


async def read_head(reader: asyncio.StreamReader) -> Head:
    """Read an answer's status line and headers. Raises ``ExchangeError`` if it is not HTTP/1.x."""
    status_line = await reader.readuntil(b"\r\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ExchangeError(f"not an HTTP/1.x answer: {status_line[:60]!r}")
    headers: dict[str, str] = {}
    length: int | None = None
    chunked = close = False
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        raw_name, _, raw_value = line.partition(b":")
        name, value = raw_name.strip().lower().decode("latin-1"), raw_value.strip().decode("latin-1")
        headers[name] = value
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif name == "connection":
            close = "close" in value.lower()
    return Head(int(parts[1]), headers, length, chunked, close)


async def read_body(reader: asyncio.StreamReader, head: Head) -> tuple[bytes, bool]:
    """The body ``head`` announces, and whether the connection must be closed after it (no length:
    the body ran to the connection's end). Raises ``ExchangeError`` past ``MAX_BODY``."""
    if head.chunked:
        return await _read_chunked(reader), head.close
    if head.length is not None:
        if head.length > MAX_BODY:
            raise ExchangeError(f"answer of {head.length} bytes")
        return await reader.readexactly(head.length), head.close
    return await reader.read(MAX_BODY), True


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise ExchangeError("chunked answer too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


@dataclass
class Connection:
    """One kept-alive connection (the prober's, one per instance, and :class:`KeepAliveClient`'s)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, address: str) -> Connection:
        """A new connection to ``address`` (``host:port``); ``OSError`` if it cannot be made."""
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    def usable(self) -> bool:
        """Still open at both ends, as far as this side knows."""
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


_FAILURES = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ExchangeError)


@dataclass
class KeepAliveClient:
    """Idle connections by ``host:port``; a request takes one (or opens one) and hands it back."""

    _idle: dict[str, list[Connection]] = field(default_factory=dict)

    async def request(
        self,
        method: str,
        url: str,
        *,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float,
    ) -> Answer:
        """``method url`` (``http://host:port/path?query``) with ``json_body`` (None: no body).
        Raises ``ExchangeError`` (with the cause) on any failure, ``TimeoutError`` past ``timeout_s``."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ExchangeError(f"only http:// URLs: {url!r}")
        address = f"{parts.hostname}:{parts.port or 80}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Accept: */*"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        body = b""
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        async with asyncio.timeout(timeout_s):
            return await self._exchange(address, message, url)

    async def _exchange(self, address: str, message: bytes, url: str) -> Answer:
        while True:
            connection, reused = await self._connection(address)
            answered = False
            try:
                connection.writer.write(message)
                head = await read_head(connection.reader)
                answered = True
                body, close = await read_body(connection.reader, head)
            except BaseException as err:
                connection.close()
                if reused and not answered and isinstance(err, _FAILURES):
                    # Closed by the server while idle (a restart closes them all): once more, on a
                    # new connection.
                    self._close_idle(address)
                    continue
                if isinstance(err, _FAILURES):
                    raise ExchangeError(f"{url}: {type(err).__name__} {err}".rstrip()) from err
                raise
            idle = self._idle.setdefault(address, [])
            if close or len(idle) >= IDLE_PER_ADDRESS:
                connection.close()
            else:
                idle.append(connection)
            return Answer(head.status, head.headers, body)

    async def _connection(self, address: str) -> tuple[Connection, bool]:
        """An idle connection that is still open (reused: True), else a new one."""
        idle = self._idle.get(address, [])
        while idle:
            connection = idle.pop()
            if connection.usable():
                return connection, True
            connection.close()
        try:
            return await Connection.open(address), False
        except OSError as err:
            raise ExchangeError(f"http://{address}: {type(err).__name__} {err}".rstrip()) from err

    def _close_idle(self, address: str) -> None:
        for connection in self._idle.pop(address, []):
            connection.close()

    async def aclose(self) -> None:
        for address in list(self._idle):
            self._close_idle(address)
        await asyncio.sleep(0)
