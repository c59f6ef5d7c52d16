"""The Envoy data plane against the real ``envoy`` binary and backends that can be ``kill -9``ed.

Each test starts its own Envoy (``--disable-hot-restart``) on free loopback ports, in front of two
tiny HTTP backends run as subprocesses: ``a`` serving (priority 0) and ``b`` hot standby (priority 1).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from drctl.platforms.local.envoy import (
    Endpoint,
    HostStatus,
    cluster_hosts,
    eds_document,
    envoy_yaml,
    render_bootstrap,
    retries_to_wait,
    wait_until_ready,
    write_eds,
)
from drctl.policies.schema import DRPolicy
from drctl.workers.binaries import find_binary

HOST = "127.0.0.1"
MODEL = "m"
EMPTY_MODEL = "n"
"""A model without endpoints; its name is also one that YAML 1.1 parsers read as ``false``."""
POLICY = DRPolicy.model_validate({"models": [{"name": MODEL}, {"name": EMPTY_MODEL}]})

BACKEND = r"""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name, delay = sys.argv[1], float(sys.argv[2])
hang_healthz = threading.Event()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else Nagle + delayed ACK add 40 ms to every response
    # Buffered: headers and body leave in one send() when the handler returns. Unbuffered, a kill
    # between the two writes leaves Envoy with response headers already passed on to the client and
    # no body; no retry can repair that (true of any server that dies mid-response).
    wbufsize = 1 << 16

    def _reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        if self.path in ("/health", "/healthz"):
            if hang_healthz.is_set():
                time.sleep(60)
            return self._reply({"ok": True})
        if self.path == "/control/hang-healthz":
            hang_healthz.set()
            return self._reply({"ok": True})
        time.sleep(delay)
        self._reply({"backend": name, "path": self.path})

    do_POST = do_GET

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Backend:
    name: str
    port: int
    proc: asyncio.subprocess.Process

    async def kill(self) -> None:
        """``kill -9`` and reap: when this returns the process and its sockets are gone."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    def endpoint(self, priority: int) -> Endpoint:
        return Endpoint(host=HOST, port=self.port, priority=priority, instance=self.name)


@dataclass
class Stack:
    lb_url: str
    admin_url: str
    eds_dir: Path
    a: Backend
    b: Backend

    @property
    def predict_url(self) -> str:
        return f"{self.lb_url}/v1/models/{MODEL}/predict"


async def start_process(
    script: str, *args: str, procs: list[asyncio.subprocess.Process]
) -> tuple[int, asyncio.subprocess.Process]:
    """Run ``python -c script *args``; it prints its port on its first line. Appended to ``procs``."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 10)
    return int(line), proc


async def _start_backend(name: str, procs: list[asyncio.subprocess.Process], delay: float = 0.005) -> Backend:
    port, proc = await start_process(BACKEND, name, str(delay), procs=procs)
    return Backend(name=name, port=port, proc=proc)


async def start_envoy(
    tmp_path: Path,
    policy: DRPolicy,
    eds_dir: Path,
    procs: list[asyncio.subprocess.Process],
    xds_port: int | None = None,
) -> tuple[str, str]:
    """Start the real Envoy on ``policy``'s bootstrap (EDS files in ``eds_dir`` written already, read
    by Envoy itself or, with ``xds_port``, sent by drctl's xDS server there) and wait until it is
    ready; returns ``(listener URL, admin URL)``. Appended to ``procs``."""
    envoy = find_binary("envoy")  # a real part: missing Envoy fails the test, it does not skip
    listen_port, admin_port = _free_port(), _free_port()
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(
        envoy_yaml(
            render_bootstrap(
                policy,
                listen_host=HOST,
                listen_port=listen_port,
                admin_port=admin_port,
                eds_dir=eds_dir,
                xds_port=xds_port,
            )
        )
    )
    log = tmp_path / "envoy.log"
    procs.append(
        await asyncio.create_subprocess_exec(
            envoy,
            *("-c", str(bootstrap), "--disable-hot-restart", "--concurrency", "2"),
            *("-l", "warning", "--log-path", str(log)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    )
    admin_url = f"http://{HOST}:{admin_port}"
    try:
        await wait_until_ready(admin_url, 15)
    except TimeoutError:
        pytest.fail("Envoy did not start:\n" + (log.read_text() if log.exists() else "(no log)"))
    return f"http://{HOST}:{listen_port}", admin_url


async def stop_processes(procs: list[asyncio.subprocess.Process]) -> None:
    """``kill -9`` and reap, last started first."""
    for proc in reversed(procs):
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    procs: list[asyncio.subprocess.Process] = []
    try:
        a = await _start_backend("a", procs)
        b = await _start_backend("b", procs)
        eds_dir = tmp_path / "eds"
        write_eds(eds_dir, MODEL, [a.endpoint(0), b.endpoint(1)])
        write_eds(eds_dir, EMPTY_MODEL, [])
        lb_url, admin_url = await start_envoy(tmp_path, POLICY, eds_dir, procs)
        # Envoy is ready only after the first health check of the initial hosts.
        assert {(h.instance, h.priority, h.healthy) for h in await cluster_hosts(admin_url, MODEL)} == {
            ("a", 0, True),
            ("b", 1, True),
        }
        yield Stack(lb_url=lb_url, admin_url=admin_url, eds_dir=eds_dir, a=a, b=b)
    finally:
        await stop_processes(procs)


@dataclass(frozen=True)
class Outcome:
    sent: float
    done: float
    status: int
    backend: str | None
    error: str | None = None


async def _request_loop(client: httpx.AsyncClient, url: str, count: int, out: list[Outcome]) -> None:
    """``count`` POSTs one after the other, ~5 ms apart; every outcome recorded, none raised."""
    for i in range(count):
        sent = time.monotonic()
        try:
            response = await client.post(url, json={"prompt": f"request {i}"})
            backend = response.json().get("backend") if response.status_code == 200 else None
            error = None if response.status_code == 200 else response.text[:200]
            out.append(Outcome(sent, time.monotonic(), response.status_code, backend, error))
        except httpx.HTTPError as exc:
            out.append(Outcome(sent, time.monotonic(), -1, None, repr(exc)))
        await asyncio.sleep(0.005)


async def _watch_hosts(
    admin_url: str, client: httpx.AsyncClient, out: list[tuple[float, list[HostStatus]]], stop: asyncio.Event
) -> None:
    """Snapshot the cluster's hosts every few ms until ``stop`` is set."""
    while not stop.is_set():
        out.append((time.monotonic(), await cluster_hosts(admin_url, MODEL, client)))
        await asyncio.sleep(0.003)


def _failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


# --- pure rendering ---------------------------------------------------------------------------------


def test_eds_document_groups_endpoints_by_priority() -> None:
    doc = eds_document(
        MODEL,
        [Endpoint(HOST, 2, 1, "s1"), Endpoint(HOST, 1, 0, "p1"), Endpoint(HOST, 3, 1, "s2")],
    )
    (assignment,) = doc["resources"]
    assert assignment["cluster_name"] == MODEL
    groups = [(g["priority"], [e["endpoint"]["hostname"] for e in g["lb_endpoints"]]) for g in assignment["endpoints"]]
    assert groups == [(0, ["p1"]), (1, ["s1", "s2"])]
    assert eds_document(MODEL, [])["resources"][0]["endpoints"] == []
    assert doc["version_info"] != eds_document(MODEL, [])["version_info"]


def test_render_bootstrap_takes_the_policy() -> None:
    policy = DRPolicy.model_validate(
        {
            "models": [{"name": MODEL}],
            "loadBalancer": {
                "healthCheck": {"interval": "2s", "timeout": "250ms", "unhealthyThreshold": 4, "path": "/ready"},
                "retries": {"attempts": 1, "perTryTimeout": "3s", "retryOn": "connect-failure"},
                "requestTimeout": "45s",
            },
        }
    )
    boot = render_bootstrap(policy, listen_host=HOST, listen_port=1, admin_port=2, eds_dir=Path("/x/eds"))
    (cluster,) = boot["static_resources"]["clusters"]
    (hc,) = cluster["health_checks"]
    assert (hc["interval"], hc["no_traffic_interval"], hc["timeout"], hc["unhealthy_threshold"]) == (
        "2s",
        "2s",
        "0.25s",
        4,
    )
    assert hc["http_health_check"]["path"] == "/ready"
    source = cluster["eds_cluster_config"]["eds_config"]["path_config_source"]
    # A folder per model: a write to one model's file is not seen by the other clusters' watches.
    assert source == {"path": "/x/eds/m/eds.yaml", "watched_directory": {"path": "/x/eds/m"}}
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = [r["route"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if "route" in r]
    assert len(routes) == 3  # by path, by the body's model, by header
    route = routes[0]
    # The request timeout bounds silence, not a whole response: a long stream lives.
    assert all((r["timeout"], r["idle_timeout"]) == ("0s", "45s") for r in routes)
    retry = route["retry_policy"]
    # One quick retry (to a standby), then enough spaced ones to wait out the request timeout (45 s,
    # shorter than the default RTO) for a replacement.
    assert retry["num_retries"] == 1 + retries_to_wait(timedelta(seconds=45))
    assert (retry["per_try_timeout"], retry["retry_on"]) == ("3s", "connect-failure")
    assert retry["retry_back_off"] == {"base_interval": "0.025s", "max_interval": "0.5s"}
    # A single retry must leave priority 0 at once, or it could never reach the standby.
    assert retry["retry_priority"]["typed_config"]["update_frequency"] == 1


def test_admin_api_stays_on_loopback_when_the_listener_is_public() -> None:
    """Envoy's admin API has no authentication (it can /quitquitquit): only this machine reaches it."""
    policy = DRPolicy.model_validate({"models": [{"name": MODEL}]})
    boot = render_bootstrap(policy, listen_host="0.0.0.0", listen_port=1, admin_port=2, eds_dir=Path("/x/eds"))
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 2}
    listener = boot["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["address"] == "0.0.0.0"


def test_envoy_yaml_quotes_names_that_look_like_bools_or_numbers() -> None:
    text = envoy_yaml(eds_document("n", [Endpoint(HOST, 1, 0, "1e3")]))
    assert '"cluster_name": "n"' in text
    assert '"hostname": "1e3"' in text
    assert '"port_value": 1\n' in text
    assert yaml.safe_load(text) == eds_document("n", [Endpoint(HOST, 1, 0, "1e3")])


# --- the real Envoy ---------------------------------------------------------------------------------


async def test_routes_by_path_and_header_to_the_serving_host(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        by_path = await client.post(stack.predict_url, json={})
        assert by_path.status_code == 200
        assert by_path.json() == {"backend": "a", "path": f"/v1/models/{MODEL}/predict"}

        by_header = await client.get(f"{stack.lb_url}/generate", headers={"model-name": MODEL})
        assert by_header.status_code == 200
        assert by_header.json() == {"backend": "a", "path": "/generate"}
        # No trailing slash: not the model's prefix but OpenAI's retrieve-model, which Envoy answers.
        retrieved = await client.get(f"{stack.lb_url}/v1/models/{MODEL}")
        assert retrieved.status_code == 200 and retrieved.json()["id"] == MODEL

        for unknown in (
            await client.post(f"{stack.lb_url}/v1/models/nope/predict", json={}),
            await client.get(f"{stack.lb_url}/generate", headers={"model-name": "nope"}),
        ):
            assert unknown.status_code == 404
            assert unknown.headers["content-type"] == "application/json"
            error = unknown.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("NotFoundError", 404, "model")
            assert error["message"].endswith(f"header. The fleet serves: {MODEL}, {EMPTY_MODEL}.")
        outside = await client.get(f"{stack.lb_url}/v1/models/nope")  # OpenAI's retrieve-model, a name outside
        assert outside.status_code == 404
        assert (
            outside.json()["error"]["message"] == f"The model does not exist; the fleet serves: {MODEL}, {EMPTY_MODEL}."
        )

        # A known model without endpoints is routed (Envoy read its file) but has nobody to serve it;
        # Envoy's own 503 comes in OpenAI's error shape.
        empty = await client.post(f"{stack.lb_url}/v1/models/{EMPTY_MODEL}/predict", json={})
        assert empty.status_code == 503
        assert empty.json() == {
            "error": {"message": "no healthy upstream", "type": "ServiceUnavailableError", "param": None, "code": 503}
        }
    assert await cluster_hosts(stack.admin_url, EMPTY_MODEL) == []
    with pytest.raises(LookupError):
        await cluster_hosts(stack.admin_url, "nope")


@pytest.mark.parametrize(("clients", "per_client"), [(1, 200), (8, 25)], ids=["sequential", "concurrent"])
async def test_kill_9_of_the_serving_host_fails_no_request(stack: Stack, clients: int, per_client: int) -> None:
    """200 requests ~5 ms apart while ``a`` is killed.

    One client: each request tried on ``a`` must be retried on the standby (previous_priorities),
    since the outlier detector ejects ``a`` only after 5 failures. Eight clients: requests are in
    flight at the kill (reset -> retry), and more retries run at once than Envoy's default retry
    circuit breaker (3) would allow.
    """
    outcomes: list[Outcome] = []
    snapshots: list[tuple[float, list[HostStatus]]] = []
    kill_sent = killed_at = 0.0

    async def kill_a() -> None:
        nonlocal kill_sent, killed_at
        await asyncio.sleep(0.2)
        kill_sent = time.monotonic()
        await stack.a.kill()
        killed_at = time.monotonic()

    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=10) as client:
        watcher = asyncio.create_task(_watch_hosts(stack.admin_url, client, snapshots, stop))
        loops = (_request_loop(client, stack.predict_url, per_client, outcomes) for _ in range(clients))
        await asyncio.gather(kill_a(), *loops)
        stop.set()
        await watcher

    assert len(outcomes) == 200
    assert _failures(outcomes) == []
    before = [o for o in outcomes if o.done < killed_at]
    after = [o for o in outcomes if o.sent > killed_at]
    assert before and all(o.backend == "a" for o in before)
    assert len(after) >= 50
    assert {o.backend for o in after} == {"b"}

    # Envoy stops trying the dead host once the outlier detector ejects it (5 consecutive failures).
    a_unhealthy = [t for t, hosts in snapshots if any(h.instance == "a" and not h.healthy for h in hosts)]
    assert a_unhealthy, "Envoy never marked the killed host unhealthy"
    final = {h.instance: h for h in snapshots[-1][1]}
    assert "failed_outlier_check" in final["a"].flags
    assert final["b"].healthy
    first_b = min(o.done for o in outcomes if o.backend == "b")
    print(
        f"\nfailover: a reaped {1000 * (killed_at - kill_sent):.1f} ms after SIGKILL; "
        f"first response from b {1000 * (first_b - kill_sent):.1f} ms, "
        f"a marked unhealthy {1000 * (a_unhealthy[0] - kill_sent):.1f} ms after SIGKILL ({final['a'].flags}); "
        f"{len(after)} requests after the kill, max latency {1000 * max(o.done - o.sent for o in after):.1f} ms"
    )


async def test_moving_the_standby_to_priority_0_keeps_it_healthy(stack: Stack) -> None:
    outcomes: list[Outcome] = []
    snapshots: list[tuple[float, list[HostStatus]]] = []
    moved_at = 0.0

    async def fail_over() -> None:
        nonlocal moved_at
        await asyncio.sleep(0.1)
        await stack.a.kill()
        await asyncio.sleep(0.2)
        # From now on b's health checks time out. Envoy keeps a host it already knows healthy for
        # ~3 more checks; a host it took for new would fail its first check within 0.5 s.
        async with httpx.AsyncClient(timeout=2) as direct:
            (await direct.get(f"http://{HOST}:{stack.b.port}/control/hang-healthz")).raise_for_status()
        write_eds(stack.eds_dir, MODEL, [stack.b.endpoint(0)])
        moved_at = time.monotonic()

    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=10) as client:
        watcher = asyncio.create_task(_watch_hosts(stack.admin_url, client, snapshots, stop))
        await asyncio.gather(fail_over(), *(_request_loop(client, stack.predict_url, 70, outcomes) for _ in range(4)))
        # Watch past the 0.5 s health-check timeout that a host taken for new would hit.
        await asyncio.sleep(max(0.0, moved_at + 1.2 - time.monotonic()))
        stop.set()
        await watcher
        final = await cluster_hosts(stack.admin_url, MODEL, client)

    assert _failures(outcomes) == []
    assert any(o.sent > moved_at + 0.2 for o in outcomes), "the request loop ended before the move"
    assert {o.backend for o in outcomes if o.sent > moved_at} == {"b"}

    moved = [t for t, hosts in snapshots if [(h.instance, h.priority) for h in hosts] == [("b", 0)]]
    assert moved, "Envoy never picked up the new EDS file"
    assert moved[0] - moved_at < 2.0
    unhealthy_b = [(t - moved_at, h) for t, hosts in snapshots for h in hosts if h.instance == "b" and not h.healthy]
    assert unhealthy_b == []
    assert [(h.instance, h.priority, h.healthy) for h in final] == [("b", 0, True)]
    print(f"\nEDS move seen by Envoy {1000 * (moved[0] - moved_at):.1f} ms after the rename")


async def test_a_host_dropped_from_eds_stops_serving_even_while_healthy(stack: Stack) -> None:
    write_eds(stack.eds_dir, MODEL, [stack.b.endpoint(0)])
    deadline = time.monotonic() + 2
    async with httpx.AsyncClient(timeout=5) as client:
        while [(h.instance, h.priority) for h in await cluster_hosts(stack.admin_url, MODEL, client)] != [("b", 0)]:
            assert time.monotonic() < deadline, "Envoy still lists the dropped host"
            await asyncio.sleep(0.01)
        served: list[Any] = [(await client.post(stack.predict_url, json={})).json()["backend"] for _ in range(20)]
    assert served == ["b"] * 20


def test_retries_to_wait_add_up_to_the_window_on_average() -> None:
    assert retries_to_wait(timedelta(0)) == 0
    # 25, 75, 175, 375 ms then 500 ms caps: on average half of each.
    assert retries_to_wait(timedelta(milliseconds=12)) == 1
    assert retries_to_wait(timedelta(milliseconds=330)) == 5
    ten, thirty = retries_to_wait(timedelta(seconds=10)), retries_to_wait(timedelta(seconds=30))
    assert 38 <= ten <= 44
    assert thirty - ten == 80  # 250 ms a retry once capped


async def test_a_request_waits_for_the_replacement_of_a_model_s_only_instance(tmp_path: Path) -> None:
    """A model with no hot standby: its only instance dies, and a replacement is registered seconds
    later (a warm standby waking). Requests sent meanwhile wait and are answered by it; none fails."""
    policy = DRPolicy.model_validate({"models": [{"name": MODEL, "rto": "20s"}, {"name": EMPTY_MODEL}]})
    procs: list[asyncio.subprocess.Process] = []
    try:
        a = await _start_backend("a", procs)
        b = await _start_backend("b", procs)
        eds_dir = tmp_path / "eds"
        write_eds(eds_dir, MODEL, [a.endpoint(0)])
        write_eds(eds_dir, EMPTY_MODEL, [])
        lb_url, _ = await start_envoy(tmp_path, policy, eds_dir, procs)
        url = f"{lb_url}/v1/models/{MODEL}/predict"
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(url)).json()["backend"] == "a"
            await a.kill()
            started = time.monotonic()
            waiting = [asyncio.create_task(client.post(url)) for _ in range(20)]
            await asyncio.sleep(2.0)
            assert not any(t.done() for t in waiting), "requests failed instead of waiting"
            # The replacement comes in the same update that takes the dead endpoint out.
            write_eds(eds_dir, MODEL, [b.endpoint(0)])
            answers = await asyncio.gather(*waiting)
            waited = time.monotonic() - started
        assert [r.status_code for r in answers] == [200] * 20
        assert {r.json()["backend"] for r in answers} == {"b"}
        assert 2.0 <= waited < 6.0
    finally:
        await stop_processes(procs)


async def test_cluster_hosts_asks_envoy_for_that_cluster_only() -> None:
    """The whole ``/clusters`` document grows with the fleet (~1 MB at 500 models) and verify polls
    it; Envoy's ``filter`` (a regular expression on the name, anchored, the name escaped) keeps it
    to one cluster. Another cluster in the answer (an Envoy without ``filter``) is still skipped."""
    asked: list[httpx.URL] = []

    def admin(request: httpx.Request) -> httpx.Response:
        asked.append(request.url)
        statuses = [{"name": "m.x2", "host_statuses": []}, {"name": "m.x", "host_statuses": []}]
        return httpx.Response(200, json={"cluster_statuses": statuses})

    async with httpx.AsyncClient(transport=httpx.MockTransport(admin)) as client:
        assert await cluster_hosts("http://admin", "m.x", client) == []
    [url] = asked
    assert url.path == "/clusters"
    assert dict(url.params) == {"format": "json", "filter": "^m\\.x$"}
