"""Fault injection on the local platform, for drills: what each scenario does to the processes
and checkpoints, and how it is undone (the node agents' fault endpoints are reached through
:mod:`drctl.platforms.node_agents`, as on Kubernetes).

A "node" on the local platform is a label on processes that share one machine, so a node that is
down is simulated by stopping (SIGSTOP) every process carrying its label: the instances and the
node's agent stop answering but keep their sockets, exactly like a hung host.

Pooled instances (``DRCTL_INSTANCE_MODE=pooled``) get the same faults through their pool's control
endpoint (``processes.signal_group`` routes a signal to one of them there): a kill crashes that
instance alone, a stop hangs it alone (it accepts, never answers), a continue resumes it.
"""

from __future__ import annotations

import signal

import httpx

from drctl.platforms.local import processes
from drctl.policies.engines import Engine, EngineProfile, HttpCall, profile

DEMO = profile(Engine.DEMO)
"""The engine ``reload_weights`` assumes when not told: drctl's stand-in."""


def kill(pid: int) -> None:
    """kill -9 of one process (its group: the instance and anything it started)."""
    processes.signal_group(pid, signal.SIGKILL)


def is_pooled(pid: int) -> bool:
    """True when ``pid`` is an instance of a pool (a thread of its pool's process)."""
    return processes.pool_control_port(pid) is not None


def stop(pids: list[int]) -> list[int]:
    """SIGSTOP each running process; returns those stopped (to continue them later)."""
    return _signal_running(pids, signal.SIGSTOP)


def resume(pids: list[int]) -> list[int]:
    """SIGCONT each process still there; returns those continued."""
    return _signal_running(pids, signal.SIGCONT)


def _signal_running(pids: list[int], sig: signal.Signals) -> list[int]:
    sent = [pid for pid in pids if processes.is_alive(pid)]
    for pid in sent:
        processes.signal_group(pid, sig)
    return sent


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
