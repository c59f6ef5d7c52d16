"""Engine profiles: everything drctl calls on a model instance, per inference engine (pure data).

A fleet runs vLLM or SGLang; the embedded stack runs drctl's stand-in (``drctl.sim``), which
speaks vLLM's API plus two extras (load progress, and a checkpoint checksum it verifies). Whatever
drctl asks an instance — is the server up, is the model ready, sleep, wake up, is it asleep, serve
one real request — it asks through the instance's :class:`EngineProfile`, never by a path written
at the call site, so a fleet of real engines is probed on the paths those engines serve.

What each engine offers (read from their OpenAI-compatible servers):

- **vLLM** (``vllm serve``): ``GET /health`` 200 once the engine runs (the HTTP server starts
  after the weights are loaded); ``GET /v1/models`` lists the served model; sleep mode needs
  ``--enable-sleep-mode`` and, for the endpoints, ``VLLM_SERVER_DEV_MODE=1``: ``POST
  /sleep?level=1`` (weights offloaded to CPU memory, KV cache dropped) or ``level=2`` (weights
  dropped too), ``POST /wake_up``, ``GET /is_sleeping`` → ``{"is_sleeping": bool}``.
- **SGLang** (``python -m sglang.launch_server``): ``GET /health``, ``GET /v1/models``; instead of
  sleep mode, ``--enable-memory-saver`` with ``POST /release_memory_occupation`` and ``POST
  /resume_memory_occupation`` (JSON body ``{}``); no "is sleeping" query.
- **demo** (``drctl.sim.inference_server``): vLLM's routes, and ``GET /load_progress``
  (``{"state", "progress"}``) while it loads its checkpoint, so a cold start shows progress.

Every engine answers ``POST /v1/completions`` with OpenAI's shape, which is what verify sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Engine(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    DEMO = "demo"


@dataclass(frozen=True)
class HttpCall:
    """One request to an instance: method, path, query parameters and JSON body."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    json: dict[str, Any] | None = None


@dataclass(frozen=True)
class EngineProfile:
    engine: Engine
    health_path: str
    """``GET``: 200 while the server runs (load balancer health checks, the prober)."""
    models_path: str
    """``GET``: the OpenAI model list; the model listed means it is ready to serve."""
    sleep: HttpCall | None
    """Put a loaded instance to sleep (a warm standby): None when the engine cannot."""
    wake: HttpCall | None
    """Wake a sleeping instance up (promoting a warm standby)."""
    is_sleeping_path: str | None
    """``GET`` → ``{"is_sleeping": bool}``; None when the engine has no such query."""
    load_progress_path: str | None
    """``GET`` → ``{"state", "progress"}`` while loading; None: readiness is the model list."""
    server_env: dict[str, str]
    """Environment the server needs for the calls above (vLLM's dev-mode endpoints)."""
    server_flags: tuple[str, ...]
    """Flags the server needs for the calls above."""

    def completion(self, model: str, prompt: str = "ping", max_tokens: int = 1) -> HttpCall:
        """A real, one-token completion (verify: the instance serves through the load balancer)."""
        return HttpCall("POST", "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens})

    @property
    def can_sleep(self) -> bool:
        return self.sleep is not None and self.wake is not None


_VLLM_SLEEP = HttpCall("POST", "/sleep", params={"level": "1"})
_VLLM_WAKE = HttpCall("POST", "/wake_up")

PROFILES: dict[Engine, EngineProfile] = {
    Engine.VLLM: EngineProfile(
        engine=Engine.VLLM,
        health_path="/health",
        models_path="/v1/models",
        sleep=_VLLM_SLEEP,
        wake=_VLLM_WAKE,
        is_sleeping_path="/is_sleeping",
        load_progress_path=None,
        server_env={"VLLM_SERVER_DEV_MODE": "1"},
        server_flags=("--enable-sleep-mode",),
    ),
    Engine.SGLANG: EngineProfile(
        engine=Engine.SGLANG,
        health_path="/health",
        models_path="/v1/models",
        sleep=HttpCall("POST", "/release_memory_occupation", json={}),
        wake=HttpCall("POST", "/resume_memory_occupation", json={}),
        is_sleeping_path=None,
        load_progress_path=None,
        server_env={},
        server_flags=("--enable-memory-saver",),
    ),
    Engine.DEMO: EngineProfile(
        engine=Engine.DEMO,
        health_path="/health",
        models_path="/v1/models",
        sleep=_VLLM_SLEEP,
        wake=_VLLM_WAKE,
        is_sleeping_path="/is_sleeping",
        load_progress_path="/load_progress",
        server_env={},
        server_flags=(),
    ),
}


def profile(engine: Engine | str) -> EngineProfile:
    """The profile of ``engine`` (``vllm``, ``sglang`` or ``demo``)."""
    return PROFILES[Engine(engine)]
