"""Making a running model instance load its weights from disk again, through its engine's calls.

This is how a model-corruption drill makes the instance find the damage: a server that already
holds its weights in GPU memory never reads the file again by itself. Both platforms reach their
instances over HTTP the same way (a local process's port, a pod's IP), so the calls live here,
shared, as the node agents' client does (:mod:`drctl.platforms.node_agents`).
"""

from __future__ import annotations

import httpx

from drctl.policies.engines import Engine, EngineProfile, HttpCall, profile

DEMO = profile(Engine.DEMO)
"""The engine ``reload_weights`` assumes when not told: drctl's stand-in."""


async def reload_weights(http: httpx.AsyncClient, base_url: str, engine: EngineProfile = DEMO) -> str:
    """Make an instance load its weights from disk again, through its engine's ``reload_weights``
    calls, so that a corrupted checkpoint is found (the drill's model-corruption fault). The demo:
    sleep level 2 drops the weights and waking up reloads and re-verifies them; vLLM: sleep level 2,
    then the weights' memory back, ``reload_weights`` over ``/collective_rpc``, the KV cache back
    (all dev-mode endpoints). SGLang has no such calls in its profile: the fault runs on the demo
    and vLLM only. Putting it to sleep must succeed; from then on the first call that fails is the
    answer (with a corrupted checkpoint the reload fails, which is the point), else the last one's."""
    if not engine.reload_weights:
        raise RuntimeError(f"reloading the weights from disk is not supported for {engine.engine} instances")
    first, *rest = engine.reload_weights
    (await _send(http, base_url, first, 5.0)).raise_for_status()
    answer = f"{first.path} done"
    for call in rest:
        response = await _send(http, base_url, call, 30.0)
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, dict):  # OpenAI's error shape (vLLM's, the demo's): {"message", "type", ...}
            error = error.get("message")
        answer = f"{call.path.lstrip('/')} {response.status_code}" + (f": {error}" if error else "")
        if not response.is_success:
            break
    return answer


async def _send(http: httpx.AsyncClient, base_url: str, call: HttpCall, timeout_s: float) -> httpx.Response:
    return await http.request(
        call.method, f"{base_url}{call.path}", params=call.params, json=call.json, timeout=timeout_s
    )
