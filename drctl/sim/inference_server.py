"""A small demo inference server that behaves like vLLM where drctl cares.

    python -m drctl.sim.inference_server --model M --instance ID --port P --checkpoint PATH \\
        [--host 127.0.0.1] [--sleeping] [--load-seconds-per-gib F] [--wake-seconds-per-gib F] [--gpu G]

It binds its port at once and "loads weights" in a background thread: it reads the checkpoint,
computing its sha256, and compares it with the ``.sha256`` sidecar. Until that succeeds the health
check answers 503, so Envoy sends it no traffic; a missing or corrupted checkpoint leaves it in the
``failed`` state for good (it keeps running and says why). It supports vLLM's sleep mode
(``/sleep``, ``/wake_up``, ``/is_sleeping``), which is how a warm standby waits: loaded, asleep.

HTTP API (every response is JSON and carries ``x-drctl-instance: <instance>``):

- ``GET /healthz`` (also ``/health``): 200 ``{"status": "ok", ...}`` when loaded and awake, else 503
  ``{"status": "loading" | "failed" | "sleeping", "progress", "error", ...}``.
- ``GET /load_progress``: ``{"state": "loading" | "ready" | "failed" | "sleeping", "progress",
  "bytes_loaded", "bytes_total", "error", "load_seconds"}``.
- ``GET /v1/models``: OpenAI-style model list.
- ``POST /v1/models/{model}/predict``, and ``POST /predict`` or ``/v1/predict`` with a ``model-name``
  header (no header: this server's model): body ``{"prompt": str, "max_tokens": int}`` -> 200
  ``{"model", "instance", "text", "tokens"}``; 404 for another model; 400 for a bad body; 503 unless
  loaded and awake.
- ``POST /sleep?level=1|2``, ``POST /wake_up``, ``GET /is_sleeping``. Level 1 keeps the weights
  (in host memory); level 2 discards them, so waking up reloads and re-verifies the checkpoint.
  ``/wake_up`` answers once the instance is awake; both answer 503 when the load failed.
- Anything else: 404 (unknown path), 405 (wrong method), 413 (body over 1 MiB).

Standard library only, and no imports from the rest of drctl, so it starts in under 0.1 s.
SIGTERM or SIGINT shut it down with exit status 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, unquote, urlsplit

from drctl.platforms.local.checkpoints import CHECKSUM_MISMATCH

GIB = 1 << 30
READ_CHUNK = 1 << 20
MAX_BODY = 1 << 20
MAX_TOKENS_LIMIT = 4096
INSTANCE_HEADER = "x-drctl-instance"
MODEL_HEADER = "model-name"

_WORDS = (
    "the a failover standby replica zone region checkpoint weights gpu tensor token model request "
    "latency shard cache kernel batch prompt stream route envoy health drain recover restore warm "
    "cold hot quorum lease epoch budget signal durable workflow activity retry timeout backoff"
).split()


def log(instance: str, message: str) -> None:
    print(f"demo-server[{instance}] {message}", file=sys.stderr, flush=True)


def fake_completion(model: str, prompt: str, max_tokens: int) -> str:
    """A deterministic completion: the same model and prompt give the same text on every instance."""
    words: list[str] = []
    counter = 0
    while len(words) < max_tokens:
        block = hashlib.sha256(f"{model}\0{prompt}\0{counter}".encode()).digest()
        words.extend(_WORDS[b % len(_WORDS)] for b in block)
        counter += 1
    return " ".join(words[:max_tokens])


class BadRequest(Exception):
    """The request cannot be served as sent (400, or 413 for a body that is too large)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class Snapshot(NamedTuple):
    state: str
    """loading | ready | failed | sleeping"""
    progress: float
    bytes_loaded: int
    bytes_total: int
    error: str | None
    sleeping: bool
    load_seconds: float | None

    @property
    def serving(self) -> bool:
        return self.state == "ready"


class DemoModel:
    """The state machine of one instance: loading -> ready | failed, and asleep or awake."""

    def __init__(
        self,
        model: str,
        instance: str,
        checkpoint: Path,
        *,
        sleeping: bool = False,
        load_seconds_per_gib: float = 0.0,
        wake_seconds_per_gib: float = 0.25,
        gpu: str | None = None,
    ) -> None:
        self.model = model
        self.instance = instance
        self.checkpoint = checkpoint
        self.gpu = gpu
        self.load_seconds_per_gib = load_seconds_per_gib
        self.wake_seconds_per_gib = wake_seconds_per_gib
        self._lock = threading.Lock()
        self._loaded = False
        self._failed = False
        self._error: str | None = None
        self._sleeping = sleeping
        self._weights_discarded = False
        self._bytes_loaded = 0
        self._bytes_total = 0
        self._load_seconds: float | None = None
        self._loader: threading.Thread | None = None
        self._last_state: str | None = None

    # -- state ---------------------------------------------------------------------------------

    def _state_locked(self) -> str:
        if self._failed:
            return "failed"
        if not self._loaded:
            return "loading"
        if self._sleeping:
            return "sleeping"
        return "ready"

    def _note_state_locked(self, detail: str = "") -> None:
        state = self._state_locked()
        if state != self._last_state:
            suffix = f" ({detail})" if detail else ""
            log(self.instance, f"state {self._last_state or 'start'} -> {state}{suffix}")
            self._last_state = state

    def _snapshot_locked(self) -> Snapshot:
        if self._bytes_total:
            progress = self._bytes_loaded / self._bytes_total
        else:
            progress = 1.0 if self._loaded else 0.0
        return Snapshot(
            state=self._state_locked(),
            progress=round(progress, 4),
            bytes_loaded=self._bytes_loaded,
            bytes_total=self._bytes_total,
            error=self._error,
            sleeping=self._sleeping,
            load_seconds=self._load_seconds,
        )

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot_locked()

    # -- loading -------------------------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Start (or join) a load of the checkpoint in a background thread."""
        with self._lock:
            if self._loader is not None and self._loader.is_alive():
                return self._loader
            self._loaded = False
            self._failed = False
            self._error = None
            self._bytes_loaded = 0
            self._note_state_locked(f"checkpoint {self.checkpoint}")
            self._loader = threading.Thread(target=self._load, name="loader", daemon=True)
            self._loader.start()
            return self._loader

    def _fail(self, error: str) -> None:
        with self._lock:
            self._failed = True
            self._error = error
            self._note_state_locked(error)

    def _load(self) -> None:
        started = time.monotonic()
        sidecar = self.checkpoint.with_suffix(self.checkpoint.suffix + ".sha256")
        try:
            total = self.checkpoint.stat().st_size
        except FileNotFoundError:
            self._fail(f"checkpoint {self.checkpoint} not found")
            return
        except OSError as e:
            self._fail(f"checkpoint {self.checkpoint} unreadable: {e}")
            return
        try:
            line = sidecar.read_text(encoding="utf-8").strip().split()
            expected = line[0].lower() if line else ""
        except FileNotFoundError:
            self._fail(f"checksum sidecar {sidecar} not found")
            return
        except (OSError, UnicodeDecodeError) as e:
            self._fail(f"checksum sidecar {sidecar} unreadable: {e}")
            return
        if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
            self._fail(f"checksum sidecar {sidecar} does not hold a sha256")
            return
        with self._lock:
            self._bytes_total = total
        digest = hashlib.sha256()
        loaded = 0
        # Smaller reads for small files, so that progress moves smoothly when loading is slowed down.
        chunk_size = min(READ_CHUNK, max(64 * 1024, total // 64))
        try:
            with self.checkpoint.open("rb") as f:
                while chunk := f.read(chunk_size):
                    digest.update(chunk)
                    loaded += len(chunk)
                    if self.load_seconds_per_gib > 0:
                        # The bytes count as loaded once their simulated load time has passed.
                        delay = loaded / GIB * self.load_seconds_per_gib - (time.monotonic() - started)
                        if delay > 0:
                            time.sleep(delay)
                    with self._lock:
                        self._bytes_loaded = loaded
        except OSError as e:
            self._fail(f"reading checkpoint {self.checkpoint} failed: {e}")
            return
        actual = digest.hexdigest()
        if actual != expected:
            self._fail(f"{CHECKSUM_MISMATCH}: expected sha256 {expected}, got {actual}")
            return
        elapsed = time.monotonic() - started
        with self._lock:
            self._loaded = True
            self._weights_discarded = False
            self._bytes_total = loaded
            self._load_seconds = round(elapsed, 4)
            self._note_state_locked(f"{loaded} bytes verified in {elapsed:.3f}s")

    # -- sleep mode ----------------------------------------------------------------------------

    def sleep(self, level: int) -> Snapshot:
        with self._lock:
            if not self._failed:
                self._sleeping = True
                # Weights still loading cannot be discarded; level 2 then acts like level 1.
                if level == 2 and self._loaded:
                    self._weights_discarded = True
                self._note_state_locked(f"level {level}")
        return self.snapshot()

    def wake_up(self) -> Snapshot:
        with self._lock:
            if self._failed or not self._sleeping:
                return self._snapshot_locked()
            discarded = self._weights_discarded
            size = self._bytes_total
        if discarded:
            # Level-2 sleep dropped the weights: load them again, checksum and all.
            self.start_loading().join()
        else:
            # Level 1: copy the weights back from host memory.
            time.sleep(size / GIB * self.wake_seconds_per_gib)
        with self._lock:
            if not self._failed:
                self._sleeping = False
            self._note_state_locked("woken up")
        return self.snapshot()


class DemoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: DemoModel) -> None:
        self.app = app
        super().__init__(address, DemoHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client (or Envoy) hanging up mid-request is not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class DemoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server_version = "drctl-demo-server/1"
    error_content_type = "application/json"
    error_message_format = '{"error": "%(message)s", "code": %(code)d}'

    @property
    def app(self) -> DemoModel:
        return cast(DemoHTTPServer, self.server).app

    # -- plumbing ------------------------------------------------------------------------------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # no access log

    def log_message(self, format: str, *args: Any) -> None:
        log(self.app.instance, "http: " + (format % args))

    def end_headers(self) -> None:
        self.send_header(INSTANCE_HEADER, self.app.instance)
        super().end_headers()

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, **extra: Any) -> None:
        self._send_json(status, {"error": message, **extra})

    def _read_body(self) -> bytes:
        """Read the whole request body (always, so the connection stays usable for keep-alive)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self.close_connection = True
                    raise BadRequest("malformed chunked body") from None
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY:
                    self.close_connection = True
                    raise BadRequest(f"body larger than {MAX_BODY} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                parts.append(self.rfile.read(size))
                self.rfile.readline(8)
            return b"".join(parts)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"bad Content-Length {length_header!r}") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise BadRequest(f"body larger than {MAX_BODY} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(length) if length else b""

    # -- dispatch ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
        except BadRequest as e:
            self._error(e.status, str(e))
            return
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        routes: dict[str, dict[str, Any]] = {
            "/healthz": {"GET": self._healthz},
            "/health": {"GET": self._healthz},
            "/load_progress": {"GET": self._load_progress},
            "/v1/models": {"GET": self._models},
            "/is_sleeping": {"GET": self._is_sleeping},
            "/sleep": {"POST": lambda: self._sleep(query)},
            "/wake_up": {"POST": self._wake_up},
            "/predict": {"POST": lambda: self._predict(self.headers.get(MODEL_HEADER), body)},
            "/v1/predict": {"POST": lambda: self._predict(self.headers.get(MODEL_HEADER), body)},
        }
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "v1", "models"] and parts[4] == "predict":
            model = unquote(parts[3])
            routes[path] = {"POST": lambda: self._predict(model, body)}
        handlers = routes.get(path)
        if handlers is None:
            self._error(HTTPStatus.NOT_FOUND, f"no route for {path}")
            return
        handler = handlers.get(method)
        if handler is None:
            allowed = ", ".join(sorted(handlers))
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on {path}", allowed=allowed)
            return
        handler()

    # -- endpoints -----------------------------------------------------------------------------

    def _healthz(self) -> None:
        app = self.app
        snap = app.snapshot()
        body: dict[str, Any] = {
            "status": "ok" if snap.serving else snap.state,
            "model": app.model,
            "instance": app.instance,
            "loaded": snap.state in ("ready", "sleeping"),
            "sleeping": snap.sleeping,
            "progress": snap.progress,
            "error": snap.error,
        }
        if app.gpu is not None:
            body["gpu"] = app.gpu
        self._send_json(HTTPStatus.OK if snap.serving else HTTPStatus.SERVICE_UNAVAILABLE, body)

    def _load_progress(self) -> None:
        snap = self.app.snapshot()
        self._send_json(
            HTTPStatus.OK,
            {
                "state": snap.state,
                "progress": snap.progress,
                "bytes_loaded": snap.bytes_loaded,
                "bytes_total": snap.bytes_total,
                "error": snap.error,
                "load_seconds": snap.load_seconds,
            },
        )

    def _models(self) -> None:
        app = self.app
        self._send_json(
            HTTPStatus.OK,
            {
                "object": "list",
                "data": [{"id": app.model, "object": "model", "owned_by": "drctl", "instance": app.instance}],
            },
        )

    def _is_sleeping(self) -> None:
        self._send_json(HTTPStatus.OK, {"is_sleeping": self.app.snapshot().sleeping})

    def _sleep(self, query: dict[str, list[str]]) -> None:
        raw = query.get("level", ["1"])[-1]
        if raw not in ("1", "2"):
            self._error(HTTPStatus.BAD_REQUEST, f"sleep level must be 1 or 2, got {raw!r}")
            return
        snap = self.app.sleep(int(raw))
        if snap.state == "failed":
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, snap.error or "failed", state=snap.state)
            return
        self._send_json(HTTPStatus.OK, {"is_sleeping": snap.sleeping, "state": snap.state})

    def _wake_up(self) -> None:
        snap = self.app.wake_up()
        if snap.state == "failed":
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, snap.error or "failed", state=snap.state)
            return
        self._send_json(HTTPStatus.OK, {"is_sleeping": snap.sleeping, "state": snap.state})

    def _predict(self, model: str | None, body: bytes) -> None:
        app = self.app
        if model is not None and model != app.model:
            self._error(HTTPStatus.NOT_FOUND, f"model {model!r} is not served here (this is {app.model!r})")
            return
        try:
            prompt, max_tokens = _parse_predict(body)
        except BadRequest as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        snap = app.snapshot()
        if not snap.serving:
            message = {
                "loading": "model is still loading",
                "sleeping": "model is sleeping",
                "failed": f"model failed to load: {snap.error}",
            }[snap.state]
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, message, state=snap.state, progress=snap.progress)
            return
        text = fake_completion(app.model, prompt, max_tokens)
        self._send_json(
            HTTPStatus.OK,
            {"model": app.model, "instance": app.instance, "text": text, "tokens": max_tokens},
        )


def _parse_predict(body: bytes) -> tuple[str, int]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequest('body must be a JSON object {"prompt": str, "max_tokens": int}')
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest('"prompt" must be a string')
    max_tokens = payload.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadRequest('"max_tokens" must be an integer')
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f'"max_tokens" must be between 1 and {MAX_TOKENS_LIMIT}')
    return prompt, max_tokens


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m drctl.sim.inference_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model name this instance serves")
    parser.add_argument("--instance", required=True, help="instance id, echoed in x-drctl-instance")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file, with a .sha256 sidecar")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--sleeping", action="store_true", help="start asleep once loaded (a warm standby)")
    parser.add_argument(
        "--load-seconds-per-gib", type=float, default=0.0, help="simulated extra load time per GiB (default 0)"
    )
    parser.add_argument(
        "--wake-seconds-per-gib", type=float, default=0.25, help="simulated wake-up time per GiB (default 0.25)"
    )
    parser.add_argument("--gpu", default=None, help="GPU this instance was placed on (reported only)")
    args = parser.parse_args(argv)
    if args.load_seconds_per_gib < 0 or args.wake_seconds_per_gib < 0:
        parser.error("--load-seconds-per-gib and --wake-seconds-per-gib must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    app = DemoModel(
        args.model,
        args.instance,
        args.checkpoint,
        sleeping=args.sleeping,
        load_seconds_per_gib=args.load_seconds_per_gib,
        wake_seconds_per_gib=args.wake_seconds_per_gib,
        gpu=args.gpu,
    )
    try:
        server = DemoHTTPServer((args.host, args.port), app)
    except OSError as e:
        log(args.instance, f"cannot listen on {args.host}:{args.port}: {e}")
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.server_address[:2]
    log(args.instance, f"model {args.model} listening on http://{host!s}:{port}")
    serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http", daemon=True)
    serve.start()
    app.start_loading()
    while not stop.wait(1.0):
        pass
    log(args.instance, "shutting down")
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
