"""The instance pool as a real subprocess: many demo-server instances in one process, each on its
own port with its own pid (a thread id), killed, hung and resumed one at a time through the control
endpoint while the others answer."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from drctl.platforms.local import processes
from drctl.platforms.local.checkpoints import corrupt_checkpoint, ensure_checkpoint

MODEL = "llama-2-7b"
CKPT_SIZE = 128 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PoolProcess:
    process: subprocess.Popen[bytes]
    control: str
    log: Path
    client: httpx.Client

    def start(self, instance: str, checkpoint: Path, *extra: str, port: int = 0, **body: Any) -> dict[str, Any]:
        argv = ["--model", MODEL, "--instance", instance, "--port", str(port), "--checkpoint", str(checkpoint), *extra]
        response = self.client.post(f"{self.control}/instances", json={"argv": argv, **body})
        assert response.status_code == 201, response.text
        started: dict[str, Any] = response.json()
        return started

    def signal(self, pid: int, name: str) -> httpx.Response:
        return self.client.post(f"{self.control}/signal", json={"pid": pid, "signal": name})

    def listed(self) -> dict[str, str]:
        return {i["instance"]: i["state"] for i in self.client.get(f"{self.control}/instances").json()["instances"]}


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    return ensure_checkpoint(tmp_path / f"{MODEL}.ckpt", MODEL, CKPT_SIZE).path


@pytest.fixture()
def pool(tmp_path: Path) -> Iterator[PoolProcess]:
    log = tmp_path / "pool.log"
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "drctl.sim.instance_pool", "--control-port", str(port), "--name", "node-a"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = httpx.Client(timeout=5.0)
    control = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            client.get(f"{control}/healthz")
            break
        except httpx.TransportError:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
    try:
        yield PoolProcess(process, control, log, client)
    finally:
        process.kill()
        process.wait()
        client.close()


def wait_ready(client: httpx.Client, port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"http://127.0.0.1:{port}/load_progress").json()["state"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def thread_group(pid: int) -> int:
    group = processes.thread_group(pid)
    assert group is not None
    return group


def test_instances_answer_on_their_own_ports_with_their_own_pids(pool: PoolProcess, checkpoint: Path) -> None:
    started = [
        pool.start(f"{MODEL}-{i}", checkpoint, thread_name=processes.thread_tag(f"{MODEL}-{i}")) for i in range(6)
    ]
    ports = {s["port"] for s in started}
    pids = {s["pid"] for s in started}
    assert len(ports) == len(pids) == 6
    for s in started:
        wait_ready(pool.client, s["port"])
        # The demo server's API, unchanged: its health, its predict route, OpenAI's completions.
        health = pool.client.get(f"http://127.0.0.1:{s['port']}/healthz")
        assert health.status_code == 200 and health.json()["instance"] == s["instance"]
        predict = pool.client.post(f"http://127.0.0.1:{s['port']}/v1/models/{MODEL}/predict", json={"prompt": "hi"})
        assert predict.json()["instance"] == s["instance"]
        assert predict.headers["x-drctl-instance"] == s["instance"]
        completion = pool.client.post(
            f"http://127.0.0.1:{s['port']}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
        )
        assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
        # Its pid is a thread of the pool, named for it: /proc answers for it as for a process.
        assert thread_group(s["pid"]) == pool.process.pid
        assert processes.is_alive(s["pid"]) and processes.runs_instance(s["pid"], s["instance"])
        assert not processes.runs_instance(s["pid"], f"{MODEL}-99")
        assert processes.pool_control_port(s["pid"]) == int(pool.control.rsplit(":", 1)[1])
    assert processes.pool_control_port(pool.process.pid) is None  # the pool itself is a process
    assert processes.is_alive(pool.process.pid)
    # Its connections' threads (the keep-alive ones of this client) are never taken for an instance,
    # even when one takes up the thread id of an ended instance.
    tasks = Path(f"/proc/{pool.process.pid}/task")
    connections = [int(t.name) for t in tasks.iterdir() if (t / "comm").read_text().strip() == "drctl-conn"]
    assert connections
    assert not any(processes.is_alive(tid) for tid in connections)
    assert pool.client.get(f"{pool.control}/healthz").json()["instances"] == 6


def test_a_killed_instance_is_gone_and_the_others_answer(pool: PoolProcess, checkpoint: Path) -> None:
    a, b, c = (pool.start(f"{MODEL}-{i}", checkpoint) for i in range(3))
    for s in (a, b, c):
        wait_ready(pool.client, s["port"])
    # A keep-alive connection open on the instance, as Envoy's would be.
    held = httpx.Client(timeout=2.0)
    assert held.get(f"http://127.0.0.1:{b['port']}/health").status_code == 200
    answer = pool.signal(b["pid"], "KILL")
    assert answer.json() == {"pid": b["pid"], "instance": f"{MODEL}-1", "state": "killed"}
    assert not processes.is_alive(b["pid"])  # gone by the time the kill is answered
    with pytest.raises(httpx.TransportError):
        held.get(f"http://127.0.0.1:{b['port']}/health")  # the open connection was closed
    with pytest.raises(httpx.ConnectError):
        pool.client.get(f"http://127.0.0.1:{b['port']}/health")  # and the port refuses new ones
    for s in (a, c):
        assert pool.client.get(f"http://127.0.0.1:{s['port']}/health").status_code == 200
        assert processes.is_alive(s["pid"])
    assert pool.listed() == {f"{MODEL}-0": "running", f"{MODEL}-2": "running"}
    assert pool.signal(b["pid"], "KILL").status_code == 404
    held.close()


def test_a_hung_instance_accepts_but_never_answers_until_resumed(pool: PoolProcess, checkpoint: Path) -> None:
    a, b = (pool.start(f"{MODEL}-{i}", checkpoint) for i in range(2))
    for s in (a, b):
        wait_ready(pool.client, s["port"])
    kept = httpx.Client(timeout=httpx.Timeout(0.3))
    assert kept.get(f"http://127.0.0.1:{a['port']}/health").status_code == 200  # keep-alive connection
    assert pool.client.post(f"{pool.control}/instances/{MODEL}-0/hang").json()["instances"][0]["state"] == "hung"
    with pytest.raises(httpx.ReadTimeout):
        kept.get(f"http://127.0.0.1:{a['port']}/health")  # on the open connection
    with socket.create_connection(("127.0.0.1", a["port"]), timeout=1.0) as sock:  # the kernel still accepts
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        assert pool.client.get(f"http://127.0.0.1:{b['port']}/health").status_code == 200  # the other answers
        assert processes.is_alive(a["pid"])  # hung, not gone
        assert pool.listed()[f"{MODEL}-0"] == "hung"
        assert pool.signal(a["pid"], "CONT").json()["state"] == "running"
        sock.settimeout(2.0)
        assert sock.recv(100).startswith(b"HTTP/1.1 200")  # the held request is answered on resume
    assert kept.get(f"http://127.0.0.1:{a['port']}/health").status_code == 200
    kept.close()


def test_a_hung_instance_that_is_killed_writes_nothing(pool: PoolProcess, checkpoint: Path) -> None:
    a = pool.start(f"{MODEL}-0", checkpoint)
    wait_ready(pool.client, a["port"])
    assert pool.signal(a["pid"], "STOP").json()["state"] == "hung"
    with socket.create_connection(("127.0.0.1", a["port"]), timeout=2.0) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)
        assert pool.signal(a["pid"], "TERM").json()["state"] == "stopped"
        try:
            answer = sock.recv(100)
        except ConnectionResetError:  # closed with the request unread: the kernel resets it (a busy machine)
            answer = b""
        assert answer == b""  # closed without a byte of an answer
    assert not processes.is_alive(a["pid"])


def test_a_kill_mid_stream_leaves_the_body_unterminated(pool: PoolProcess, checkpoint: Path) -> None:
    a = pool.start(f"{MODEL}-0", checkpoint, "--token-delay-ms", "20")
    wait_ready(pool.client, a["port"])
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 200, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):  # the stream is read, then broken
        with pool.client.stream("POST", f"http://127.0.0.1:{a['port']}/v1/completions", json=body) as response:
            assert response.status_code == 200
            for n, _line in enumerate(response.iter_lines()):
                if n == 3:
                    pool.signal(a["pid"], "KILL")


def test_sleep_wake_and_a_failed_checksum_as_in_the_demo_server(pool: PoolProcess, checkpoint: Path) -> None:
    a = pool.start(f"{MODEL}-0", checkpoint, "--sleeping")
    url = f"http://127.0.0.1:{a['port']}"
    deadline = time.monotonic() + 5
    while pool.client.get(f"{url}/load_progress").json()["state"] != "sleeping":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pool.client.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}
    assert pool.client.get(f"{url}/health").status_code == 200  # asleep: healthy, not serving
    assert pool.client.post(f"{url}/wake_up").status_code == 200
    assert pool.client.get(f"{url}/healthz").json()["status"] == "ok"

    bad = checkpoint.with_name("bad.ckpt")
    ensure_checkpoint(bad, MODEL, CKPT_SIZE)
    corrupt_checkpoint(bad, 1024, 16)
    b = pool.start(f"{MODEL}-1", bad)
    deadline = time.monotonic() + 5
    while (progress := pool.client.get(f"http://127.0.0.1:{b['port']}/load_progress").json())["state"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "checksum mismatch" in progress["error"]
    assert pool.client.get(f"{url}/healthz").json()["status"] == "ok"  # the other is unaffected


def test_bad_arguments_and_a_taken_port_are_refused(pool: PoolProcess, checkpoint: Path) -> None:
    refused = pool.client.post(f"{pool.control}/instances", json={"argv": ["--model", MODEL]})
    assert refused.status_code == 400
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = ["--model", MODEL, "--instance", "x-0", "--port", str(taken.getsockname()[1])]
        answer = pool.client.post(f"{pool.control}/instances", json={"argv": [*argv, "--checkpoint", str(checkpoint)]})
        assert answer.status_code == 409 and "cannot listen" in answer.json()["error"]
    assert pool.client.get(f"{pool.control}/instances").json() == {"instances": []}


def test_sigterm_stops_every_instance_and_the_pool(pool: PoolProcess, checkpoint: Path) -> None:
    started = [pool.start(f"{MODEL}-{i}", checkpoint) for i in range(3)]
    pool.process.send_signal(signal.SIGTERM)
    assert pool.process.wait(timeout=10) == 0
    assert not any(processes.is_alive(s["pid"]) for s in started)
