"""The embedded local platform: model instances are processes on loopback, Envoy is the LB.

Its records are ``LocalInstance`` (the registry's): an instance's process (pid, port) stays here.
The ``Platform`` methods hand out plain ``Instance`` payloads and, given one, look its process up
in the registry by id, so they act on what the registry says now.

Tier mapping (seed §4.1 on one machine): hot = running, loaded, registered at priority 1;
warm = running, loaded and asleep (vLLM sleep mode), not registered; cold = checkpoint only,
no process. Serving instances are registered at priority 0.

Every call on an instance (health, readiness, sleep, wake, verify) goes through its model's engine
profile (``ModelPolicy.engine_profile``, :mod:`drctl.policies.engines`), so a vLLM or SGLang fleet
is asked on the paths it serves; its process starts with the profile's ``server_env``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from drctl.payloads import Instance, ReconcileAction, Role
from drctl.platforms import errors
from drctl.platforms.base import ProgressCallback, find_instance
from drctl.platforms.keepalive_http import Answer, ExchangeError, KeepAliveClient
from drctl.platforms.local import envoy, pools, processes
from drctl.platforms.local.checkpoints import (
    CHECKSUM_MISMATCH,
    ensure_checkpoint,
    file_sha256,
    read_expected_sha256,
    restore_checkpoint,
)
from drctl.platforms.local.fault_injection import LocalFaultInjector
from drctl.platforms.local.registry import EditedInstances, GroupCommit, InstanceRegistry, LocalInstance
from drctl.policies.engines import MODEL_HEADER, EngineProfile, HttpCall
from drctl.policies.loader import load_policy_file
from drctl.policies.placement import gpu_inventory
from drctl.policies.reconcile import plan_reconcile
from drctl.policies.schema import DRPolicy, ModelPolicy
from drctl.settings import DrctlSettings, StateLayout

LB_PRIORITY = {Role.SERVING: 0, Role.HOT: 1}
DELETING = "deleting"
"""The note of an instance a delete has taken out and not yet forgotten (role failed)."""
RESPAWNED_ROLES = (Role.SERVING, Role.HOT, Role.WARM, Role.PROMOTING)
"""Roles whose process a clean stop ends and the next ``drctl up`` starts again."""


SETTLE_CONCURRENCY = 32
"""Instances ``settle_fleet`` waits on at once (see there)."""
VERIFY_FIRST_PAUSE_S = 0.002
VERIFY_LAST_PAUSE_S = 0.05
"""``verify`` checks again after 2 ms, then doubles the pause up to 50 ms: a registration reaches
Envoy through the xDS server a few milliseconds after the EDS write, and a fixed 50 ms pause made
every verify (and so every failover) wait 50 to 100 ms for it."""
VERIFY_ASKS_INSTANCE_AFTER_S = 1.0
VERIFY_ASKS_INSTANCE_EVERY_S = 0.5
"""Once Envoy has not counted the instance healthy for a second, ``verify`` also probes the
instance itself, every half second: an instance that died or hung after its load check (nemesis
seed 8, round 18: a hot standby SIGSTOPped 0.2 s after its serving instance's kill) fails the step
as the prober would judge it, instead of three 30-second tries (75 s) before the runbook moves on
to the next standby. A healthy registration is seen by Envoy in milliseconds and never probed."""


FETCH_ERRORS = (ExchangeError, TimeoutError, httpx.HTTPError)
"""What :meth:`LocalPlatform._fetch` raises when a request fails or gets no answer in time."""


class LocalPlatform:
    def __init__(self, settings: DrctlSettings, policy: DRPolicy) -> None:
        self.settings = settings
        self.policy = policy
        self._policy_bytes: bytes | None = None
        """The policy file's content when ``policy`` was last parsed from it (None: not yet)."""
        self.layout = StateLayout(settings.state_dir)
        self.registry = InstanceRegistry(self.layout.instances_file)
        self._commits = GroupCommit(self.registry)
        self.pools = pools.InstancePools(self.layout, settings.instance_pool_base_port)
        """Pooled mode's processes, one per node (``DRCTL_INSTANCE_MODE=pooled``; see ``pools``)."""
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=0.5))
        self._keepalive = KeepAliveClient()
        """The requests runbook steps make in a loop (probes, the load check, verify): see :meth:`_fetch`."""
        self._draining: dict[asyncio.Task[None], int | None] = {}
        """Ejected processes still draining their connections, stopped when the task ends."""
        self._to_settle: list[str] = []
        """Instances ``ensure_fleet`` started, which ``settle_fleet`` waits for and registers."""

    async def start(self) -> list[str]:
        """Ready for a worker: the HTTP client warmed up, and the ejected instances whose draining
        died with the last worker stopped. Returns what it did, for the worker's log."""
        await self.warm_up()
        left = self.drain_leftovers()
        return (
            [f"stopping ejected instance(s) whose draining ended with the last worker: {', '.join(left)}"]
            if left
            else []
        )

    def fault_injector(self) -> LocalFaultInjector:
        """Drills inject faults here: signals to processes, Xids through the node agents, checkpoints."""
        return LocalFaultInjector(self)

    async def close(self) -> None:
        for task, pid in list(self._draining.items()):
            task.cancel()
            await asyncio.to_thread(processes.terminate, pid)
        await self._http.aclose()
        await self._keepalive.aclose()

    async def warm_up(self) -> None:
        """Make the HTTP client's first request now: it costs ~30 ms once, which would otherwise
        land inside the first failover's critical path."""
        with contextlib.suppress(httpx.HTTPError):
            await self._http.get(f"{self.settings.envoy_admin_url}/ready", timeout=1.0)

    def drain_leftovers(self) -> list[str]:
        """Stop, after the usual connection draining, the processes of ejected instances that still
        run because their draining was a task of a worker that died (found by the nemesis: a worker
        killed within the drain of an ejected instance left its process running for good). The
        worker calls this when it starts; returns the instances it will stop."""
        left = [
            i for i in self.registry.load().values() if i.role == Role.FAILED and processes.runs_instance(i.pid, i.id)
        ]
        for instance in left:
            self._stop_after(instance.pid, self._drain_s())
        return [i.id for i in left]

    def _drain_s(self) -> float:
        return self.policy.load_balancer.retries.per_try_timeout.total_seconds() + 1.0

    # -- the Platform interface -------------------------------------------------------------

    async def list_instances(self, model: str) -> list[Instance]:
        if not self.policy.has_model(model):
            raise errors.unknown_model(model, self.policy.model_names)
        return [i.to_instance() for i in self.registry.of_model(model)]

    async def get_instance(self, model: str, instance_id: str) -> Instance:
        return find_instance(await self.list_instances(model), model, instance_id)

    async def probe(self, instance: Instance) -> tuple[bool, str]:
        """Healthy *for its tier*: serving and hot answer their engine's health path with 200 and
        are awake; a warm standby is loaded, asleep or awake (see ``EngineProfile.judge_health``);
        a cold standby has no process, its normal state, and is healthy while the model's checkpoint
        is intact. A warm standby whose process is gone or whose model failed (or is still loading)
        is not."""
        if instance.role == Role.COLD:
            checkpoint = self.layout.checkpoint(instance.model)
            size = self._checkpoint_size(self.policy.model(instance.model))
            try:
                expected = read_expected_sha256(checkpoint)
                actual_size = checkpoint.stat().st_size
            except (OSError, ValueError) as exc:
                return False, f"cold standby: checkpoint {checkpoint.name} unusable: {exc}"
            if actual_size != size:
                return False, f"cold standby: checkpoint {checkpoint.name} has {actual_size} bytes, expected {size}"
            if size > 2**30:  # too big to re-hash within a probe: size and checksum sidecar only
                return True, f"cold standby: no process (its normal state), checkpoint {checkpoint.name} present"
            if await asyncio.to_thread(file_sha256, checkpoint) != expected:
                return False, f"cold standby: {CHECKSUM_MISMATCH} of {checkpoint.name}"
            return True, f"cold standby: no process (its normal state), checkpoint {checkpoint.name} intact"
        local = self._local(instance)
        if not processes.is_alive(local.pid):
            return False, f"process {local.pid} is not running"
        engine = self._engine(instance.model)
        last = ""
        timeout = self.policy.detection.probe_timeout.total_seconds()
        for attempt in range(3):
            try:
                response = await self._fetch("GET", self._url(local, engine.health_path), timeout_s=timeout)
            except FETCH_ERRORS as exc:
                last = f"{engine.health_path} unreachable: {type(exc).__name__}"
            else:
                up = response.status_code == 200
                verdict = engine.judge_health(
                    response.status_code,
                    response.text,
                    asleep=await self._asleep(local, engine, timeout) if up else None,
                    may_sleep=instance.role == Role.WARM,
                    load_progress=None if up else await self._load_progress(local, engine, timeout),
                )
                if verdict.healthy:
                    return True, verdict.detail
                last = verdict.detail
            if attempt < 2:
                await asyncio.sleep(0.1)
        return False, last

    async def _load_progress(self, local: LocalInstance, engine: EngineProfile, timeout_s: float) -> str | None:
        """The engine's load progress answer (the demo's: why it is not up), None without one."""
        if engine.load_progress_path is None:
            return None
        try:
            return (await self._fetch("GET", self._url(local, engine.load_progress_path), timeout_s=timeout_s)).text
        except FETCH_ERRORS:
            return None

    async def _asleep(self, local: LocalInstance, engine: EngineProfile, timeout_s: float) -> bool | None:
        """What the engine's ``is_sleeping`` query answers; None without one, or without an answer."""
        if engine.is_sleeping_path is None:
            return None
        try:
            response = await self._fetch("GET", self._url(local, engine.is_sleeping_path), timeout_s=timeout_s)
            asleep = response.json().get("is_sleeping") if response.status_code == 200 else None
        except (*FETCH_ERRORS, ValueError, AttributeError):
            return None
        return asleep if isinstance(asleep, bool) else None

    async def claim_epoch(self, model: str) -> int:
        if not self.policy.has_model(model):
            raise errors.unknown_model(model, self.policy.model_names)
        return await self._commits.claim_epoch(model)

    async def highest_indexes(self) -> dict[str, int]:
        return self.registry.highest_indexes()

    async def epochs(self) -> dict[str, int]:
        return self.registry.epochs()

    def _check_epoch(self, model: str, epoch: int | None) -> None:
        """Refuse a stale step before it acts outside the registry (an HTTP call, a process)."""
        errors.check_epoch(model, epoch, self.registry.epochs().get(model, 0))

    async def eject(self, instance: Instance, reason: str, epoch: int | None = None) -> str:
        self._check_epoch(instance.model, epoch)
        local = self._local(instance)
        if instance.role == Role.FAILED and instance.lb_priority is None and not processes.is_alive(local.pid):
            return "already ejected"
        await self._commits.update(instance.id, epoch=epoch, role=Role.FAILED, lb_priority=None, note=reason[:200])
        self.sync_load_balancer(instance.model)
        if not processes.is_alive(local.pid):
            return "removed from LB, marked failed"
        # Connection draining: Envoy sends it nothing new, but requests it still holds (a hung
        # instance holds them until the per-try timeout) must time out and be retried on a standby,
        # not be reset now, when the only healthy host may be the one their retry must not use.
        drain_s = self._drain_s()
        self._stop_after(local.pid, drain_s)
        return f"removed from LB, marked failed; process to stop after {drain_s:g}s of connection draining"

    def _stop_after(self, pid: int | None, delay_s: float) -> None:
        async def stop() -> None:
            await asyncio.sleep(delay_s)
            await asyncio.to_thread(processes.terminate, pid)

        task = asyncio.get_running_loop().create_task(stop())
        self._draining[task] = pid
        task.add_done_callback(lambda t: self._draining.pop(t, None))

    async def promote(self, instance: Instance, epoch: int | None = None) -> str:
        self._check_epoch(instance.model, epoch)
        local = self._local(instance)
        if instance.role in (Role.PROMOTING, Role.SERVING):
            if instance.role == Role.SERVING or local.port is None or processes.is_alive(local.pid):
                return f"already {instance.role}"
        elif not instance.role.is_standby:
            raise errors.not_a_standby(instance.id, instance.role)
        if instance.role == Role.HOT:
            await self._commits.update(instance.id, epoch=epoch, role=Role.PROMOTING)
            return "hot standby: already loaded and registered at priority 1"
        if instance.role == Role.WARM and processes.is_alive(local.pid):
            engine = self._engine(instance.model)
            if engine.wake is None:
                await self._commits.update(instance.id, epoch=epoch, role=Role.PROMOTING)
                return f"warm standby: {engine.engine} cannot sleep, so it is awake already"
            response = await self._send(local, engine.wake, timeout_s=60.0)
            if response.status_code != 200:
                said = response.text.strip()[:200]
                raise errors.model_load_failed(
                    instance.id, f"{engine.wake.path} answered {response.status_code}" + (f": {said}" if said else "")
                )
            await self._commits.update(instance.id, epoch=epoch, role=Role.PROMOTING)
            return f"warm standby woken up ({engine.wake.path})"
        # Cold, or a warm standby whose process is gone: start a process and load from the checkpoint.
        started = self._start_process(local.with_changes(role=Role.PROMOTING), epoch)
        return f"cold standby started as pid {started.pid} on port {started.port}"

    async def wait_loaded(self, instance: Instance, progress: ProgressCallback) -> str:
        """Until the instance has loaded its model: its engine's load progress where it has one (the
        demo), else its model listed on the engine's models path (vLLM, SGLang)."""
        local = self._local(instance)
        engine = self._engine(instance.model)
        start = time.monotonic()
        deadline = start + self.load_timeout_s(instance.model)
        while time.monotonic() < deadline:
            if not processes.is_alive(local.pid):
                said = self._log_tail(instance.id)
                why = f"process {local.pid} exited while loading" + (f"; its log ends: {said}" if said else "")
                raise errors.model_load_failed(instance.id, why)
            state = await self._load_state(local, engine)
            progress(float(state.get("progress") or 0.0), str(state.get("state")))
            if state.get("state") == "ready":
                return f"loaded in {time.monotonic() - start:.2f}s"
            if state.get("state") == "failed":
                error = str(state.get("error"))
                if error.startswith(CHECKSUM_MISMATCH):
                    raise errors.checkpoint_corrupt(instance.id, error)
                raise errors.model_load_failed(instance.id, error)
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{instance.id} did not load within {self.load_timeout_s(instance.model):.0f}s")

    async def _load_state(self, local: LocalInstance, engine: EngineProfile) -> dict[str, Any]:
        """``{"state": starting | loading | ready | failed, "progress", "error"}`` of a loading instance."""
        starting: dict[str, Any] = {"state": "starting", "progress": 0.0}
        if engine.load_progress_path is not None:
            try:
                response = await self._fetch("GET", self._url(local, engine.load_progress_path), timeout_s=1.0)
                state = response.json()
            except (*FETCH_ERRORS, ValueError):
                return starting
            return state if isinstance(state, dict) else starting
        try:
            response = await self._fetch("GET", self._url(local, engine.models_path), timeout_s=1.0)
        except FETCH_ERRORS:
            return starting  # vLLM's and SGLang's servers listen once the weights are loaded
        if response.status_code == 200 and engine.lists_model(response.text, local.model):
            return {"state": "ready", "progress": 1.0}
        # Up, the model not listed yet. A server that says its model failed (the demo's health
        # answer) has failed for good: say so now rather than at the timeout.
        try:
            health = await self._fetch("GET", self._url(local, engine.health_path), timeout_s=1.0)
        except FETCH_ERRORS:
            return {"state": "loading", "progress": 0.0}
        verdict = engine.judge_health(health.status_code, health.text, asleep=None, may_sleep=True)
        if verdict.final:
            return {"state": "failed", "progress": 0.0, "error": _error_field(health.text) or verdict.detail}
        return {"state": "loading", "progress": 0.0}

    async def restore_checkpoint(self, instance: Instance) -> str:
        """Copy the good checkpoint over the corrupted one, then restart the instance's process so it
        loads again (from the start, checksum and all)."""
        target = self.layout.checkpoint(instance.model)
        info = await asyncio.to_thread(restore_checkpoint, self.layout.good_checkpoint(instance.model), target)
        detail = f"{target.name} restored from the repository (sha256 {info.sha256[:12]}…)"
        local = self._local(instance)
        if local.port is None:
            return detail
        await asyncio.to_thread(processes.terminate, local.pid)
        restarted = self._start_process(local)
        return f"{detail}; {instance.id} restarted as pid {restarted.pid}"

    async def register(self, instance: Instance, priority: int, epoch: int | None = None) -> str:
        role = Role.SERVING if priority == 0 else Role.HOT
        await self._commits.update(instance.id, epoch=epoch, role=role, lb_priority=priority)
        self.sync_load_balancer(instance.model)
        return f"registered at priority {priority}"

    async def verify(self, instance: Instance, progress: ProgressCallback) -> str:
        """A real one-token completion through Envoy succeeds (OpenAI's ``POST /v1/completions``,
        the model in the body and in the ``model-name`` header, so it routes by either), and Envoy
        counts the instance healthy at priority 0. When another instance answered through Envoy (the
        one it replaces still serves until it is verified: a zone failover of a zone that is up, a
        drain), the same completion is also sent to the instance itself, so what is verified is the
        promoted instance serving, not only the model."""
        call = self._engine(instance.model).completion(instance.model, prompt="drctl verify")
        url = f"{self.settings.lb_url}{call.path}"
        local = self._local(instance)
        port = local.port
        start = time.monotonic()
        last = "not tried"
        pause = VERIFY_FIRST_PAUSE_S
        watch = _InstanceWatch(self, instance, start)
        cluster = envoy.cluster_url(self.settings.envoy_admin_url, instance.model)
        while time.monotonic() - start < 30.0:
            try:
                clusters = await self._fetch("GET", cluster)
                clusters.raise_for_status()
                hosts = envoy.hosts_of(clusters.json(), instance.model, self.settings.envoy_admin_url)
                mine = [h for h in hosts if h.port == port]
                if not mine or not mine[0].healthy or mine[0].priority != 0:
                    last = f"Envoy: {mine[0] if mine else 'host not in cluster yet'}"
                else:
                    response = await self._fetch(
                        call.method, url, json=call.json, headers={MODEL_HEADER: instance.model}, timeout_s=5.0
                    )
                    if response.status_code == 200 and response.json().get("model") == instance.model:
                        served_by = response.header(envoy.INSTANCE_HEADER, "?")
                        itself = ""
                        if served_by != instance.id:
                            direct = await self._fetch(call.method, self._url(local, call.path), json=call.json)
                            if direct.status_code != 200 or direct.json().get("model") != instance.model:
                                raise ValueError(f"{instance.id} itself answered {direct.status_code}")
                            itself = f", and {instance.id} itself 200"
                        return f"{call.path} via LB 200 (served by {served_by}){itself}; Envoy: healthy at priority 0"
                    last = f"{call.path} via LB {response.status_code}: {response.text[:200]}"
            except (*FETCH_ERRORS, ValueError, LookupError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            await watch.check(last)
            progress(min(0.99, (time.monotonic() - start) / 30.0), last)
            await asyncio.sleep(pause)
            pause = min(VERIFY_LAST_PAUSE_S, pause * 2)
        raise RuntimeError(f"verification through the load balancer failed: {last}")

    # -- reconciliation ----------------------------------------------------------------------

    async def current_policy(self) -> DRPolicy:
        """The policy file as it reads now, parsed again only when its bytes changed: at 500 models
        a parse is tens of milliseconds, and the budget's limits, the listings' serving zones,
        reconciliation and the metrics each ask every few seconds (about 2 % of the worker's CPU in a
        zone outage of 1,000 instances). An unreadable file is parsed (and fails) every time."""
        return self._policy_now()

    def _policy_now(self) -> DRPolicy:
        try:
            content = Path(self.settings.policy).read_bytes()
        except OSError:
            content = None
        if content is None or content != self._policy_bytes:
            self.policy = load_policy_file(self.settings.policy)
            self._policy_bytes = content
        return self.policy

    async def cordon_gpu(self, gpu: str, reason: str) -> str:
        cordoned = dict(self._read_cordoned())
        if gpu in cordoned:
            return f"{gpu} already cordoned ({cordoned[gpu]})"
        cordoned[gpu] = reason or "drained"
        self._write_cordoned(cordoned)
        return f"{gpu} cordoned: kept out of placement"

    def _write_cordoned(self, cordoned: dict[str, str]) -> None:
        path = self.layout.cordoned_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cordoned, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    async def cordoned_gpus(self) -> list[str]:
        return sorted(self._read_cordoned())

    async def hung_gpus(self) -> list[str]:
        """The GPUs of every node whose instance pool is stopped (pooled mode; SIGSTOP, as a zone
        outage or a node-down drill does): a create there fails after its try ("looks hung"), so
        placement skips them. Read from ``/proc`` at each look and never recorded, unlike a cordon:
        a node that resumes is back in placement at the next pass, and nothing on a hung node is
        moved for it (its failures are the detectors' and the runbooks'). Per-process instances
        have no node process to tell by: none then."""
        hung = {pool.name for pool in self.pools.recorded() if processes.is_stopped(pool.pid)}
        return [slot.id for slot in gpu_inventory(self.policy.gpu_pool) if pools.pool_name(slot.node) in hung]

    async def uncordon_gpu(self, gpu: str) -> str:
        cordoned = self._read_cordoned()
        if cordoned.pop(gpu, None) is None:
            return f"{gpu} was not cordoned"
        self._write_cordoned(cordoned)
        return f"{gpu} back in placement"

    def _read_cordoned(self) -> dict[str, str]:
        try:
            data = json.loads(self.layout.cordoned_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    async def all_instances(self) -> list[Instance]:
        return [i.to_instance() for i in self.registry.view().values()]  # to_instance copies

    async def create_instance(self, action: ReconcileAction, progress: ProgressCallback) -> str:
        return _one(await self.create_instances([action], progress, loads_per_node=1))

    async def create_instances(
        self, actions: Sequence[ReconcileAction], progress: ProgressCallback, loads_per_node: int
    ) -> list[str | Exception]:
        """Make every instance of ``actions`` (:meth:`create_instance` each) with two registry writes
        and one EDS write per model, however many there are: one edit records and starts them all,
        they load side by side (at most ``loads_per_node`` on one node at once), and one more edit
        puts the loaded ones in their tier. Made one at a time, a reconciliation pass after a zone
        outage wrote the 1,000-instance registry twice per create, and each write made the prober
        and the xDS server read it again: the registry's writes were 39 % of the worker's time in
        the pass (py-spy). Each action's result is its detail or the exception that failed it."""
        results: list[str | Exception] = ["" for _ in actions]
        loading: list[tuple[int, ReconcileAction, LocalInstance]] = []
        created_at = datetime.now(UTC)
        # Record and start in one locked step, so two runs creating the same id start one process.
        with self.registry.edit() as instances:
            for n, action in enumerate(actions):
                try:
                    started = self._recorded_and_started(instances, action, created_at)
                except Exception as exc:  # this action's outcome; the edit writes the others
                    results[n] = exc
                    continue
                if isinstance(started, str):
                    results[n] = started
                else:
                    loading.append((n, action, started))
        gates: dict[str | None, asyncio.Semaphore] = {}

        async def loaded(action: ReconcileAction, instance: LocalInstance) -> None:
            async with gates.setdefault(instance.node, asyncio.Semaphore(loads_per_node)):
                await self.wait_loaded(instance, progress)
                if action.tier == Role.WARM:
                    await self._put_to_sleep(instance)

        waits = await asyncio.gather(*(loaded(a, i) for _, a, i in loading), return_exceptions=True)
        ready: list[tuple[int, ReconcileAction, LocalInstance]] = []
        for (n, action, instance), waited in zip(loading, waits, strict=True):
            if isinstance(waited, Exception):
                results[n] = waited
            elif isinstance(waited, BaseException):
                raise waited  # cancelled: the activity is
            else:
                ready.append((n, action, instance))
        with self.registry.edit() as instances:
            for n, action, instance in ready:
                try:
                    instances.fence(action.model, action.epoch)
                    instances[instance.id] = instances[instance.id].with_changes(
                        role=action.tier, lb_priority=LB_PRIORITY.get(action.tier)
                    )
                except Exception as exc:
                    results[n] = exc
                    continue
                where = f"on {action.gpu} ({action.node}, {action.zone})"
                results[n] = f"{action.tier} {instance.id} {where}, pid {instance.pid}, port {instance.port}"
        for model in sorted({action.model for _, action, _ in ready}):
            self.sync_load_balancer(model)
        return results

    def _recorded_and_started(
        self, instances: EditedInstances, action: ReconcileAction, created_at: datetime
    ) -> LocalInstance | str:
        """Inside a registry edit: the action's instance recorded and its process started (to be
        loaded), or what there is to say when nothing needs loading (a cold reservation, an
        instance already in its tier). Fenced by the action's epoch."""
        if not self.policy.has_model(action.model):
            raise errors.unknown_model(action.model, self.policy.model_names)
        instances.fence(action.model, action.epoch)
        template = LocalInstance(
            id=action.instance,
            model=action.model,
            role=Role.COLD if action.tier == Role.COLD else Role.PROMOTING,
            host=self.settings.host,
            gpu=action.gpu,
            node=action.node,
            zone=action.zone,
            created_at=created_at,
        )
        existing: LocalInstance = instances.get(action.instance, template)
        done = existing.role == action.tier and (existing.lb_priority is not None or action.tier != Role.HOT)
        if action.tier != Role.COLD and not done and not processes.is_alive(existing.pid):
            # A new process: a new instance of the id, whatever an earlier one's record says.
            existing = self._spawn(instances, existing).with_changes(created_at=created_at)
        instances[existing.id] = existing
        if action.tier == Role.COLD:
            return f"cold standby reserved on {action.gpu} (checkpoint only, no process)"
        if done:
            return f"already {action.tier}"
        return existing

    async def retier_instance(self, action: ReconcileAction, progress: ProgressCallback) -> str:
        self._check_epoch(action.model, action.epoch)
        instance = self._local(await self.get_instance(action.model, action.instance))
        if instance.role == action.tier:
            return f"already {action.tier}"
        if action.tier != Role.HOT or instance.role != Role.WARM:
            raise errors.not_a_standby(instance.id, f"{instance.role} (only warm → hot is supported)")
        engine = self._engine(instance.model)
        if not processes.is_alive(instance.pid):
            instance = self._start_process(instance, action.epoch)
        elif engine.wake is not None:
            response = await self._send(instance, engine.wake, timeout_s=60.0)
            response.raise_for_status()
        await self.wait_loaded(instance, progress)
        self.registry.update(instance.id, epoch=action.epoch, role=Role.HOT, lb_priority=LB_PRIORITY[Role.HOT])
        self.sync_load_balancer(instance.model)
        return f"{instance.id} warm → hot, registered at priority 1"

    async def delete_instance(self, action: ReconcileAction) -> str:
        return _one(await self.delete_instances([action]))

    async def delete_instances(self, actions: Sequence[ReconcileAction]) -> list[str | Exception]:
        """Out of the load balancer, stopped, then forgotten: every instance of ``actions`` with two
        registry writes and one EDS write per model (see :meth:`create_instances`). The first step
        (fenced) only marks an instance deleted, so a worker that dies before the end leaves it in
        the registry and the retry finishes the job; forgotten first, the retry found it "already
        gone" while its endpoint stayed in Envoy and its process ran on (found by the nemesis: a
        worker killed during a placement move left a ghost hot standby in the load balancer)."""
        results: list[str | Exception] = ["" for _ in actions]
        marked: list[tuple[int, ReconcileAction, LocalInstance]] = []
        with self.registry.edit() as instances:
            for n, action in enumerate(actions):
                instance = instances.get(action.instance)
                if instance is None:
                    results[n] = "already gone"
                    continue
                if instance.note != DELETING:  # not marked by an earlier attempt of this delete
                    try:
                        instances.fence(action.model, action.epoch)
                    except Exception as exc:
                        results[n] = exc
                        continue
                    instance = instance.with_changes(role=Role.FAILED, lb_priority=None, note=DELETING)
                    instances[action.instance] = instance
                marked.append((n, action, instance))
        for model in sorted({action.model for _, action, _ in marked}):
            self.sync_load_balancer(model)
        stops = await asyncio.gather(
            *(asyncio.to_thread(processes.terminate, instance.pid) for _, _, instance in marked), return_exceptions=True
        )
        with self.registry.edit() as instances:
            for (n, action, _), stopped in zip(marked, stops, strict=True):
                if isinstance(stopped, Exception):
                    results[n] = stopped  # still marked: a retry stops it and forgets it
                elif isinstance(stopped, BaseException):
                    raise stopped
                else:
                    instances.pop(action.instance, None)
                    results[n] = f"{action.instance} deleted" + (" (process stopped)" if stopped else "")
        return results

    # -- fleet management (used by `drctl up`) -----------------------------------------------

    def load_timeout_s(self, model: str) -> float:
        size = self._checkpoint_size(self.policy.model(model))
        return 60.0 + self.policy.local.load_seconds_per_gib * size / 2**30 * 2

    def ensure_fleet(self, on_progress: Callable[[str], None] = lambda _: None) -> list[LocalInstance]:
        """Bring the fleet up: checkpoints, processes, EDS.

        With no registry (first start, or ``drctl up --fresh``) the fleet is planned from the policy.
        Otherwise it resumes as the registry recorded it: roles, tiers, GPUs and ids stay; processes
        a clean stop ended are started again; processes still alive (the last ``drctl up`` died
        without stopping them) are adopted; processes that died are left as recorded, for the prober
        and the failover runbook. The reconcile schedule then converges what the policy changed.
        """
        self.layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for model in self.policy.models:
            size = self._checkpoint_size(model)
            good = ensure_checkpoint(self.layout.good_checkpoint(model.name), model.name, size, verify=True)
            info = ensure_checkpoint(self.layout.checkpoint(model.name), model.name, size, verify=True)
            if info.sha256 != good.sha256:
                info = restore_checkpoint(good.path, info.path)
            on_progress(f"checkpoint {info.path.name} ({info.size} bytes, sha256 {info.sha256[:12]}…)")
        if self.registry.load():
            self._resume_fleet(on_progress)
        else:
            self._plan_fleet(on_progress)
        for name in self.policy.model_names:
            self.sync_load_balancer(name)
        return list(self.registry.load().values())

    def _plan_fleet(self, on_progress: Callable[[str], None]) -> None:
        """A new fleet from the policy: the same planner as reconciliation, from an empty fleet."""
        plan = plan_reconcile(self.policy, [], cordoned=self._read_cordoned())
        with self.registry.edit() as instances:
            for action in plan.actions:
                instances[action.instance] = LocalInstance(
                    id=action.instance,
                    model=action.model,
                    role=action.tier,
                    host=self.settings.host,
                    gpu=action.gpu,
                    node=action.node,
                    zone=action.zone,
                )
        for problem in plan.unplaceable:
            on_progress(f"WARNING: not placed: {problem}")
        self._to_settle = []
        with self.registry.edit() as instances:  # one write for the whole fleet, not one per instance
            for instance in list(instances.values()):
                if instance.role != Role.COLD:
                    started = self._spawn(instances, instance)
                    self._to_settle.append(started.id)
                    on_progress(f"started {started.id} ({started.role}) pid {started.pid} port {started.port}")

    def _resume_fleet(self, on_progress: Callable[[str], None]) -> None:
        """The fleet as the registry recorded it (see :meth:`ensure_fleet`)."""
        self._to_settle = []
        known = set(self.policy.model_names)
        with self.registry.edit() as instances:
            for instance in sorted(instances.values(), key=lambda i: (i.model, i.id)):
                if instance.model not in known:
                    # Reconciliation only plans the policy's models, so a model removed while drctl
                    # was down is removed here: its instances stop and leave the registry.
                    if processes.runs_instance(instance.pid, instance.id):
                        processes.terminate(instance.pid)
                    del instances[instance.id]
                    on_progress(f"removed {instance.id}: {instance.model} is no longer in the policy")
                    continue
                kept = f"{instance.id} ({instance.role}, {instance.gpu or 'no GPU'})"
                if instance.role == Role.COLD:
                    on_progress(f"kept {kept}: checkpoint only")
                elif instance.role == Role.FAILED:
                    if processes.runs_instance(instance.pid, instance.id):  # ejected, was draining
                        processes.terminate(instance.pid)
                        on_progress(f"stopped {kept}: pid {instance.pid} of an ejected instance")
                elif processes.runs_instance(instance.pid, instance.id):
                    on_progress(f"adopted {kept}: pid {instance.pid} still running, port {instance.port}")
                elif instance.pid is None and instance.role in RESPAWNED_ROLES:
                    # Stopped by a clean stop (``stop_all`` cleared its pid): start it again. Until it
                    # has loaded it is out of the load balancer, as on a first start.
                    waiting = instance.with_changes(lb_priority=None)
                    started = self._spawn(instances, waiting)
                    if instance.role != Role.PROMOTING:  # a promotion's runbook registers it
                        self._to_settle.append(instance.id)
                    on_progress(f"restarted {kept} as pid {started.pid} port {started.port}")
                elif instance.role in (Role.SERVING, Role.HOT):
                    on_progress(
                        f"WARNING: {kept}: process {instance.pid} died while drctl was down; "
                        "left to the prober and the failover runbook"
                    )
                else:
                    on_progress(f"kept {kept}: process {instance.pid} is gone; promotion starts a new one")
        drift = self.fleet_drift()
        if drift:
            on_progress(f"the fleet differs from the policy ({'; '.join(drift)}): the reconcile schedule converges it")

    def fleet_drift(self) -> list[str]:
        """What reconciliation would change now (empty when the fleet matches the policy)."""
        plan = plan_reconcile(self.policy, list(self.registry.load().values()), cordoned=self._read_cordoned())
        changes = [f"{a.kind} {a.instance} ({a.tier})" for a in plan.actions]
        return changes + [f"cannot place {problem}" for problem in plan.unplaceable]

    async def settle_fleet(self, timeout_s: float = 60.0) -> None:
        """Wait for every instance ``ensure_fleet`` started to load, put warm ones to sleep, then
        register them in Envoy. Adopted instances are already loaded (and asleep, if warm)."""
        registry = self.registry.load()
        pending = [registry[i] for i in self._to_settle if i in registry]
        # Waited for a few at a time: they load in parallel anyway (started by ensure_fleet), and
        # polling a thousand at once, each every 50 ms, starved the loads themselves of CPU.
        gate = asyncio.Semaphore(SETTLE_CONCURRENCY)

        async def settle(instance: LocalInstance) -> None:
            async with gate:
                await self._settle(instance, timeout_s)

        await asyncio.gather(*(settle(i) for i in pending))
        self._to_settle = []
        for model in self.policy.model_names:
            self.sync_load_balancer(model)

    async def _settle(self, instance: LocalInstance, timeout_s: float) -> None:
        await self.wait_loaded(instance, lambda _f, _s: None)
        if instance.role == Role.WARM:
            await self._put_to_sleep(instance)
        lb_priority = LB_PRIORITY.get(instance.role)
        self.registry.update(instance.id, lb_priority=lb_priority)

    def stop_all(self) -> int:
        """Stop every instance process (``drctl up`` on exit); returns how many were running.

        Each instance whose process this stopped is recorded without a pid: the next ``drctl up``
        starts it again, while one whose process had already died keeps its pid, so the prober
        finds it dead and the failover runbook handles it, as if drctl had never stopped."""
        stopped: dict[str, int] = {}
        for instance in self.registry.load().values():
            if processes.runs_instance(instance.pid, instance.id) and processes.terminate(instance.pid, grace_s=2.0):
                assert instance.pid is not None
                stopped[instance.id] = instance.pid
        with self.registry.edit() as instances:
            for instance_id, pid in stopped.items():
                current = instances.get(instance_id)
                if current is not None and current.pid == pid:
                    instances[instance_id] = current.with_changes(pid=None)
        self.pools.stop_all()  # pooled mode: the pools, now empty (and any instance not recorded)
        return len(stopped)

    def sync_load_balancer(self, model: str) -> None:
        """Rewrite the model's EDS file from the registry (atomic; Envoy watches the folder)."""
        endpoints = [
            envoy.Endpoint(host=i.host, port=i.port, priority=i.lb_priority, instance=i.id)
            for i in self.registry.of_model(model)
            if i.lb_priority is not None and i.port is not None
        ]
        envoy.write_eds(self.layout.eds_dir, model, endpoints)

    # -- helpers -----------------------------------------------------------------------------

    def _checkpoint_size(self, model: ModelPolicy) -> int:
        return model.checkpoint_size if model.checkpoint_size is not None else self.policy.local.checkpoint_size

    def _start_process(self, instance: LocalInstance, epoch: int | None = None) -> LocalInstance:
        with self.registry.edit(instance.model, epoch) as instances:
            return self._spawn(instances, instance)

    def _spawn(self, instances: EditedInstances, instance: LocalInstance) -> LocalInstance:
        """Start the instance's process (inside a registry edit) and record its port and pid."""
        taken = [i.port for i in instances.peek() if i.port is not None and i.id != instance.id]
        port = processes.pick_port(self.settings.host, self.settings.instance_base_port, taken)
        command = processes.render_command(
            self.policy.local.command,
            {
                "model": instance.model,
                "instance": instance.id,
                "port": port,
                "checkpoint": self.layout.checkpoint(instance.model),
                "gpu": instance.gpu or "",
                "load_seconds_per_gib": self.policy.local.load_seconds_per_gib,
            },
        )
        pooled = pools.demo_server_args(command) if self.settings.instance_mode == "pooled" else None
        if pooled is not None:
            # Pooled mode: a thread of the node's pool, its thread id as pid (see ``pools``).
            pid, port = self.pools.start_instance(pools.pool_name(instance.node), instance.id, pooled, port, taken)
        else:
            env = self._engine(instance.model).server_env
            pid = processes.spawn(command, self.layout.logs_dir / f"{instance.id}.log", env=env)
        updated = instance.with_changes(port=port, pid=pid)
        instances[instance.id] = updated
        return updated

    def _log_tail(self, instance_id: str, lines: int = 5) -> str:
        """The last lines of an instance's log, so that an instance that died while loading says why
        (a port taken meanwhile, a bad command) in the runbook's error, not only in a file."""
        try:
            text = (self.layout.logs_dir / f"{instance_id}.log").read_text(errors="replace")
        except OSError:
            return self.pools.log_tail(instance_id, lines)  # pooled: its lines in its pool's log
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])[:800]

    def _local(self, instance: Instance) -> LocalInstance:
        """The registry's record of ``instance`` as it is now (its process); the non-retryable
        ``UnknownInstance`` when the registry no longer has it."""
        local = self.registry.get(instance.id)  # one copy, not the fleet's
        if local is None or local.model != instance.model:
            known = sorted(i.id for i in self.registry.view().values() if i.model == instance.model)
            raise errors.unknown_instance(instance.model, instance.id, known)
        return local

    def _engine(self, model: str) -> EngineProfile:
        """The engine profile of ``model``'s instances; the non-retryable ``UnknownModel`` when the
        policy no longer has the model."""
        try:
            return self.policy.model(model).engine_profile
        except KeyError:
            raise errors.unknown_model(model, self.policy.model_names) from None

    async def _fetch(
        self,
        method: str,
        url: str,
        *,
        json: object = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 5.0,
    ) -> Answer:
        """A request a runbook step makes in a loop: over a kept-alive connection
        (:mod:`drctl.platforms.keepalive_http`, ~0.1 ms of the event loop where httpx took 2-4 ms;
        in a zone failover's batch the loop is what every switch waits on), or through httpx for
        anything but plain ``http://``. Raises one of :data:`FETCH_ERRORS`."""
        if url.startswith("http://"):
            return await self._keepalive.request(method, url, json_body=json, headers=headers, timeout_s=timeout_s)
        response = await self._http.request(method, url, json=json, headers=headers, timeout=timeout_s)
        return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)

    async def _send(self, instance: LocalInstance, call: HttpCall, timeout_s: float) -> httpx.Response:
        """One of the engine profile's calls (sleep, wake up) on the instance."""
        return await self._http.request(
            call.method, self._url(instance, call.path), params=call.params, json=call.json, timeout=timeout_s
        )

    async def _put_to_sleep(self, instance: LocalInstance) -> None:
        """Put a loaded warm standby to sleep through its engine's sleep call; an engine that cannot
        sleep keeps it loaded and awake (out of the load balancer all the same)."""
        engine = self._engine(instance.model)
        if engine.sleep is None:
            return
        response = await self._send(instance, engine.sleep, timeout_s=10.0)
        if response.status_code != 200:
            needs = " ".join([*engine.server_flags, *(f"{k}={v}" for k, v in engine.server_env.items())])
            hint = f" (its server needs {needs})" if needs else ""
            raise RuntimeError(
                f"{instance.id}: {engine.sleep.path} answered {response.status_code}{hint}: {response.text[:200]}"
            )

    @staticmethod
    def _url(instance: LocalInstance, path: str) -> str:
        if instance.address is None:
            raise RuntimeError(f"{instance.id} has no process to call (no port)")
        return f"http://{instance.address}{path}"


def _error_field(body: str) -> str | None:
    """The ``error`` of a JSON answer (the demo's health answer says why its model failed)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return str(error) if error else None


def _one(results: list[str | Exception]) -> str:
    """The one result of a batch of one: its detail, or its exception raised."""
    [result] = results
    if isinstance(result, Exception):
        raise result
    return result


class _InstanceWatch:
    """``verify``'s look at the instance itself while Envoy does not count it healthy: the instance
    is failed (non-retryable ``InstanceFailed``, so the runbook tries its next standby at once) when
    its process is gone, or when it has failed every probe for as long as the prober takes to judge
    an instance failed (``unhealthyThreshold`` times ``probeInterval``)."""

    def __init__(self, platform: LocalPlatform, instance: Instance, start: float) -> None:
        self._platform = platform
        self._instance = instance
        self._next = start + VERIFY_ASKS_INSTANCE_AFTER_S
        self._down_since: float | None = None
        detection = platform.policy.detection
        self._judged_after_s = detection.unhealthy_threshold * detection.probe_interval.total_seconds()

    async def check(self, envoy_says: str) -> None:
        began = time.monotonic()
        if began < self._next:
            return
        healthy, why = await self._platform.probe(self._instance)
        now = time.monotonic()
        self._next = now + VERIFY_ASKS_INSTANCE_EVERY_S
        if healthy:
            self._down_since = None
            return
        if self._down_since is None:
            self._down_since = began
        gone = not processes.is_alive(self._platform._local(self._instance).pid)
        if gone or now - self._down_since >= self._judged_after_s:
            raise errors.instance_failed(
                self._instance.id, f"{why} (for {now - self._down_since:.1f} s during verify; {envoy_says})"
            )
