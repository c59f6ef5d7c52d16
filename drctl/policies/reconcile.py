"""Pure planning of standby reconciliation: compare what exists with the policy, and say what to
create, re-tier or delete so every model gets back to its serving/hot/warm/cold counts, placed per
anti-affinity and spread over failure domains where the pool allows (DESIGN: invariant 2). Drift
(a promoted standby serving where other standbys of its model sit, standbys stacked beside serving
instances) is repaired by moving standbys, a few per pass, and said in ``plan.violations``.

The plan is a function of (policy, instances) only, so ``ReconcileStandbysWorkflow`` computes it
deterministically inside the workflow and the same plan is what ``drctl reconcile --dry-run`` shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from drctl.payloads import Instance, ReconcileAction, ReconcileActionKind, ReconcilePlan, Role
from drctl.policies.placement import (
    LOADED_TIERS,
    SERVING_TIERS,
    Allocation,
    GpuSlot,
    Placement,
    PlacementEngine,
    PlacementError,
    PlacementRequest,
    assign_borrowed,
    gpu_inventory,
    place,
)
from drctl.policies.schema import DRPolicy, ModelPolicy, Priority

TIERS: tuple[Role, ...] = (Role.SERVING, Role.HOT, Role.WARM, Role.COLD)


def instance_index(instance_id: str) -> int:
    tail = instance_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def wanted_counts(model: ModelPolicy) -> dict[Role, int]:
    return {
        Role.SERVING: model.replicas,
        Role.HOT: model.hot_standby,
        Role.WARM: model.warm_standby,
        Role.COLD: model.cold_standby,
    }


def allocation_of(policy: DRPolicy, instance: Instance) -> Allocation | None:
    """The pool capacity an instance holds; None when it holds none (failed, or never placed)."""
    if instance.gpu is None or instance.role == Role.FAILED or instance.model not in policy.model_names:
        return None
    model = policy.model(instance.model)
    return Allocation(
        instance=instance.id,
        model=instance.model,
        tenant=model.tenant,
        priority=model.priority,
        tier=instance.role.value,
        memory=model.gpu_memory,
        gpu=instance.gpu,
    )


def current_allocations(policy: DRPolicy, instances: Sequence[Instance]) -> list[Allocation]:
    """The pool as the instances hold it, with borrowed capacity marked again (instances do not
    record it), so a borrower is not mistaken for a tenant over its cap and can be reclaimed."""
    held = [a for a in (allocation_of(policy, i) for i in instances) if a is not None]
    return assign_borrowed(held, policy.tenants)


def _remarked(policy: DRPolicy, allocations: Iterable[Allocation]) -> list[Allocation]:
    """Borrowed marks derived again from the caps (:func:`assign_borrowed`), as the next pass
    derives them from the instances; without a capped tenant nothing is ever borrowed."""
    if any(t.capability.memory is not None or t.capability.gpus is not None for t in policy.tenants):
        return assign_borrowed(allocations, policy.tenants)
    return list(allocations)


def usable_inventory(policy: DRPolicy, cordoned: Iterable[str] = ()) -> list[GpuSlot]:
    """The pool's GPUs less the cordoned ones (drained after a GPU failure)."""
    out = set(cordoned)
    return [slot for slot in gpu_inventory(policy.gpu_pool) if slot.id not in out]


MAX_MOVES_PER_MODEL = 2
"""Misplaced standbys of one model moved in one pass: placement is repaired a little at a time."""
MAX_MOVES_PER_PASS = 8
"""Misplaced standbys moved in one pass, over every model: a reconcile never churns the fleet."""


@dataclass
class _Member:
    """A standby of a model as the plan leaves it: existing, or created by an action of the plan."""

    id: str
    tier: Role
    gpu: str | None
    action: int | None = None
    """Index in ``plan.actions`` of the CREATE that makes it; None when it exists already."""


@dataclass
class _Settled:
    """One model after the counts are planned: what the placement repair works on."""

    model: ModelPolicy
    serving: list[tuple[str, str | None]]
    """(instance, GPU) of each serving instance, existing or created."""
    standbys: list[_Member]
    next_index: int


def plan_reconcile(
    policy: DRPolicy,
    instances: Sequence[Instance],
    models: Sequence[str] | None = None,
    cordoned: Iterable[str] = (),
) -> ReconcilePlan:
    """The actions that bring each model back to its policy counts, placed on the GPU pool, then
    the moves that repair anti-affinity and spread (see :func:`_repair_placement`).

    Most important models are planned first so they get capacity first. A model with an instance
    mid-promotion is left alone: a failover is running and will settle it.
    """
    cordoned_set = set(cordoned)
    inventory = usable_inventory(policy, cordoned_set)
    slots = {slot.id: slot for slot in inventory}
    every_gpu = {slot.id: slot for slot in gpu_inventory(policy.gpu_pool)}
    reported = {i.id: i for i in instances}
    allocations = current_allocations(policy, instances)
    plan = ReconcilePlan()
    settled: list[_Settled] = []
    short_of_room = 0
    """Wanted instances that did not fit for lack of capacity or quota (not for being too large)."""
    order = sorted(policy.models, key=lambda m: (-m.priority.rank, m.name))
    # Every model's surplus and stranded standbys go first, whatever its priority: the capacity
    # they free is there for whatever any model is missing.
    kept: list[tuple[ModelPolicy, dict[Role, list[Instance]], int]] = []
    for model in order:
        if models is not None and model.name not in models:
            continue
        mine = [i for i in instances if i.model == model.name]
        live = [i for i in mine if i.role != Role.FAILED]
        if any(i.role == Role.PROMOTING for i in live):
            plan.skipped_models.append(f"{model.name}: an instance is being promoted (failover running)")
            continue
        serving = [i for i in live if i.role == Role.SERVING]
        if len(serving) > model.replicas:
            # A failover registered its replacement and has not ejected the failed instance yet (it
            # waits for the replacement to verify): deleting either now would fight the failover.
            ids = ", ".join(i.id for i in serving)
            plan.skipped_models.append(f"{model.name}: {ids} all serving (a failover is switching over)")
            continue
        next_index = max((instance_index(i.id) for i in mine), default=-1) + 1
        # Standbys left on a cordoned GPU (drained, or its zone failed over) are moved: deleted
        # here and counted as missing, so they are recreated where placement allows.
        for stranded in [i for i in live if i.role.is_standby and i.gpu in cordoned_set]:
            plan.actions.append(delete_action(stranded, f"on cordoned GPU {stranded.gpu}"))
            allocations = [a for a in allocations if a.instance != stranded.id]
            live.remove(stranded)
        by_tier = {
            tier: sorted((i for i in live if i.role == tier), key=lambda i: instance_index(i.id)) for tier in TIERS
        }
        want = wanted_counts(model)
        # 1. Surplus goes first (newest first), freeing its capacity for what is missing.
        for tier in TIERS:
            surplus = by_tier[tier][want[tier] :]
            # A surplus warm standby that can become a missing hot one is kept for step 2.
            if tier == Role.WARM:
                hot_missing = max(0, want[Role.HOT] - len(by_tier[Role.HOT]))
                surplus = surplus[hot_missing:] if hot_missing else surplus
            for instance in reversed(surplus):
                plan.actions.append(delete_action(instance, f"{tier} surplus: policy wants {want[tier]}"))
                allocations = [a for a in allocations if a.instance != instance.id]
                by_tier[tier].remove(instance)
        # 2. A surplus warm standby becomes a missing hot one when its GPU can hold it loaded.
        while len(by_tier[Role.HOT]) < want[Role.HOT] and len(by_tier[Role.WARM]) > want[Role.WARM]:
            warm = by_tier[Role.WARM].pop()
            if warm.gpu is None or not _fits_loaded(slots.get(warm.gpu), allocations, warm.id, model.gpu_memory):
                by_tier[Role.WARM].append(warm)
                break
            plan.actions.append(
                ReconcileAction(
                    kind=ReconcileActionKind.RETIER,
                    model=model.name,
                    instance=warm.id,
                    tier=Role.HOT,
                    gpu=warm.gpu,
                    node=warm.node,
                    zone=warm.zone,
                    reason="warm surplus becomes the missing hot standby",
                )
            )
            allocations = [a if a.instance != warm.id else _as_tier(a, Role.HOT) for a in allocations]
            by_tier[Role.HOT].append(warm)
        # A warm standby kept for that, which its GPU cannot hold loaded, is surplus after all.
        for instance in reversed(by_tier[Role.WARM][want[Role.WARM] :]):
            plan.actions.append(delete_action(instance, f"{Role.WARM} surplus: policy wants {want[Role.WARM]}"))
            allocations = [a for a in allocations if a.instance != instance.id]
            by_tier[Role.WARM].remove(instance)
        kept.append((model, by_tier, next_index))
    changed = bool(plan.actions)
    for model, by_tier, next_index in kept:
        # Borrowed marks as the next pass derives them from the instances (a re-tier or a delete
        # changes which allocations are within a tenant's cap): this pass decides on the same.
        if changed:
            allocations = _remarked(policy, allocations)
            changed = False
        want = wanted_counts(model)
        # Not what a create of another model preempted (quota reclaim): counted as missing.
        preempted = {a.instance for a in plan.actions if a.kind == ReconcileActionKind.DELETE}
        by_tier = {tier: [i for i in members if i.id not in preempted] for tier, members in by_tier.items()}
        # 3. Whatever is still missing is created where placement puts it: away from the nodes
        # and zones of the model's serving instances, spread over the fleet's failure domains.
        serving_gpus: list[tuple[str, str | None]] = [(i.id, i.gpu) for i in by_tier[Role.SERVING]]
        standbys = [_Member(i.id, tier, i.gpu) for tier in TIERS[1:] for i in by_tier[tier]]  # re-tiered: new tier
        for tier in TIERS:
            for _ in range(want[tier] - len(by_tier[tier])):
                instance_id = f"{model.name}-{next_index}"
                next_index += 1
                nodes, zones = _domains(serving_gpus, every_gpu, reported)
                request = _request(model, instance_id, tier, nodes, zones)
                try:
                    placement = place(request, inventory, allocations, policy.gpu_pool, policy.tenants)
                except PlacementError as exc:
                    plan.unplaceable.append(f"{instance_id} ({tier}): {exc.reason}")
                    short_of_room += exc.kind in ("capacity", "quota")
                    continue
                victims = {a.instance for a in placement.preempted}
                for victim in placement.preempted:
                    plan.actions.append(_preempt(victim, f"preempted for {instance_id}: {placement.reason}"))
                allocations = [a for a in allocations if a.instance not in victims]
                allocations.append(placement.allocation(request))
                changed = True
                plan.actions.append(
                    ReconcileAction(
                        kind=ReconcileActionKind.CREATE,
                        model=model.name,
                        instance=instance_id,
                        tier=tier,
                        gpu=placement.gpu.id,
                        node=placement.gpu.node,
                        zone=placement.gpu.zone,
                        preempts=sorted(victims),
                        reason=f"{tier} missing: policy wants {want[tier]}"
                        + (" (borrowed capacity)" if placement.borrowed else ""),
                    )
                )
                if tier == Role.SERVING:
                    serving_gpus.append((instance_id, placement.gpu.id))
                else:
                    standbys.append(_Member(instance_id, tier, placement.gpu.id, len(plan.actions) - 1))
        settled.append(_Settled(model, serving_gpus, standbys, next_index))
    preempted = {a.instance for a in plan.actions if a.kind == ReconcileActionKind.DELETE}
    for item in settled:  # a standby preempted by a more important model's create is gone
        item.standbys = [m for m in item.standbys if m.id not in preempted]
    _repair_placement(policy, plan, settled, inventory, every_gpu, instances, allocations, short_of_room)
    return plan


def _request(
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


def _domains(
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


def _repair_placement(
    policy: DRPolicy,
    plan: ReconcilePlan,
    settled: Sequence[_Settled],
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
    tenants = policy.tenants

    def engine_of(allocs: Iterable[Allocation]) -> PlacementEngine:
        # Borrowed marks re-derived as the next pass derives them from the instances, so this pass
        # decides on exactly the state the next one will see.
        return PlacementEngine(inventory, _remarked(policy, allocs), policy.gpu_pool, tenants, index=False)

    engine = engine_of(allocations)
    reported = {i.id: i for i in instances}
    domains = {item.model.name: _domains(item.serving, every_gpu, reported) for item in settled}
    lowest: dict[str, list[tuple[tuple[int, ...], str]]] = {}
    """Per model, every usable GPU big enough by penalty (for a standby of the model, room or not):
    whether the pool allows better than a place. Dropped whenever the pool changes."""

    def misplaced(item: _Settled, member: _Member) -> tuple[PlacementRequest, str, tuple[int, ...]] | None:
        """(request judging the member where it stands, its GPU, its penalty) when a GPU elsewhere
        is better."""
        if member.gpu is None or engine.slot(member.gpu) is None:
            return None  # never placed, or on a GPU gone from the pool: nothing to judge
        nodes, zones = domains[item.model.name]
        here = _request(item.model, member.id, member.tier, nodes, zones)
        current = engine.penalty(here, member.gpu)
        if not any(current):
            return None
        if item.model.name not in lowest:
            anyone = _request(item.model, "", member.tier, nodes, zones)
            ranked = [(p, s.id) for p, s in engine.penalties(anyone) if s.memory >= item.model.gpu_memory]
            lowest[item.model.name] = sorted(ranked)
        for penalty, gpu in lowest[item.model.name]:  # (its own copy counts only on its own GPU, left out)
            if penalty >= current:
                return None
            if gpu != member.gpu:
                return here, member.gpu, current
        return None

    moved: dict[str, int] = {}
    moves = 0
    why_not: dict[str, str] = {}
    """Misplaced standby → why it was not moved (the last reason seen)."""
    for _sweep in range(MAX_MOVES_PER_PASS + sum(len(s.standbys) for s in settled) + 1):
        progress = False
        for item in settled:
            model = item.model
            for k, member in enumerate(item.standbys):
                found_misplaced = misplaced(item, member)
                if found_misplaced is None:
                    why_not.pop(member.id, None)
                    continue
                here, gpu, current = found_misplaced
                if short_of_room:
                    why_not[member.id] = (
                        f"{short_of_room} wanted instance(s) found no room this pass (restoring the counts comes first)"
                    )
                    continue
                if member.action is not None and not moves:
                    # Created by this plan: placed again, nothing to move. (Once a move has freed
                    # capacity, that capacity exists only after the move, so a create of this plan
                    # moves like any standby: the moves run after the plain creates, in order.)
                    try:
                        placement = engine.decide(here)
                    except PlacementError as exc:
                        why_not[member.id] = exc.reason
                        continue
                    if placement.preempted or engine.penalty(here, placement.gpu.id) >= current:
                        why_not[member.id] = _no_better(placement, gpu)
                        continue
                    engine.apply(here, placement)
                    engine = engine_of(engine.allocations)
                    lowest.clear()
                    action = plan.actions[member.action]
                    plan.actions[member.action] = action.model_copy(
                        update={
                            "gpu": placement.gpu.id,
                            "node": placement.gpu.node,
                            "zone": placement.gpu.zone,
                            "reason": f"{action.reason}; re-placed: {placement.reason}",
                        }
                    )
                    item.standbys[k] = _Member(member.id, member.tier, placement.gpu.id, member.action)
                    why_not.pop(member.id, None)
                    progress = True
                    continue
                if moved.get(model.name, 0) >= MAX_MOVES_PER_MODEL or moves >= MAX_MOVES_PER_PASS:
                    why_not[member.id] = (
                        f"move budget spent this pass ({MAX_MOVES_PER_MODEL} per model, {MAX_MOVES_PER_PASS} in all); "
                        "the next pass continues"
                    )
                    continue
                new_id = f"{model.name}-{item.next_index}"
                request = _request(model, new_id, member.tier, here.protects, here.avoid_zones)
                try:
                    placement = engine.decide(request)
                except PlacementError as exc:
                    why_not[member.id] = exc.reason
                    continue
                # Judged where it would stand once the old one is gone.
                if placement.preempted or engine.penalty(here, placement.gpu.id) >= current:
                    why_not[member.id] = _no_better(placement, gpu)
                    continue
                what = _describe(engine, here, gpu, current)
                item.next_index += 1
                engine.apply(request, placement)
                old = engine.remove(member.id)
                engine = engine_of(engine.allocations)
                lowest.clear()
                plan.actions.append(
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
                item.standbys[k] = _Member(new_id, member.tier, placement.gpu.id, len(plan.actions) - 1)
                slot = every_gpu.get(old.gpu)
                found = reported.get(member.id)
                if found is None and member.action is not None:
                    found = _as_instance(plan.actions[member.action])
                plan.actions.append(
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
                plan.moves[new_id] = member.id
                plan.violations.append(f"{what}: moved to {new_id} on {placement.gpu.id} (zone {placement.gpu.zone})")
                why_not.pop(member.id, None)
                moved[model.name] = moved.get(model.name, 0) + 1
                moves += 1
                progress = True
        if not progress:
            break
    # What is still misplaced, as the plan leaves it, and why this pass leaves it so.
    for item in settled:
        for member in item.standbys:
            found_misplaced = misplaced(item, member)
            if found_misplaced is not None:
                here, gpu, current = found_misplaced
                why = why_not.get(member.id, "no better place has room")
                plan.violations.append(f"{_describe(engine, here, gpu, current)}: not moved: {why}")
    plan.violations.extend(_serving_violations(engine, settled, inventory, every_gpu, reported))


def _as_instance(action: ReconcileAction) -> Instance:
    return Instance(
        id=action.instance, model=action.model, role=action.tier, gpu=action.gpu, node=action.node, zone=action.zone
    )


def _no_better(placement: Placement, gpu: str) -> str:
    if placement.preempted:
        return "only a place that preempts other instances would do better"
    if placement.gpu.id == gpu:
        return "no better place has room (where it stands is the only place that fits)"
    return f"no better place has room (placement would choose {placement.gpu.id}: {placement.reason})"


def _describe(engine: PlacementEngine, request: PlacementRequest, gpu: str, penalty: tuple[int, ...]) -> str:
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
    return f"{request.instance} ({request.tier} standby on {gpu}) " + ", ".join(parts)


def _serving_violations(
    engine: PlacementEngine,
    settled: Sequence[_Settled],
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
            for name in _domains([(instance_id, gpu)], every_gpu, reported)[0]:
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


def _preempt(victim: Allocation, reason: str) -> ReconcileAction:
    return ReconcileAction(
        kind=ReconcileActionKind.DELETE,
        model=victim.model,
        instance=victim.instance,
        tier=Role(victim.tier),
        gpu=victim.gpu,
        reason=reason,
    )


def delete_action(instance: Instance, reason: str) -> ReconcileAction:
    """Remove ``instance`` (it keeps its tier in the action, for the record)."""
    return ReconcileAction(
        kind=ReconcileActionKind.DELETE,
        model=instance.model,
        instance=instance.id,
        tier=instance.role,
        gpu=instance.gpu,
        node=instance.node,
        zone=instance.zone,
        reason=reason,
    )


def _fits_loaded(slot: GpuSlot | None, allocations: Sequence[Allocation], instance_id: str, memory: int) -> bool:
    if slot is None:
        return False
    loaded = sum(
        a.memory for a in allocations if a.gpu == slot.id and a.tier in LOADED_TIERS and a.instance != instance_id
    )
    return loaded + memory <= slot.memory


def _as_tier(allocation: Allocation, tier: Role) -> Allocation:
    return Allocation(
        instance=allocation.instance,
        model=allocation.model,
        tenant=allocation.tenant,
        priority=allocation.priority,
        tier=tier.value,
        memory=allocation.memory,
        gpu=allocation.gpu,
        borrowed=allocation.borrowed,
    )


def plan_emergency(
    policy: DRPolicy,
    instances: Sequence[Instance],
    model_name: str,
    failed_instance: str,
    cordoned: Iterable[str] = (),
) -> ReconcilePlan:
    """A new serving instance for a model whose standbys are all used up or broken.

    Placed on the pool away from the failed instance's node; a critical model may preempt strictly
    lower-priority instances (placement says which, and the plan deletes them first).
    """
    model = policy.model(model_name)
    inventory = usable_inventory(policy, cordoned)
    allocations = current_allocations(policy, instances)
    failed = next((i for i in instances if i.id == failed_instance), None)
    next_index = max((instance_index(i.id) for i in instances if i.model == model_name), default=-1) + 1
    instance_id = f"{model_name}-{next_index}"
    request = PlacementRequest(
        instance=instance_id,
        model=model_name,
        tenant=model.tenant,
        priority=model.priority,
        tier=Role.SERVING.value,
        memory=model.gpu_memory,
        protects=frozenset({failed.node}) if failed is not None and failed.node else frozenset(),
        emergency=model.priority == Priority.CRITICAL,
        spread=True,
    )
    plan = ReconcilePlan()
    try:
        placement = place(request, inventory, allocations, policy.gpu_pool, policy.tenants)
    except PlacementError as exc:
        plan.unplaceable.append(f"{instance_id} (emergency): {exc.reason}")
        return plan
    for victim in placement.preempted:
        reason = f"preempted by the emergency instance {instance_id} of {model_name} ({model.priority})"
        plan.actions.append(_preempt(victim, reason))
    plan.actions.append(
        ReconcileAction(
            kind=ReconcileActionKind.CREATE,
            model=model_name,
            instance=instance_id,
            tier=Role.SERVING,
            gpu=placement.gpu.id,
            node=placement.gpu.node,
            zone=placement.gpu.zone,
            preempts=[v.instance for v in placement.preempted],
            reason=f"emergency: no standby of {model_name} could take over from {failed_instance}",
        )
    )
    return plan
