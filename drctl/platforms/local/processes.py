"""Model instance processes on the local platform: start from a command template, check, stop.

Instances run in their own session (process group) so they outlive a crashed worker and a
``kill -9`` of one never takes its siblings down; stopping one signals its whole group, which
matters for servers such as vLLM that fork workers.

Every child starts from :func:`inherited_env`, an allowlist of this process's environment (what a
program needs to run, and what an inference engine reads: ``CUDA_*``, ``NVIDIA_*``, ``VLLM_*``,
``HF_*``, …), never the whole of it: drctl's own settings and secrets (``DRCTL_ALERT_TOKENS``, the
fault-injection token, the Temporal API key) would otherwise sit in ``/proc/PID/environ`` of every
model instance, and in whatever the engine logs or dumps. A part of drctl that needs a setting gets
it through ``env`` (see ``drctl.workers.part_env``).

**Pooled instances** (``DRCTL_INSTANCE_MODE=pooled``, :mod:`drctl.platforms.local.pools`): many
instances share one process, :data:`POOL_MODULE`, and each instance's pid is the id of the thread
that serves it. ``/proc/<tid>`` behaves as a process's ``/proc/<pid>`` for what is read here (alive,
stopped, its name), so :func:`is_alive` and :func:`runs_instance` need no other path. A signal to a
thread id would reach the whole pool, though, so :func:`signal_group` (and through it
:func:`terminate` and the drills' faults) never signals a thread: to a pooled instance it sends the
signal's meaning through its pool's control endpoint (``POST /signal``: KILL crashes the instance,
TERM stops it, STOP hangs it, CONT resumes it), and to a thread of any other process nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

INHERITED_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
        "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
        "XDG_CACHE_HOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
    }
)  # fmt: skip
"""Variables every child inherits: what any program needs to run."""
INHERITED_PREFIXES = (
    "LC_", "PYTHON", "CUDA_", "NVIDIA_", "NCCL_", "VLLM_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TORCH",
)  # fmt: skip
"""And every variable with one of these prefixes: locale, the interpreter, GPU runtimes and engines."""

_children: dict[int, subprocess.Popen[bytes]] = {}
"""Processes this process started, kept so that they are reaped (no zombies) once they exit."""


def render_command(template: Iterable[str], values: Mapping[str, object]) -> list[str]:
    merged = {"python": sys.executable, **{k: str(v) for k, v in values.items()}}
    return [arg.format_map(merged) for arg in template]


def inherited_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of ``environ`` (this process's environment) a child inherits: the allowlist above."""
    source = os.environ if environ is None else environ
    return {
        name: value
        for name, value in source.items()
        if name in INHERITED_NAMES or (name.startswith(INHERITED_PREFIXES) and not name.startswith("DRCTL_"))
    }


def spawn(command: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> int:
    """Start a process in a new session, output appended to ``log_path``; returns its pid.

    Its environment is :func:`inherited_env` plus ``env``: nothing else of this process's."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**inherited_env(), **(env or {})},
        )
    _children[proc.pid] = proc
    return proc.pid


def reap() -> None:
    """Collect exited children so they do not linger as zombies. Called from several threads at
    once (terminations run in ``asyncio.to_thread``), so a child may be collected by another."""
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            _children.pop(pid, None)


def is_alive(pid: int | None) -> bool:
    """True when the process exists and is not a zombie (a ``kill -9``'d child not yet reaped)."""
    if pid is None or pid <= 0:
        return False
    reap()
    try:
        stat = _proc_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    name, _, rest = stat.partition(" (")[2].rpartition(")")
    if name == POOL_CONNECTION_THREAD:
        return False  # a pool's connection thread took up the thread id of an ended instance
    return rest.split()[0] not in ("Z", "X")


def _proc_stat(pid: int) -> str:
    """The ``stat`` line of thread ``pid`` (a process's main thread, or a pooled instance's
    thread), read with two system calls. The prober reads 2,500 a second at 1,000 instances:
    ``Path.read_text`` of ``/proc/{pid}/stat`` was a tenth of a core, as the kernel sums that file
    over every thread of the process (a pool runs hundreds); the thread's own file under ``task``
    is 3 µs, not 8, and names the thread itself."""
    fd = os.open(f"/proc/{pid}/task/{pid}/stat", os.O_RDONLY)
    try:
        return os.read(fd, 4096).decode(errors="replace")
    finally:
        os.close(fd)


def is_stopped(pid: int | None) -> bool:
    """True when the process exists and is stopped (SIGSTOP: state ``T``), e.g. by a node-down drill."""
    if pid is None or pid <= 0:
        return False
    try:
        stat = _proc_stat(pid)
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def runs_instance(pid: int | None, instance_id: str) -> bool:
    """True when ``pid`` is alive and its command line names ``instance_id``, or it is the thread
    of a pooled instance named after ``instance_id`` (:func:`thread_tag`); guards against a
    recycled pid before stopping a leftover process."""
    if not is_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if instance_id.encode() in argv:
            return True
        return Path(f"/proc/{pid}/comm").read_text().strip() == thread_tag(instance_id)
    except OSError:
        return False


def terminate(pid: int | None, grace_s: float = 3.0) -> bool:
    """SIGTERM the process group, SIGKILL after ``grace_s``; True if it had been running.

    A stopped process (SIGSTOP: a hung node in a drill) is killed at once: it cannot shut down
    gracefully, and continuing it to do so would let it write half a response to a request it held
    (which the load balancer could then no longer retry elsewhere). For a pooled instance (a
    thread), its pool stopped counts: the threads of a process that was just SIGSTOPped enter the
    stopped state one by one, and one seen still running was sent SIGTERM, which a stopped pool
    cannot act out, and waited ``grace_s`` for nothing."""
    if not is_alive(pid):
        return False
    assert pid is not None
    if is_stopped(pid) or is_stopped(thread_group(pid)):
        signal_group(pid, signal.SIGKILL)
        signal_group(pid, signal.SIGCONT)  # a stopped process dies of SIGKILL; make sure it runs to exit
    else:
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.02)
    signal_group(pid, signal.SIGKILL)
    _wait_exited(pid, 2.0)
    return True


def _wait_exited(pid: int, timeout_s: float) -> None:
    """Until ``pid`` has exited (a zombie counts), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group of ``pid`` (its children too), or to ``pid`` alone; to a
    pooled instance, through its pool's control endpoint (see the module's docstring)."""
    if _signal_thread(pid, sig):
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def pick_port(host: str, start: int, taken: Iterable[int]) -> int:
    """The first port from ``start`` that no instance holds and nothing is bound to."""
    used = set(taken)
    port = start
    while port in used or not port_is_free(host, port):
        port += 1
        if port > 65535:
            raise RuntimeError(f"no free port from {start} upward on {host}")
    return port


# -- pooled instances ------------------------------------------------------------------------

POOL_MODULE = "drctl.sim.instance_pool"
"""The module a pool of instances runs (``python -m drctl.sim.instance_pool``); named, not imported:
the platforms sit below ``drctl.sim`` in the layers."""
POOL_CONNECTION_THREAD = "drctl-conn"
"""The name of a pool's short-lived threads (``drctl.sim.instance_pool.CONNECTION_THREAD_NAME``):
never an instance, whatever thread id it has."""
POOL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSTOP, signal.SIGCONT})
"""The signals a pool acts out for one of its instances (any other is not sent)."""


def thread_tag(instance_id: str) -> str:
    """The name (``/proc/<pid>/comm``, at most 15 bytes) of the thread that serves a pooled instance:
    a digest of its id, so that :func:`runs_instance` tells a recycled thread id apart."""
    return "i" + hashlib.blake2b(instance_id.encode(), digest_size=7).hexdigest()


def thread_group(pid: int | None) -> int | None:
    """The process (thread group) that ``pid`` belongs to: ``pid`` itself for a process, its
    process for a thread; None when there is no such pid."""
    if pid is None or pid <= 0:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    return None


def pool_control_port(pid: int | None) -> int | None:
    """The control port of the pool whose instance thread ``pid`` is; None when ``pid`` is not a
    thread of a pool (a process of its own, a thread of something else, or gone)."""
    group = thread_group(pid)
    if group is None or group == pid:
        return None
    try:
        argv = Path(f"/proc/{group}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if POOL_MODULE not in argv:
        return None
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--control-port" and i + 1 < len(argv) else arg.partition("--control-port=")[2]
        if value.isdigit():
            return int(value)
    return None


def pool_call(
    port: int, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 5.0
) -> tuple[int, dict[str, Any]]:
    """One call of a pool's control endpoint on loopback: (status, JSON answer). ``OSError`` (a
    refused connection, a timeout) when the pool does not answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except http.client.HTTPException as exc:
        raise OSError(f"pool on port {port}: {exc}") from exc
    finally:
        connection.close()
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {"error": raw[:200].decode(errors="replace")}
    return response.status, answer if isinstance(answer, dict) else {"answer": answer}


def _signal_thread(pid: int, sig: signal.Signals) -> bool:
    """Act out ``sig`` for a pooled instance through its pool; True when ``pid`` is a thread (pooled
    or not: signalled, it would be its whole process), False for a process, to be signalled."""
    group = thread_group(pid)
    if group is None or group == pid:
        return False
    port = pool_control_port(pid)
    if port is not None and sig == signal.SIGKILL and is_stopped(group):
        # The whole pool is stopped (its node hung: a zone outage, a node-down drill) and cannot
        # answer. Killing one of its instances kills the pool, as fencing a hung node would: every
        # instance on it is as hung as this one, and a kill that waited for the node to come back
        # would hold up every delete of a zone's instances (seen: reconcile could not empty a
        # stopped zone in minutes). The prober fails the pool's other instances over.
        with contextlib.suppress(ProcessLookupError):
            os.kill(group, signal.SIGKILL)
        # The instance's thread can be gone while the rest of the pool is still exiting; wait for
        # the whole pool, so that whoever fenced it may start a new one on the node at once.
        _wait_exited(group, 2.0)
        return True
    if port is None or sig not in POOL_SIGNALS or is_stopped(group):
        return True  # not a pool's, or a signal a pool does not act out, or a stopped pool: cannot answer
    with contextlib.suppress(OSError):
        pool_call(port, "POST", "/signal", {"pid": pid, "signal": sig.name}, timeout_s=5.0)
    return True
