"""drctl's xDS server against the real ``envoy`` binary: endpoints from the EDS files over one ADS
stream, one model's write sending that model alone, more models than Envoy's file watches allow,
and a restarted server picked up again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from drctl.platforms.local import xds
from drctl.platforms.local.envoy import XDS_CLUSTER, cluster_hosts, envoy_yaml, render_bootstrap, write_eds
from drctl.policies.schema import DRPolicy
from drctl.settings import StateLayout
from tests.platforms.local.test_envoy import (
    HOST,
    _free_port,
    _start_backend,
    start_envoy,
    stop_processes,
)

MANY = 200
"""More models than Envoy could watch EDS files for (one inotify instance each, 128 by default)."""


class RunningServer:
    """The xDS server in this test's event loop, restartable on the same port."""

    def __init__(self, eds_dir: Path, port: int) -> None:
        self.eds_dir, self.port = eds_dir, port
        self.store: xds.AssignmentStore | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._stop = asyncio.Event()
        self.store = xds.open_store(self.eds_dir)
        self._task = asyncio.create_task(xds.serve(self.store, HOST, self.port, self._stop))
        await asyncio.sleep(0.2)
        if self._task.done():
            self._task.result()

    async def stop(self) -> None:
        """Stops serving; a connected Envoy keeps its connection (the process lives on), so a
        restart is tested with the server's own process (:func:`start_server_process`)."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@contextlib.asynccontextmanager
async def running_server(eds_dir: Path) -> AsyncIterator[RunningServer]:
    server = RunningServer(eds_dir, _free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def until(check: Callable[[], Any], timeout: float = 10.0) -> float:  # noqa: ASYNC109 (a deadline, not a cancel)
    """Seconds until ``await check()`` is truthy; fails the test after ``timeout``."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not true after {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def policy_of(count: int) -> DRPolicy:
    return DRPolicy.model_validate({"models": [{"name": f"m{i}"} for i in range(count)]})


def test_bootstrap_over_ads_has_no_file_sources_and_a_grpc_cluster() -> None:
    boot = render_bootstrap(
        policy_of(2), listen_host=HOST, listen_port=1, admin_port=2, eds_dir=Path("/x/eds"), xds_port=3
    )
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    assert clusters["m0"]["eds_cluster_config"]["eds_config"] == {"ads": {}, "resource_api_version": "V3"}
    assert "path_config_source" not in envoy_yaml(boot)
    xds_cluster = clusters[XDS_CLUSTER]
    assert xds_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 3}
    }
    assert boot["dynamic_resources"]["ads_config"]["grpc_services"] == [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]


def test_store_reads_files_and_reports_only_real_changes(tmp_path: Path) -> None:
    write_eds(tmp_path, "m0", [])
    store = xds.open_store(tmp_path)
    assert len(store) == 1
    assert store.load(["m0"]) == set()  # read again, same content
    assert store.stale() == []
    from drctl.platforms.local.envoy import Endpoint

    write_eds(tmp_path, "m0", [Endpoint(host=HOST, port=9, priority=0, instance="i")])
    write_eds(tmp_path, "m1", [])
    assert set(store.stale()) == {"m0", "m1"}
    assert store.load(["m0", "m1"]) == {"m0", "m1"}
    _, version = store.resource("m0")
    assert version != "none"
    assert store.resource("unknown")[1] == "none"


def test_an_eds_file_as_json_and_one_written_as_yaml_before_read_alike(tmp_path: Path) -> None:
    """EDS files are JSON since the ninth session (a hundredth of PyYAML's cost); a state folder
    from before has YAML ones, and the same assignment must come out of either."""
    from drctl.platforms.local.envoy import Endpoint, eds_document, eds_file

    endpoints = [Endpoint(host=HOST, port=9, priority=0, instance="n"), Endpoint(HOST, 10, 1, "1e3")]
    write_eds(tmp_path, "y", endpoints)
    as_json = eds_file(tmp_path, "y").read_text()
    assert json.loads(as_json) == yaml.safe_load(as_json) == eds_document("y", endpoints)
    old = tmp_path / "old" / "eds.yaml"
    old.parent.mkdir()
    old.write_text(envoy_yaml(eds_document("y", endpoints)))
    assert xds.read_assignment(old, "y") == xds.read_assignment(eds_file(tmp_path, "y"), "y")
    read = xds.read_assignment(old, "y")
    assert [e.endpoint.hostname for p in read.endpoints for e in p.lb_endpoints] == ["n", "1e3"]


def test_a_bad_file_is_skipped_and_the_last_assignment_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_eds(tmp_path, "m0", [])
    store = xds.open_store(tmp_path)
    before = store.resource("m0")
    (tmp_path / "m0" / "eds.yaml").write_text("resources: [{cluster_name: other}]\n")
    assert store.load(["m0"]) == set()
    assert store.resource("m0") == before
    assert "not 'm0'" in caplog.text or "other" in caplog.text


async def start_server_process(
    state_dir: Path, port: int, procs: list[asyncio.subprocess.Process]
) -> asyncio.subprocess.Process:
    """The server as the stack runs it: ``python -m drctl.workers.xds_server`` on ``state_dir``."""
    env = {**os.environ, "DRCTL_STATE_DIR": str(state_dir), "DRCTL_XDS_PORT": str(port)}
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drctl.workers.xds_server", env=env, stderr=(state_dir / "xds.log").open("ab")
    )
    procs.append(server)

    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            return False
        writer.close()
        return True

    await until(listening)
    return server


async def test_envoy_routes_by_the_assignments_the_server_sends(tmp_path: Path) -> None:
    procs: list[asyncio.subprocess.Process] = []
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    eds_dir = StateLayout(state_dir).eds_dir  # where the server (another process) works out they are
    policy = policy_of(2)
    port = _free_port()
    try:
        a = await _start_backend("a", procs)
        b = await _start_backend("b", procs)
        write_eds(eds_dir, "m0", [a.endpoint(0)])
        server = await start_server_process(state_dir, port, procs)
        lb_url, admin_url = await start_envoy(tmp_path, policy, eds_dir, procs, xds_port=port)
        async with httpx.AsyncClient() as client:

            async def served_by(name: str) -> bool:
                r = await client.post(f"{lb_url}/v1/models/m0/predict")
                return r.status_code == 200 and r.json()["backend"] == name

            await until(lambda: served_by("a"))
            # m1 has no file: an empty assignment, so its cluster is up and answers 503.
            assert (await client.post(f"{lb_url}/v1/models/m1/predict")).status_code == 503

            # Swap a for b: the write reaches Envoy through the watcher, within a fraction of a second.
            write_eds(eds_dir, "m0", [b.endpoint(0)])
            took = await until(lambda: served_by("b"), timeout=5)
            assert took < 2.0
            assert {h.instance for h in await cluster_hosts(admin_url, "m0")} == {"b"}

            # The server is killed: Envoy keeps what it has.
            server.kill()
            await server.wait()
            for _ in range(5):
                assert await served_by("b")
            # A write while it is away is sent once it is back (the files are the truth).
            write_eds(eds_dir, "m0", [a.endpoint(0)])
            await start_server_process(state_dir, port, procs)
            await until(lambda: served_by("a"), timeout=15)
    finally:
        await stop_processes(procs)


async def test_many_models_over_one_stream_and_a_write_sends_one_model(tmp_path: Path) -> None:
    """Above the file watches' limit Envoy still starts, and a write to one model's file sends one
    assignment: Envoy's work per change does not grow with the fleet."""
    procs: list[asyncio.subprocess.Process] = []
    eds_dir = tmp_path / "eds"
    policy = policy_of(MANY)
    sent: list[int] = []
    original = xds._Stream.responses

    async def counting(self: xds._Stream) -> AsyncIterator[Any]:
        async for response in original(self):
            sent.append(len(response.resources))
            yield response

    try:
        a = await _start_backend("a", procs)
        for i in range(MANY):
            write_eds(eds_dir, f"m{i}", [])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(xds._Stream, "responses", counting)
            async with running_server(eds_dir) as server:
                _, admin_url = await start_envoy(tmp_path, policy, eds_dir, procs, xds_port=server.port)
                assert sum(sent) >= MANY  # every model's assignment went out at the start
                sent.clear()
                write_eds(eds_dir, f"m{MANY - 1}", [a.endpoint(0)])

                async def last_has_a() -> bool:
                    return [h.instance for h in await cluster_hosts(admin_url, f"m{MANY - 1}")] == ["a"]

                await until(last_has_a)
                assert sent == [1]
    finally:
        await stop_processes(procs)
