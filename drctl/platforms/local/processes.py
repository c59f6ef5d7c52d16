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
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

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
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def is_stopped(pid: int | None) -> bool:
    """True when the process exists and is stopped (SIGSTOP: state ``T``), e.g. by a node-down drill."""
    if pid is None or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def runs_instance(pid: int | None, instance_id: str) -> bool:
    """True when ``pid`` is alive and its command line names ``instance_id`` (guards against a
    recycled pid before stopping a leftover process)."""
    if not is_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return instance_id.encode() in argv


def terminate(pid: int | None, grace_s: float = 3.0) -> bool:
    """SIGTERM the process group, SIGKILL after ``grace_s``; True if it had been running.

    A stopped process (SIGSTOP: a hung node in a drill) is killed at once: it cannot shut down
    gracefully, and continuing it to do so would let it write half a response to a request it held
    (which the load balancer could then no longer retry elsewhere)."""
    if not is_alive(pid):
        return False
    assert pid is not None
    if is_stopped(pid):
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
    deadline = time.monotonic() + 2.0
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group of ``pid`` (its children too), or to ``pid`` alone."""
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
