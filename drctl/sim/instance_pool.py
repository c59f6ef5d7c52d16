"""Many demo inference-server instances in one process: the local platform's pooled instance mode.

    python -m drctl.sim.instance_pool --control-port P [--control-host 127.0.0.1] [--name NODE]

One demo server process (:mod:`drctl.sim.inference_server`) costs ~20 MiB of RSS and a Python
start, so a fleet of 1,000 instances does not fit on a small machine. A pool runs many instances
in one process, each **on its own port** with the demo server's whole HTTP API — it *is* the demo
server's ``DemoModel`` and ``DemoHandler``, one ``DemoHTTPServer`` per instance, only accepting in
a thread of the pool instead of a process of its own — so Envoy, the prober and the runbooks see
distinct instances, exactly as with one process each.

**Each instance has a pid of its own**: the id of the thread that accepts its connections (Linux
thread ids are pids: ``/proc/<tid>/stat`` exists while the thread runs and is gone the moment it
ends). That thread lives exactly as long as the instance, so everything that asks ``/proc`` whether
an instance's process runs (the prober, ``drctl status``, the platform) gets the right answer per
instance, and the pool's death is the death of all its instances. The thread's name
(``/proc/<tid>/comm``) is what the start request asked for, so a recycled id is told apart.
A *signal* to that pid would reach the whole pool, though: drctl's own code sends none
(``drctl.platforms.local.processes.signal_group`` turns a signal to a pooled instance into a call
of the control endpoint below); a person's ``kill -9 <pid>`` takes down the pool, like a node.

**The control endpoint** (JSON, on ``--control-host``, loopback by default: like Envoy's admin API it
has no authentication, so it must not be reachable from elsewhere):

- ``GET /healthz``: ``{"status": "ok", "name", "pid", "instances": n}``.
- ``GET /instances``: ``{"instances": [{"instance", "model", "port", "pid", "state"}]}``, state
  ``running`` or ``hung`` (an ended instance leaves the list: its pid is gone from ``/proc``).
- ``POST /instances`` ``{"argv": [demo server arguments], "thread_name": str?}``: start one; the
  arguments are the demo server's own (``--model M --instance ID --port P --checkpoint PATH …``;
  port 0: any free one). 201 ``{"instance", "model", "port", "pid", "state"}`` once it listens (it
  loads its checkpoint in the background, as the demo server does); 400 for bad arguments, 409 when
  the port cannot be bound.
- ``POST /signal`` ``{"pid", "signal"}``: what a signal would do to that instance's process:
  ``KILL`` — it crashes: its listening socket closes (connections are refused) and every open
  connection is shut down mid-request, with no further byte written; ``TERM``/``INT`` — it stops,
  the same way (the demo server's SIGTERM exit also drops the requests in flight); ``STOP`` — it
  hangs: it accepts no connection (the kernel still completes handshakes into the backlog, as for a
  stopped process), reads nothing more into an answer and writes nothing, streams freeze mid-way;
  ``CONT`` — it goes on from where it stood. 200 ``{"pid", "state"}``, 404 for a pid it does not run.
- ``POST /instances/{id}/kill|stop|hang|resume``: the same by instance id (every instance of that id).

SIGTERM or SIGINT stop every instance and the pool (exit status 0). Standard library only, besides
the demo server.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

from drctl.sim.inference_server import DemoHandler, DemoHTTPServer, DemoModel, log, parse_args, stop_on_signals

THREAD_STACK_BYTES = 512 * 1024
"""Each instance and connection is a thread: a smaller stack than the default 8 MiB keeps the
pool's address space (not its RSS, which counts touched pages only) within reason at 1,000s."""
CONNECTION_THREAD_NAME = "drctl-conn"
"""The name of every short-lived thread of a pool (a connection's, a load's): a thread id that an
ended instance leaves behind and one of these takes up is not taken for that instance alive
(``drctl.platforms.local.processes.is_alive`` knows the name). Connections come and go, and thread
ids are recycled sooner than one expects (``pid_max`` is 32768 on many machines)."""
SIGNAL_ACTIONS = {"KILL": "kill", "TERM": "stop", "INT": "stop", "STOP": "hang", "CONT": "resume"}
ACTIONS = frozenset(SIGNAL_ACTIONS.values())


class PoolError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PooledInstance:
    """One demo server instance inside the pool: its model, its server (socket) and its thread."""

    def __init__(self, args: argparse.Namespace, thread_name: str | None = None) -> None:
        self.app = DemoModel(
            args.model,
            args.instance,
            args.checkpoint,
            sleeping=args.sleeping,
            load_seconds_per_gib=args.load_seconds_per_gib,
            wake_seconds_per_gib=args.wake_seconds_per_gib,
            gpu=args.gpu,
        )
        self.thread_name = (thread_name or args.instance)[:15]  # the kernel keeps 15 bytes of a name
        self.gate = threading.Event()
        """Set while it runs; cleared while it hangs (every accept, request and write waits here)."""
        self.gate.set()
        self.ended: str | None = None
        """Why it ended (killed, stopped); None while it runs or hangs."""
        self.pid = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._started = threading.Event()
        self.server = PooledHTTPServer(
            (args.host, args.port),
            self.app,
            self,
            token_delay_s=args.token_delay_ms / 1000,
            max_model_len=args.max_model_len,
        )  # binds now: OSError when the port is taken
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self._serve, name=f"instance {args.instance}", daemon=True)

    @property
    def instance(self) -> str:
        return self.app.instance

    @property
    def state(self) -> str:
        if self.ended is not None:
            return self.ended
        return "running" if self.gate.is_set() else "hung"

    def describe(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "model": self.app.model,
            "port": self.port,
            "pid": self.pid,
            "state": self.state,
        }

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        host, port = self.server.server_address[:2]
        log(self.instance, f"model {self.app.model} listening on http://{host!s}:{port} (pooled, pid {self.pid})")
        self.app.start_loading()

    def _serve(self) -> None:
        """The instance's process: accept connections, one handler thread each, until it ends."""
        self.pid = threading.get_native_id()
        name_thread(self.thread_name)
        self._started.set()
        try:
            while True:
                self.gate.wait()
                if self.ended is not None:
                    break
                try:
                    request, address = self.server.get_request()
                except OSError:
                    if self.ended is not None:
                        break
                    time.sleep(0.01)  # out of file descriptors, or a connection aborted: go on
                    continue
                if not self.track(request):
                    self.server.shutdown_request(request)
                    break
                try:
                    self.server.process_request(request, address)
                except Exception:  # as socketserver's own loop: one bad connection is not the end
                    self.server.handle_error(request, address)
                    self.server.shutdown_request(request)
        finally:
            # Closed here, by the thread that accepts, so that no accept can run on a reused fd.
            self.server.server_close()

    def track(self, connection: socket.socket) -> bool:
        """Count an open connection (False, and not counted, once the instance has ended)."""
        with self._lock:
            if self.ended is not None:
                return False
            self._connections.add(connection)
            return True

    def untrack(self, connection: socket.socket) -> None:
        with self._lock:  # before the handler closes it: ``end`` never shuts down a reused fd
            self._connections.discard(connection)

    def wait_gate(self) -> None:
        """Go on only while the instance runs: wait while it hangs; an ended one answers nothing."""
        self.gate.wait()
        if self.ended is not None:
            raise ConnectionAbortedError(f"{self.instance} {self.ended}")

    def hang(self) -> None:
        if self.ended is None:
            self.gate.clear()
            log(self.instance, "hung (as if SIGSTOP)")

    def resume(self) -> None:
        if self.ended is None and not self.gate.is_set():
            self.gate.set()
            log(self.instance, "resumed (as if SIGCONT)")

    def end(self, reason: str) -> None:
        """Crash or stop: no new connection, every open one shut down, its thread (its pid) gone
        by the time this returns."""
        with self._lock:
            if self.ended is not None:
                return
            self.ended = reason
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        self.gate.set()  # hung requests and the accept loop see that it ended
        with contextlib.suppress(OSError):
            self.server.socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (Linux)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
            self._wait_thread_gone()
        log(self.instance, f"{reason} (pooled, pid {self.pid})")

    def _wait_thread_gone(self, timeout_s: float = 1.0) -> None:
        """Until the kernel has the thread (its pid) no more: ``join`` returns when the thread has
        finished its Python code, a moment before the OS thread exits, and on a busy machine
        ``/proc`` still showed the "killed" instance alive after the kill was answered (CI)."""
        if not self.pid:
            return  # never started
        task = f"/proc/self/task/{self.pid}"
        deadline = time.monotonic() + timeout_s
        while os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.001)


class PooledHTTPServer(DemoHTTPServer):
    """The demo server's HTTP server, accepting in its instance's thread (not ``serve_forever``)
    and with a handler that waits while the instance hangs."""

    def __init__(
        self,
        address: tuple[str, int],
        app: DemoModel,
        pooled: PooledInstance,
        *,
        token_delay_s: float,
        max_model_len: int,
    ) -> None:
        self.pooled = pooled
        super().__init__(address, app, token_delay_s=token_delay_s, max_model_len=max_model_len)
        self.RequestHandlerClass = PooledHandler

    def shutdown_request(self, request: Any) -> None:
        self.pooled.untrack(request)
        super().shutdown_request(request)


class _GatedWriter(io.BufferedIOBase):
    """A handler's ``wfile`` that writes only while its instance runs (a hung one writes nothing)."""

    def __init__(self, raw: io.BufferedIOBase, pooled: PooledInstance) -> None:
        super().__init__()
        self._raw = raw
        self._pooled = pooled

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._pooled.wait_gate()
        return self._raw.write(data)

    def flush(self) -> None:
        if not self._raw.closed:
            self._raw.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # flushes first
        finally:
            self._raw.close()


class PooledHandler(DemoHandler):
    """The demo server's handler, every request and every write held while its instance hangs."""

    @property
    def pooled(self) -> PooledInstance:
        return cast(PooledHTTPServer, self.server).pooled

    def setup(self) -> None:
        name_thread(CONNECTION_THREAD_NAME)  # not its instance's name, which it inherited
        super().setup()
        self.wfile = _GatedWriter(self.wfile, self.pooled)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.pooled.wait_gate()  # a request read while hanging is answered (if ever) on resume
        return ok


class InstancePool:
    """The instances of one pool, by pid (an instance id can run twice, like two processes)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._instances: dict[int, PooledInstance] = {}

    def start(self, argv: Sequence[str], thread_name: str | None = None) -> PooledInstance:
        try:
            args = parse_args(list(argv))
        except SystemExit as exc:  # argparse said why on stderr (the pool's log)
            raise PoolError(
                HTTPStatus.BAD_REQUEST, f"bad instance arguments {list(argv)} (see the pool's log)"
            ) from exc
        try:
            pooled = PooledInstance(args, thread_name)
        except OSError as exc:
            log(args.instance, f"cannot listen on {args.host}:{args.port}: {exc}")
            raise PoolError(HTTPStatus.CONFLICT, f"cannot listen on {args.host}:{args.port}: {exc}") from None
        pooled.start()
        with self._lock:
            self._instances[pooled.pid] = pooled
        return pooled

    def instances(self) -> list[PooledInstance]:
        with self._lock:
            return list(self._instances.values())

    def act(self, pooled: PooledInstance, action: str) -> None:
        if action == "hang":
            pooled.hang()
        elif action == "resume":
            pooled.resume()
        else:
            pooled.end("killed" if action == "kill" else "stopped")
            with self._lock:
                self._instances.pop(pooled.pid, None)

    def by_pid(self, pid: int) -> PooledInstance:
        with self._lock:
            pooled = self._instances.get(pid)
        if pooled is None:
            raise PoolError(HTTPStatus.NOT_FOUND, f"no instance with pid {pid} in pool {self.name}")
        return pooled

    def by_id(self, instance: str) -> list[PooledInstance]:
        found = [p for p in self.instances() if p.instance == instance]
        if not found:
            raise PoolError(HTTPStatus.NOT_FOUND, f"no instance {instance} in pool {self.name}")
        return found

    def stop_all(self) -> None:
        for pooled in self.instances():
            self.act(pooled, "stop")


class ControlServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], pool: InstancePool) -> None:
        self.pool = pool
        super().__init__(address, ControlHandler)


class ControlHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    @property
    def pool(self) -> InstancePool:
        return cast(ControlServer, self.server).pool

    def setup(self) -> None:
        name_thread(CONNECTION_THREAD_NAME)  # and so the loads it starts
        super().setup()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log_message(self, format: str, *args: Any) -> None:
        print(f"instance-pool[{self.pool.name}] http: {format % args}", file=sys.stderr, flush=True)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            raise PoolError(HTTPStatus.BAD_REQUEST, "body is not JSON") from None
        if not isinstance(body, dict):
            raise PoolError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            status, body = self._route(method, self.path.rstrip("/"))
        except PoolError as exc:
            status, body = exc.status, {"error": str(exc)}
        self._send(status, body)

    def _route(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        pool = self.pool
        parts = path.split("/")
        if (method, path) == ("GET", "/healthz"):
            return HTTPStatus.OK, {
                "status": "ok",
                "name": pool.name,
                "pid": os.getpid(),
                "instances": len(pool.instances()),
            }
        if (method, path) == ("GET", "/instances"):
            return HTTPStatus.OK, {"instances": [p.describe() for p in pool.instances()]}
        if (method, path) == ("POST", "/instances"):
            body = self._body()
            argv, name = body.get("argv"), body.get("thread_name")
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise PoolError(HTTPStatus.BAD_REQUEST, '"argv" must be a list of strings')
            if name is not None and not isinstance(name, str):
                raise PoolError(HTTPStatus.BAD_REQUEST, '"thread_name" must be a string')
            return HTTPStatus.CREATED, pool.start(argv, name).describe()
        if (method, path) == ("POST", "/signal"):
            body = self._body()
            pid, sig = body.get("pid"), str(body.get("signal", "")).upper().removeprefix("SIG")
            if not isinstance(pid, int) or sig not in SIGNAL_ACTIONS:
                raise PoolError(HTTPStatus.BAD_REQUEST, f'need {{"pid": int, "signal": {sorted(SIGNAL_ACTIONS)}}}')
            pooled = pool.by_pid(pid)
            pool.act(pooled, SIGNAL_ACTIONS[sig])
            return HTTPStatus.OK, {"pid": pid, "instance": pooled.instance, "state": pooled.state}
        if method == "POST" and len(parts) == 4 and parts[:2] == ["", "instances"] and parts[3] in ACTIONS:
            found = pool.by_id(parts[2])
            for pooled in found:
                pool.act(pooled, parts[3])
            return HTTPStatus.OK, {"instances": [p.describe() for p in found]}
        raise PoolError(HTTPStatus.NOT_FOUND, f"no route {method} {path}")


def name_thread(name: str) -> None:
    """Name the calling thread (``/proc/<tid>/comm``, 15 bytes); threads it starts inherit the name."""
    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])


def raise_file_limit() -> int:
    """The soft limit on open files up to the hard one (each instance holds a socket, each
    connection another); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse_pool_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m drctl.sim.instance_pool", description=__doc__.split("\n")[0])
    parser.add_argument("--control-port", type=int, required=True, help="control endpoint port (0: any free one)")
    parser.add_argument("--control-host", default="127.0.0.1", help="control endpoint address (default 127.0.0.1)")
    parser.add_argument("--name", default="pool", help="the pool's name in logs (drctl: its node)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_pool_args(argv)
    files = raise_file_limit()
    threading.stack_size(THREAD_STACK_BYTES)
    pool = InstancePool(args.name)
    try:
        server = ControlServer((args.control_host, args.control_port), pool)
    except OSError as exc:
        print(
            f"instance-pool[{args.name}] cannot listen on {args.control_host}:{args.control_port}: {exc}",
            file=sys.stderr,
        )
        return 1
    stop = stop_on_signals()
    host, port = server.server_address[:2]
    print(
        f"instance-pool[{args.name}] control on http://{host!s}:{port} (pid {os.getpid()}, {files} open files)",
        flush=True,
    )
    serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="control", daemon=True)
    serve.start()
    while not stop.wait(1.0):
        pass
    print(f"instance-pool[{args.name}] stopping {len(pool.instances())} instance(s)", file=sys.stderr, flush=True)
    server.shutdown()
    pool.stop_all()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
