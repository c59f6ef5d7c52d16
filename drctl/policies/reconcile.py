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
from dataclasses import replace

from drctl.payloads import (
    FleetSnapshot,
    Instance,
    ReconcileAction,
    ReconcileActionKind,
    ReconcilePacing,
    ReconcilePlan,
    Role,
)
from drctl.policies.placement import (
    LOADED_TIERS,
    Allocation,
    GpuSlot,
    PlacementEngine,
    PlacementError,
    PlacementRequest,
    assign_borrowed,
    gpu_inventory,
    place,
    serving_zones,
)
from drctl.policies.placement_repair import (
    MAX_MOVES_PER_MODEL,
    MAX_MOVES_PER_PASS,
    PlannedStandby,
    SettledModel,
    dr_request,
    failure_domains,
    remarked,
    repair_placement,
)
from drctl.policies.schema import DRPolicy, ModelPolicy, Priority

__all__ = ["MAX_MOVES_PER_MODEL", "MAX_MOVES_PER_PASS", "delete_action", "plan_emergency", "plan_reconcile"]

TIERS: tuple[Role, ...] = (Role.SERVING, Role.HOT, Role.WARM, Role.COLD)


def instance_index(instance_id: str) -> int:
    tail = instance_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def next_instance_index(instances: Iterable[Instance], highest_before: int = -1) -> int:
    """The index of a model's next instance: past its instances' and past ``highest_before`` (the
    highest its deleted instances had, where the platform remembers it)."""
    return max(max((instance_index(i.id) for i in instances), default=-1), highest_before) + 1


def wanted_counts(model: ModelPolicy) -> dict[Role, int]:
    return {
        Role.SERVING: model.replicas,
        Role.HOT: model.hot_standby,
        Role.WARM: model.warm_standby,
        Role.COLD: model.cold_standby,
    }


def allocation_of(policy: DRPolicy, instance: Instance) -> Allocation | None:
    """The pool capacity an instance holds; None when it holds none (failed, or never placed)."""
    if instance.gpu is None or instance.role == Role.FAILED or not policy.has_model(instance.model):
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


def usable_inventory(policy: DRPolicy, cordoned: Iterable[str] = ()) -> list[GpuSlot]:
    """The pool's GPUs less the cordoned ones (drained after a GPU failure)."""
    out = set(cordoned)
    return [slot for slot in gpu_inventory(policy.gpu_pool) if slot.id not in out]


def plan_reconcile(
    policy: DRPolicy,
    instances: Sequence[Instance],
    models: Sequence[str] | None = None,
    cordoned: Iterable[str] = (),
    highest_indexes: Mapping[str, int] | None = None,
    hung: Iterable[str] = (),
) -> ReconcilePlan:
    """The actions that bring each model back to its policy counts, placed on the GPU pool, then
    the moves that repair anti-affinity and spread (see
    :func:`drctl.policies.placement_repair.repair_placement`).

    Neither a ``cordoned`` GPU nor a ``hung`` one (its node looks hung now) is chosen for a new
    instance; standbys on a cordoned GPU are moved off it, those on a hung one are left to the
    detectors and runbooks (a node that resumes keeps them).

    A new instance is named ``model-N`` past the highest index the model's instances have, and past
    ``highest_indexes`` (deleted instances' too, where the platform keeps them): never a deleted
    instance's id.

    Most important models are planned first so they get capacity first. A model with an instance
    mid-promotion is left alone: a failover is running and will settle it.
    """
    planner = _CountsPlanner(policy, instances, set(cordoned), highest_indexes, set(hung))
    order = sorted(policy.models, key=lambda m: (-m.priority.rank, m.name))
    # Every model's surplus and stranded standbys go first, whatever its priority: the capacity
    # they free is there for whatever any model is missing.
    selected = None if models is None else set(models)
    kept = [
        found
        for model in order
        if selected is None or model.name in selected
        if (found := planner.free_surplus(model)) is not None
    ]
    changed = bool(planner.plan.actions)
    settled: list[SettledModel] = []
    for model, by_tier, next_index in kept:
        # Borrowed marks as the next pass derives them from the instances (a re-tier or a delete
        # changes which allocations are within a tenant's cap): this pass decides on the same.
        if changed:
            planner.remark()
        created, item = planner.create_missing(model, by_tier, next_index)
        changed = created
        settled.append(item)
    plan = planner.plan
    preempted = {a.instance for a in plan.actions if a.kind == ReconcileActionKind.DELETE}
    for item in settled:  # a standby preempted by a more important model's create is gone
        item.standbys = [m for m in item.standbys if m.id not in preempted]
    repair_placement(
        policy,
        plan,
        settled,
        planner.inventory,
        planner.every_gpu,
        instances,
        planner.allocations,
        planner.short_of_room,
    )
    plan.violations.extend(serving_zone_violations(policy, instances, plan, settled, planner.cordoned))
    return plan


ByTier = dict[Role, list[Instance]]


class _CountsPlanner:
    """One pass's planning of counts: the pool as the plan so far leaves it, and the plan."""

    def __init__(
        self,
        policy: DRPolicy,
        instances: Sequence[Instance],
        cordoned: set[str],
        highest_indexes: Mapping[str, int] | None = None,
        hung: set[str] | None = None,
    ) -> None:
        self.policy = policy
        self.instances = instances
        self.cordoned = cordoned
        self.highest_indexes = highest_indexes or {}
        self.inventory = usable_inventory(policy, cordoned | (hung or set()))
        self.slots = {slot.id: slot for slot in self.inventory}
        self.every_gpu = {slot.id: slot for slot in gpu_inventory(policy.gpu_pool)}
        self.reported = {i.id: i for i in instances}
        self.by_model: dict[str, list[Instance]] = {}
        for instance in instances:
            self.by_model.setdefault(instance.model, []).append(instance)
        self._allocations = current_allocations(policy, instances)
        self._engine: PlacementEngine | None = None
        """The pool as ``allocations`` occupy it, kept up to date across the creates of a pass (built
        again after any other change): one engine per create, built over every allocation, made
        planning N creates O(N x fleet), 0.8 s for the 500 creates after a zone outage of 1,000
        instances."""
        self.serving_zones = serving_zones(policy)
        """Where serving instances belong (the active zones); empty: anywhere."""
        self.plan = ReconcilePlan()
        self.short_of_room = 0
        """Wanted instances that did not fit for lack of capacity or quota (not for being too large)."""

    @property
    def allocations(self) -> list[Allocation]:
        return self._allocations

    @allocations.setter
    def allocations(self, allocations: list[Allocation]) -> None:
        self._allocations = allocations
        self._engine = None

    def remark(self) -> None:
        """Borrowed marks derived again (:func:`remarked`); the engine stays when none changed."""
        marked = remarked(self.policy, self._allocations)
        if any(new is not old for new, old in zip(marked, self._allocations, strict=True)):
            self.allocations = marked

    def _placement_engine(self) -> PlacementEngine:
        if self._engine is None:  # as ``place`` builds one: scanning, not indexed
            pool, tenants = self.policy.gpu_pool, self.policy.tenants
            self._engine = PlacementEngine(self.inventory, self._allocations, pool, tenants, index=False)
        return self._engine

    def _drop(self, instance_id: str) -> None:
        self.allocations = [a for a in self.allocations if a.instance != instance_id]

    def free_surplus(self, model: ModelPolicy) -> tuple[ModelPolicy, ByTier, int] | None:
        """Delete the model's stranded and surplus standbys and re-tier a surplus warm one into a
        missing hot one; returns what is left by tier and the next instance index (None: the model
        is skipped, a failover is settling it)."""
        plan = self.plan
        mine = self.by_model.get(model.name, [])
        live = [i for i in mine if i.role != Role.FAILED]
        if any(i.role == Role.PROMOTING for i in live):
            plan.skipped_models.append(f"{model.name}: an instance is being promoted (failover running)")
            return None
        serving = [i for i in live if i.role == Role.SERVING]
        if len(serving) > model.replicas:
            # A failover registered its replacement and has not ejected the failed instance yet (it
            # waits for the replacement to verify): deleting either now would fight the failover.
            ids = ", ".join(i.id for i in serving)
            plan.skipped_models.append(f"{model.name}: {ids} all serving (a failover is switching over)")
            return None
        next_index = next_instance_index(mine, self.highest_indexes.get(model.name, -1))
        # Standbys left on a cordoned GPU (drained, or its zone failed over) are moved: deleted
        # here and counted as missing, so they are recreated where placement allows.
        for stranded in [i for i in live if i.role.is_standby and i.gpu in self.cordoned]:
            plan.actions.append(delete_action(stranded, f"on cordoned GPU {stranded.gpu}"))
            self._drop(stranded.id)
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
                self._drop(instance.id)
                by_tier[tier].remove(instance)
        # 2. A surplus warm standby becomes a missing hot one when its GPU can hold it loaded.
        while len(by_tier[Role.HOT]) < want[Role.HOT] and len(by_tier[Role.WARM]) > want[Role.WARM]:
            warm = by_tier[Role.WARM].pop()
            if warm.gpu is None or not _fits_loaded(
                self.slots.get(warm.gpu), self.allocations, warm.id, model.gpu_memory
            ):
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
            self.allocations = [a if a.instance != warm.id else _as_tier(a, Role.HOT) for a in self.allocations]
            by_tier[Role.HOT].append(warm)
        # A warm standby kept for that, which its GPU cannot hold loaded, is surplus after all.
        for instance in reversed(by_tier[Role.WARM][want[Role.WARM] :]):
            plan.actions.append(delete_action(instance, f"{Role.WARM} surplus: policy wants {want[Role.WARM]}"))
            self._drop(instance.id)
            by_tier[Role.WARM].remove(instance)
        return model, by_tier, next_index

    def create_missing(self, model: ModelPolicy, by_tier: ByTier, next_index: int) -> tuple[bool, SettledModel]:
        """3. Create whatever the model still misses where placement puts it: away from the nodes
        and zones of its serving instances, spread over the fleet's failure domains. Returns
        whether anything was created, and the model as the plan settles it."""
        plan = self.plan
        want = wanted_counts(model)
        created = False
        # Not what a create of another model preempted (quota reclaim): counted as missing.
        preempted = {a.instance for a in plan.actions if a.kind == ReconcileActionKind.DELETE}
        by_tier = {tier: [i for i in members if i.id not in preempted] for tier, members in by_tier.items()}
        serving_gpus: list[tuple[str, str | None]] = [(i.id, i.gpu) for i in by_tier[Role.SERVING]]
        # (a re-tiered standby with its new tier)
        standbys = [PlannedStandby(i.id, tier, i.gpu) for tier in TIERS[1:] for i in by_tier[tier]]
        for tier in TIERS:
            for _ in range(want[tier] - len(by_tier[tier])):
                instance_id = f"{model.name}-{next_index}"
                next_index += 1
                nodes, zones = failure_domains(serving_gpus, self.every_gpu, self.reported)
                request = dr_request(model, instance_id, tier, nodes, zones)
                if self.serving_zones:
                    request = replace(request, serving_zones=self.serving_zones)
                engine = self._placement_engine()
                try:
                    placement = engine.decide(request)
                except PlacementError as exc:
                    plan.unplaceable.append(f"{instance_id} ({tier}): {exc.reason}")
                    self.short_of_room += exc.kind in ("capacity", "quota")
                    continue
                victims = {a.instance for a in placement.preempted}
                for victim in placement.preempted:
                    plan.actions.append(_preempt(victim, f"preempted for {instance_id}: {placement.reason}"))
                # The engine and the list, changed alike (the engine is not built again).
                self._allocations = [a for a in self._allocations if a.instance not in victims]
                self._allocations.append(engine.apply(request, placement))
                created = True
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
                        + (" (borrowed capacity)" if placement.borrowed else "")
                        # Serving outside the active zones: placement says why no active zone took it.
                        + (f"; {placement.reason}" if request.outside(placement.gpu.zone) else ""),
                    )
                )
                if tier == Role.SERVING:
                    serving_gpus.append((instance_id, placement.gpu.id))
                else:
                    standbys.append(PlannedStandby(instance_id, tier, placement.gpu.id, len(plan.actions) - 1))
        return created, SettledModel(model, serving_gpus, standbys, next_index)


def failed_over_zones(policy: DRPolicy, cordoned: Iterable[str]) -> list[str]:
    """Active zones whose GPUs are all cordoned: failed over (``ZoneFailoverWorkflow`` cordons the
    whole zone until ``drctl failback``)."""
    out = set(cordoned)
    by_zone: dict[str, list[str]] = {}
    for slot in gpu_inventory(policy.gpu_pool):
        by_zone.setdefault(slot.zone, []).append(slot.id)
    return sorted(z for z in serving_zones(policy) if by_zone.get(z) and all(g in out for g in by_zone[z]))


def serving_zone_violations(
    policy: DRPolicy,
    instances: Sequence[Instance],
    plan: ReconcilePlan,
    settled: Sequence[SettledModel],
    cordoned: Iterable[str],
) -> list[str]:
    """Serving instances outside the active zones (a failover promoted a standby of the standby
    zone, or no active zone had room when they were placed) while placement, on the pool as this
    plan leaves it, would now put them in an active zone. Reported only: reconcile never moves a
    serving instance (moving one is a failover: an operator's call, as failback is). Nothing is said
    while an active zone is failed over: serving in the standby zone is then exactly right."""
    zones = serving_zones(policy)
    if not zones or failed_over_zones(policy, cordoned):
        return []
    every_gpu = {slot.id: slot for slot in gpu_inventory(policy.gpu_pool)}
    reported = {i.id: i for i in instances}
    outside = [
        (item, instance_id, zone)
        for item in settled
        for instance_id, gpu in item.serving
        for zone in failure_domains([(instance_id, gpu)], every_gpu, reported)[1]
        if zone not in zones
    ]
    if not outside:
        return []
    engine = PlacementEngine(
        usable_inventory(policy, cordoned),
        current_allocations(policy, _after(instances, plan)),
        policy.gpu_pool,
        policy.tenants,
        index=False,
    )
    out = []
    active = ", ".join(sorted(zones))
    for item, instance_id, zone in outside:
        others = [(i, g) for i, g in item.serving if i != instance_id]
        nodes, avoid = failure_domains(others, every_gpu, reported)
        request = replace(
            dr_request(item.model, instance_id, Role.SERVING, nodes, avoid),
            serving_zones=zones,
        )
        try:
            placement = engine.decide(request)
        except PlacementError:
            continue
        if placement.preempted or placement.gpu.zone not in zones:
            continue
        out.append(
            f"serving {instance_id} of {item.model.name} in zone {zone}, outside the active zones ({active}), "
            f"while {placement.gpu.id} (zone {placement.gpu.zone}) could take it "
            "(reconcile never moves a serving instance)"
        )
    return out


def _after(instances: Sequence[Instance], plan: ReconcilePlan) -> list[Instance]:
    """The instances as the plan's actions leave them."""
    by_id = {i.id: i for i in instances}
    for a in plan.actions:
        if a.kind == ReconcileActionKind.DELETE:
            by_id.pop(a.instance, None)
        elif a.kind == ReconcileActionKind.RETIER and a.instance in by_id:
            by_id[a.instance] = by_id[a.instance].model_copy(update={"role": a.tier})
        else:
            by_id[a.instance] = Instance(id=a.instance, model=a.model, role=a.tier, gpu=a.gpu, node=a.node, zone=a.zone)
    return list(by_id.values())


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
    highest_indexes: Mapping[str, int] | None = None,
    hung: Iterable[str] = (),
) -> ReconcilePlan:
    """A new serving instance for a model whose standbys are all used up or broken.

    Placed on the pool away from the failed instance's node, on neither a cordoned nor a hung GPU;
    a critical model may preempt strictly lower-priority instances (placement says which, and the
    plan deletes them first).
    """
    model = policy.model(model_name)
    inventory = usable_inventory(policy, [*cordoned, *hung])
    allocations = current_allocations(policy, instances)
    failed = next((i for i in instances if i.id == failed_instance), None)
    mine = [i for i in instances if i.model == model_name]
    instance_id = f"{model_name}-{next_instance_index(mine, (highest_indexes or {}).get(model_name, -1))}"
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
        serving_zones=serving_zones(policy),
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
            reason=f"emergency: no standby of {model_name} could take over from {failed_instance}"
            + (f"; {placement.reason}" if request.outside(placement.gpu.zone) else ""),
        )
    )
    return plan


def without_leftovers(
    snapshot: FleetSnapshot, models: list[str] | None
) -> tuple[list[Instance], list[ReconcileAction]]:
    """Instances left ``promoting`` by a create or a promotion that no longer runs (its activity was
    refused as stale, or its worker died and the runbook moved on), in a model with no recovery in
    flight (the budget says so): they are deleted, and planned around as gone. The planner alone
    would skip such a model for ever, taking the leftover for a failover still running."""
    kept: list[Instance] = []
    cleanup: list[ReconcileAction] = []
    for instance in snapshot.instances:
        leftover = instance.role == Role.PROMOTING and instance.model not in snapshot.busy_models
        if leftover and (models is None or instance.model in models):
            cleanup.append(delete_action(instance, "left promoting by a create or promotion that no longer runs"))
            kept.append(instance.model_copy(update={"role": Role.FAILED}))
        else:
            kept.append(instance)
    return kept, cleanup


def fenced(plan: ReconcilePlan, snapshot: FleetSnapshot) -> ReconcilePlan:
    """Leave the models with a recovery in flight alone (the budget says which), and stamp every
    other action with its model's epoch as observed: if a failover claims a newer epoch before the
    action runs, the platform refuses it, and the next pass plans again from the new fleet."""
    busy = snapshot.busy_models
    actions = [
        action.model_copy(update={"epoch": snapshot.epochs.get(action.model, 0)})
        for action in plan.actions
        if action.model not in busy
    ]
    skipped = [f"{model}: {runbook} in flight" for model, runbook in sorted(busy.items())]
    return plan.model_copy(update={"actions": actions, "skipped_models": [*plan.skipped_models, *skipped]})


def zone_failover_first(plan: ReconcilePlan, zones: list[str]) -> ReconcilePlan:
    """While a zone fails over (its workflow or its lease running), a pass makes no new standbys: no standby
    creates, re-tiers or moves, nor the deletes that would make room for them. It still deletes what
    is dead or surplus and still creates a missing serving instance. The zone's recoveries go first:
    in the 1,000-instance zone outage of ``bench/zone_bench.py`` the hundreds of standbys made
    beside them took the machine from them (every model switched 7 s later), and they come in the
    pass the zone failover asks for as it ends. A zone failover that runs for long is not
    waited for (``drctl.temporal.incidents.ZONE_FAILOVER_FIRST_FOR``)."""
    if not zones:
        return plan
    later = {a.instance for a in plan.actions if a.kind != ReconcileActionKind.DELETE and a.tier != Role.SERVING}
    if not later:
        return plan
    kept = [a for a in plan.actions if a.instance not in later]
    still_freed = {victim for a in kept for victim in a.preempts}
    made_room = {victim for a in plan.actions if a.instance in later for victim in a.preempts}
    made_room |= {old for new, old in plan.moves.items() if new in later}
    actions = [a for a in kept if a.instance not in made_room - still_freed]
    note = f"{len(later)} new standby(s): after the failover of zone {', '.join(zones)} (its recoveries go first)"
    return plan.model_copy(
        update={
            "actions": actions,
            "moves": {new: old for new, old in plan.moves.items() if new not in later},
            "skipped_models": [*plan.skipped_models, note],
            "after_zone_failover": list(zones),
        }
    )


def plan_pass(snapshot: FleetSnapshot, models: list[str] | None) -> ReconcilePlan:
    """One reconcile pass's plan from what was observed: leftovers deleted first, then what the
    policy wants (:func:`plan_reconcile`), every action fenced with its model's epoch."""
    policy = DRPolicy.model_validate(snapshot.policy)
    instances, cleanup = without_leftovers(snapshot, models)
    busy = snapshot.busy_models
    if busy:
        # Their actions would be dropped (fenced) anyway: planning them cost seconds of the
        # worker's CPU per pass during a zone failover of 1,000 instances (every model busy), and
        # left unplanned they reserve no capacity for actions that will not run.
        models = [m for m in (models if models is not None else policy.model_names) if m not in busy]
    plan = plan_reconcile(
        policy, instances, models, snapshot.cordoned_gpus, snapshot.highest_indexes, snapshot.hung_gpus
    )
    plan = fenced(plan.model_copy(update={"actions": [*cleanup, *plan.actions]}), snapshot)
    plan = zone_failover_first(plan, snapshot.zones_failing_over)
    pacing = ReconcilePacing(
        parallel_changes=policy.reconcile.max_parallel_changes, loads_per_node=policy.reconcile.max_loads_per_node
    )
    return plan.model_copy(
        update={"violations": listed(plan.violations), "pacing": pacing, "cordoned": sorted(snapshot.cordoned_gpus)}
    )


MAX_LISTED_VIOLATIONS = 20
"""Placement drift said in a plan: the plan goes into every pass's workflow history, and a dense
pool of 1,000 models can carry hundreds of standbys that no better place has room for."""


def listed(lines: list[str], limit: int = MAX_LISTED_VIOLATIONS) -> list[str]:
    """The first ``limit`` lines, and how many more there are."""
    if len(lines) <= limit:
        return lines
    return [*lines[:limit], f"... and {len(lines) - limit} more like these"]
