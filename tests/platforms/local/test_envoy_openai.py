"""OpenAI clients, unchanged, through the real Envoy: routing by the JSON body's ``model``.

Two models on three stub OpenAI servers (subprocesses, so they can be ``kill -9``ed): ``alpha``
served by ``a`` with ``b`` as its hot standby, ``beta`` served by ``c``, and ``gamma`` with no
instance at all. The stubs answer ``/v1/completions`` and ``/v1/chat/completions`` in OpenAI's shape
(with ``"stream": true`` as server-sent events, one chunk every ``gap`` seconds) and say which of
them answered. The policy's request timeout is 1 s and its per-try timeout 0.5 s, so a stream of
a few seconds shows that neither cuts a stream that keeps sending.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from drctl.platforms.local.envoy import (
    INSTANCE_HEADER,
    MAX_REQUEST_BODY_BYTES,
    OPENAI_BODY_PATHS,
    Endpoint,
    cluster_hosts,
    health_check_path,
    render_bootstrap,
    write_eds,
)
from drctl.policies.schema import DRPolicy
from tests.platforms.local.test_envoy import HOST, start_envoy, start_process, stop_processes

ALPHA, BETA, GAMMA = "alpha", "beta", "gamma"
POLICY = DRPolicy.model_validate(
    {
        "models": [{"name": ALPHA}, {"name": BETA}, {"name": GAMMA}],
        "loadBalancer": {"requestTimeout": "1s", "retries": {"perTryTimeout": "500ms"}},
    }
)

STUB = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name = sys.argv[1]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"backend": name, "path": self.path})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._send({"backend": name, "path": self.path, "bytes": len(raw)})
        body = json.loads(raw)
        chat = self.path == "/v1/chat/completions"
        n, gap = int(body.get("max_tokens") or 4), float(body.get("gap", 0))
        head = {
            "id": f"cmpl-{name}",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": body["model"],
        }

        def choice(text, finish):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            key = "delta" if body.get("stream") else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

        if not body.get("stream"):
            time.sleep(gap * n)
            text = " ".join(f"{name}{i}" for i in range(n))
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            return self._send({**head, "choices": [choice(text, "length")], "usage": usage, "backend": name})

        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def event(data):
            chunk = f"data: {data}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))  # wfile is unbuffered: one send each

        if chat:
            head["object"] = "chat.completion.chunk"
        try:
            for i in range(n):
                if i:
                    time.sleep(gap)
                event(json.dumps({**head, "choices": [choice(f"{name}{i} ", None)], "sent": time.time()}))
            event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # Envoy cut the stream
            self.close_connection = True

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@dataclass
class Stub:
    name: str
    port: int
    proc: asyncio.subprocess.Process

    def endpoint(self, priority: int) -> Endpoint:
        return Endpoint(host=HOST, port=self.port, priority=priority, instance=self.name)


@dataclass
class Fleet:
    lb_url: str
    admin_url: str
    eds_dir: Path
    stubs: dict[str, Stub]

    def url(self, path: str) -> str:
        return f"{self.lb_url}{path}"


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    procs: list[asyncio.subprocess.Process] = []
    try:
        stubs = {}
        for name in ("a", "b", "c"):
            port, proc = await start_process(STUB, name, procs=procs)
            stubs[name] = Stub(name, port, proc)
        eds_dir = tmp_path / "eds"
        write_eds(eds_dir, ALPHA, [stubs["a"].endpoint(0), stubs["b"].endpoint(1)])
        write_eds(eds_dir, BETA, [stubs["c"].endpoint(0)])
        write_eds(eds_dir, GAMMA, [])
        lb_url, admin_url = await start_envoy(tmp_path, POLICY, eds_dir, procs)
        yield Fleet(lb_url, admin_url, eds_dir, stubs)
    finally:
        await stop_processes(procs)


def _not_found(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "NotFoundError", "param": "model", "code": 404}}


def _events(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


# --- the bootstrap ----------------------------------------------------------------------------------


def test_routes_in_order_and_the_body_filter_only_where_a_body_names_the_model() -> None:
    boot = render_bootstrap(POLICY, listen_host=HOST, listen_port=1, admin_port=2, eds_dir=Path("/x/eds"))
    listener = boot["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == MAX_REQUEST_BODY_BYTES
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.router",
    ]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    models = [ALPHA, BETA, GAMMA]
    assert [r["name"] for r in routes] == [
        *(f"{m}-path" for m in models),
        *(f"{m}-body" for m in models),
        *(f"{m}-header" for m in models),
        "openai-invalid-body",
        "openai-unknown-model",
        "openai-unknown-model-unquoted",
        "openai-no-model",
        "model-list",
        *(f"{m}-object" for m in models),
        "model-object-unknown",
        "unknown-model",
    ]
    # json_to_metadata (which holds the request until its body is whole) runs only on the routes
    # that the headers of a body-routed request can select.
    parsing = [r["name"] for r in routes if "typed_per_filter_config" not in r]
    assert parsing == [
        *(f"{m}-body" for m in models),
        "openai-invalid-body",
        "openai-unknown-model",
        "openai-unknown-model-unquoted",
        "openai-no-model",
    ]


def test_the_health_check_path_is_the_engines_unless_the_policy_sets_one() -> None:
    assert health_check_path(POLICY, ALPHA) == "/health"
    demo = DRPolicy.model_validate({"models": [{"name": ALPHA, "engine": "demo"}]})
    assert health_check_path(demo, ALPHA) == "/health"
    custom = DRPolicy.model_validate({"models": [{"name": ALPHA}], "loadBalancer": {"healthCheck": {"path": "/ready"}}})
    assert health_check_path(custom, ALPHA) == "/ready"


# --- the real Envoy ---------------------------------------------------------------------------------


async def test_the_bodys_model_picks_the_cluster_on_both_paths(fleet: Fleet) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for path in OPENAI_BODY_PATHS:
            for model, backend in ((ALPHA, "a"), (BETA, "c")):
                response = await client.post(fleet.url(path), json={"model": model, "prompt": "hi", "max_tokens": 2})
                assert response.status_code == 200, response.text
                assert (response.json()["backend"], response.json()["model"]) == (backend, model)
                assert response.headers[INSTANCE_HEADER] == backend  # from the EDS hostname

        # application/json with parameters, or no content-type at all; a query string is no matter.
        for headers in ({"content-type": "Application/JSON; charset=utf-8"}, {}):
            response = await client.post(
                fleet.url("/v1/completions?x=1"), content=json.dumps({"model": BETA}).encode(), headers=headers
            )
            assert response.json()["backend"] == "c"

        # Larger than Envoy's default buffer (1 MiB), within MAX_REQUEST_BODY_BYTES.
        big = {"model": BETA, "prompt": "x" * (2 * 1024 * 1024), "max_tokens": 1}
        assert (await client.post(fleet.url("/v1/completions"), json=big)).json()["backend"] == "c"


async def test_path_and_header_routes_still_work_and_the_header_wins(fleet: Fleet) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        by_path = await client.post(fleet.url(f"/v1/models/{ALPHA}/predict"), content=b'{"prompt": "hi"}')
        assert by_path.json() == {"backend": "a", "path": f"/v1/models/{ALPHA}/predict", "bytes": 16}
        by_header = await client.get(fleet.url("/generate"), headers={"model-name": BETA})
        assert by_header.json() == {"backend": "c", "path": "/generate"}
        both = await client.post(
            fleet.url("/v1/completions"), json={"model": ALPHA, "max_tokens": 1}, headers={"model-name": BETA}
        )
        assert both.json()["backend"] == "c"

        # These routes do not read the body: one larger than the body routes take still passes.
        huge = b"x" * (MAX_REQUEST_BODY_BYTES + 1024)
        response = await client.post(fleet.url(f"/v1/models/{ALPHA}/upload"), content=huge)
        assert response.json() == {"backend": "a", "path": f"/v1/models/{ALPHA}/upload", "bytes": len(huge)}
        too_large = await client.post(
            fleet.url("/v1/completions"), content=huge, headers={"content-type": "application/json"}
        )
        assert too_large.status_code == 413
        assert too_large.json()["error"]["code"] == 413

        listing = await client.get(fleet.url("/v1/models"))
        assert [m["id"] for m in listing.json()["data"]] == [ALPHA, BETA, GAMMA]
        # OpenAI's "retrieve model": the object the list has; a name outside the fleet, OpenAI's 404.
        retrieved = await client.get(fleet.url(f"/v1/models/{BETA}"))
        assert retrieved.status_code == 200 and retrieved.json() == listing.json()["data"][1]
        missing = await client.get(fleet.url("/v1/models/nope"))
        assert missing.status_code == 404
        assert missing.json() == _not_found(f"The model does not exist; the fleet serves: {ALPHA}, {BETA}, {GAMMA}.")


async def test_an_unknown_or_missing_model_and_a_bad_body_get_openais_errors(fleet: Fleet) -> None:
    fleet_list = f"{ALPHA}, {BETA}, {GAMMA}"
    no_model = _not_found(f'The request names no model: set "model" in the JSON body to one of: {fleet_list}.')
    unquoted = _not_found(f"The model does not exist; the fleet serves: {fleet_list}.")
    bad = {
        "error": {
            "message": "The request body was not read as JSON: send a JSON object, with the header content-type: "
            "application/json (curl: -H 'content-type: application/json').",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    json_ct = {"content-type": "application/json"}
    cases: list[tuple[bytes, dict[str, str], int, dict[str, Any]]] = [
        (b'{"model": "nope", "prompt": "hi"}', json_ct, 404, _not_found("The model `nope` does not exist.")),
        # Envoy escapes what it quotes, and substitutes nothing inside it.
        (
            b'{"model": "a\\"b%RESPONSE_CODE%"}',
            json_ct,
            404,
            _not_found('The model `a"b%RESPONSE_CODE%` does not exist.'),
        ),
        (b'{"model": 7}', json_ct, 404, _not_found("The model `7` does not exist.")),
        ('{"model": "modèle"}'.encode(), json_ct, 404, unquoted),  # not ASCII: not quoted
        (b'{"prompt": "hi"}', json_ct, 404, no_model),
        (b'{"model": ""}', json_ct, 404, no_model),
        (b'{"model": {"id": "alpha"}}', json_ct, 404, no_model),
        (b'["alpha"]', json_ct, 404, no_model),
        (b"", json_ct, 404, no_model),
        (b'{"model": "alpha", "prompt": ', json_ct, 400, bad),
        (b'{"model": "alpha"}', {"content-type": "text/plain"}, 400, bad),
    ]
    async with httpx.AsyncClient(timeout=5) as client:
        for body, headers, status, expected in cases:
            for path in OPENAI_BODY_PATHS:
                response = await client.post(fleet.url(path), content=body, headers=headers)
                assert (response.status_code, response.json()) == (status, expected), (body, path)
                assert response.headers["content-type"] == "application/json"
        long_name = "m" * 300
        response = await client.post(fleet.url("/v1/completions"), json={"model": long_name})
        assert response.json()["error"]["message"] == f"The model `{long_name[:256]}` does not exist."

        # A fleet model without an instance: routed, and Envoy's 503 in the same shape.
        response = await client.post(fleet.url("/v1/completions"), json={"model": GAMMA})
        assert response.status_code == 503
        assert response.json()["error"] == {
            "message": "no healthy upstream",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[tuple[float, str]]]:
    """POST with ``"stream": true``; every SSE line with the time it arrived."""
    lines: list[tuple[float, str]] = []
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line:
                lines.append((time.time(), line))
    return response, lines


async def test_a_stream_arrives_chunk_by_chunk_past_every_timeout(fleet: Fleet) -> None:
    """8 chunks 0.3 s apart: 2.1 s in all, more than the 1 s request timeout and the 0.5 s per try."""
    count, gap = 8, 0.3
    async with httpx.AsyncClient(timeout=10) as client:
        started = time.time()
        response, lines = await _stream(
            client, fleet.url("/v1/chat/completions"), {"model": ALPHA, "max_tokens": count, "gap": gap}
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = _events([line for _, line in lines])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [f"a{i} " for i in range(count)]
    # Each chunk reached the client as soon as the server sent it, not when the stream ended.
    arrived = [t for t, line in lines if line.startswith("data: {")]
    delays = [t - c["sent"] for t, c in zip(arrived, chunks, strict=True)]
    assert max(delays) < 0.2, delays
    assert arrived[0] - started < 0.5
    assert arrived[-1] - arrived[0] > (count - 2) * gap
    print(f"\nstream: {count} chunks over {arrived[-1] - arrived[0]:.2f} s, max delay {1000 * max(delays):.1f} ms")


async def test_a_silent_stream_is_cut_by_the_idle_timeout(fleet: Fleet) -> None:
    """The request timeout (1 s) bounds the silence: chunks 1.5 s apart are cut after the first.

    Envoy resets the stream at 1 s; the client sees the connection close up to a second later
    (Envoy's delayed close), and never the chunk sent at 1.5 s.
    """
    async with httpx.AsyncClient(timeout=10) as client:
        received: list[str] = []
        started = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            body = {"model": BETA, "max_tokens": 3, "gap": 1.5, "stream": True}
            async with client.stream("POST", fleet.url("/v1/completions"), json=body) as response:
                async for line in response.aiter_lines():
                    received += [line] if line else []
        assert 0.9 < time.monotonic() - started < 2.5
        assert len(received) == 1
        # Not streamed: silent until the whole answer, so 3 x 0.4 s is cut too (per-try 0.5 s: retried, then 504).
        slow = await client.post(fleet.url("/v1/completions"), json={"model": BETA, "max_tokens": 3, "gap": 0.4})
        assert slow.status_code == 504
        assert slow.json()["error"]["type"] == "ServiceUnavailableError"


async def test_a_failover_cuts_the_open_stream_and_new_streams_reach_the_replacement(fleet: Fleet) -> None:
    """``kill -9`` of alpha's serving instance mid-stream, then the EDS move to the standby.

    Envoy retries only until the response headers are sent; a stream already answering is lost in
    flight. Requests after the kill reach ``b`` (the retry to priority 1), and so do those after
    the move.
    """
    url = fleet.url("/v1/chat/completions")
    lost = 0
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream(
            "POST", url, json={"model": ALPHA, "max_tokens": 20, "gap": 0.1, "stream": True}
        ) as response:
            assert response.headers[INSTANCE_HEADER] == "a"
            received: list[str] = []
            try:
                async for line in response.aiter_lines():
                    if line:
                        received.append(line)
                        if len(received) == 2:
                            fleet.stubs["a"].proc.kill()
                            await fleet.stubs["a"].proc.wait()
            except httpx.RemoteProtocolError:
                lost += 1
        assert lost == 1
        assert 2 <= len(received) < 20 and "data: [DONE]" not in received

        right_after = await client.post(url, json={"model": ALPHA, "max_tokens": 1})
        assert right_after.json()["backend"] == "b"

        write_eds(fleet.eds_dir, ALPHA, [fleet.stubs["b"].endpoint(0)])
        deadline = time.monotonic() + 3
        while [(h.instance, h.priority) for h in await cluster_hosts(fleet.admin_url, ALPHA, client)] != [("b", 0)]:
            assert time.monotonic() < deadline, "Envoy did not take the EDS move"
            await asyncio.sleep(0.02)
        response, lines = await _stream(client, url, {"model": ALPHA, "max_tokens": 3, "gap": 0.05})
    assert response.headers[INSTANCE_HEADER] == "b"
    assert _events([line for _, line in lines])[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in _events([x for _, x in lines])[:-1]] == [
        "b0 ",
        "b1 ",
        "b2 ",
    ]


async def test_the_openai_client_unchanged(fleet: Fleet) -> None:
    client = openai.AsyncOpenAI(base_url=fleet.url("/v1"), api_key="x", max_retries=0, timeout=10)
    completion = await client.completions.create(model=ALPHA, prompt="hi", max_tokens=3)
    assert (completion.model, completion.choices[0].text) == (ALPHA, "a0 a1 a2")

    stream = await client.chat.completions.create(
        model=BETA, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True, extra_body={"gap": 0.05}
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "c0 c1 c2 c3 "

    models = [m.id async for m in client.models.list()]
    assert models == [ALPHA, BETA, GAMMA]
    assert (await client.models.retrieve(GAMMA)).id == GAMMA
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")

    with pytest.raises(openai.NotFoundError) as caught:
        await client.completions.create(model="nope", prompt="hi", max_tokens=1)
    assert caught.value.status_code == 404
    assert "The model `nope` does not exist." in str(caught.value)
    await client.close()
