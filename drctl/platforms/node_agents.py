"""GPU health from the node agents (the DaemonSet on Kubernetes) over HTTP, and the drills' way in.

Each agent answers ``GET /gpus?status=drain`` with the GPUs it wants drained; their ids
(``{node}/{index}``) are what placement keeps out and what ``DrainGpuWorkflow`` takes.

A GPU-failure drill injects an Xid through the agent's fault endpoints (``POST /faults/xid``,
``DELETE /faults``; only with ``--allow-fault-injection`` and its bearer token). Both platforms
reach their agents over HTTP the same way, so the client of those endpoints lives here, shared.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class AgentGpus:
    agent: str
    drain: list[str]
    error: str | None = None
    """Set when the agent could not be read: its GPUs are then unknown, not healthy."""


async def drained_gpus(
    agent_urls: Sequence[str], client: httpx.AsyncClient, request_timeout_s: float = 2.0
) -> list[AgentGpus]:
    """Ask every agent at once which of its GPUs must be drained."""

    async def ask(url: str) -> AgentGpus:
        try:
            response = await client.get(
                f"{url.rstrip('/')}/gpus", params={"status": "drain"}, timeout=request_timeout_s
            )
            response.raise_for_status()
            reports = response.json()
            return AgentGpus(url, sorted(f"{r['node']}/{r['index']}" for r in reports))
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            return AgentGpus(url, [], f"{type(exc).__name__}: {exc}")

    return list(await asyncio.gather(*(ask(url) for url in agent_urls)))


async def agent_node(http: httpx.AsyncClient, url: str, timeout_s: float = 2.0) -> str | None:
    """The node an agent says it runs on (its ``/healthz`` names it), or None when it does not
    answer. A 503 (its NVML polls stall) still answers: the node is there."""
    try:
        response = await http.get(f"{url.rstrip('/')}/healthz", timeout=timeout_s)
        node = response.json().get("node")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return str(node) if node else None


async def agent_urls(urls: Sequence[str], service: str | None) -> list[str]:
    """Agents to ask: the configured URLs, plus every address of a headless Service
    (``host:port``, e.g. the DaemonSet's ``drctl-node-agent.drctl.svc:9400``) — no RBAC needed."""
    found = list(urls)
    if service:
        host, _, port = service.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            infos = []
        addresses = {str(info[4][0]) for info in infos}
        found += sorted(f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses)
    return found


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check(response: httpx.Response, agent_url: str) -> None:
    if response.status_code == 404:
        raise RuntimeError(
            f"{agent_url} does not accept injected faults: start it with --allow-fault-injection "
            "(drctl up does; on Kubernetes the deploy/kubernetes/drills component does)"
        )
    if response.status_code == 401:
        raise RuntimeError(
            f"{agent_url} refused the fault-injection token: set DRCTL_FAULT_INJECTION_TOKEN (or _FILE) "
            "to the agents' token (drctl up: .drctl/fault-token; Kubernetes: the Secret drctl-fault-token)"
        )
    response.raise_for_status()


async def inject_xid(
    http: httpx.AsyncClient, agent_url: str, gpu_index: int, xid: int = 79, token: str | None = None
) -> str:
    """Make a node agent handle ``xid`` on one GPU (needs ``--allow-fault-injection`` and its token)."""
    response = await http.post(
        f"{agent_url.rstrip('/')}/faults/xid", json={"gpu": gpu_index, "xid": xid}, headers=_bearer(token)
    )
    _check(response, agent_url)
    return str(response.json().get("status"))


async def clear_xids(http: httpx.AsyncClient, agent_url: str, token: str | None = None) -> list[int]:
    """Make a node agent forget the Xids injected into it; returns the GPUs it re-classified."""
    response = await http.delete(f"{agent_url.rstrip('/')}/faults", headers=_bearer(token))
    _check(response, agent_url)
    return [int(i) for i in response.json().get("cleared", [])]


async def agent_for_node(http: httpx.AsyncClient, agent_urls: Sequence[str], node: str) -> str | None:
    """The URL of the agent that says it runs on ``node``."""
    for url in agent_urls:
        if await agent_node(http, url) == node:
            return url
    return None
