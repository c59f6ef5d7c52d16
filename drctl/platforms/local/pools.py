"""The local platform's pooled instance mode (``DRCTL_INSTANCE_MODE=pooled``): instances of the demo
server run many to a process, one pool per node (:mod:`drctl.sim.instance_pool`).

**One pool per node**, because a node is the local platform's failure domain: a pool that dies
takes down the instances of one node, as a crashed host would, and never those of two. A pool is
started the first time an instance of its node needs one, ``python -m drctl.sim.instance_pool
--control-port P --name NODE`` in its own session (like an instance: it outlives a crashed worker),
output in ``logs/pool-NODE.log``. ``pools/NODE.json`` in the state folder records its pid and port,
so that the next worker or ``drctl up`` **adopts** it (its pid still runs the pool module with that
port and it answers) instead of starting another. Nothing restarts a pool that died: its instances
died with it (their pids, thread ids, are gone from ``/proc``), the prober fails them over, and the
first instance started on the node again (a promotion, reconciliation) starts a new pool.
``stop_all`` (a clean ``drctl up`` exit, ``--fresh``) stops the pools after their instances.

Starting an instance is a ``POST /instances`` to its node's pool with the demo server's own
arguments (the policy's command template, rendered as for a process); the pid it records is the
instance's thread id. Stopping, killing, hanging and resuming go through
:func:`drctl.platforms.local.processes.signal_group`, which turns the signal into the pool's
``POST /signal``; whether it runs is ``/proc/<tid>`` (:func:`~drctl.platforms.local.processes.is_alive`),
so the prober and ``drctl status`` need no change. Only a command template that runs the demo server
(``{python} -m drctl.sim.inference_server …``) is pooled; any other (vLLM, SGLang) still starts a
process per instance.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from drctl.platforms.local import processes
from drctl.settings import LOOPBACK, StateLayout

DEMO_MODULE = "drctl.sim.inference_server"
DEFAULT_POOL = "local"
"""The pool of instances that have no node (a policy without a GPU pool)."""
POOL_START_TIMEOUT_S = 20.0
START_ATTEMPTS = 3
"""Tries with the next free port when the one picked was taken before the pool could bind it."""


@dataclass(frozen=True)
class Pool:
    name: str
    pid: int
    port: int


def demo_server_args(command: list[str]) -> list[str] | None:
    """The demo server's own arguments when ``command`` runs it (``python -m
    drctl.sim.inference_server …``); None for any other command, which a pool cannot run."""
    if len(command) >= 3 and command[1:3] == ["-m", DEMO_MODULE]:
        return command[3:]
    return None


def with_port(args: list[str], port: int) -> list[str]:
    """``args`` with the value of ``--port`` replaced."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--port" and i + 1 < len(out):
            out[i + 1] = str(port)
        elif arg.startswith("--port="):
            out[i] = f"--port={port}"
    return out


def pool_name(node: str | None) -> str:
    return node or DEFAULT_POOL


class InstancePools:
    """The pools of one state folder: found, adopted, started and stopped."""

    def __init__(self, layout: StateLayout, base_port: int) -> None:
        self.layout = layout
        self.base_port = base_port
        self.dir = layout.root / "pools"

    def _state_file(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def recorded(self) -> list[Pool]:
        """The pools the state folder records whose process still runs the pool module."""
        found = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            pool = self._read(path)
            if pool is not None and _runs_pool(pool):
                found.append(pool)
        return found

    @staticmethod
    def _read(path: Path) -> Pool | None:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return Pool(name=str(raw["name"]), pid=int(raw["pid"]), port=int(raw["port"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def ensure(self, name: str) -> Pool:
        """The running pool of ``name`` (adopted), or a new one."""
        pool = self._read(self._state_file(name))
        if pool is not None and _runs_pool(pool):
            # Its node is hung (stopped): a second pool beside it would be an orphan nobody stops,
            # and an instance started on a hung node is not one anybody wants. Checked before asking
            # it (a stopped pool accepts the connection and never answers, and the ask blocked the
            # worker's event loop for its whole timeout on every try: workflow tasks timed out
            # behind it in a zone outage), and again after a failed ask (a stop just sent may not
            # show in /proc at once).
            if not processes.is_stopped(pool.pid) and _answers(pool):
                return pool
            if processes.is_stopped(pool.pid):
                raise RuntimeError(f"instance pool {name} (pid {pool.pid}) is stopped: node {name} looks hung")
            # Running, but too busy to answer in time (at 2,000 instances a pool ran at 200 % CPU):
            # a second pool started beside it took over its record, and the first, with every
            # instance it still served, was left running after the stack stopped. The step retries.
            raise RuntimeError(
                f"instance pool {name} (pid {pool.pid}) runs but did not answer within 1 s: "
                "not starting a second pool beside it"
            )
        return self._start(name)

    def _start(self, name: str) -> Pool:
        taken = [p.port for p in self.recorded()]
        port = processes.pick_port(LOOPBACK, self.base_port, taken)
        log = self.layout.logs_dir / f"pool-{name}.log"
        command = [sys.executable, "-m", processes.POOL_MODULE, "--control-port", str(port), "--name", name]
        pool = Pool(name=name, pid=processes.spawn(command, log), port=port)
        deadline = time.monotonic() + POOL_START_TIMEOUT_S
        while not _answers(pool):
            if not processes.is_alive(pool.pid):
                raise RuntimeError(f"instance pool {name} (pid {pool.pid}) exited at start; its log ends: {_tail(log)}")
            if time.monotonic() > deadline:
                processes.terminate(pool.pid, grace_s=1.0)
                raise RuntimeError(f"instance pool {name} (pid {pool.pid}) did not answer on port {port}")
            time.sleep(0.02)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._state_file(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"name": name, "pid": pool.pid, "port": port}) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return pool

    def start_instance(
        self, name: str, instance_id: str, args: list[str], port: int, taken: list[int]
    ) -> tuple[int, int]:
        """Start an instance in pool ``name`` on ``port`` (or the next free one, should another
        process take it first); returns (pid, port): its thread id and the port it listens on."""
        pool = self.ensure(name)
        host = _host_arg(args)
        body: dict[str, object] = {}
        for _attempt in range(START_ATTEMPTS):
            status, body = processes.pool_call(
                pool.port,
                "POST",
                "/instances",
                {"argv": with_port(args, port), "thread_name": processes.thread_tag(instance_id)},
                timeout_s=10.0,
            )
            if status == 201:
                return int(str(body["pid"])), int(str(body["port"]))
            if status != 409:  # 409: the port was taken meanwhile
                break
            port = processes.pick_port(host, port + 1, taken)
        raise RuntimeError(
            f"instance pool {name} (pid {pool.pid}) did not start {instance_id}: {body.get('error', body)}"
        )

    def stop_all(self) -> int:
        """Stop every pool of the state folder (their instances with them); returns how many ran."""
        stopped = 0
        for pool in self.recorded():
            if processes.terminate(pool.pid, grace_s=5.0):
                stopped += 1
        if self.dir.is_dir():
            for path in self.dir.glob("*.json"):
                path.unlink(missing_ok=True)
        return stopped

    def log_tail(self, instance_id: str, lines: int = 5) -> str:
        """The last lines that the pools' logs have about ``instance_id``."""
        tag = f"[{instance_id}]"
        found: list[str] = []
        for log in sorted(self.layout.logs_dir.glob("pool-*.log")):
            found += [line.strip() for line in _tail_lines(log) if tag in line]
        return " | ".join(found[-lines:])[:800]


def _runs_pool(pool: Pool) -> bool:
    """``pool.pid`` still runs the pool module with ``pool.port`` (not a recycled pid)."""
    if not processes.is_alive(pool.pid):
        return False
    try:
        argv = Path(f"/proc/{pool.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return processes.POOL_MODULE in argv and str(pool.port) in argv


def _answers(pool: Pool) -> bool:
    try:
        status, body = processes.pool_call(pool.port, "GET", "/healthz", timeout_s=1.0)
    except OSError:
        return False
    return status == 200 and body.get("pid") == pool.pid


def _host_arg(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg == "--host" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--host="):
            return arg.partition("=")[2]
    return LOOPBACK


def _tail_lines(path: Path, size: int = 256 * 1024) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def _tail(path: Path, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in _tail_lines(path)[-lines:])[:800]
