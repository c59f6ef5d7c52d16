"""Everything drctl calls on an instance goes through its model's engine profile: the local platform
(probe, wait for the load, sleep, wake up, verify, start), the prober, the drill's reload fault and
load generator, each against a small recording stand-in of vLLM's or SGLang's server.

The stand-in answers as the engine does (vLLM: ``/health`` 200 asleep or awake, ``/is_sleeping``;
SGLang: ``/release_memory_occupation`` and ``/resume_memory_occupation``, no sleep query, so
``/is_sleeping`` is 404) and doubles as Envoy for verify: its ``/clusters`` admin answer lists the
instance healthy at priority 0, and it answers completions as the load balancer would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from temporalio.exceptions import ApplicationError

from drctl.activities.load import LoadGenerator
from drctl.detectors.prober import SLEEP_CHECK_EVERY, Prober
from drctl.payloads import ErrorType, FailoverRequest, IncidentTicket, ReconcileAction, ReconcileActionKind, Role
from drctl.platforms.local import faults
from drctl.platforms.local.checkpoints import corrupt_checkpoint, ensure_checkpoint
from drctl.platforms.local.platform import LocalPlatform
from drctl.platforms.local.registry import InstanceRegistry, LocalInstance
from drctl.policies.engines import Engine, profile
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings
from tests.sim.test_inference_server import MODEL as DEMO_MODEL
from tests.sim.test_inference_server import demo_server

MODEL = "m"
INSTANCE = "m-0"


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    model_header: str | None


@dataclass
class FakeEngine:
    """A recording stand-in of one engine's server (and of Envoy's admin ``/clusters``)."""

    engine: Engine
    calls: list[Call] = field(default_factory=list)
    asleep: bool = False
    listed_after: int = 0
    """Answer ``/v1/models`` without the model this many times first (loading)."""
    port: int = 0
    down: bool = False
    """The instance fails its health check (503) and Envoy's active health check says so."""
    served_by: str = INSTANCE
    """Who answers a completion sent through "Envoy" (one with the ``model-name`` header)."""

    def paths(self, *, admin: bool = False) -> list[str]:
        return [f"{c.method} {c.path}" for c in self.calls if admin or c.path != "/clusters"]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body: Any = await request.json() if request.can_read_body else None
        self.calls.append(
            Call(request.method, request.path, dict(request.query), body, request.headers.get("model-name"))
        )
        route = (request.method, request.path)
        vllm = self.engine == Engine.VLLM
        if route == ("GET", "/health"):  # both engines: 200 while the server runs, asleep or not
            return web.Response(status=503 if self.down else 200)
        if route == ("GET", "/v1/models"):
            listed = self.paths().count("GET /v1/models") > self.listed_after
            return web.json_response({"object": "list", "data": [{"id": MODEL}] if listed else []})
        if route == ("POST", "/v1/completions"):
            answer = {"object": "text_completion", "model": body["model"], "choices": [{"text": "x"}]}
            via_lb = request.headers.get("model-name") is not None
            return web.json_response(answer, headers={"x-drctl-instance": self.served_by} if via_lb else None)
        if route == ("GET", "/clusters"):
            host = {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}},
                "priority": 0,
                "hostname": INSTANCE,
                "health_status": {"eds_health_status": "HEALTHY", "failed_active_health_check": self.down},
            }
            return web.json_response({"cluster_statuses": [{"name": MODEL, "host_statuses": [host]}]})
        if vllm and route == ("GET", "/is_sleeping"):
            return web.json_response({"is_sleeping": self.asleep})
        if route in ((("POST", "/sleep"),) if vllm else (("POST", "/release_memory_occupation"),)):
            self.asleep = True
            return web.Response(status=200)
        if route in ((("POST", "/wake_up"),) if vllm else (("POST", "/resume_memory_occupation"),)):
            self.asleep = False
            return web.Response(status=200)
        if vllm and route == ("POST", "/collective_rpc"):
            return web.json_response({"results": [None]})
        return web.json_response({"error": f"no route {request.method} {request.path}"}, status=404)


@pytest.fixture(params=[Engine.VLLM, Engine.SGLANG], ids=str)
async def server(request: pytest.FixtureRequest) -> AsyncIterator[FakeEngine]:
    fake = FakeEngine(request.param)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.port = runner.addresses[0][1]
    try:
        yield fake
    finally:
        await runner.cleanup()


def policy(engine: Engine, **local: Any) -> DRPolicy:
    return DRPolicy.model_validate({"models": [{"name": MODEL, "engine": engine.value}], "local": local})


@pytest.fixture()
async def platform(server: FakeEngine, tmp_path: Path) -> AsyncIterator[LocalPlatform]:
    settings = DrctlSettings(state_dir=tmp_path / "state", envoy_port=server.port, envoy_admin_port=server.port)
    local = LocalPlatform(settings, policy(server.engine))
    try:
        yield local
    finally:
        await local.close()


def record(platform: LocalPlatform, server: FakeEngine, role: Role) -> LocalInstance:
    """The instance as the registry records it: its "process" is this test's (alive), its port the fake's."""
    with platform.registry.edit() as instances:
        instances[INSTANCE] = instance = LocalInstance(
            id=INSTANCE, model=MODEL, role=role, port=server.port, pid=os.getpid()
        )
    return instance


async def test_a_warm_standby_is_probed_on_the_engines_health_path(platform: LocalPlatform, server: FakeEngine) -> None:
    server.asleep = True
    healthy, why = await platform.probe(record(platform, server, Role.WARM).to_instance())
    assert healthy, why
    if server.engine == Engine.VLLM:  # /health says 200 asleep or awake: /is_sleeping tells
        assert server.paths() == ["GET /health", "GET /is_sleeping"]
        assert "loaded and asleep" in why
    else:
        assert server.paths() == ["GET /health"] and why == "/health 200"


async def test_a_vllm_hot_standby_that_sleeps_is_not_healthy(platform: LocalPlatform, server: FakeEngine) -> None:
    server.asleep = True
    healthy, why = await platform.probe(record(platform, server, Role.HOT).to_instance())
    if server.engine == Engine.VLLM:
        assert not healthy and "asleep" in why, why
    else:  # SGLang has no sleep query: its health answer is all there is
        assert healthy and why == "/health 200"


async def test_promoting_a_warm_standby_wakes_it_with_the_engines_call(
    platform: LocalPlatform, server: FakeEngine
) -> None:
    server.asleep = True
    detail = await platform.promote(record(platform, server, Role.WARM).to_instance())
    wake = "/wake_up" if server.engine == Engine.VLLM else "/resume_memory_occupation"
    assert detail == f"warm standby woken up ({wake})"
    assert server.paths() == [f"POST {wake}"] and not server.asleep
    assert server.calls[0].body == (None if server.engine == Engine.VLLM else {})
    assert platform.registry.load()[INSTANCE].role == Role.PROMOTING


async def test_a_model_is_loaded_once_its_engine_lists_it(platform: LocalPlatform, server: FakeEngine) -> None:
    server.listed_after = 2
    beats: list[str] = []
    detail = await platform.wait_loaded(
        record(platform, server, Role.PROMOTING).to_instance(), lambda _f, s: beats.append(s)
    )
    assert detail.startswith("loaded in ")
    assert server.paths().count("GET /v1/models") == 3 and "GET /load_progress" not in server.paths()
    assert beats[-1] == "ready" and "loading" in beats


async def test_a_warm_standby_is_put_to_sleep_with_the_engines_call(
    platform: LocalPlatform, server: FakeEngine
) -> None:
    record(platform, server, Role.WARM)
    platform._to_settle = [INSTANCE]  # as ensure_fleet leaves it after starting the process
    await platform.settle_fleet()
    sleep = [c for c in server.calls if c.method == "POST"]
    if server.engine == Engine.VLLM:
        assert [(c.path, c.query) for c in sleep] == [("/sleep", {"level": "1"})]
    else:
        assert [(c.path, c.body) for c in sleep] == [("/release_memory_occupation", {})]
    assert server.asleep and platform.registry.load()[INSTANCE].lb_priority is None


async def test_retiering_warm_to_hot_wakes_it_up(platform: LocalPlatform, server: FakeEngine) -> None:
    server.asleep = True
    record(platform, server, Role.WARM)
    action = ReconcileAction(kind=ReconcileActionKind.RETIER, model=MODEL, instance=INSTANCE, tier=Role.HOT)
    assert "warm → hot" in await platform.retier_instance(action, lambda _f, _s: None)
    wake = "/wake_up" if server.engine == Engine.VLLM else "/resume_memory_occupation"
    assert server.paths()[:2] == [f"POST {wake}", "GET /v1/models"] and not server.asleep


async def test_verify_sends_a_one_token_completion_through_the_load_balancer(
    platform: LocalPlatform, server: FakeEngine
) -> None:
    detail = await platform.verify(record(platform, server, Role.SERVING).to_instance(), lambda _f, _s: None)
    assert detail.startswith("/v1/completions via LB 200")
    (completion,) = [c for c in server.calls if c.path == "/v1/completions"]
    assert completion.method == "POST" and completion.model_header == MODEL  # routes by header or body
    assert completion.body == {"model": MODEL, "prompt": "drctl verify", "max_tokens": 1}


async def test_verify_checks_the_instance_itself_when_another_answered_through_the_load_balancer(
    platform: LocalPlatform, server: FakeEngine
) -> None:
    """The instance it replaces still serves until this one is verified (a zone failover of a zone
    that is up): Envoy's answer from it says nothing of the promoted one, which is then asked itself."""
    server.served_by = "m-9"
    detail = await platform.verify(record(platform, server, Role.SERVING).to_instance(), lambda _f, _s: None)
    assert "(served by m-9), and m-0 itself 200" in detail
    via_lb, direct = [c for c in server.calls if c.path == "/v1/completions"]
    assert via_lb.model_header == MODEL and direct.model_header is None
    assert direct.body == {"model": MODEL, "prompt": "drctl verify", "max_tokens": 1}


async def test_verify_fails_the_instance_once_it_fails_its_own_probes_as_long_as_the_prober_would_wait(
    platform: LocalPlatform, server: FakeEngine
) -> None:
    """A standby that hangs or dies after its load check fails verify as the prober would judge it
    (here 3 probes 1 s apart), not after verify's three 30-second tries: the runbook then tries its next standby."""
    platform.policy = platform.policy.model_copy(
        update={"detection": platform.policy.detection.model_copy(update={"probe_interval": timedelta(seconds=1)})}
    )
    server.down = True
    beats: list[str] = []
    start = time.monotonic()
    with pytest.raises(ApplicationError) as failed:
        await platform.verify(record(platform, server, Role.SERVING).to_instance(), lambda _f, s: beats.append(s))
    took = time.monotonic() - start
    assert failed.value.type == ErrorType.INSTANCE_FAILED and failed.value.non_retryable
    assert "/health" in str(failed.value) and "failed_active_health_check" in str(failed.value)
    # The prober's judgment (3 probes a second apart) after verify's first second without Envoy.
    assert 1.0 + 3.0 <= took < 10.0, took
    assert "POST /v1/completions" not in server.paths()  # Envoy never counted it healthy
    assert beats and all("failed_active_health_check" in b for b in beats)


async def test_verify_fails_at_once_when_the_instances_process_is_gone(
    platform: LocalPlatform, server: FakeEngine
) -> None:
    server.down = True
    instance = record(platform, server, Role.SERVING)
    with platform.registry.edit() as instances:
        instances[INSTANCE] = instance.model_copy(update={"pid": dead_pid()})
    start = time.monotonic()
    with pytest.raises(ApplicationError) as failed:
        await platform.verify(instance.to_instance(), lambda _f, _s: None)
    assert failed.value.type == ErrorType.INSTANCE_FAILED and "is not running" in str(failed.value)
    assert time.monotonic() - start < 3.0  # the first look at the instance, after Envoy's first second


async def test_verify_does_not_probe_an_instance_envoy_counts_healthy_at_once(
    platform: LocalPlatform, server: FakeEngine
) -> None:
    await platform.verify(record(platform, server, Role.SERVING).to_instance(), lambda _f, _s: None)
    assert "GET /health" not in server.paths()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def test_an_instance_process_starts_with_the_engines_environment(server: FakeEngine, tmp_path: Path) -> None:
    out = tmp_path / "env"
    script = f"import os, pathlib; pathlib.Path({str(out)!r}).write_text(os.environ.get('VLLM_SERVER_DEV_MODE', '-'))"
    settings = DrctlSettings(state_dir=tmp_path / "state", instance_base_port=server.port + 1)
    platform = LocalPlatform(settings, policy(server.engine, command=["{python}", "-c", script, "{instance}"]))
    try:
        platform._start_process(LocalInstance(id=INSTANCE, model=MODEL, role=Role.PROMOTING))
        await asyncio.to_thread(wait_for, out)
        assert out.read_text() == ("1" if server.engine == Engine.VLLM else "-")
    finally:
        await platform.close()


def wait_for(path: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


# -- the prober ---------------------------------------------------------------------------------------


async def test_the_prober_asks_the_engines_paths(server: FakeEngine, tmp_path: Path) -> None:
    registry = InstanceRegistry(tmp_path / "instances.json")
    with registry.edit() as instances:
        instances[INSTANCE] = LocalInstance(
            id=INSTANCE, model=MODEL, role=Role.SERVING, port=server.port, pid=os.getpid()
        )

    async def report(request: FailoverRequest) -> IncidentTicket:
        raise AssertionError("nothing to report")

    prober = Prober(policy(server.engine), registry, report)
    try:
        instance = registry.load()[INSTANCE]
        assert await prober._probe(instance) == (True, False)
        server.asleep = True  # a serving vLLM instance asleep answers /health 200 and cannot serve
        vllm = server.engine == Engine.VLLM
        # is_sleeping is asked on every SLEEP_CHECK_EVERY-th probe (the 1st, the 4th, ...), then on
        # every probe while the instance is seen asleep.
        verdicts = [await prober._probe(instance) for _ in range(SLEEP_CHECK_EVERY + 1)]
        assert verdicts == [(True, False)] * (SLEEP_CHECK_EVERY - 1) + [(not vllm, False)] * 2
    finally:
        await prober.aclose()
    health, asked = ["GET /health"], ["GET /health", "GET /is_sleeping"] if vllm else ["GET /health"]
    assert server.paths() == asked + health * (SLEEP_CHECK_EVERY - 1) + asked * 2


# -- the drill's fault and load ----------------------------------------------------------------------


async def test_reloading_weights_goes_through_the_profile(server: FakeEngine) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient() as http:
        if server.engine == Engine.SGLANG:
            with pytest.raises(RuntimeError, match="not supported for sglang"):
                await faults.reload_weights(http, base, profile(server.engine))
            assert server.calls == []
            return
        answer = await faults.reload_weights(http, base, profile(server.engine))
    assert answer == "wake_up 200"
    assert [(c.path, c.query, c.body) for c in server.calls] == [
        ("/sleep", {"level": "2"}, None),
        ("/wake_up", {"tags": "weights"}, None),
        ("/collective_rpc", {}, {"method": "reload_weights"}),
        ("/wake_up", {"tags": "kv_cache"}, None),
    ]


async def test_the_load_generator_sends_openai_completions(server: FakeEngine) -> None:
    load = LoadGenerator(f"http://127.0.0.1:{server.port}", MODEL, rps=50, streams=False)
    load.start()
    await asyncio.sleep(0.1)
    samples = await load.stop()
    assert samples and all(s.ok for s in samples)
    assert {c.path for c in server.calls} == {"/v1/completions"}
    assert all(c.model_header == MODEL and c.body["model"] == MODEL for c in server.calls)


async def test_the_load_generator_counts_requests_past_its_cap_failed_and_does_not_queue_them() -> None:
    """A model that does not answer (down, its requests held by the load balancer): at most
    ``max_inflight`` requests wait, the ones due after them are counted failed without being sent.
    Queued on the connection pool instead, they pegged the worker's CPU."""
    hold = asyncio.Event()
    arrived = 0

    async def never_answers(_: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await hold.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/v1/completions", never_answers)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        load = LoadGenerator(f"http://127.0.0.1:{port}", MODEL, rps=100, streams=False, max_inflight=5, timeout_s=5)
        load.start()
        await asyncio.sleep(0.5)
        hold.set()  # the held requests are answered now
        samples = await load.stop()
    finally:
        await runner.cleanup()
    assert arrived == 5  # never more than the cap were sent
    not_sent = [s for s in samples if s.status == "not-sent"]
    assert len(not_sent) >= 30 and not any(s.ok for s in not_sent)
    assert "5 requests already in flight" in not_sent[0].error
    assert sum(1 for s in samples if s.ok) == 5


async def test_the_demo_reload_finds_a_corrupted_checkpoint(tmp_path: Path) -> None:
    """The drill's default (the demo engine) against drctl's real stand-in: sleep level 2, then the
    wake-up reloads and re-verifies the checkpoint, and says that it does not match."""
    checkpoint = tmp_path / f"{DEMO_MODEL}.ckpt"
    ensure_checkpoint(checkpoint, DEMO_MODEL, 256 * 1024)
    with demo_server(checkpoint, tmp_path) as server:
        await asyncio.to_thread(server.wait_until, "ready")
        corrupt_checkpoint(checkpoint, offset=4096)
        async with httpx.AsyncClient() as http:
            answer = await faults.reload_weights(http, server.url)
    assert answer.startswith("wake_up 503: ") and "checksum" in answer, answer
