"""The drill's load generator: an open-loop stream of OpenAI completions through the load balancer.

Each request is what an OpenAI client sends (``POST /v1/completions``, the model in the JSON body),
plus the ``model-name`` header, so it routes whether the load balancer routes by the body's model or
by the header; every engine drctl runs (vLLM, SGLang, the demo stand-in) answers it.

Open loop (a request every ``1/rps`` seconds whatever the answers) so a stall shows up as failed or
slow requests instead of silently lowering the rate, as a closed loop would.

Beside them, one streamed chat completion (``"stream": true``, server-sent events) is open at all
times, the next opened as one ends: a stream open on the instance the fault hits is cut — no load
balancer can retry a response that has started — and the streams opened after the failover show
which instance serves them (:class:`StreamSample`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from drctl.policies.engines import MODEL_HEADER, completion

STREAM_TOKENS = 48
"""Tokens asked of each stream (the demo stand-in sends one every few ms: a stream lasts ~0.3 s)."""


@dataclass(frozen=True)
class Sample:
    sent_at: float
    """``time.monotonic()`` when sent."""
    latency_s: float
    ok: bool
    served_by: str | None
    status: int | str
    """HTTP status, or the exception's name."""
    error: str = ""
    """The response body's start, or the exception's message, when not ok."""


@dataclass(frozen=True)
class StreamSample:
    opened_at: float
    """``time.monotonic()`` when the request was sent."""
    ended_at: float
    completed: bool
    """The stream ended with ``data: [DONE]``."""
    chunks: int
    served_by: str | None
    status: int | str
    error: str = ""


@dataclass
class LoadGenerator:
    lb_url: str
    model: str
    rps: int
    timeout_s: float = 30.0
    streams: bool = True
    """Keep one streamed chat completion open at all times, beside the requests."""
    max_inflight: int = 0
    """Requests in flight at most; a request due past it is counted failed, not sent (see
    :meth:`_not_sent`). 0: eight seconds of requests at the rate, at least 256 (the connection
    pool is this size: a request waits for an answer, never for a connection). A warm standby's
    switch holds requests ~2 s (docs/benchmarks.md), well within it."""
    samples: list[Sample] = field(default_factory=list)
    stream_samples: list[StreamSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._streamer: asyncio.Task[None] | None = None
        self.max_inflight = self.max_inflight or max(256, self.rps * 8)
        self._http = httpx.AsyncClient(
            timeout=self.timeout_s, limits=httpx.Limits(max_connections=self.max_inflight + 1)
        )

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())
        if self.streams:
            self._streamer = asyncio.create_task(self._stream_loop())

    async def stop(self) -> list[Sample]:
        """Stop sending, wait for the requests in flight, and return every sample."""
        self._stop.set()
        if self._runner is not None:
            await self._runner
        if self._streamer is not None:
            await asyncio.wait({self._streamer}, timeout=self.timeout_s + 1)
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.timeout_s + 1)
        await self._http.aclose()
        return sorted(self.samples, key=lambda s: s.sent_at)

    async def _run(self) -> None:
        url = f"{self.lb_url}{completion(self.model).path}"
        period = 1.0 / self.rps
        next_at = time.monotonic()
        n = 0
        while not self._stop.is_set():
            if len(self._inflight) >= self.max_inflight:
                self._not_sent()
            else:
                task = asyncio.create_task(self._one(url, n))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            n += 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                except TimeoutError:
                    pass

    def _not_sent(self) -> None:
        """A request due while :attr:`max_inflight` wait for answers (the model is down and the
        load balancer holds requests for its RTO): counted failed, not sent. Queued on a full
        connection pool instead, they piled up by the hundreds and httpx's pool spent the worker's
        whole CPU matching them to connections, stalling every workflow on it (a drill with no
        prober running, found by a helper trying the stack)."""
        error = f"not sent: {len(self._inflight)} requests already in flight"
        self.samples.append(Sample(time.monotonic(), 0.0, False, None, "not-sent", error))

    async def _one(self, url: str, n: int) -> None:
        sent = time.monotonic()
        try:
            call = completion(self.model, prompt=f"drill request {n}", max_tokens=4)
            response = await self._http.post(url, json=call.json, headers={MODEL_HEADER: self.model})
            ok = response.status_code == 200
            status: int | str = response.status_code
            served_by = response.headers.get("x-drctl-instance")
            error = "" if ok else response.text[:200]
        except httpx.HTTPError as exc:
            ok, status, served_by, error = False, type(exc).__name__, None, str(exc)[:200]
        self.samples.append(Sample(sent, time.monotonic() - sent, ok, served_by, status, error))

    async def _stream_loop(self) -> None:
        url = f"{self.lb_url}/v1/chat/completions"
        n = 0
        while not self._stop.is_set():
            await self._stream(url, n)
            n += 1

    async def _stream(self, url: str, n: int) -> None:
        opened = time.monotonic()
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"drill stream {n}"}],
            "max_tokens": STREAM_TOKENS,
            "stream": True,
        }
        chunks, done, served_by, error = 0, False, None, ""
        status: int | str = ""
        try:
            async with self._http.stream("POST", url, json=body, headers={MODEL_HEADER: self.model}) as response:
                status = response.status_code
                served_by = response.headers.get("x-drctl-instance")
                if response.status_code != 200:
                    error = (await response.aread()).decode(errors="replace")[:200]
                else:
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunks += 1
        except httpx.HTTPError as exc:
            status, error = type(exc).__name__, str(exc)[:200]
        self.stream_samples.append(StreamSample(opened, time.monotonic(), done, chunks, served_by, status, error))
        if not done:
            await asyncio.sleep(0.05)  # a failed stream is not retried in a tight loop
