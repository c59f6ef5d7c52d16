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

Reloading the weights from disk (the drill's model-corruption fault, :attr:`EngineProfile.reload_weights`):
the demo reloads and re-verifies its checkpoint when woken from sleep level 2; vLLM, once woken from
level 2, needs the weights' memory back (``/wake_up?tags=weights``), ``POST /collective_rpc``
``{"method": "reload_weights"}``, then its KV cache (``/wake_up?tags=kv_cache``); SGLang has
``/update_weights_from_disk`` (it needs the checkpoint's path), which drctl does not call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MODEL_HEADER = "model-name"
"""The header drctl's own requests through a load balancer carry besides the body's ``model``, so
they route whether the load balancer routes by the body, by this header or by path."""


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
    reload_weights: tuple[HttpCall, ...] = ()
    """Calls, in order, that make a running instance load its weights from disk again (and so find
    a corrupted checkpoint); empty when drctl has no such calls for the engine."""

    def completion(self, model: str, prompt: str = "ping", max_tokens: int = 1) -> HttpCall:
        """A real, one-token completion (verify: the instance serves through the load balancer)."""
        return completion(model, prompt, max_tokens)

    @property
    def can_sleep(self) -> bool:
        return self.sleep is not None and self.wake is not None

    def judge_health(
        self, status: int, body: str, *, asleep: bool | None, may_sleep: bool, load_progress: str | None = None
    ) -> HealthVerdict:
        """Whether an instance is healthy for its tier, from its answer on :attr:`health_path`.

        ``asleep``: what :attr:`is_sleeping_path` answered (None: not asked, or no answer), which
        is how a vLLM instance's sleep shows (its ``/health`` answers 200 asleep or awake); an older
        demo said so in the health answer instead (503 ``{"status": "sleeping"}``). ``may_sleep``:
        the instance is a warm standby, whose normal state is loaded and asleep; serving instances
        and hot standbys must be awake. ``load_progress``: the answer on :attr:`load_progress_path`
        (the demo), asked when the health answer is not 200, which says why (loading, failed and
        the error). A model that failed to load (e.g. a checkpoint that fails its checksum) is a
        final failure: it will not come back by itself."""
        path = self.health_path
        if status == 200 and not asleep:
            return HealthVerdict(True, f"{path} 200" + (", awake" if asleep is False else ""))
        state = _field(body, "status") or _field(load_progress, "state")
        if asleep or state == "sleeping":
            how = f"{path} {status}, {self.is_sleeping_path} true" if asleep else f"{path} {status} sleeping"
            if may_sleep:
                return HealthVerdict(True, f"{how}: loaded and asleep, a warm standby's normal state")
            return HealthVerdict(False, f"{how}: asleep, so it cannot serve until woken up")
        said = _field(body, "error") or _field(load_progress, "error") or body.strip()[:200] or "(no body)"
        return HealthVerdict(False, f"{path} {status}{f' {state}' if state else ''}: {said}", final=state == "failed")

    def lists_model(self, body: str, model: str) -> bool:
        """Whether an answer on :attr:`models_path` lists ``model`` (it is loaded and ready)."""
        try:
            data = json.loads(body).get("data")
        except (ValueError, AttributeError):
            return False
        return isinstance(data, list) and any(isinstance(m, dict) and m.get("id") == model for m in data)


@dataclass(frozen=True)
class HealthVerdict:
    """What an instance's health answer means for its tier (:meth:`EngineProfile.judge_health`)."""

    healthy: bool
    detail: str
    final: bool = False
    """The instance says its model failed to load: it will not recover by itself."""


def _field(body: str | None, name: str) -> str | None:
    """A string field of a JSON object answer; None for anything else (vLLM's empty health body)."""
    try:
        value = json.loads(body or "").get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def completion(model: str, prompt: str = "ping", max_tokens: int = 1) -> HttpCall:
    """``POST /v1/completions`` with OpenAI's body: what every engine answers, and what clients send."""
    return HttpCall("POST", "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens})


_VLLM_SLEEP = HttpCall("POST", "/sleep", params={"level": "1"})
_VLLM_WAKE = HttpCall("POST", "/wake_up")
_SLEEP_DROPPING_WEIGHTS = HttpCall("POST", "/sleep", params={"level": "2"})

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
        reload_weights=(
            _SLEEP_DROPPING_WEIGHTS,
            HttpCall("POST", "/wake_up", params={"tags": "weights"}),
            HttpCall("POST", "/collective_rpc", json={"method": "reload_weights"}),
            HttpCall("POST", "/wake_up", params={"tags": "kv_cache"}),
        ),
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
        reload_weights=(_SLEEP_DROPPING_WEIGHTS, _VLLM_WAKE),
    ),
}


def profile(engine: Engine | str) -> EngineProfile:
    """The profile of ``engine`` (``vllm``, ``sglang`` or ``demo``)."""
    return PROFILES[Engine(engine)]
