"""The stand-in's OpenAI API, driven by the official ``openai`` client as a vLLM fleet's clients drive it.

Completions and chat completions, streamed and not; the errors the client turns into exceptions
(unknown model, bad request, not serving); the model list as the readiness signal; and a stream
cut by the server's death, which the client must see as an error, not as a clean end.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from drctl.platforms.local.checkpoints import ensure_checkpoint
from tests.sim.test_inference_server import CKPT_SIZE, MODEL, Server, demo_server

STREAM_DELAY_MS = 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checkpoints") / f"{MODEL}.ckpt"
    ensure_checkpoint(path, MODEL, CKPT_SIZE)
    return path


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One loaded, awake server (streaming ``STREAM_DELAY_MS`` per token) for the tests that leave it so."""
    logs = tmp_path_factory.mktemp("logs")
    with demo_server(checkpoint, logs, "--token-delay-ms", str(STREAM_DELAY_MS)) as ready:
        ready.wait_until("ready")
        yield ready


def openai_client(server: Server) -> openai.OpenAI:
    # No retries: the client would retry 503s and broken connections, hiding what the server said.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=10.0)


@pytest.fixture()
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai_client(server) as c:
        yield c


# -- completions -------------------------------------------------------------------------------


def test_verify_completion_is_one_token(client: openai.OpenAI, server: Server) -> None:
    """What drctl's verify sends (EngineProfile.completion): one token of "ping"."""
    completion = client.completions.create(model=MODEL, prompt="ping", max_tokens=1)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.model == MODEL
    assert abs(completion.created - time.time()) < 60
    [choice] = completion.choices
    assert choice.index == 0
    assert len(choice.text.split()) == 1
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (1, 1)
    assert completion.usage.total_tokens == 2


def test_completion_honours_max_tokens_and_is_deterministic(client: openai.OpenAI, server: Server) -> None:
    prompt = "fail over, please"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7)
    assert first.choices[0].text == again.choices[0].text
    assert len(first.choices[0].text.split()) == 7
    assert first.usage is not None and first.usage.completion_tokens == 7
    assert first.id != again.id
    # The same text the demo predict API gives, so old and new paths agree.
    predict = server.post(f"/v1/models/{MODEL}/predict", json={"prompt": prompt, "max_tokens": 7})
    assert predict.json()["text"] == first.choices[0].text
    # vLLM's default max_tokens for completions is 16.
    default = client.completions.create(model=MODEL, prompt=prompt)
    assert len(default.choices[0].text.split()) == 16


def test_completion_of_several_prompts_and_choices(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt=["one", "two"], n=2, max_tokens=3)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    texts = [c.text for c in completion.choices]
    assert len(set(texts)) == 4
    single = client.completions.create(model=MODEL, prompt="two", max_tokens=3)
    assert texts[2] == single.choices[0].text  # choice index = prompt index * n + i
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    tokens = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 3


def test_model_may_be_omitted_as_vllm_allows(server: Server) -> None:
    response = server.post("/v1/completions", json={"prompt": "ping", "max_tokens": 1})
    assert response.status_code == 200
    assert response.json()["model"] == MODEL


def test_request_id_header_names_the_completion(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt="ping", max_tokens=1, extra_headers={"X-Request-Id": "drill-42"}
    )
    assert completion.id == "cmpl-drill-42"


# -- chat completions --------------------------------------------------------------------------


def test_chat_completion(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are a failover drill."},
        {"role": "user", "content": "Say something."},
    ]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert chat.object == "chat.completion"
    assert chat.id.startswith("chatcmpl-")
    assert chat.model == MODEL
    [choice] = chat.choices
    assert choice.message.role == "assistant"
    assert choice.message.content is not None and len(choice.message.content.split()) == 5
    assert choice.finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 5

    # max_completion_tokens wins over max_tokens; no limit at all: the fake model stops by itself.
    newer = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=2, max_tokens=9)
    assert newer.choices[0].message.content is not None and len(newer.choices[0].message.content.split()) == 2
    unbounded = client.chat.completions.create(model=MODEL, messages=messages)
    assert unbounded.choices[0].finish_reason == "stop"
    assert unbounded.usage is not None and unbounded.usage.completion_tokens == 16

    two = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == choice.message.content != two.choices[1].message.content


def test_chat_accepts_content_parts(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}], max_tokens=2
    )
    assert chat.usage is not None and chat.usage.prompt_tokens == 3  # "user: hello there"


# -- streaming ---------------------------------------------------------------------------------


def test_completion_stream_arrives_token_by_token(client: openai.OpenAI) -> None:
    tokens = 20
    started = time.monotonic()
    stream = client.completions.create(model=MODEL, prompt="stream me", max_tokens=tokens, stream=True)
    arrivals: list[float] = []
    chunks = []
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        chunks.append(chunk)
    assert len(chunks) == tokens
    assert all(c.object == "text_completion" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (tokens - 1) + ["length"]
    # Each chunk left the server as it was made: they came in over the whole generation (at least
    # (tokens - 1) delays apart, half that allowed for a busy machine), not at once at the end.
    spread = arrivals[-1] - arrivals[0]
    assert spread >= (tokens - 1) * STREAM_DELAY_MS / 1000 * 0.5, arrivals
    assert arrivals[0] < arrivals[-1] / 2, arrivals
    whole = client.completions.create(model=MODEL, prompt="stream me", max_tokens=tokens)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_chat_stream_deltas_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first, *tokens, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert len(tokens) == 4
    assert [c.choices[0].finish_reason for c in tokens] == [None, None, None, "length"]
    text = "".join(c.choices[0].delta.content or "" for c in tokens)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert text == whole.choices[0].message.content
    assert usage.choices == []
    assert usage.usage is not None and usage.usage.completion_tokens == 4
    assert whole.usage is not None and usage.usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_wire_format(server: Server) -> None:
    """Exactly what vLLM sends: text/event-stream, ``data: {json}\\n\\n`` events, ``data: [DONE]``,
    HTTP/1.1 chunked with the body properly terminated, and the connection kept alive after it."""
    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"model": MODEL, "prompt": "wire", "max_tokens": 2, "stream": True}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while not received.endswith(b"x-drctl-instance: " + f"{MODEL}-0".encode() + b"\r\n\r\n") or (
            received.count(b"HTTP/1.1 200") < 2
        ):
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
    head, chunked = received.split(b"\r\n\r\n", 1)
    assert b"content-type: text/event-stream; charset=utf-8" in head.lower()
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"content-length" not in head.lower()
    events: list[bytes] = []
    while True:
        size_line, chunked = chunked.split(b"\r\n", 1)
        size = int(size_line, 16)
        assert chunked[size : size + 2] == b"\r\n"
        if size == 0:  # the terminating chunk: the body ended properly
            health_response = chunked[2:]
            break
        events.append(chunked[:size])
        chunked = chunked[size + 2 :]
    assert events[-1] == b"data: [DONE]\n\n"
    assert all(e.startswith(b"data: {") and e.endswith(b"}\n\n") for e in events[:-1])
    parsed = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert [p["choices"][0]["finish_reason"] for p in parsed] == [None, "length"]
    assert health_response.startswith(b"HTTP/1.1 200 OK")


# -- errors ------------------------------------------------------------------------------------


def test_unknown_model_is_openais_not_found(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="mistral-7b", prompt="ping", max_tokens=1)
    assert err.value.status_code == 404
    assert err.value.body == {
        "message": "The model `mistral-7b` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="mistral-7b", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="mistral-7b", prompt="ping", stream=True)
    raw = server.post("/v1/chat/completions", json={"model": "mistral-7b", "messages": [{"role": "user"}]})
    assert raw.json()["error"]["type"] == "NotFoundError"
    assert raw.headers["x-drctl-instance"] == f"{MODEL}-0"


@pytest.mark.parametrize(
    ("path", "body", "error_type", "param"),
    [
        ("/v1/completions", b"{not json", "Bad Request", "body"),
        ("/v1/completions", b"[1, 2]", "Bad Request", "body"),
        ("/v1/completions", b'{"model": "llama-2-7b"}', "Bad Request", "prompt"),
        ("/v1/completions", b'{"prompt": ""}', "Bad Request", "prompt"),
        ("/v1/completions", b'{"prompt": {"a": 1}}', "Bad Request", "body.prompt"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "3"}', "Bad Request", "body.max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": true}', "Bad Request", "body.max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', "BadRequestError", "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 5000}', "BadRequestError", "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "n": 0}', "BadRequestError", "n"),
        ("/v1/completions", b'{"prompt": "x", "model": 7}', "Bad Request", "body.model"),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', "Bad Request", "body.stream"),
        (
            "/v1/completions",
            b'{"prompt": "x", "stream_options": {"include_usage": true}}',
            "Bad Request",
            "stream_options",
        ),
        ("/v1/chat/completions", b'{"model": "llama-2-7b"}', "Bad Request", "body.messages"),
        ("/v1/chat/completions", b'{"messages": []}', "BadRequestError", "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}', "Bad Request", "body.messages.0"),
    ],
)
def test_malformed_requests_are_400_in_vllms_shape(
    server: Server, path: str, body: bytes, error_type: str, param: str | None
) -> None:
    response = server.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == error_type
    assert error["code"] == 400
    if param is not None:
        assert error["param"] == param
    assert error["message"]


def test_bad_request_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
    assert "maximum context length is 4096" in err.value.message


# -- readiness: loading, sleeping, failed ------------------------------------------------------


def test_models_list_shows_the_model_only_when_ready(checkpoint: Path, tmp_path: Path) -> None:
    # 256 KiB at 2048 s/GiB: about half a second of loading, asleep once loaded (a warm standby).
    with (
        demo_server(checkpoint, tmp_path, "--sleeping", "--load-seconds-per-gib", "2048") as slow,
        openai_client(slow) as client,
    ):
        assert client.models.list().data == []  # loading
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=MODEL, prompt="ping", max_tokens=1)
        assert err.value.status_code == 503
        assert isinstance(err.value.body, dict) and "loading" in err.value.body["message"]

        slow.wait_until("sleeping")
        assert client.models.list().data == []  # loaded, asleep: alive but not ready
        assert slow.get("/health").status_code == 200
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503
        assert isinstance(err.value.body, dict) and err.value.body["type"] == "ServiceUnavailableError"
        assert "sleeping" in err.value.body["message"]

        assert slow.post("/wake_up").status_code == 200
        [card] = client.models.list().data
        assert (card.id, card.object, card.owned_by) == (MODEL, "model", "vllm")
        assert client.completions.create(model=MODEL, prompt="ping", max_tokens=1).choices[0].text


def test_sleep_mid_stream_aborts_the_stream(checkpoint: Path, tmp_path: Path) -> None:
    with demo_server(checkpoint, tmp_path, "--token-delay-ms", "30") as server, openai_client(server) as client:
        server.wait_until("ready")
        stream = client.completions.create(model=MODEL, prompt="long", max_tokens=200, stream=True)
        chunks = [next(stream) for _ in range(3)]
        assert server.post("/sleep?level=1").status_code == 200
        chunks.extend(stream)  # ends cleanly: vLLM's sleep aborts the request, it does not drop the connection
        assert chunks[-1].choices[0].finish_reason == "abort"
        assert len(chunks) < 200


def test_stream_is_cut_when_the_server_dies(checkpoint: Path, tmp_path: Path) -> None:
    """A killed instance leaves its open streams unterminated: the client gets an error, never a
    clean end that would pass a truncated answer off as whole (this is what a failover cuts)."""
    with demo_server(checkpoint, tmp_path, "--token-delay-ms", "30") as server, openai_client(server) as client:
        server.wait_until("ready")
        stream = client.completions.create(model=MODEL, prompt="long", max_tokens=200, stream=True)
        received = [next(stream) for _ in range(3)]
        killer = threading.Timer(0.05, server.process.send_signal, (signal.SIGKILL,))
        killer.start()
        with pytest.raises(openai.APIConnectionError) as err:
            received.extend(stream)
        killer.join()
        assert server.process.wait(5) == -signal.SIGKILL
        # The body's chunked encoding was never terminated (openai 3 runs on httpx2, hence no class check).
        assert "incomplete chunked read" in str(err.value.__cause__)
        assert 3 <= len(received) < 200
        assert all(c.choices[0].finish_reason is None for c in received)
