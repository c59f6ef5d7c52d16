"""The local platform's fault injection, for drills: each scenario's fault done to this machine's
processes, node agents and checkpoints, and undone.

This is the platform's optional fault-injection capability (:class:`drctl.platforms.base.FaultInjector`):
the drill activities ask the platform for it instead of asking which platform they run on.
Every part of a fault is recorded in the ``InjectedFault`` before the next part can fail, so that
whatever was done is undone (the drill workflow restores from the activity's last heartbeat if the
worker dies mid-drill).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from drctl.payloads import DrillRestore, DrillScenario, DrillTarget, InjectedFault
from drctl.platforms import node_agents
from drctl.platforms.local import faults
from drctl.platforms.local.checkpoints import (
    corrupt_checkpoint,
    file_sha256,
    read_expected_sha256,
    restore_checkpoint,
)

if TYPE_CHECKING:
    from drctl.platforms.local.platform import LocalPlatform


class LocalFaultInjector:
    def __init__(self, platform: LocalPlatform) -> None:
        self.platform = platform
        self.settings = platform.settings
        self.layout = platform.layout

    def refusal(self, scenario: DrillScenario) -> str | None:
        """None: every scenario's fault is this machine's to inject."""
        return None

    async def inject(self, target: DrillTarget, fault: InjectedFault) -> None:
        """Inject the scenario's fault, recording each part in ``fault`` before the next can fail."""
        instances = list(self.platform.registry.load().values())  # with their processes
        serving = next(i for i in instances if i.id == target.instance)
        match target.scenario:
            case DrillScenario.POD_CRASH:
                if serving.pid is None:
                    raise RuntimeError(f"{serving.id} has no process to kill")
                pooled = faults.is_pooled(serving.pid)
                faults.kill(serving.pid)
                fault.detail = (
                    f"crash of pooled instance {serving.id} (pid {serving.pid}) through its pool's control endpoint"
                    if pooled
                    else f"kill -9 {serving.pid} ({serving.id})"
                )
            case DrillScenario.NODE_DOWN | DrillScenario.ZONE_OUTAGE:
                nodes: set[str]
                if target.scenario == DrillScenario.NODE_DOWN:
                    if target.node is None:
                        raise RuntimeError("a node-down drill needs a target node")
                    nodes = {target.node}
                else:
                    nodes = {n.name for n in self.platform.policy.gpu_pool.nodes if n.zone == target.zone}
                agent_pids = self._agent_pids()
                pids = list(dict.fromkeys(i.pid for i in instances if i.node in nodes and i.pid is not None))
                pids += [agent_pids[n] for n in sorted(nodes) if n in agent_pids]
                for pid in pids:
                    fault.stopped_pids += faults.stop([pid])
                what = f"node {target.node}" if target.scenario == DrillScenario.NODE_DOWN else f"zone {target.zone}"
                fault.detail = (
                    f"{what} down: SIGSTOP of {len(fault.stopped_pids)} process(es) on {', '.join(sorted(nodes))}"
                )
            case DrillScenario.GPU_FAILURE:
                if target.gpu is None or target.node is None:
                    raise RuntimeError("a GPU-failure drill needs a target GPU and its node")
                async with httpx.AsyncClient(timeout=5.0) as http:
                    url = await node_agents.agent_for_node(http, self.settings.node_agent_urls, target.node)
                    if url is None:
                        raise RuntimeError(f"no node agent answers for {target.node} (drctl up runs one per node)")
                    fault.xid_agents.append(url)
                    gpu_index = int(target.gpu.rsplit("/", 1)[1])
                    status = await node_agents.inject_xid(http, url, gpu_index, 79, token=self.settings.fault_token())
                fault.detail = f"Xid 79 (GPU fallen off the bus) injected on {target.gpu} via {url}: {status}"
            case DrillScenario.MODEL_CORRUPTION:
                path = self.layout.checkpoint(target.model)
                fault.corrupted.append(str(path))
                await asyncio.to_thread(corrupt_checkpoint, path, 4096, 64)
                async with httpx.AsyncClient() as http:
                    profile = self.platform.policy.model(target.model).engine_profile
                    reload = await faults.reload_weights(http, f"http://{serving.address}", profile)
                fault.detail = f"{path.name} corrupted (64 bytes at 4096); {serving.id} reloaded its weights: {reload}"

    async def restore(self, fault: InjectedFault) -> DrillRestore:
        """Undo exactly what was injected; idempotent (the drill retries it until it succeeds)."""
        out = DrillRestore()
        if fault.stopped_pids:
            resumed = faults.resume(fault.stopped_pids)
            gone = len(fault.stopped_pids) - len(resumed)
            out.detail.append(f"SIGCONT to {len(resumed)} process(es); {gone} had been stopped by runbooks")
        if fault.xid_agents:
            async with httpx.AsyncClient(timeout=5.0) as http:
                for url in fault.xid_agents:
                    cleared = await node_agents.clear_xids(http, url, token=self.settings.fault_token())
                    out.detail.append(f"{url}: injected Xids cleared on GPU(s) {cleared}")
        for name in fault.corrupted:
            path = Path(name)
            if await asyncio.to_thread(file_sha256, path) == read_expected_sha256(path):
                out.detail.append(f"{path.name}: already restored by the runbook")
            else:
                good = self.layout.good_checkpoint(path.stem)
                await asyncio.to_thread(restore_checkpoint, good, path)
                out.detail.append(f"{path.name}: restored from the repository by the drill")
        return out

    def _agent_pids(self) -> dict[str, int]:
        """Node → pid of its agent, as ``drctl up`` recorded them (a node down stops its agent too)."""
        try:
            pids = json.loads(self.layout.stack_file.read_text(encoding="utf-8"))["pids"]
        except (OSError, ValueError, KeyError):
            return {}
        names = {n.name for n in self.platform.policy.gpu_pool.nodes}
        return {k: int(v) for k, v in pids.items() if k in names}
