"""A small stand-in for vLLM's OpenAI-compatible server: the routes drctl and OpenAI clients use.

    python -m drctl.sim.inference_server --model M --instance ID --port P --checkpoint PATH \\
        [--host 127.0.0.1] [--sleeping] [--load-seconds-per-gib F] [--wake-seconds-per-gib F] \\
        [--token-delay-ms MS] [--max-model-len N] [--gpu G]

It binds its port at once and "loads weights" in a background thread: it reads the checkpoint,
computing its sha256, and compares it with the ``.sha256`` sidecar. Until that succeeds it serves
no completions; a missing or corrupted checkpoint leaves it in the ``failed`` state for good (it
keeps running and says why). It has vLLM's sleep mode (``/sleep``, ``/wake_up``, ``/is_sleeping``),
which is how a warm standby waits: loaded, asleep. Completions are a deterministic fake text, one
word per token: the same model and prompt give the same text on every instance.

The shapes follow vLLM's OpenAI server (``vllm/entrypoints/openai``: the completion and chat
protocols and serving, ``engine/protocol.py`` for errors and the model list, and
``serve/dev/sleep`` and ``serve/instrumentator/health.py``). Every response carries
``x-drctl-instance: <instance>``.

**OpenAI API** (what clients send; ``"model"`` may be omitted, as vLLM allows, for the served one):

- ``POST /v1/completions`` ``{"model", "prompt": str | [str] | [int] | [[int]], "max_tokens"
  (default 16), "n", "stream", "stream_options": {"include_usage"}}`` -> ``{"id": "cmpl-…",
  "object": "text_completion", "created", "model", "choices": [{"index", "text", "logprobs": null,
  "finish_reason": "length", "stop_reason": null, …}], "usage": {"prompt_tokens",
  "completion_tokens", "total_tokens", …}}``. Choice ``index`` is ``prompt_index * n + i``.
- ``POST /v1/chat/completions`` ``{"model", "messages": [{"role", "content"}], "max_tokens" or
  "max_completion_tokens", "n", "stream", "stream_options"}`` -> ``{"id": "chatcmpl-…", "object":
  "chat.completion", …, "choices": [{"index", "message": {"role": "assistant", "content", …},
  "logprobs": null, "finish_reason", "stop_reason": null}], "usage"}``. Without a token limit the
  answer is 16 tokens and ends with ``finish_reason: "stop"`` (as if the model had said EOS);
  with one it is exactly that many, ``"length"``.
- ``"stream": true``: server-sent events, one ``data: {chunk}\\n\\n`` per token and choice, each
  written (HTTP/1.1 chunked) as soon as it is made, ``--token-delay-ms`` apart (default 5 ms):
  ``"object": "text_completion"`` chunks with ``text``, or ``"chat.completion.chunk"`` chunks with
  ``delta`` (first ``{"role": "assistant", "content": ""}``, then ``{"content": token}``); the last
  token's chunk has the ``finish_reason``; with ``stream_options.include_usage`` a chunk with
  ``"choices": []`` and ``usage`` follows; then ``data: [DONE]\\n\\n`` and the terminating chunk.
  A process killed mid-stream leaves the chunked body unterminated, so the client sees an error,
  never a clean end. If the model stops serving mid-stream (put to sleep), each open choice gets a
  final chunk with ``finish_reason: "abort"`` (vLLM's sleep aborts requests in flight). Streaming
  is the only place the token delay applies: a non-streamed answer comes at once.
- Temperature, ``stop``, ``logprobs`` and the other sampling fields are accepted and ignored.
- Errors, in vLLM's shape ``{"error": {"message", "type", "param", "code"}}``: a body that is not
  JSON, fields of the wrong type or missing, an empty prompt, ``stream_options`` without
  ``stream``: 400 ``"Bad Request"`` (vLLM's request validation; ``param`` names the field,
  ``body.<field>`` for a type error); ``max_tokens`` or ``n`` below 1, or a prompt and
  ``max_tokens`` beyond ``--max-model-len`` (default 4096): 400 ``"BadRequestError"`` (vLLM's
  serving checks); another model: 404 ``"NotFoundError"``, param ``model``, "The model `X` does
  not exist."; loading, failed or asleep: 503 ``"ServiceUnavailableError"`` (the openai client
  raises ``InternalServerError``). The checks run in that order.
- ``GET /v1/models``: ``{"object": "list", "data": [{"id": model, "object": "model", "created",
  "owned_by": "vllm", "root": checkpoint path, "parent": null, "max_model_len", "permission":
  [{"object": "model_permission", …}]}]}`` — but the model is listed **only while it is ready**
  (loaded and awake), else ``"data": []``. That is drctl's readiness signal. Real vLLM serves
  nothing until its weights are loaded, so there the list also means loaded, but it keeps listing
  the model while asleep: against vLLM, readiness is "listed and ``/is_sleeping`` false".

**vLLM's server routes:**

- ``GET /health``: 200, empty body, once the weights are loaded, **awake or asleep**; 503, empty
  body, while loading and once the load failed. vLLM answers 200 whenever its engine runs, and a
  sleeping vLLM engine runs, so a warm standby (asleep by design) is healthy to a prober or Envoy
  probing ``/health``; whether it can take traffic is the model list or ``/is_sleeping``. A loading
  instance is in no load balancer (vLLM would not answer at all then). The stand-in adds one
  header, ``x-drctl-state: loading | ready | sleeping | failed``, for people reading probes.
- ``POST /sleep?level=1|2``: 200, empty body (vLLM's answer). Level 1 keeps the weights (in host
  memory); level 2 discards them, so waking up reloads and re-verifies the checkpoint. Another
  level: 400. ``POST /wake_up``: 200, empty body, once awake (it waits, like vLLM's); vLLM's
  ``?tags=weights|kv_cache`` is accepted, and the stand-in wakes up whole. Both 503 in the error
  shape when the load failed. ``GET /is_sleeping``: ``{"is_sleeping": bool}``.

**The demo's own routes** (kept while drctl still uses them):

- ``GET /healthz``: 200 ``{"status": "ok", "model", "instance", "loaded", "sleeping", "progress",
  "error"}`` when loaded and awake, else 503 with ``"status": "loading" | "failed" | "sleeping"``.
- ``GET /load_progress``: ``{"state": "loading" | "ready" | "failed" | "sleeping", "progress",
  "bytes_loaded", "bytes_total", "error", "load_seconds"}``.
- ``POST /v1/models/{model}/predict``, and ``POST /predict`` or ``/v1/predict`` with a
  ``model-name`` header (no header: this server's model): body ``{"prompt": str, "max_tokens":
  int}`` -> 200 ``{"model", "instance", "text", "tokens"}`` (the same text as a completion of that
  prompt); errors ``{"error": str}``: 404 for another model, 400 for a bad body, 503 unless loaded
  and awake.

Anything else: 404 (unknown path), 405 (wrong method, with ``Allow``), 413 (body over 1 MiB), in
the OpenAI error shape.

Standard library only (and drctl's checkpoint constants), so it starts in under 0.1 s. SIGTERM or
SIGINT shut it down with exit status 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, unquote, urlsplit

from drctl.platforms.local.checkpoints import CHECKSUM_MISMATCH

GIB = 1 << 30
READ_CHUNK = 1 << 20
MAX_BODY = 1 << 20
MAX_TOKENS_LIMIT = 4096
INSTANCE_HEADER = "x-drctl-instance"
MODEL_HEADER = "model-name"
STATE_HEADER = "x-drctl-state"
DEFAULT_COMPLETION_TOKENS = 16
"""vLLM's default ``max_tokens`` for ``/v1/completions``."""
NATURAL_ANSWER_TOKENS = 16
"""A chat answer without a token limit: this many tokens, then the fake model "says EOS"."""
MAX_CHOICES = 64
"""At most this many choices (prompts x n) in one request."""

_WORDS = (
    "the a failover standby replica zone region checkpoint weights gpu tensor token model request "
    "latency shard cache kernel batch prompt stream route envoy health drain recover restore warm "
    "cold hot quorum lease epoch budget signal durable workflow activity retry timeout backoff"
).split()


def log(instance: str, message: str) -> None:
    print(f"demo-server[{instance}] {message}", file=sys.stderr, flush=True)


def fake_completion(model: str, prompt: str, max_tokens: int) -> str:
    """A deterministic completion: the same model and prompt give the same text on every instance."""
    words: list[str] = []
    counter = 0
    while len(words) < max_tokens:
        block = hashlib.sha256(f"{model}\0{prompt}\0{counter}".encode()).digest()
        words.extend(_WORDS[b % len(_WORDS)] for b in block)
        counter += 1
    return " ".join(words[:max_tokens])


class BadRequest(Exception):
    """The request cannot be served as sent (400, or 413 for a body that is too large)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class Snapshot(NamedTuple):
    state: str
    """loading | ready | failed | sleeping"""
    progress: float
    bytes_loaded: int
    bytes_total: int
    error: str | None
    sleeping: bool
    load_seconds: float | None

    @property
    def serving(self) -> bool:
        return self.state == "ready"


class DemoModel:
    """The state machine of one instance: loading -> ready | failed, and asleep or awake."""

    def __init__(
        self,
        model: str,
        instance: str,
        checkpoint: Path,
        *,
        sleeping: bool = False,
        load_seconds_per_gib: float = 0.0,
        wake_seconds_per_gib: float = 0.25,
        gpu: str | None = None,
    ) -> None:
        self.model = model
        self.instance = instance
        self.checkpoint = checkpoint
        self.gpu = gpu
        self.load_seconds_per_gib = load_seconds_per_gib
        self.wake_seconds_per_gib = wake_seconds_per_gib
        self._lock = threading.Lock()
        self._loaded = False
        self._failed = False
        self._error: str | None = None
        self._sleeping = sleeping
        self._weights_discarded = False
        self._bytes_loaded = 0
        self._bytes_total = 0
        self._load_seconds: float | None = None
        self._loader: threading.Thread | None = None
        self._last_state: str | None = None

    # -- state ---------------------------------------------------------------------------------

    def _state_locked(self) -> str:
        if self._failed:
            return "failed"
        if not self._loaded:
            return "loading"
        if self._sleeping:
            return "sleeping"
        return "ready"

    def _note_state_locked(self, detail: str = "") -> None:
        state = self._state_locked()
        if state != self._last_state:
            suffix = f" ({detail})" if detail else ""
            log(self.instance, f"state {self._last_state or 'start'} -> {state}{suffix}")
            self._last_state = state

    def _snapshot_locked(self) -> Snapshot:
        if self._bytes_total:
            progress = self._bytes_loaded / self._bytes_total
        else:
            progress = 1.0 if self._loaded else 0.0
        return Snapshot(
            state=self._state_locked(),
            progress=round(progress, 4),
            bytes_loaded=self._bytes_loaded,
            bytes_total=self._bytes_total,
            error=self._error,
            sleeping=self._sleeping,
            load_seconds=self._load_seconds,
        )

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot_locked()

    # -- loading -------------------------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Start (or join) a load of the checkpoint in a background thread."""
        with self._lock:
            if self._loader is not None and self._loader.is_alive():
                return self._loader
            self._loaded = False
            self._failed = False
            self._error = None
            self._bytes_loaded = 0
            self._note_state_locked(f"checkpoint {self.checkpoint}")
            self._loader = threading.Thread(target=self._load, name="loader", daemon=True)
            self._loader.start()
            return self._loader

    def _fail(self, error: str) -> None:
        with self._lock:
            self._failed = True
            self._error = error
            self._note_state_locked(error)

    def _load(self) -> None:
        started = time.monotonic()
        sidecar = self.checkpoint.with_suffix(self.checkpoint.suffix + ".sha256")
        try:
            total = self.checkpoint.stat().st_size
        except FileNotFoundError:
            self._fail(f"checkpoint {self.checkpoint} not found")
            return
        except OSError as e:
            self._fail(f"checkpoint {self.checkpoint} unreadable: {e}")
            return
        try:
            line = sidecar.read_text(encoding="utf-8").strip().split()
            expected = line[0].lower() if line else ""
        except FileNotFoundError:
            self._fail(f"checksum sidecar {sidecar} not found")
            return
        except (OSError, UnicodeDecodeError) as e:
            self._fail(f"checksum sidecar {sidecar} unreadable: {e}")
            return
        if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
            self._fail(f"checksum sidecar {sidecar} does not hold a sha256")
            return
        with self._lock:
            self._bytes_total = total
        digest = hashlib.sha256()
        loaded = 0
        # Smaller reads for small files, so that progress moves smoothly when loading is slowed down.
        chunk_size = min(READ_CHUNK, max(64 * 1024, total // 64))
        try:
            with self.checkpoint.open("rb") as f:
                while chunk := f.read(chunk_size):
                    digest.update(chunk)
                    loaded += len(chunk)
                    if self.load_seconds_per_gib > 0:
                        # The bytes count as loaded once their simulated load time has passed.
                        delay = loaded / GIB * self.load_seconds_per_gib - (time.monotonic() - started)
                        if delay > 0:
                            time.sleep(delay)
                    with self._lock:
                        self._bytes_loaded = loaded
        except OSError as e:
            self._fail(f"reading checkpoint {self.checkpoint} failed: {e}")
            return
        actual = digest.hexdigest()
        if actual != expected:
            self._fail(f"{CHECKSUM_MISMATCH}: expected sha256 {expected}, got {actual}")
            return
        elapsed = time.monotonic() - started
        with self._lock:
            self._loaded = True
            self._weights_discarded = False
            self._bytes_total = loaded
            self._load_seconds = round(elapsed, 4)
            self._note_state_locked(f"{loaded} bytes verified in {elapsed:.3f}s")

    # -- sleep mode ----------------------------------------------------------------------------

    def sleep(self, level: int) -> Snapshot:
        with self._lock:
            if not self._failed:
                self._sleeping = True
                # Weights still loading cannot be discarded; level 2 then acts like level 1.
                if level == 2 and self._loaded:
                    self._weights_discarded = True
                self._note_state_locked(f"level {level}")
        return self.snapshot()

    def wake_up(self) -> Snapshot:
        with self._lock:
            if self._failed or not self._sleeping:
                return self._snapshot_locked()
            discarded = self._weights_discarded
            size = self._bytes_total
        if discarded:
            # Level-2 sleep dropped the weights: load them again, checksum and all.
            self.start_loading().join()
        else:
            # Level 1: copy the weights back from host memory.
            time.sleep(size / GIB * self.wake_seconds_per_gib)
        with self._lock:
            if not self._failed:
                self._sleeping = False
            self._note_state_locked("woken up")
        return self.snapshot()


class OpenAIError(Exception):
    """An error answered in vLLM's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_ or HTTPStatus(status).phrase
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.status}}


def _invalid(field: str, message: str) -> OpenAIError:
    """A request field of the wrong type or missing (vLLM's validation handler: "Bad Request")."""
    return OpenAIError(HTTPStatus.BAD_REQUEST, f"{field}: {message}", param=f"body.{field}")


def _rejected(param: str, message: str) -> OpenAIError:
    """A request one of vLLM's request-model validators refuses: its validation handler names the
    validator's parameter and answers "Bad Request" too."""
    return OpenAIError(HTTPStatus.BAD_REQUEST, message, param=param)


def _bad_request(message: str, param: str | None = None) -> OpenAIError:
    """A valid request vLLM's serving code refuses (its ``BadRequestError``)."""
    return OpenAIError(HTTPStatus.BAD_REQUEST, message, "BadRequestError", param)


def _not_serving(snap: Snapshot) -> OpenAIError:
    message = {
        "loading": f"the model is still loading ({snap.progress:.0%})",
        "sleeping": "the model is sleeping (POST /wake_up first)",
        "failed": f"the model failed to load: {snap.error}",
    }.get(snap.state, snap.state)
    return OpenAIError(HTTPStatus.SERVICE_UNAVAILABLE, message, "ServiceUnavailableError")


def _token_count(text: str) -> int:
    """The stand-in's tokenizer: one token per word, at least one (every prompt has a BOS token)."""
    return max(1, len(text.split()))


def _int_field(payload: dict[str, Any], name: str, default: int | None, minimum: int = 1) -> int | None:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, "Input should be a valid integer")
    if value < minimum:
        raise _bad_request(f"{name} must be at least {minimum}, got {value}.", name)
    return value


def _bool_field(payload: dict[str, Any], name: str) -> bool:
    value = payload.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, "Input should be a valid boolean")
    return value


def _chat_text(messages: Any) -> str:
    """The conversation as one text (the stand-in's chat template)."""
    if not isinstance(messages, list):
        raise _invalid("messages", "Field required" if messages is None else "Input should be a valid list")
    if not messages:
        raise _bad_request("messages must not be empty.", "messages")
    lines: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid(f"messages.{i}", 'each message must be an object with a "role"')
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            text = " ".join(p for p in parts if isinstance(p, str))
        else:
            raise _invalid(f"messages.{i}.content", "Input should be a string or a list of content parts")
        lines.append(f"{message['role']}: {text}")
    return "\n".join(lines)


def _completion_prompts(prompt: Any) -> list[tuple[str, int]]:
    """``prompt`` as (text the answer is derived from, prompt tokens), one per prompt."""

    def token_ids(value: list[Any]) -> bool:
        return all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if prompt is None or prompt == "" or prompt == []:
        raise _rejected("prompt", "Either prompt or prompt_embeds must be provided and non-empty.")
    if isinstance(prompt, str):
        return [(prompt, _token_count(prompt))]
    if isinstance(prompt, list):
        if token_ids(prompt):
            return [(" ".join(map(str, prompt)), len(prompt))]
        if all(isinstance(p, str) and p for p in prompt):
            return [(p, _token_count(p)) for p in prompt]
        if all(isinstance(p, list) and p and token_ids(p) for p in prompt):
            return [(" ".join(map(str, p)), len(p)) for p in prompt]
    raise _invalid("prompt", "Input should be a string, a list of strings, or token ids")


class Generation(NamedTuple):
    """One validated completion or chat request, and the deterministic answer it gets."""

    chat: bool
    model: str
    request_id: str
    created: int
    prompt_tokens: int
    texts: list[list[str]]
    """Per choice, the answer's tokens (words; all but the first with a leading space)."""
    finish_reason: str
    stream: bool
    include_usage: bool

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.texts)

    def usage(self, completion_tokens: int | None = None) -> dict[str, Any]:
        done = self.completion_tokens if completion_tokens is None else completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + done,
            "completion_tokens": done,
            "prompt_tokens_details": None,
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return body

    def stream_choice(self, index: int, token: str, finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = {"content": token}
        else:
            choice["text"] = token
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        if finish_reason is not None:
            choice["stop_reason"] = None
        return choice

    def response(self) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for index, tokens in enumerate(self.texts):
            text = "".join(tokens)
            if self.chat:
                message = {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                }
                choices.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": self.finish_reason,
                        "stop_reason": None,
                    }
                )
            else:
                choices.append(
                    {
                        "index": index,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": self.finish_reason,
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                )
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self.usage(),
        }
        if self.chat:
            body["prompt_logprobs"] = None
        body["kv_transfer_params"] = None
        return body


def answer_tokens(model: str, prompt: str, count: int) -> list[str]:
    """``fake_completion`` as tokens: ``"".join(answer_tokens(...)) == fake_completion(...)``."""
    words = fake_completion(model, prompt, count).split(" ")
    return [words[0], *(" " + w for w in words[1:])]


class DemoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], app: DemoModel, *, token_delay_s: float = 0.005, max_model_len: int = 4096
    ) -> None:
        self.app = app
        self.token_delay_s = token_delay_s
        self.max_model_len = max_model_len
        super().__init__(address, DemoHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client (or Envoy) hanging up mid-request is not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class DemoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server_version = "drctl-demo-server/1"
    error_content_type = "application/json"
    error_message_format = '{"error": {"message": "%(message)s", "type": "Error", "param": null, "code": %(code)d}}'

    @property
    def demo_server(self) -> DemoHTTPServer:
        return cast(DemoHTTPServer, self.server)

    @property
    def app(self) -> DemoModel:
        return self.demo_server.app

    # -- plumbing ------------------------------------------------------------------------------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # no access log

    def log_message(self, format: str, *args: Any) -> None:
        log(self.app.instance, "http: " + (format % args))

    def end_headers(self) -> None:
        self.send_header(INSTANCE_HEADER, self.app.instance)
        if self.close_connection:
            self.send_header("Connection", "close")
        super().end_headers()

    def _send(self, status: int, data: bytes, content_type: str | None, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        """vLLM's ``Response(status_code=...)``: no body, no content type."""
        self._send(status, b"", None, headers)

    def _error(self, error: OpenAIError, headers: dict[str, str] | None = None) -> None:
        self._send_json(error.status, error.body(), headers)

    def _legacy_error(self, status: int, message: str, **extra: Any) -> None:
        """The demo predict API's error body: ``{"error": str, ...}``."""
        self._send_json(status, {"error": message, **extra})

    def _read_body(self) -> bytes:
        """Read the whole request body (always, so the connection stays usable for keep-alive)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self.close_connection = True
                    raise BadRequest("malformed chunked body") from None
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY:
                    self.close_connection = True
                    raise BadRequest(f"body larger than {MAX_BODY} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                parts.append(self.rfile.read(size))
                self.rfile.readline(8)
            return b"".join(parts)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"bad Content-Length {length_header!r}") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise BadRequest(f"body larger than {MAX_BODY} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(length) if length else b""

    # -- dispatch ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
        except BadRequest as e:
            self._error(OpenAIError(e.status, str(e)))
            return
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        routes: dict[str, dict[str, Any]] = {
            "/health": {"GET": self._health},
            "/healthz": {"GET": self._healthz},
            "/load_progress": {"GET": self._load_progress},
            "/v1/models": {"GET": self._models},
            "/v1/completions": {"POST": lambda: self._openai(body, chat=False)},
            "/v1/chat/completions": {"POST": lambda: self._openai(body, chat=True)},
            "/is_sleeping": {"GET": self._is_sleeping},
            "/sleep": {"POST": lambda: self._sleep(query)},
            "/wake_up": {"POST": self._wake_up},
            "/predict": {"POST": lambda: self._predict(self.headers.get(MODEL_HEADER), body)},
            "/v1/predict": {"POST": lambda: self._predict(self.headers.get(MODEL_HEADER), body)},
        }
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "v1", "models"] and parts[4] == "predict":
            model = unquote(parts[3])
            routes[path] = {"POST": lambda: self._predict(model, body)}
        handlers = routes.get(path)
        if handlers is None:
            self._error(OpenAIError(HTTPStatus.NOT_FOUND, f"no route for {path}", "NotFoundError"))
            return
        handler = handlers.get(method)
        if handler is None:
            allowed = ", ".join(sorted(handlers))
            error = OpenAIError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on {path} (allowed: {allowed})")
            self._error(error, {"Allow": allowed})
            return
        handler()

    # -- vLLM's server routes ------------------------------------------------------------------

    def _health(self) -> None:
        snap = self.app.snapshot()
        alive = snap.state in ("ready", "sleeping")
        self._send_empty(HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE, {STATE_HEADER: snap.state})

    def _models(self) -> None:
        app = self.app
        now = int(time.time())
        cards: list[dict[str, Any]] = []
        if app.snapshot().serving:
            permission = {
                "id": f"modelperm-{uuid.uuid4().hex}",
                "object": "model_permission",
                "created": now,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
            cards.append(
                {
                    "id": app.model,
                    "object": "model",
                    "created": now,
                    "owned_by": "vllm",
                    "root": str(app.checkpoint),
                    "parent": None,
                    "max_model_len": self.demo_server.max_model_len,
                    "permission": [permission],
                }
            )
        self._send_json(HTTPStatus.OK, {"object": "list", "data": cards})

    def _is_sleeping(self) -> None:
        self._send_json(HTTPStatus.OK, {"is_sleeping": self.app.snapshot().sleeping})

    def _sleep(self, query: dict[str, list[str]]) -> None:
        raw = query.get("level", ["1"])[-1]
        if raw not in ("1", "2"):
            self._error(_bad_request(f"sleep level must be 1 or 2, got {raw!r}", "level"))
            return
        snap = self.app.sleep(int(raw))
        if snap.state == "failed":
            self._error(_not_serving(snap))
            return
        self._send_empty(HTTPStatus.OK)

    def _wake_up(self) -> None:
        snap = self.app.wake_up()
        if snap.state == "failed":
            self._error(_not_serving(snap))
            return
        self._send_empty(HTTPStatus.OK)

    # -- the OpenAI API ------------------------------------------------------------------------

    def _openai(self, body: bytes, *, chat: bool) -> None:
        try:
            generation = self._generation(body, chat=chat)
        except OpenAIError as e:
            self._error(e)
            return
        if generation.stream:
            self._stream(generation)
        else:
            self._send_json(HTTPStatus.OK, generation.response())

    def _generation(self, body: bytes, *, chat: bool) -> Generation:
        """Validate a request in vLLM's order (the body, then the model, then the engine, then the
        lengths) and make its answer."""
        app = self.app
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise OpenAIError(HTTPStatus.BAD_REQUEST, f"JSON decode error: {e}", param="body") from None
        if not isinstance(payload, dict):
            raise OpenAIError(HTTPStatus.BAD_REQUEST, "Input should be a valid dictionary", param="body")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise _invalid("model", "Input should be a valid string")
        if chat:
            conversation = _chat_text(payload.get("messages"))
            prompts = [(conversation, _token_count(conversation))]
            limit = _int_field(payload, "max_completion_tokens", None) or _int_field(payload, "max_tokens", None)
        else:
            prompts = _completion_prompts(payload.get("prompt"))
            limit = _int_field(payload, "max_tokens", DEFAULT_COMPLETION_TOKENS)
        n = _int_field(payload, "n", 1)
        assert n is not None
        stream = _bool_field(payload, "stream")
        stream_options = payload.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise _invalid("stream_options", "Input should be a valid dictionary")
        if stream_options and not stream:
            raise _rejected("stream_options", "Stream options can only be defined when `stream=True`.")
        include_usage = _bool_field(stream_options or {}, "include_usage")
        if len(prompts) * n > MAX_CHOICES:
            raise _bad_request(f"at most {MAX_CHOICES} choices (prompts x n) per request", "n")

        if model and model != app.model:
            raise OpenAIError(HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", "NotFoundError", "model")
        snap = app.snapshot()
        if not snap.serving:
            raise _not_serving(snap)

        max_model_len = self.demo_server.max_model_len
        for _text, tokens in prompts:
            if tokens >= max_model_len:
                raise _bad_request(
                    f"This model's maximum context length is {max_model_len} tokens. However, your request "
                    f"has {tokens} input tokens. Please reduce the length of the input messages.",
                    "input_tokens",
                )
            if limit is not None and tokens + limit > max_model_len:
                raise _bad_request(
                    f"'max_tokens' or 'max_completion_tokens' is too large: {limit}. This model's maximum "
                    f"context length is {max_model_len} tokens and your request has {tokens} input tokens "
                    f"({limit} > {max_model_len} - {tokens}).",
                    "max_tokens",
                )
        texts: list[list[str]] = []
        finish_reason = "length"
        for text, tokens in prompts:
            count = limit
            if count is None:  # no limit: the fake model "says EOS" after a fixed number of tokens
                count = min(NATURAL_ANSWER_TOKENS, max_model_len - tokens)
                finish_reason = "stop" if count == NATURAL_ANSWER_TOKENS else "length"
            for i in range(n):
                texts.append(answer_tokens(app.model, text if i == 0 else f"{text}\0{i}", count))
        base_id = self.headers.get("X-Request-Id") or uuid.uuid4().hex
        return Generation(
            chat=chat,
            model=app.model,
            request_id=f"{'chatcmpl' if chat else 'cmpl'}-{base_id}",
            created=int(time.time()),
            prompt_tokens=sum(tokens for _text, tokens in prompts),
            texts=texts,
            finish_reason=finish_reason,
            stream=stream,
            include_usage=include_usage,
        )

    def _stream(self, generation: Generation) -> None:
        """Server-sent events, one chunk per token and choice, each written as soon as it is made."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        delay = self.demo_server.token_delay_s
        sent = 0
        try:
            if generation.chat:
                roles = [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(generation.texts))
                ]
                for choice in roles:
                    self._event(generation.chunk([choice]))
            longest = max(len(tokens) for tokens in generation.texts)
            for step in range(longest):
                if delay > 0:
                    time.sleep(delay)
                if not self.app.snapshot().serving:
                    # Put to sleep (or failed) mid-stream: vLLM's sleep aborts the requests in flight.
                    log(self.app.instance, f"stream {generation.request_id} aborted after {step} tokens")
                    for index, tokens in enumerate(generation.texts):
                        if step < len(tokens):
                            self._event(generation.chunk([generation.stream_choice(index, "", "abort")]))
                    break
                for index, tokens in enumerate(generation.texts):
                    if step < len(tokens):
                        last = step == len(tokens) - 1
                        choice = generation.stream_choice(
                            index, tokens[step], generation.finish_reason if last else None
                        )
                        self._event(generation.chunk([choice]))
                        sent += 1
            if generation.include_usage:
                self._event(generation.chunk([], generation.usage(sent)))
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
            log(self.app.instance, f"stream {generation.request_id}: client went away after {sent} tokens")

    def _event(self, chunk: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        """One HTTP/1.1 chunk in one write (``wfile`` is unbuffered: it leaves at once); empty: the end."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    # -- the demo's own routes -----------------------------------------------------------------

    def _healthz(self) -> None:
        app = self.app
        snap = app.snapshot()
        body: dict[str, Any] = {
            "status": "ok" if snap.serving else snap.state,
            "model": app.model,
            "instance": app.instance,
            "loaded": snap.state in ("ready", "sleeping"),
            "sleeping": snap.sleeping,
            "progress": snap.progress,
            "error": snap.error,
        }
        if app.gpu is not None:
            body["gpu"] = app.gpu
        self._send_json(HTTPStatus.OK if snap.serving else HTTPStatus.SERVICE_UNAVAILABLE, body)

    def _load_progress(self) -> None:
        snap = self.app.snapshot()
        self._send_json(
            HTTPStatus.OK,
            {
                "state": snap.state,
                "progress": snap.progress,
                "bytes_loaded": snap.bytes_loaded,
                "bytes_total": snap.bytes_total,
                "error": snap.error,
                "load_seconds": snap.load_seconds,
            },
        )

    def _predict(self, model: str | None, body: bytes) -> None:
        app = self.app
        if model is not None and model != app.model:
            self._legacy_error(HTTPStatus.NOT_FOUND, f"model {model!r} is not served here (this is {app.model!r})")
            return
        try:
            prompt, max_tokens = _parse_predict(body)
        except BadRequest as e:
            self._legacy_error(HTTPStatus.BAD_REQUEST, str(e))
            return
        snap = app.snapshot()
        if not snap.serving:
            message = {
                "loading": "model is still loading",
                "sleeping": "model is sleeping",
                "failed": f"model failed to load: {snap.error}",
            }[snap.state]
            self._legacy_error(HTTPStatus.SERVICE_UNAVAILABLE, message, state=snap.state, progress=snap.progress)
            return
        text = fake_completion(app.model, prompt, max_tokens)
        self._send_json(
            HTTPStatus.OK,
            {"model": app.model, "instance": app.instance, "text": text, "tokens": max_tokens},
        )


def _parse_predict(body: bytes) -> tuple[str, int]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequest('body must be a JSON object {"prompt": str, "max_tokens": int}')
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest('"prompt" must be a string')
    max_tokens = payload.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadRequest('"max_tokens" must be an integer')
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f'"max_tokens" must be between 1 and {MAX_TOKENS_LIMIT}')
    return prompt, max_tokens


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m drctl.sim.inference_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model name this instance serves")
    parser.add_argument("--instance", required=True, help="instance id, echoed in x-drctl-instance")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file, with a .sha256 sidecar")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--sleeping", action="store_true", help="start asleep once loaded (a warm standby)")
    parser.add_argument(
        "--load-seconds-per-gib", type=float, default=0.0, help="simulated extra load time per GiB (default 0)"
    )
    parser.add_argument(
        "--wake-seconds-per-gib", type=float, default=0.25, help="simulated wake-up time per GiB (default 0.25)"
    )
    parser.add_argument("--token-delay-ms", type=float, default=5.0, help="time per streamed token, in ms (default 5)")
    parser.add_argument(
        "--max-model-len", type=int, default=MAX_TOKENS_LIMIT, help="context length in tokens (default 4096)"
    )
    parser.add_argument("--gpu", default=None, help="GPU this instance was placed on (reported only)")
    args = parser.parse_args(argv)
    if args.load_seconds_per_gib < 0 or args.wake_seconds_per_gib < 0:
        parser.error("--load-seconds-per-gib and --wake-seconds-per-gib must not be negative")
    if args.token_delay_ms < 0:
        parser.error("--token-delay-ms must not be negative")
    if args.max_model_len < 2:
        parser.error("--max-model-len must be at least 2")
    return args


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: a server's main thread waits on it, then shuts down."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    app = DemoModel(
        args.model,
        args.instance,
        args.checkpoint,
        sleeping=args.sleeping,
        load_seconds_per_gib=args.load_seconds_per_gib,
        wake_seconds_per_gib=args.wake_seconds_per_gib,
        gpu=args.gpu,
    )
    try:
        server = DemoHTTPServer(
            (args.host, args.port), app, token_delay_s=args.token_delay_ms / 1000, max_model_len=args.max_model_len
        )
    except OSError as e:
        log(args.instance, f"cannot listen on {args.host}:{args.port}: {e}")
        return 1
    stop = stop_on_signals()
    host, port = server.server_address[:2]
    log(args.instance, f"model {args.model} listening on http://{host!s}:{port}")
    serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http", daemon=True)
    serve.start()
    app.start_loading()
    while not stop.wait(1.0):
        pass
    log(args.instance, "shutting down")
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
