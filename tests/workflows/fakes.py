"""Fake activities registered under the real activity names, over an in-memory fleet."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError

from drctl.activities.incidents import IncidentActivities
from drctl.activities.zone_switch import ZoneSwitchActivities
from drctl.payloads import (
    ActivityName,
    CordonGpusRequest,
    DrainGpuRequest,
    EjectRequest,
    ErrorType,
    FleetSnapshot,
    Instance,
    InstanceChange,
    InstanceList,
    InstanceRef,
    ModelRef,
    ProbeResult,
    ReconcilePlan,
    ReconcileRequest,
    RegisterRequest,
    Role,
    StepReport,
)
from drctl.policies.loader import load_policy_file
from drctl.policies.reconcile import plan_pass
from drctl.policies.schema import DRPolicy

EXAMPLE_POLICY = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")


@dataclass
class FakeFleet:
    """What the fake platform knows, and the calls it saw, in order."""

    instances: dict[str, Instance]
    healthy: set[str] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)
    """Standbys whose promotion fails."""
    calls: list[tuple[str, str]] = field(default_factory=list)
    promote_gate: asyncio.Event | None = None
    gated: set[str] | None = None
    """The standbys whose promotion waits for ``promote_gate`` (None: every one)."""
    policy: DRPolicy = field(default_factory=lambda: EXAMPLE_POLICY)
    cordoned: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    hung: set[str] = field(default_factory=set)
    """Instances that never answer (their node is down): loading them waits forever."""
    epochs: dict[str, int] = field(default_factory=dict)
    """Fencing epochs per model, as the platform keeps them: fenced steps with an older one are refused."""
    refused: list[tuple[str, str]] = field(default_factory=list)
    """Fenced steps refused as stale (step, instance)."""
    listing_at_claim_fails: bool = False
    """The platform's listing fails when the guardian's epoch claim asks (the runbook's own step works)."""
    """Instances whose checkpoint fails its checksum until ``restore_checkpoint`` runs for them."""

    @classmethod
    def of(cls, *specs: tuple[str, Role]) -> FakeFleet:
        fleet = {
            iid: Instance(id=iid, model="llama-2-7b", role=role, lb_priority={Role.SERVING: 0, Role.HOT: 1}.get(role))
            for iid, role in specs
        }
        return cls(instances=fleet)

    def activities(self) -> list[object]:
        fleet = self

        @activity.defn(name=ActivityName.PROBE_INSTANCE)
        async def probe(ref: InstanceRef) -> ProbeResult:
            fleet.calls.append(("probe", ref.instance))
            if ref.instance not in fleet.instances:
                raise ApplicationError("no such instance", type=ErrorType.UNKNOWN_INSTANCE, non_retryable=True)
            ok = ref.instance in fleet.healthy
            return ProbeResult(instance=ref.instance, healthy=ok, detail="200" if ok else "refused", duration_ms=1)

        @activity.defn(name=ActivityName.LIST_INSTANCES)
        async def list_instances(ref: ModelRef) -> InstanceList:
            fleet.calls.append(("list", ref.model))
            return InstanceList(
                model=ref.model, instances=[i for i in fleet.instances.values() if i.model == ref.model]
            )

        platform = FakePlatform(fleet)

        @activity.defn(name=ActivityName.EJECT_INSTANCE)
        async def eject(req: EjectRequest) -> StepReport:
            detail = await platform.eject(fleet.instances[req.instance], req.reason, req.epoch)
            return StepReport(detail=detail, duration_ms=2)

        @activity.defn(name=ActivityName.PROMOTE_STANDBY)
        async def promote(ref: InstanceRef) -> StepReport:
            return StepReport(detail=await platform.promote(fleet.instances[ref.instance], ref.epoch), duration_ms=3)

        @activity.defn(name=ActivityName.LOAD_MODEL)
        async def load(ref: InstanceRef) -> StepReport:
            return StepReport(detail=await platform.wait_loaded(fleet.instances[ref.instance]), duration_ms=4)

        @activity.defn(name=ActivityName.RESTORE_CHECKPOINT)
        async def restore(ref: InstanceRef) -> StepReport:
            fleet.calls.append(("restore", ref.instance))
            fleet.corrupt.discard(ref.instance)
            return StepReport(detail="restored from the repository", duration_ms=8)

        @activity.defn(name=ActivityName.REGISTER_INSTANCE)
        async def register(req: RegisterRequest) -> StepReport:
            detail = await platform.register(fleet.instances[req.instance], req.priority, req.epoch)
            return StepReport(detail=detail, duration_ms=5)

        @activity.defn(name=ActivityName.VERIFY_SERVING)
        async def verify(ref: InstanceRef) -> StepReport:
            return StepReport(detail=await platform.verify(fleet.instances[ref.instance]), duration_ms=6)

        @activity.defn(name=ActivityName.REQUEST_RECONCILE)
        async def request_reconcile(ref: ModelRef) -> StepReport:
            fleet.calls.append(("replenish", ref.model))
            return StepReport(detail="triggered", duration_ms=0.5)

        @activity.defn(name=ActivityName.OBSERVE_FLEET)
        async def observe() -> FleetSnapshot:
            fleet.calls.append(("observe", "fleet"))
            return FleetSnapshot(
                policy=fleet.policy.model_dump(mode="json", by_alias=True),
                instances=list(fleet.instances.values()),
                cordoned_gpus=sorted(fleet.cordoned),
                epochs=dict(fleet.epochs),
            )

        @activity.defn(name=ActivityName.PLAN_RECONCILE)
        async def plan(request: ReconcileRequest) -> ReconcilePlan:
            return plan_pass(await observe(), request.models)

        @activity.defn(name=ActivityName.CREATE_INSTANCE)
        async def create(change: InstanceChange) -> StepReport:
            a = change.action
            fleet.calls.append(("create", a.instance))
            if a.instance in fleet.corrupt:
                raise ApplicationError("checksum mismatch", type=ErrorType.CHECKPOINT_CORRUPT, non_retryable=True)
            fleet.instances[a.instance] = Instance(
                id=a.instance, model=a.model, role=a.tier, gpu=a.gpu, node=a.node, zone=a.zone, lb_priority=0
            )
            return StepReport(detail=f"created on {a.gpu}", duration_ms=7)

        @activity.defn(name=ActivityName.DELETE_INSTANCE)
        async def delete(change: InstanceChange) -> StepReport:
            fleet.calls.append(("delete", change.action.instance))
            fleet.instances.pop(change.action.instance, None)
            return StepReport(detail="deleted", duration_ms=1)

        @activity.defn(name=ActivityName.CORDON_GPU)
        async def cordon(request: DrainGpuRequest) -> StepReport:
            fleet.calls.append(("cordon", request.gpu))
            fleet.cordoned.add(request.gpu)
            return StepReport(detail="cordoned")

        @activity.defn(name=ActivityName.CORDON_GPUS)
        async def cordon_all(request: CordonGpusRequest) -> StepReport:
            fleet.calls.extend(("cordon", gpu) for gpu in request.gpus)
            fleet.cordoned.update(request.gpus)
            return StepReport(detail=f"{len(request.gpus)} GPU(s) cordoned")

        @activity.defn(name=ActivityName.UNCORDON_GPU)
        async def uncordon(request: DrainGpuRequest) -> StepReport:
            fleet.calls.append(("uncordon", request.gpu))
            fleet.cordoned.discard(request.gpu)
            return StepReport(detail="uncordoned")

        return [
            *IncidentActivities(platform).all(),  # type: ignore[arg-type]
            *ZoneSwitchActivities(platform).all(),  # type: ignore[arg-type]
            cordon,
            cordon_all,
            uncordon,
            probe,
            list_instances,
            eject,
            promote,
            load,
            restore,
            register,
            verify,
            request_reconcile,
            observe,
            plan,
            create,
            delete,
        ]

    def fence(self, step: str, model: str, instance: str, epoch: int | None) -> None:
        current = self.epochs.get(model, 0)
        if epoch is not None and epoch < current:
            self.refused.append((step, instance))
            raise ApplicationError(f"stale epoch {epoch} < {current}", type=ErrorType.STALE_EPOCH, non_retryable=True)

    def steps(self) -> list[str]:
        return [f"{name}:{subject}" for name, subject in self.calls]


class FakePlatform:
    """What the real incident activities (epochs, leases) need of a platform, over the fake fleet."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    async def claim_epoch(self, model: str) -> int:
        self.fleet.epochs[model] = self.fleet.epochs.get(model, 0) + 1
        self.fleet.calls.append(("claim-epoch", str(self.fleet.epochs[model])))
        return self.fleet.epochs[model]

    async def current_policy(self) -> DRPolicy:
        return self.fleet.policy

    async def list_instances(self, model: str) -> list[Instance]:
        """The guardian's epoch claim lists the model for the runbook it starts (as ``list_instances``
        the activity does: one ``list`` call either way)."""
        if self.fleet.listing_at_claim_fails:
            raise ConnectionError("platform API unreachable")
        self.fleet.calls.append(("list", model))
        return [i for i in self.fleet.instances.values() if i.model == model]

    async def get_instance(self, model: str, instance_id: str) -> Instance:
        if instance_id not in self.fleet.instances:
            raise ApplicationError("no such instance", type=ErrorType.UNKNOWN_INSTANCE, non_retryable=True)
        return self.fleet.instances[instance_id]

    # The runbook's steps, as the fake activities above run them and as the zone failover's batch
    # (``drctl.activities.zone_switch``, real activities over this platform) runs them.

    def _fenced_change(self, step: str, instance: Instance, epoch: int | None, **fields: object) -> None:
        """A fenced step that changes the instance's fields (refused as stale: nothing changes)."""
        fleet = self.fleet
        fleet.fence(step, instance.model, instance.id, epoch)
        fleet.calls.append((step, instance.id))
        fleet.instances[instance.id] = fleet.instances[instance.id].model_copy(update=fields)

    async def eject(self, instance: Instance, reason: str, epoch: int | None = None) -> str:
        self._fenced_change("eject", instance, epoch, role=Role.FAILED, lb_priority=None)
        return "ejected"

    async def promote(self, instance: Instance, epoch: int | None = None) -> str:
        fleet = self.fleet
        fleet.fence("promote", instance.model, instance.id, epoch)
        current = fleet.instances[instance.id]
        if current.role == Role.SERVING:  # as both platforms: a retry finds it done
            return "already serving"
        fleet.calls.append(("promote", instance.id))
        if fleet.promote_gate is not None and (fleet.gated is None or instance.id in fleet.gated):
            await fleet.promote_gate.wait()
            fleet.fence("promote", instance.model, instance.id, epoch)
        if instance.id in fleet.broken:
            raise ApplicationError("checksum mismatch", type=ErrorType.MODEL_LOAD_FAILED, non_retryable=True)
        fleet.instances[instance.id] = fleet.instances[instance.id].model_copy(update={"role": Role.PROMOTING})
        return "promoted"

    async def wait_loaded(self, instance: Instance, progress: object = None) -> str:
        fleet = self.fleet
        fleet.calls.append(("load", instance.id))
        if instance.id in fleet.hung:
            await asyncio.sleep(3600)
        if instance.id in fleet.corrupt:
            raise ApplicationError("checksum mismatch", type=ErrorType.CHECKPOINT_CORRUPT, non_retryable=True)
        return "loaded"

    async def register(self, instance: Instance, priority: int, epoch: int | None = None) -> str:
        self._fenced_change("register", instance, epoch, role=Role.SERVING, lb_priority=priority)
        return "registered"

    async def verify(self, instance: Instance, progress: object = None) -> str:
        self.fleet.calls.append(("verify", instance.id))
        return "200 via LB"
