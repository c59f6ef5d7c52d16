"""The prober's keep-alive GETs against real sockets: the demo server, and a raw server that answers
with a length, chunked, closing, slowly or never."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from drctl.detectors.http_probe import ProbeClient, ProbeError

HOST = "127.0.0.1"


@dataclass
class RawServer:
    """Answers ``GET /len``, ``/chunked``, ``/close``, ``/hang`` and ``/garbage``; counts connections."""

    port: int = 0
    connections: int = 0
    server: asyncio.Server | None = None
    hung: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                path = request.split(b" ", 2)[1]
                if path == b"/len":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n" + b'{"status":"ok"}')
                elif path == b"/chunked":
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n")
                    writer.write(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
                elif path == b"/close":
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
                    writer.close()
                    return
                elif path == b"/hang":
                    self.hung.append(writer)
                    await asyncio.sleep(3600)
                else:
                    writer.write(b"SSH-2.0-not-http\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


@pytest.fixture
async def client() -> AsyncIterator[ProbeClient]:
    """The prober's client, closed after the test (before the servers it talked to)."""
    made = ProbeClient()
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    made = RawServer()
    made.server = await asyncio.start_server(made.handle, HOST, 0)
    made.port = made.server.sockets[0].getsockname()[1]
    try:
        yield made
    finally:
        made.server.close()
        for writer in made.hung:
            writer.close()


async def test_answers_reuse_one_connection(raw: RawServer, client: ProbeClient) -> None:
    for _ in range(5):
        assert await client.get(raw.address, "/len", 1.0) == (200, b'{"status":"ok"}')
    assert raw.connections == 1
    assert await client.get(raw.address, "/chunked", 1.0) == (503, b"hello world")
    assert raw.connections == 1


async def test_a_closing_answer_is_read_and_the_next_probe_connects_again(raw: RawServer, client: ProbeClient) -> None:
    assert await client.get(raw.address, "/close", 1.0) == (200, b"ok")
    assert await client.get(raw.address, "/len", 1.0) == (200, b'{"status":"ok"}')
    assert raw.connections == 2


async def test_a_hung_server_misses_the_deadline_and_its_connection_is_not_reused(
    raw: RawServer, client: ProbeClient
) -> None:
    began = time.monotonic()
    with pytest.raises(ProbeError, match="TimeoutError"):
        await client.get(raw.address, "/hang", 0.2)
    assert 0.15 < time.monotonic() - began < 1.0
    assert await client.get(raw.address, "/len", 1.0) == (200, b'{"status":"ok"}')
    assert raw.connections == 2


async def test_refused_and_garbage_are_probe_errors(raw: RawServer, client: ProbeClient) -> None:
    with pytest.raises(ProbeError, match="not an HTTP"):
        await client.get(raw.address, "/garbage", 1.0)
    assert raw.server is not None
    raw.server.close()
    await raw.server.wait_closed()
    with pytest.raises(ProbeError):
        await client.get(raw.address, "/len", 1.0)


class _Answering(BaseHTTPRequestHandler):
    """Answers at once, from its own thread: while the test's event loop is blocked."""

    protocol_version = "HTTP/1.1"  # keep-alive

    def do_GET(self) -> None:
        if self.path == "/hang":
            time.sleep(3)
        elif self.path == "/soon":
            time.sleep(0.05)  # after the loop is blocked, well before it is free again
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def threaded() -> Iterator[str]:
    server = ThreadingHTTPServer((HOST, 0), _Answering)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _block_the_loop(seconds: float) -> None:
    """Keep this thread's event loop busy, as a thousand other probes' answers would."""
    asyncio.get_running_loop().call_soon(time.sleep, seconds)


async def test_an_answer_that_came_in_time_while_the_loop_was_busy_is_not_a_timeout(
    threaded: str, client: ProbeClient
) -> None:
    assert await client.get(threaded, "/", 1.0) == (200, b"ok")  # connected: nothing to wait for next
    # Past the deadline; the thread answers meanwhile, so the loop, once free, finds the answer
    # and the expired deadline in the same turn (an answer there before the loop was blocked
    # would be read first, and there would be nothing to test).
    _block_the_loop(0.5)
    assert await client.get(threaded, "/soon", 0.2) == (200, b"ok")
    assert client.late_deadlines == 1


async def test_a_hung_server_still_fails_when_the_loop_was_late_at_its_deadline(
    threaded: str, client: ProbeClient
) -> None:
    assert await client.get(threaded, "/", 1.0) == (200, b"ok")
    began = time.monotonic()
    _block_the_loop(0.5)
    with pytest.raises(ProbeError, match="TimeoutError"):
        await client.get(threaded, "/hang", 0.2)
    # Late at the first deadline (0.5 s blocked), so one more timeout from there, not more.
    assert 0.65 < time.monotonic() - began < 1.5
    assert client.late_deadlines == 1


async def test_a_cancel_from_outside_is_not_turned_into_a_timeout(raw: RawServer, client: ProbeClient) -> None:
    probe = asyncio.create_task(client.get(raw.address, "/hang", 0.2))
    await asyncio.sleep(0.05)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
