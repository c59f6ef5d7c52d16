"""The runbook steps' kept-alive requests against a real socket server: bodies by length, chunked
or to the connection's end, JSON sent, connections reused, a connection the server closed while
idle tried again, and every failure an ``ExchangeError`` or ``TimeoutError`` that is never reused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from drctl.platforms.keepalive_http import MAX_BODY, ExchangeError, KeepAliveClient

HOST = "127.0.0.1"


@dataclass
class Server:
    """Answers by path; records each request's method, headers and body; counts connections."""

    port: int = 0
    connections: int = 0
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((method, target, headers, body))
                if target == "/echo":
                    answer = json.dumps({"method": method, "body": body.decode()}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nX-Served-By: m-1\r\nContent-Length: %d\r\n\r\n" % len(answer))
                    writer.write(answer)
                elif target == "/chunked":
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n")
                    writer.write(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
                elif target == "/to-the-end":
                    writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
                    await writer.drain()
                    writer.close()
                    return
                elif target == "/huge":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
                elif target == "/hang":
                    await asyncio.sleep(3600)
                else:
                    writer.write(b"SSH-2.0-not-http\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def close_idle(self) -> None:
        """Close every connection from the server's side (as a server's idle timeout does)."""
        for writer in self.writers:
            writer.close()
        self.writers.clear()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    listening = await asyncio.start_server(state.handle, HOST, 0)
    state.port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield state
        state.close_idle()


@pytest.fixture
async def client() -> AsyncIterator[KeepAliveClient]:
    http = KeepAliveClient()
    yield http
    await http.aclose()


async def test_requests_one_after_another_share_one_connection_and_json_goes_as_sent(
    server: Server, client: KeepAliveClient
) -> None:
    first = await client.request("POST", server.url("/echo"), json_body={"prompt": "hi"}, timeout_s=2)
    second = await client.request("GET", server.url("/echo"), headers={"model-name": "m"}, timeout_s=2)
    assert first.status_code == 200 and first.json() == {"method": "POST", "body": '{"prompt": "hi"}'}
    assert first.header("x-served-by") == first.header("X-Served-By") == "m-1"
    assert second.json()["method"] == "GET"
    assert server.connections == 1
    method, _, headers, body = server.requests[0]
    assert (method, headers["content-type"], json.loads(body)) == ("POST", "application/json", {"prompt": "hi"})
    assert server.requests[1][2]["model-name"] == "m" and server.requests[1][3] == b""
    assert server.requests[0][2]["host"] == f"{HOST}:{server.port}"


async def test_side_by_side_requests_each_get_a_connection_then_share_them(
    server: Server, client: KeepAliveClient
) -> None:
    await asyncio.gather(*(client.request("GET", server.url("/echo"), timeout_s=2) for _ in range(3)))
    assert server.connections == 3
    await asyncio.gather(*(client.request("GET", server.url("/echo"), timeout_s=2) for _ in range(3)))
    assert server.connections == 3


async def test_chunked_and_to_the_end_bodies(server: Server, client: KeepAliveClient) -> None:
    chunked = await client.request("GET", server.url("/chunked"), timeout_s=2)
    assert (chunked.status_code, chunked.body) == (503, b"hello world")
    with pytest.raises(ExchangeError, match="503"):
        chunked.raise_for_status()
    ended = await client.request("GET", server.url("/to-the-end"), timeout_s=2)
    assert (ended.status_code, ended.text) == (200, "all of it")
    await client.request("GET", server.url("/echo"), timeout_s=2)
    assert server.connections == 2  # the chunked answer's connection kept, the other closed with its body


async def test_a_connection_the_server_closed_while_idle_is_tried_again_on_a_new_one(
    server: Server, client: KeepAliveClient
) -> None:
    await client.request("GET", server.url("/echo"), timeout_s=2)
    server.close_idle()
    await asyncio.sleep(0.05)
    again = await client.request("POST", server.url("/echo"), json_body={"n": 1}, timeout_s=2)
    assert again.json()["method"] == "POST"
    assert server.connections == 2
    assert [r[0] for r in server.requests] == ["GET", "POST"]  # the POST reached the server once


async def test_failures_are_exchange_errors_or_timeouts_and_their_connections_are_not_reused(
    server: Server, client: KeepAliveClient
) -> None:
    with pytest.raises(ExchangeError, match=r"not an HTTP/1\.x answer"):
        await client.request("GET", server.url("/garbage"), timeout_s=2)
    with pytest.raises(ExchangeError, match="answer of"):
        await client.request("GET", server.url("/huge"), timeout_s=2)
    with pytest.raises(TimeoutError):
        await client.request("GET", server.url("/hang"), timeout_s=0.2)
    assert server.connections == 3
    await client.request("GET", server.url("/echo"), timeout_s=2)
    assert server.connections == 4  # none of the failed ones was handed back
    with pytest.raises(ExchangeError, match="ConnectionRefusedError"):
        await client.request("GET", f"http://{HOST}:1/", timeout_s=2)
    with pytest.raises(ExchangeError, match="only http:// URLs"):
        await client.request("GET", "https://example.invalid/", timeout_s=2)
