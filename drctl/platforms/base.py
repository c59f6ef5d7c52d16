"""The one platform interface the runbook activities drive.

The local platform (processes on this machine, Envoy as the load balancer) and the Kubernetes
platform (pods, each model's Service or an Istio VirtualService as the load balancer) implement the
same methods, so workflows never know which one runs underneath. The one capability only some
platforms have, fault injection for drills, is asked for (``fault_injector``), not assumed.

Instances cross this interface, and the runbooks' history, as the shared ``Instance`` payload: what
every platform knows of an instance (model, role, load-balancer priority, GPU, node, zone) and its
``address``, the ``host:port`` where it answers on its platform's network (a local process's
loopback port, a pod's IP and container port; None while it has no process or pod, as a cold
standby). What only one platform has stays in that platform's own records, looked up by instance id
when a method needs it: the local platform's pids and ports in its registry (``LocalInstance``), the
pods behind an instance's labels on Kubernetes. A platform returns plain ``Instance`` objects, never
a subclass of its own, which Temporal's pydantic data converter would serialise with its extra
fields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from drctl.payloads import DrillRestore, DrillScenario, DrillTarget, InjectedFault, Instance, ReconcileAction
from drctl.platforms import errors
from drctl.policies.schema import DRPolicy

ProgressCallback = Callable[[float, str], None]
"""Called with (fraction done, what is happening) during long steps; activities heartbeat it."""


class FaultInjector(Protocol):
    """What a platform that can run DR drills offers: inject a scenario's fault, and undo it."""

    def refusal(self, scenario: DrillScenario) -> str | None:
        """Why ``scenario`` cannot be injected here (None: it can). Asked before a drill starts its
        load, so that a fault this platform cannot inject is refused before anything happens."""
        ...

    async def inject(self, target: DrillTarget, fault: InjectedFault) -> None:
        """Inject the fault, recording each part in ``fault`` before the next part can fail."""
        ...

    async def restore(self, fault: InjectedFault) -> DrillRestore:
        """Undo exactly what ``fault`` records; idempotent."""
        ...


class Platform(Protocol):
    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Get ready before a worker polls (warm clients, clean up after a dead worker); returns
        what it did, for the log."""
        ...

    async def close(self) -> None:
        """Release what the platform holds (HTTP clients, draining tasks)."""
        ...

    def fault_injector(self) -> FaultInjector | None:
        """The platform's fault injection for drills, or None where it has none."""
        ...

    # -- the runbook's steps --------------------------------------------------------------------

    async def list_instances(self, model: str) -> list[Instance]:
        """Every instance of the model, in every role. Raises ``UnknownModel`` if none is known."""
        ...

    async def get_instance(self, model: str, instance_id: str) -> Instance:
        """One instance; raises the non-retryable ``UnknownInstance`` error if there is none."""
        ...

    async def probe(self, instance: Instance) -> tuple[bool, str]:
        """Is the instance alive and answering its health check? Returns (healthy, why)."""
        ...

    async def claim_epoch(self, model: str) -> int:
        """The model's next fencing epoch (it only grows). From now on every fenced step with an
        older epoch is refused with the non-retryable ``StaleEpoch`` and changes nothing."""
        ...

    async def epochs(self) -> dict[str, int]:
        """Each model's current fencing epoch (absent: 0)."""
        ...

    async def eject(self, instance: Instance, reason: str, epoch: int | None = None) -> str:
        """Take it out of the load balancer for good, mark it failed, release what it holds.
        Fenced: refused when ``epoch`` is older than the model's (None: unfenced)."""
        ...

    async def promote(self, instance: Instance, epoch: int | None = None) -> str:
        """Bring a standby towards serving: hot is already loaded, warm wakes, cold starts. Fenced."""
        ...

    async def wait_loaded(self, instance: Instance, progress: ProgressCallback) -> str:
        """Wait until the instance has its model loaded and answers; fails on a bad checkpoint."""
        ...

    async def restore_checkpoint(self, instance: Instance) -> str:
        """Its checkpoint failed the checksum: put a good copy in place and make it load again."""
        ...

    async def register(self, instance: Instance, priority: int, epoch: int | None = None) -> str:
        """Put it in the load balancer at ``priority`` (0 serves, 1 is the hot backup). Fenced."""
        ...

    async def verify(self, instance: Instance, progress: ProgressCallback) -> str:
        """A real request through the load balancer succeeds with the instance serving."""
        ...

    # -- reconciliation -------------------------------------------------------------------------

    async def current_policy(self) -> DRPolicy:
        """The DR policy as it is now (re-read, so a changed policy is reconciled towards)."""
        ...

    async def all_instances(self) -> list[Instance]:
        """Every instance of every model, failed ones included."""
        ...

    async def create_instance(self, action: ReconcileAction, progress: ProgressCallback) -> str:
        """Create the instance the action names on its GPU, in its tier: loaded and registered at
        priority 1 (hot), loaded and asleep (warm), a reservation only (cold). Idempotent: a retry
        finds the instance created by the last attempt and carries on. Fenced by ``action.epoch``
        (as are retier and delete)."""
        ...

    async def retier_instance(self, action: ReconcileAction, progress: ProgressCallback) -> str:
        """Move a standby to the action's tier (warm → hot: wake up, register at priority 1)."""
        ...

    async def delete_instance(self, action: ReconcileAction) -> str:
        """Out of the load balancer, process stopped, record dropped. Idempotent."""
        ...

    async def cordon_gpu(self, gpu: str, reason: str) -> str:
        """Keep a GPU out of placement from now on (idempotent)."""
        ...

    async def cordoned_gpus(self) -> list[str]: ...

    async def uncordon_gpu(self, gpu: str) -> str:
        """Let placement use a GPU again (zone failback, a repaired GPU). Idempotent."""
        ...


@runtime_checkable
class BatchedChanges(Protocol):
    """What a platform whose records are one file (the local platform's registry) offers beside
    ``create_instance`` and ``delete_instance``: many of them with one write of its records and one
    load-balancer update per model. Asked for (``isinstance``), not assumed: the reconciliation's
    batches use it where it is, and make their changes one by one, side by side, elsewhere.

    Each action's result is its detail or the exception that failed it, in the order of
    ``actions``: one change that fails does not fail the others."""

    async def create_instances(
        self, actions: Sequence[ReconcileAction], progress: ProgressCallback, loads_per_node: int
    ) -> list[str | Exception]:
        """``create_instance`` of each action, at most ``loads_per_node`` loading on one node at once."""
        ...

    async def delete_instances(self, actions: Sequence[ReconcileAction]) -> list[str | Exception]:
        """``delete_instance`` of each action."""
        ...


@runtime_checkable
class SeesHungNodes(Protocol):
    """A platform that can tell, right now, which nodes look hung without a detector's verdict: the
    local platform in pooled mode, whose node is a pool process (stopped by SIGSTOP in a zone
    outage or a node-down drill). Asked for (``isinstance``). Kubernetes needs none: the GPUs of
    its NotReady Nodes are in ``cordoned_gpus`` already."""

    async def hung_gpus(self) -> list[str]:
        """The GPUs of the nodes that look hung now; placement does not choose them."""
        ...


@runtime_checkable
class KeepsIndexes(Protocol):
    """A platform that remembers the highest instance index each model has had, deleted instances
    included, so reconciliation never gives a new instance a deleted one's id: the local platform
    in its registry, Kubernetes in the fencing ConfigMap. Asked for (``isinstance``): a platform
    without it names new instances after the ones it has, as before."""

    async def highest_indexes(self) -> dict[str, int]:
        """Model → the highest ``N`` of its instances' ids ``model-N``, deleted ones included."""
        ...


def find_instance(instances: list[Instance], model: str, instance_id: str) -> Instance:
    """The instance with ``instance_id``, or the non-retryable ``UnknownInstance`` naming the known ones."""
    for instance in instances:
        if instance.id == instance_id:
            return instance
    raise errors.unknown_instance(model, instance_id, [i.id for i in instances])
