"""The demo inference server as a real subprocess: loading, checksum failure, health, predict, sleep mode, signals.

The OpenAI API (completions, chat, streaming) is driven with the official client in test_openai_api.py.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from drctl.platforms.local.checkpoints import corrupt_checkpoint, ensure_checkpoint

MODEL = "llama-2-7b"
CKPT_SIZE = 256 * 1024


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    client: httpx.Client

    def get(self, path: str) -> httpx.Response:
        return self.client.get(self.url + path)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(self.url + path, **kwargs)

    def wait_until(self, *states: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            progress: dict[str, Any] = self.get("/load_progress").json()
            if progress["state"] in states:
                return progress
            assert time.monotonic() < deadline, f"still {progress} after {timeout}s; log:\n{self.log.read_text()}"
            time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def demo_server(checkpoint: Path, log_dir: Path, *extra: str, instance: str = f"{MODEL}-0") -> Iterator[Server]:
    log = log_dir / f"{instance}.log"
    for _attempt in range(5):  # another process may grab the free port before the server binds it
        port = free_port()
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "drctl.sim.inference_server", "--model", MODEL, "--instance", instance),
                    *("--port", str(port), "--checkpoint", str(checkpoint), *extra),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        client = httpx.Client(timeout=5.0)
        try:
            deadline = time.monotonic() + 5.0
            while process.poll() is None:
                try:
                    client.get(f"http://127.0.0.1:{port}/load_progress")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, f"server did not answer; log:\n{log.read_text()}"
                    time.sleep(0.01)
            if process.poll() is not None:
                assert "cannot listen" in log.read_text(), log.read_text()
                continue
            yield Server(process, f"http://127.0.0.1:{port}", log, client)
            return
        finally:
            client.close()
            if process.poll() is None:
                process.kill()
            process.wait(5)
    pytest.fail("no free port after 5 attempts")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checkpoints") / f"{MODEL}.ckpt"
    ensure_checkpoint(path, MODEL, CKPT_SIZE)
    return path


@pytest.fixture(scope="module")
def ready_server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One loaded, awake server shared by the tests that do not change its state."""
    with demo_server(checkpoint, tmp_path_factory.mktemp("logs")) as server:
        server.wait_until("ready")
        yield server


def test_ready_after_load_with_right_checksum(ready_server: Server) -> None:
    health = ready_server.get("/healthz")
    assert health.status_code == 200
    assert health.headers["x-drctl-instance"] == f"{MODEL}-0"
    assert health.json() == {
        "status": "ok",
        "model": MODEL,
        "instance": f"{MODEL}-0",
        "loaded": True,
        "sleeping": False,
        "progress": 1.0,
        "error": None,
    }
    progress = ready_server.get("/load_progress").json()
    assert progress["state"] == "ready"
    assert progress["progress"] == 1.0
    assert progress["bytes_loaded"] == progress["bytes_total"] == CKPT_SIZE
    assert progress["error"] is None
    assert ready_server.get("/is_sleeping").json() == {"is_sleeping": False}
    models = ready_server.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_health_is_vllms_empty_200(ready_server: Server) -> None:
    health = ready_server.get("/health")
    assert health.status_code == 200
    assert health.content == b""
    assert "content-type" not in health.headers
    assert health.headers["x-drctl-state"] == "ready"
    assert health.headers["x-drctl-instance"] == f"{MODEL}-0"


def test_models_lists_a_vllm_model_card(ready_server: Server) -> None:
    models = ready_server.get("/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert card["id"] == MODEL
    assert card["object"] == "model"
    assert card["owned_by"] == "vllm"
    assert card["root"].endswith(f"{MODEL}.ckpt")
    assert card["parent"] is None
    assert card["max_model_len"] == 4096
    assert isinstance(card["created"], int)
    [permission] = card["permission"]
    assert permission["object"] == "model_permission"
    assert permission["id"].startswith("modelperm-")


def test_predict_returns_model_and_instance(ready_server: Server) -> None:
    body = {"prompt": "fail over, please", "max_tokens": 7}
    response = ready_server.post(f"/v1/models/{MODEL}/predict", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-drctl-instance"] == f"{MODEL}-0"
    result = response.json()
    assert result["model"] == MODEL
    assert result["instance"] == f"{MODEL}-0"
    assert result["tokens"] == 7
    assert len(result["text"].split()) == 7
    # Deterministic, and the same through the header-routed paths Envoy may use.
    for path in ("/predict", "/v1/predict"):
        again = ready_server.post(path, json=body, headers={"model-name": MODEL})
        assert again.status_code == 200
        assert again.json() == result


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/v1/models/mistral-7b/predict", {}), ("/predict", {"model-name": "mistral-7b"})],
)
def test_predict_for_another_model_is_404(ready_server: Server, path: str, headers: dict[str, str]) -> None:
    response = ready_server.post(path, json={"prompt": "hi", "max_tokens": 1}, headers=headers)
    assert response.status_code == 404
    assert "mistral-7b" in response.json()["error"]
    assert response.headers["x-drctl-instance"] == f"{MODEL}-0"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "JSON"),
        (b"[1, 2]", "object"),
        (b'{"max_tokens": 3}', "prompt"),
        (b'{"prompt": 5}', "prompt"),
        (b'{"prompt": "x", "max_tokens": "3"}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": true}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ],
)
def test_malformed_predict_is_400(ready_server: Server, body: bytes, message: str) -> None:
    response = ready_server.post(
        f"/v1/models/{MODEL}/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_unknown_route_and_wrong_method(ready_server: Server) -> None:
    missing = ready_server.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == 404
    response = ready_server.client.put(ready_server.url + "/healthz")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.json()["error"]["code"] == 405
    assert response.headers["x-drctl-instance"] == f"{MODEL}-0"
    assert ready_server.get("/v1/completions").status_code == 405


def test_keep_alive_pipelined_requests_on_one_connection(ready_server: Server) -> None:
    port = int(ready_server.url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
    request = (
        f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        received = b""
        while received.count(b"HTTP/1.1 200") < 2 or not received.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert received.lower().count(b"content-length:") == 2


def test_slow_load_reports_progress(checkpoint: Path, tmp_path: Path) -> None:
    # 256 KiB at 1024 s/GiB: about 0.25 s of loading.
    with demo_server(checkpoint, tmp_path, "--load-seconds-per-gib", "1024") as server:
        health = server.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "loading"
        assert 0.0 <= health.json()["progress"] < 1.0
        vllm_health = server.get("/health")
        assert vllm_health.status_code == 503
        assert vllm_health.headers["x-drctl-state"] == "loading"
        assert server.get("/v1/models").json() == {"object": "list", "data": []}  # not ready: not listed
        assert server.post(f"/v1/models/{MODEL}/predict", json={"prompt": "x"}).status_code == 503
        progress = server.wait_until("ready")
        assert progress["load_seconds"] >= 0.2
        assert server.get("/healthz").status_code == 200
        assert server.get("/health").status_code == 200
        assert [m["id"] for m in server.get("/v1/models").json()["data"]] == [MODEL]


def test_corrupted_checkpoint_fails(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    ensure_checkpoint(bad, MODEL, CKPT_SIZE)
    corrupt_checkpoint(bad, offset=CKPT_SIZE // 2)
    with demo_server(bad, tmp_path) as server:
        progress = server.wait_until("failed")
        assert "checksum" in progress["error"]
        health = server.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "failed"
        assert "checksum" in health.json()["error"]
        predict = server.post(f"/v1/models/{MODEL}/predict", json={"prompt": "x", "max_tokens": 1})
        assert predict.status_code == 503
        assert "checksum" in predict.json()["error"]
        assert server.get("/health").status_code == 503
        assert server.get("/health").headers["x-drctl-state"] == "failed"
        assert server.get("/v1/models").json()["data"] == []
        wake = server.post("/wake_up")
        assert wake.status_code == 503
        assert "checksum" in wake.json()["error"]["message"]
        assert server.post("/sleep?level=1").status_code == 503
        assert server.process.poll() is None  # it keeps running and keeps saying why
        assert "checksum" in server.log.read_text()


def test_missing_checkpoint_fails(tmp_path: Path) -> None:
    with demo_server(tmp_path / "absent.ckpt", tmp_path) as server:
        progress = server.wait_until("failed")
        assert "not found" in progress["error"]
        assert server.get("/healthz").status_code == 503


def test_sleep_and_wake_up(checkpoint: Path, tmp_path: Path) -> None:
    predict = {"json": {"prompt": "x", "max_tokens": 1}}
    with demo_server(checkpoint, tmp_path) as server:
        server.wait_until("ready")
        # vLLM answers /sleep and /wake_up with an empty 200.
        asleep = server.post("/sleep?level=1")
        assert (asleep.status_code, asleep.content) == (200, b"")
        assert server.get("/is_sleeping").json() == {"is_sleeping": True}
        health = server.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "sleeping"
        assert health.json()["loaded"] is True
        # A sleeping engine is alive (a warm standby is healthy), but its model is not ready.
        assert server.get("/health").status_code == 200
        assert server.get("/health").headers["x-drctl-state"] == "sleeping"
        assert server.get("/v1/models").json()["data"] == []
        assert server.get("/load_progress").json()["state"] == "sleeping"
        assert server.post(f"/v1/models/{MODEL}/predict", **predict).status_code == 503

        awake = server.post("/wake_up")
        assert (awake.status_code, awake.content) == (200, b"")
        assert server.get("/is_sleeping").json() == {"is_sleeping": False}
        assert [m["id"] for m in server.get("/v1/models").json()["data"]] == [MODEL]
        assert server.get("/healthz").status_code == 200
        assert server.post(f"/v1/models/{MODEL}/predict", **predict).status_code == 200

        # Level 2 discards the weights: waking up reloads and re-verifies the checkpoint.
        assert server.post("/sleep?level=2").status_code == 200
        assert server.post("/wake_up").status_code == 200
        assert server.get("/is_sleeping").json() == {"is_sleeping": False}
        assert server.post(f"/v1/models/{MODEL}/predict", **predict).status_code == 200
        assert server.log.read_text().count("-> loading") == 2

        bad_level = server.post("/sleep?level=3")
        assert bad_level.status_code == 400
        assert bad_level.json()["error"]["param"] == "level"


def test_start_sleeping(checkpoint: Path, tmp_path: Path) -> None:
    with demo_server(checkpoint, tmp_path, "--sleeping") as server:
        progress = server.wait_until("sleeping")
        assert progress["progress"] == 1.0
        assert server.get("/is_sleeping").json() == {"is_sleeping": True}
        health = server.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "sleeping"
        assert server.get("/health").status_code == 200
        assert server.post("/wake_up").status_code == 200
        assert server.get("/healthz").status_code == 200


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_cleanly(checkpoint: Path, tmp_path: Path, signum: signal.Signals) -> None:
    with demo_server(checkpoint, tmp_path) as server:
        server.wait_until("ready")
        server.process.send_signal(signum)
        assert server.process.wait(5) == 0
        assert "shutting down" in server.log.read_text()
