"""Placement repair: standbys placed against anti-affinity or spread are moved where placement
does better, a few per reconcile pass (pure, like the rest of the reconcile plan).

:func:`drctl.policies.reconcile.plan_reconcile` first plans every model's counts; what it settles
(each model's serving instances and standbys, existing or created by the plan) is what
:func:`repair_placement` judges and moves. Drift repaired here: a promoted standby serving where
other standbys of its model sit, standbys stacked beside serving instances or on one node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from drctl.payloads import Instance, ReconcileAction, ReconcileActionKind, ReconcilePlan, Role
from drctl.policies.placement import (
    SERVING_TIERS,
    STANDBY_JUDGED,
    Allocation,
    GpuSlot,
    Placement,
    PlacementEngine,
    PlacementError,
    PlacementRequest,
    assign_borrowed,
    standby_class,
)
from drctl.policies.schema import DRPolicy, ModelPolicy, TenantCapability


def remarked(policy: DRPolicy, allocations: Iterable[Allocation]) -> list[Allocation]:
    """Borrowed marks derived again from the caps (:func:`assign_borrowed`), as the next pass
    derives them from the instances; without a capped tenant nothing is ever borrowed, nor when
    nothing is marked and every tenant's allocations fit its caps whole (the common case, and
    one sum instead of a sort of the fleet: the planner asks after every model it creates for)."""
    items = list(allocations)
    if any(t.capability.memory is not None or t.capability.gpus is not None for t in policy.tenants):
        if any(a.borrowed for a in items) or not _within_caps(policy, items):
            return assign_borrowed(items, policy.tenants)
    return items


def _within_caps(policy: DRPolicy, allocations: Sequence[Allocation]) -> bool:
    """Every tenant's allocations, all of them, within its memory and GPU caps: then
    :func:`assign_borrowed` marks none (each of its running sums is at most the whole)."""
    memory: dict[str, int] = {}
    gpus: dict[str, set[str]] = {}
    for a in allocations:
        memory[a.tenant] = memory.get(a.tenant, 0) + a.memory
        if a.loaded:
            gpus.setdefault(a.tenant, set()).add(a.gpu)
    caps: dict[str, TenantCapability] = {}
    for tenant in policy.tenants:
        caps.setdefault(tenant.name, tenant.capability)
    for name, capability in caps.items():
        if capability.memory is not None and memory.get(name, 0) > capability.memory:
            return False
        if capability.gpus is not None and len(gpus.get(name, ())) > capability.gpus:
            return False
    return True


MAX_MOVES_PER_MODEL = 2
"""Misplaced standbys of one model moved in one pass: placement is repaired a little at a time."""
MAX_MOVES_PER_PASS = 8
"""Misplaced standbys moved in one pass, over every model: a reconcile never churns the fleet."""


@dataclass
class PlannedStandby:
    """A standby of a model as the plan leaves it: existing, or created by an action of the plan."""

    id: str
    tier: Role
    gpu: str | None
    action: int | None = None
    """Index in ``plan.actions`` of the CREATE that makes it; None when it exists already."""


@dataclass
class SettledModel:
    """One model after the counts are planned: what the placement repair works on."""

    model: ModelPolicy
    serving: list[tuple[str, str | None]]
    """(instance, GPU) of each serving instance, existing or created."""
    standbys: list[PlannedStandby]
    next_index: int


BALANCE_SLACK = 2
"""How many standbys of its class (:func:`~drctl.policies.placement.standby_class`) fewer, its own
left out, another node must hold before a standby is moved there for balance alone: moved when
its node holds at least three more than the other. One more is a tie; two more, left alone (a
re-tiered standby beside one of its class would otherwise be moved right after, reloading it); a
zone failed back, with every standby elsewhere, is well past it."""


def judged_better(candidate: tuple[int, ...], current: tuple[int, ...]) -> bool:
    """Whether a place judged ``candidate`` (:meth:`PlacementEngine.penalty`) is better than a
    standby's ``current`` (cut to :data:`STANDBY_JUDGED`): lower in all but the last component, or
    equal there and lower by at least :data:`BALANCE_SLACK` in its class's standbys on the node.
    Monotone in the penalties' order, so the lowest candidate decides for every other."""
    head, now = candidate[: STANDBY_JUDGED - 1], current[: STANDBY_JUDGED - 1]
    if head != now:
        return head < now
    return candidate[STANDBY_JUDGED - 1] + BALANCE_SLACK <= current[STANDBY_JUDGED - 1]


def dr_request(
    model: ModelPolicy, instance_id: str, tier: Role, nodes: frozenset[str], zones: frozenset[str]
) -> PlacementRequest:
    """A DR placement request: away from the nodes and zones of the model's serving instances (a
    serving instance: of its other replicas), spread over the fleet's failure domains."""
    return PlacementRequest(
        instance=instance_id,
        model=model.name,
        tenant=model.tenant,
        priority=model.priority,
        tier=tier.value,
        memory=model.gpu_memory,
        protects=nodes,
        avoid_zones=zones,
        spread=True,
    )


def failure_domains(
    serving: Sequence[tuple[str, str | None]], every_gpu: Mapping[str, GpuSlot], reported: Mapping[str, Instance]
) -> tuple[frozenset[str], frozenset[str]]:
    """Nodes and zones of serving instances (from their GPU, else as the instance reports them)."""
    nodes: set[str] = set()
    zones: set[str] = set()
    for instance_id, gpu in serving:
        slot = every_gpu.get(gpu) if gpu else None
        found = reported.get(instance_id)
        node = slot.node if slot else found.node if found else None
        zone = slot.zone if slot else found.zone if found else None
        if node:
            nodes.add(node)
        if zone:
            zones.add(zone)
    return frozenset(nodes), frozenset(zones)


def repair_placement(
    policy: DRPolicy,
    plan: ReconcilePlan,
    settled: Sequence[SettledModel],
    inventory: Sequence[GpuSlot],
    every_gpu: dict[str, GpuSlot],
    instances: Sequence[Instance],
    allocations: Sequence[Allocation],
    short_of_room: int,
) -> None:
    """Find standbys placed against anti-affinity or spread and move them where placement does better.

    A standby's place is judged by :meth:`PlacementEngine.penalty` (its model's serving nodes, then
    zones, then a serving instance or its own model on the GPU); it is misplaced when some usable
    GPU that could hold it has a lower penalty. Placement then picks the new place, on the pool as
    it is (the old standby still there: it is created first), without preempting anything; the
    standby moves only when the new place is strictly better, so every move makes progress and
    moves stop. A standby this plan creates is re-placed instead (no move needed) until the first
    move; after it, it moves like the others. The workflow runs the moves last, one by one, create
    then delete, in plan order: on the state this accounting assumes.

    Repeated over every model until nothing moves, at most :data:`MAX_MOVES_PER_MODEL` moves per
    model and :data:`MAX_MOVES_PER_PASS` in all, and none while wanted instances lack room
    (restoring the counts comes first). Serving instances are never moved; the ones sharing a node
    or a GPU are reported. Every misplacement left, and every move, is said in ``plan.violations``.
    """
    repair = _PlacementRepair(policy, plan, settled, inventory, every_gpu, instances, allocations, short_of_room)
    repair.sweep()
    repair.report_leftovers()


@dataclass
class _PlacementRepair:
    """The state of one repair: the pool as the plan leaves it, and what moved so far."""

    policy: DRPolicy
    plan: ReconcilePlan
    settled: Sequence[SettledModel]
    inventory: Sequence[GpuSlot]
    every_gpu: dict[str, GpuSlot]
    instances: Sequence[Instance]
    allocations: Sequence[Allocation]
    short_of_room: int
    moved: dict[str, int] = field(default_factory=dict)
    """Model → standbys moved this pass."""
    moves: int = 0
    why_not: dict[str, str] = field(default_factory=dict)
    """Misplaced standby → why it was not moved (the last reason seen)."""
    lowest: dict[tuple[str, str], list[tuple[tuple[int, ...], str]]] = field(default_factory=dict)
    """Per model and standby tier, the two usable GPUs big enough with the lowest judged penalty
    (room or not): whether the pool allows better than a place. Dropped whenever the pool changes."""

    def __post_init__(self) -> None:
        self.engine = self.engine_of(self.allocations)
        self.reported = {i.id: i for i in self.instances}
        self.domains = {
            item.model.name: failure_domains(item.serving, self.every_gpu, self.reported) for item in self.settled
        }

    def engine_of(self, allocs: Iterable[Allocation]) -> PlacementEngine:
        # Borrowed marks re-derived as the next pass derives them from the instances, so this pass
        # decides on exactly the state the next one will see.
        return PlacementEngine(
            self.inventory, remarked(self.policy, allocs), self.policy.gpu_pool, self.policy.tenants, index=False
        )

    def misplaced(
        self, item: SettledModel, member: PlannedStandby
    ) -> tuple[PlacementRequest, str, tuple[int, ...]] | None:
        """(request judging the member where it stands, its GPU, its penalty) when a GPU elsewhere
        is better."""
        if member.gpu is None or self.engine.slot(member.gpu) is None:
            return None  # never placed, or on a GPU gone from the pool: nothing to judge
        nodes, zones = self.domains[item.model.name]
        here = dr_request(item.model, member.id, member.tier, nodes, zones)
        current = self.engine.penalty(here, member.gpu)[:STANDBY_JUDGED]
        if not any(current):
            return None
        key = (item.model.name, member.tier.value)
        if key not in self.lowest:
            anyone = dr_request(item.model, "", member.tier, nodes, zones)
            # The two lowest are enough: the member's own GPU is at most one of them.
            self.lowest[key] = self.engine.lowest_judged(anyone, item.model.gpu_memory)
        for penalty, gpu in self.lowest[key]:  # (its own copy counts only on its own GPU, left out)
            if not judged_better(penalty, current):
                return None
            if gpu != member.gpu:
                return here, member.gpu, current
        return None

    def sweep(self) -> None:
        """Every model's standbys, again and again until nothing moves (each move makes progress)."""
        for _sweep in range(MAX_MOVES_PER_PASS + sum(len(s.standbys) for s in self.settled) + 1):
            progress = False
            for item in self.settled:
                for k, member in enumerate(item.standbys):
                    progress |= self.consider(item, k, member)
            if not progress:
                return

    def consider(self, item: SettledModel, k: int, member: PlannedStandby) -> bool:
        """Re-place or move one standby if it is misplaced and may be; True when it did."""
        found_misplaced = self.misplaced(item, member)
        if found_misplaced is None:
            self.why_not.pop(member.id, None)
            return False
        here, gpu, current = found_misplaced
        if self.short_of_room:
            self.why_not[member.id] = (
                f"{self.short_of_room} wanted instance(s) found no room this pass (restoring the counts comes first)"
            )
            return False
        if member.action is not None and not self.moves:
            # Created by this plan: placed again, nothing to move. (Once a move has freed
            # capacity, that capacity exists only after the move, so a create of this plan
            # moves like any standby: the moves run after the plain creates, in order.)
            return self.re_place(item, k, member, here, gpu, current)
        return self.move(item, k, member, here, gpu, current)

    def better_place(
        self,
        request: PlacementRequest,
        here: PlacementRequest,
        member: PlannedStandby,
        gpu: str,
        current: tuple[int, ...],
    ) -> Placement | None:
        """Where placement puts ``request``, if that is strictly better than ``member``'s place on
        ``gpu`` (judged as ``here``: where it would stand once the old one is gone) and preempts
        nothing; else None, with the reason kept in ``why_not``."""
        try:
            placement = self.engine.decide(request)
        except PlacementError as exc:
            self.why_not[member.id] = exc.reason
            return None
        if placement.preempted or not judged_better(self.engine.penalty(here, placement.gpu.id), current):
            self.why_not[member.id] = no_better(placement, gpu)
            return None
        return placement

    def re_place(
        self,
        item: SettledModel,
        k: int,
        member: PlannedStandby,
        here: PlacementRequest,
        gpu: str,
        current: tuple[int, ...],
    ) -> bool:
        """A standby this plan creates: placed again where placement does better, nothing to move."""
        assert member.action is not None
        placement = self.better_place(here, here, member, gpu, current)
        if placement is None:
            return False
        self.engine.apply(here, placement)
        self.engine = self.engine_of(self.engine.allocations)
        self.lowest.clear()
        action = self.plan.actions[member.action]
        self.plan.actions[member.action] = action.model_copy(
            update={
                "gpu": placement.gpu.id,
                "node": placement.gpu.node,
                "zone": placement.gpu.zone,
                "reason": f"{action.reason}; re-placed: {placement.reason}",
            }
        )
        item.standbys[k] = PlannedStandby(member.id, member.tier, placement.gpu.id, member.action)
        self.why_not.pop(member.id, None)
        return True

    def move(
        self,
        item: SettledModel,
        k: int,
        member: PlannedStandby,
        here: PlacementRequest,
        gpu: str,
        current: tuple[int, ...],
    ) -> bool:
        """An existing standby (or, after a first move, one this plan creates): its replacement is
        created where placement does better, and it is deleted once that one exists."""
        model = item.model
        if self.moved.get(model.name, 0) >= MAX_MOVES_PER_MODEL or self.moves >= MAX_MOVES_PER_PASS:
            self.why_not[member.id] = (
                f"move budget spent this pass ({MAX_MOVES_PER_MODEL} per model, {MAX_MOVES_PER_PASS} in all); "
                "the next pass continues"
            )
            return False
        new_id = f"{model.name}-{item.next_index}"
        request = dr_request(model, new_id, member.tier, here.protects, here.avoid_zones)
        placement = self.better_place(request, here, member, gpu, current)
        if placement is None:
            return False
        what = describe(self.engine, here, gpu, current)
        item.next_index += 1
        self.engine.apply(request, placement)
        old = self.engine.remove(member.id)
        self.engine = self.engine_of(self.engine.allocations)
        self.lowest.clear()
        self.plan.actions.append(
            ReconcileAction(
                kind=ReconcileActionKind.CREATE,
                model=model.name,
                instance=new_id,
                tier=member.tier,
                gpu=placement.gpu.id,
                node=placement.gpu.node,
                zone=placement.gpu.zone,
                reason=f"replaces misplaced {member.id}: {placement.reason}"
                + (" (borrowed capacity)" if placement.borrowed else ""),
            )
        )
        item.standbys[k] = PlannedStandby(new_id, member.tier, placement.gpu.id, len(self.plan.actions) - 1)
        slot = self.every_gpu.get(old.gpu)
        found = self.reported.get(member.id)
        if found is None and member.action is not None:
            found = as_instance(self.plan.actions[member.action])
        self.plan.actions.append(
            ReconcileAction(
                kind=ReconcileActionKind.DELETE,
                model=model.name,
                instance=member.id,
                tier=member.tier,
                gpu=old.gpu,
                node=slot.node if slot else found.node if found else None,
                zone=slot.zone if slot else found.zone if found else None,
                reason=f"moved to {new_id} on {placement.gpu.id}, once that one exists: {what}",
            )
        )
        self.plan.moves[new_id] = member.id
        self.plan.violations.append(f"{what}: moved to {new_id} on {placement.gpu.id} (zone {placement.gpu.zone})")
        self.why_not.pop(member.id, None)
        self.moved[model.name] = self.moved.get(model.name, 0) + 1
        self.moves += 1
        return True

    def report_leftovers(self) -> None:
        """What is still misplaced, as the plan leaves it, and why this pass leaves it so."""
        # What is still misplaced, as the plan leaves it, and why this pass leaves it so.
        for item in self.settled:
            for member in item.standbys:
                found_misplaced = self.misplaced(item, member)
                if found_misplaced is not None:
                    here, gpu, current = found_misplaced
                    why = self.why_not.get(member.id, "no better place has room")
                    self.plan.violations.append(f"{describe(self.engine, here, gpu, current)}: not moved: {why}")
        self.plan.violations.extend(
            serving_violations(self.engine, self.settled, self.inventory, self.every_gpu, self.reported)
        )


def as_instance(action: ReconcileAction) -> Instance:
    return Instance(
        id=action.instance, model=action.model, role=action.tier, gpu=action.gpu, node=action.node, zone=action.zone
    )


def no_better(placement: Placement, gpu: str) -> str:
    if placement.preempted:
        return "only a place that preempts other instances would do better"
    if placement.gpu.id == gpu:
        return "no better place has room (where it stands is the only place that fits)"
    return f"no better place has room (placement would choose {placement.gpu.id}: {placement.reason})"


def describe(engine: PlacementEngine, request: PlacementRequest, gpu: str, penalty: tuple[int, ...]) -> str:
    """What is wrong with a standby's place, said (``penalty`` from :meth:`PlacementEngine.penalty`)."""
    slot = engine.slot(gpu)
    assert slot is not None
    others = [a for a in engine.allocations if a.instance != request.instance]
    on_gpu = [a for a in others if a.gpu == gpu]
    parts = []
    if penalty[0] or penalty[1]:
        level = "node" if penalty[0] else "zone"
        where = slot.node if penalty[0] else slot.zone
        serving = sorted(
            a.instance
            for a in others
            if a.model == request.model
            and a.tier in SERVING_TIERS
            and (found := engine.slot(a.gpu)) is not None
            and getattr(found, level) == where
        )
        parts.append(f"on the {level} of serving {', '.join(serving) or request.model} ({where})")
    if penalty[2]:
        serving = sorted(a.instance for a in on_gpu if a.tier in SERVING_TIERS)
        parts.append(f"beside serving {', '.join(serving)} on GPU {gpu}")
    same = sorted(a.instance for a in on_gpu if a.model == request.model and a.tier not in SERVING_TIERS)
    if penalty[3] and same:  # (its model's serving instance there is said above)
        parts.append(f"beside {', '.join(same)} of its model on GPU {gpu}")
    if not parts and len(penalty) > 4 and penalty[4]:
        parts.append(f"one of {penalty[4] + 1} instances of {request.model} in zone {slot.zone}")
    if not parts and len(penalty) > 5 and penalty[5]:
        # Only the balance of the nodes: the one it stands on has more of its class than another.
        kind = "cold" if standby_class(request.tier) == "cold" else "hot or warm"
        parts.append(f"one of {penalty[5] + 1} {kind} standbys on node {slot.node}, where another has fewer")
    return f"{request.instance} ({request.tier} standby on {gpu}) " + ", ".join(parts)


def serving_violations(
    engine: PlacementEngine,
    settled: Sequence[SettledModel],
    inventory: Sequence[GpuSlot],
    every_gpu: dict[str, GpuSlot],
    reported: Mapping[str, Instance],
) -> list[str]:
    """Serving instances placed against spread (reported only: reconcile never moves a serving
    instance; a failover or a drain does): replicas of one model sharing a node while another node
    could hold one, and serving instances stacked on one GPU while a GPU without any could."""
    out = []
    never = "(reconcile never moves a serving instance)"
    for item in settled:
        by_node: dict[str, list[str]] = {}
        for instance_id, gpu in item.serving:
            for name in failure_domains([(instance_id, gpu)], every_gpu, reported)[0]:
                by_node.setdefault(name, []).append(instance_id)
        free_nodes = {s.node for s in inventory if s.memory >= item.model.gpu_memory} - set(by_node)
        for node, ids in sorted(by_node.items()):
            if len(ids) > 1 and free_nodes:
                out.append(f"serving {', '.join(sorted(ids))} of {item.model.name} share node {node} {never}")
    selected = {i for item in settled for i, _gpu in item.serving}
    serving_on: dict[str, list[Allocation]] = {}
    for a in engine.allocations:
        if a.tier in SERVING_TIERS:
            serving_on.setdefault(a.gpu, []).append(a)
    for gpu, stacked in sorted(serving_on.items()):
        if len(stacked) < 2 or not {a.instance for a in stacked} & selected:
            continue
        smallest = min(a.memory for a in stacked)
        if any(s.id not in serving_on and s.memory >= smallest for s in inventory):
            names = ", ".join(sorted(a.instance for a in stacked))
            out.append(f"serving {names} stacked on GPU {gpu} while GPUs without a serving instance exist {never}")
    return out
