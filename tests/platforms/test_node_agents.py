"""Reading GPU health from node agents over HTTP, against a stand-in answering the agent's /gpus contract."""

from __future__ import annotations

import httpx
from aiohttp import web

from drctl.platforms.node_agents import agent_urls, drained_gpus


async def _serve(handler: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(handler)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_drained_gpus_are_collected_and_unreachable_agents_reported() -> None:
    async def gpus(request: web.Request) -> web.Response:
        assert request.query["status"] == "drain"
        return web.json_response([{"node": "gpu-node-1", "index": 3, "status": "drain", "reasons": ["Xid 79"]}])

    app = web.Application()
    app.router.add_get("/gpus", gpus)
    runner, url = await _serve(app)
    try:
        async with httpx.AsyncClient() as client:
            results = await drained_gpus([url, "http://127.0.0.1:9"], client, request_timeout_s=1.0)
    finally:
        await runner.cleanup()
    assert results[0].drain == ["gpu-node-1/3"] and results[0].error is None
    assert results[1].drain == [] and results[1].error is not None


async def test_agents_from_urls_and_a_service_name() -> None:
    assert await agent_urls(["http://a:9400"], None) == ["http://a:9400"]
    resolved = await agent_urls([], "localhost:9400")
    assert "http://127.0.0.1:9400" in resolved
    assert set(resolved) <= {"http://127.0.0.1:9400", "http://[::1]:9400"}
    assert await agent_urls([], "no-such-host.invalid:9400") == []
