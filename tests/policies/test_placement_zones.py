"""Zone roles in placement: an active-passive policy's serving instances go to its active zones
(the zones the health checker watches) while one has room; standbys may use any zone; a policy
without zone roles places as before."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from drctl.payloads import Instance, ReconcileAction, ReconcileActionKind, Role
from drctl.policies.explain import explain
from drctl.policies.loader import load_policy_file, parse_policy
from drctl.policies.placement import (
    SERVING_TIERS,
    Allocation,
    Placement,
    PlacementError,
    PlacementRequest,
    gpu_inventory,
    place,
    serving_zones,
)
from drctl.policies.reconcile import plan_emergency, plan_reconcile
from drctl.policies.schema import DRPolicy, Priority
from tests.policies.test_placement import PROPERTY, Scenario, plain_options, run, scenarios
from tests.policies.test_reconcile import apply

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"
POLICY = load_policy_file(EXAMPLE)
ACTIVE = {"az-1", "az-2"}
GiB = 1024**3


def without_zone_roles(policy: DRPolicy, **az_failover: object) -> DRPolicy:
    """The policy with its ``az_failover`` section replaced (none: the schema's defaults)."""
    data = policy.model_dump(mode="json", by_alias=True)
    if az_failover:
        data["az_failover"] = {**data["az_failover"], **az_failover}
    else:
        del data["az_failover"]
    return DRPolicy.model_validate(data)


def serving_zone_of(actions: Sequence[ReconcileAction], model: str) -> list[str | None]:
    return [a.zone for a in actions if a.model == model and a.tier == Role.SERVING]


# -- the example policy -----------------------------------------------------------------------------


def test_example_policy_has_zone_roles() -> None:
    assert serving_zones(POLICY) == frozenset(ACTIVE)


def test_every_serving_instance_of_the_example_lands_in_an_active_zone() -> None:
    plan = plan_reconcile(POLICY, [])
    assert plan.unplaceable == []
    for model in POLICY.model_names:
        zones = serving_zone_of(plan.actions, model)
        assert zones and all(z in ACTIVE for z in zones), (model, zones)
    # The trial's case: gpt-4-8b served from gpu-node-2 (az-3, the standby zone).
    assert {a.node for a in plan.actions if a.tier == Role.SERVING}.isdisjoint({"gpu-node-2"})
    # No node carries two serving instances while another active node has none (3 active nodes).
    serving_nodes = [a.node for a in plan.actions if a.tier == Role.SERVING]
    assert len(set(serving_nodes)) == len(serving_nodes) == 3
    # Nothing said about serving outside the active zones: there is none.
    assert not any("outside the active zones" in a.reason for a in plan.actions)
    assert plan.violations == []


def test_standbys_still_use_the_standby_zone_and_avoid_their_serving_domain() -> None:
    fleet = apply([], plan_reconcile(POLICY, []).actions)
    standby_zones = {i.zone for i in fleet if i.role != Role.SERVING}
    assert "az-3" in standby_zones
    for model in POLICY.model_names:
        serving = [i for i in fleet if i.model == model and i.role == Role.SERVING]
        standbys = [i for i in fleet if i.model == model and i.role != Role.SERVING]
        assert not {i.node for i in serving} & {i.node for i in standbys}, model
        # Three zones and at most three standbys per model: none needs the serving zone.
        assert not {i.zone for i in serving} & {i.zone for i in standbys}, model


def test_second_pass_on_the_example_changes_nothing() -> None:
    fleet = apply([], plan_reconcile(POLICY, []).actions)
    plan = plan_reconcile(POLICY, fleet)
    assert plan.actions == [] and plan.violations == []


def test_explain_lists_no_serving_outside_the_active_zones() -> None:
    assert all(item.outside_active_zones == [] for item in explain(POLICY))


# -- falling back to the standby zone -----------------------------------------------------------------

TWO_ZONES = """
models:
  - {name: big-a, priority: critical, gpuMemory: 80Gi}
  - {name: big-b, priority: high, gpuMemory: 80Gi}
az_failover: {strategy: active-passive, activeZones: [az-1], standbyZone: az-3}
gpuPool:
  overcommitRatio: 1.0
  nodes:
    - {name: node-a, zone: az-1, gpus: 1, gpuMemory: 80Gi}
    - {name: node-s, zone: az-3, gpus: 1, gpuMemory: 80Gi}
"""


def test_with_the_active_zones_full_serving_falls_back_to_the_standby_zone_and_says_so() -> None:
    policy = parse_policy(TWO_ZONES)
    plan = plan_reconcile(policy, [])
    assert plan.unplaceable == []
    by_model = {a.model: a for a in plan.actions}
    assert by_model["big-a"].zone == "az-1"  # critical first: the active zone
    fallback = by_model["big-b"]
    assert fallback.zone == "az-3"
    assert "in zone az-3, outside the active zones (az-1): no GPU there has 80 GiB free" in fallback.reason
    outside = {item.name: item.outside_active_zones for item in explain(policy)}
    assert outside["big-a"] == []
    assert outside["big-b"] == ["big-b-0: in zone az-3, outside the active zones (az-1): no GPU there has 80 GiB free"]
    # Nothing better exists: no violation while the active zone stays full.
    assert plan.violations == []


def example_request(instance: str, tier: str = "serving", **fields: object) -> PlacementRequest:
    request = PlacementRequest(
        instance=instance,
        model="m",
        tenant="default",
        priority=Priority.NORMAL,
        tier=tier,
        memory=16 * GiB,
        spread=True,
        serving_zones=serving_zones(POLICY),
    )
    return replace(request, **fields)  # type: ignore[arg-type]


def fill(zones: set[str]) -> list[Allocation]:
    """Every GPU of the example pool in ``zones`` loaded full."""
    return [
        Allocation(f"full-{s.id}", "filler", "default", Priority.CRITICAL, "serving", s.memory, s.id)
        for s in gpu_inventory(POLICY.gpu_pool)
        if s.zone in zones
    ]


def test_place_falls_back_only_when_no_active_gpu_fits() -> None:
    inventory = gpu_inventory(POLICY.gpu_pool)
    pool, tenants = POLICY.gpu_pool, POLICY.tenants
    # az-1 full: az-2 is still an active zone with room.
    assert place(example_request("m-0"), inventory, fill({"az-1"}), pool, tenants).gpu.zone == "az-2"
    # Both active zones full: the standby zone, said.
    placement = place(example_request("m-0"), inventory, fill(ACTIVE), pool, tenants)
    assert placement.gpu.zone == "az-3"
    assert "outside the active zones (az-1, az-2): no GPU there has 16 GiB free" in placement.reason
    # A promoting instance is serving too.
    assert place(example_request("m-0", "promoting"), inventory, fill(ACTIVE), pool, tenants).gpu.zone == "az-3"
    # A standby is not bound to the active zones: with nothing placed, best fit's order picks.
    standby = place(example_request("m-1", "warm"), inventory, [], pool, tenants)
    assert "outside the active zones" not in standby.reason


def test_replicas_never_share_a_node_to_stay_in_the_active_zones() -> None:
    """Three active nodes: three replicas fill them (two share az-1, none shares a node); a fourth
    goes to the standby zone rather than onto a node that already serves the model."""
    data = POLICY.model_dump(mode="json", by_alias=True)
    data["models"] = [{"name": "wide", "replicas": 4, "priority": "critical"}]
    policy = DRPolicy.model_validate(data)
    plan = plan_reconcile(policy, [])
    serving = [a for a in plan.actions if a.tier == Role.SERVING]
    assert len({a.node for a in serving}) == 4
    assert sorted(a.zone or "" for a in serving) == ["az-1", "az-1", "az-2", "az-3"]
    fourth = next(a for a in serving if a.zone == "az-3")
    assert "outside the active zones (az-1, az-2): every node there with room already serves wide" in fourth.reason


def test_emergency_instance_goes_to_an_active_zone() -> None:
    fleet = apply([], plan_reconcile(POLICY, []).actions)
    serving = next(i for i in fleet if i.model == "gpt-4-8b" and i.role == Role.SERVING)
    gone = [i for i in fleet if not (i.model == "gpt-4-8b" and i.role != Role.SERVING)]
    plan = plan_emergency(POLICY, gone, "gpt-4-8b", serving.id)
    create = next(a for a in plan.actions if a.kind == ReconcileActionKind.CREATE)
    assert create.zone in ACTIVE and create.node != serving.node


# -- no zone roles: as before ---------------------------------------------------------------------------


def test_without_zone_roles_placement_is_as_before() -> None:
    """Without ``az_failover`` (its default ``activeZones: [az-1]`` names no standby zone), with no
    active zones, or with no standby zone: no zone roles, and the same plan each time, placed as
    drctl placed before zone roles existed (gpt-4-8b serving from gpu-node-2, in az-3; the
    standbys spread over the zones for their model, then over the nodes by class)."""
    before = [
        ("llama-2-7b-0", "serving", "gpu-node-0/0"),
        ("llama-2-7b-1", "hot", "gpu-node-1/0"),
        ("llama-2-7b-2", "hot", "gpu-node-2/0"),
        ("llama-2-7b-3", "cold", "gpu-node-1/1"),
        ("mistral-7b-0", "serving", "gpu-node-1/2"),
        ("mistral-7b-1", "hot", "gpu-node-0/1"),
        ("mistral-7b-2", "warm", "gpu-node-2/1"),
        ("mistral-7b-3", "cold", "gpu-node-2/0"),
        ("gpt-4-8b-0", "serving", "gpu-node-2/2"),
        ("gpt-4-8b-1", "warm", "gpu-node-3/0"),
        ("gpt-4-8b-2", "cold", "gpu-node-1/0"),
        ("gpt-4-8b-3", "cold", "gpu-node-0/1"),
    ]
    for policy in (
        without_zone_roles(POLICY),
        without_zone_roles(POLICY, activeZones=[]),
        without_zone_roles(POLICY, standbyZone=None),
    ):
        assert serving_zones(policy) == frozenset()
        plan = plan_reconcile(policy, [])
        assert [(a.instance, a.tier.value, a.gpu) for a in plan.actions] == before
        assert all(item.outside_active_zones == [] for item in explain(policy))


@st.composite
def zoned_scenarios(draw: st.DrawFn) -> Scenario:
    """Scenarios whose requests carry serving zones (a subset of the pool's zones), spread and
    avoided zones, as the planner sends them."""
    scenario = draw(scenarios())
    zones = sorted({n.zone for n in scenario.pool.nodes} | {"az-9"})
    active = frozenset(draw(st.sets(st.sampled_from(zones), min_size=1, max_size=2)))
    requests = [
        replace(
            r,
            spread=draw(st.booleans()),
            avoid_zones=frozenset(draw(st.sets(st.sampled_from(zones), max_size=1))),
            serving_zones=active,
        )
        for r in scenario.requests
    ]
    return Scenario(scenario.pool, scenario.tenants, requests)


@PROPERTY
@given(zoned_scenarios())
def test_zoned_placement_is_the_best_feasible_gpu(scenario: Scenario) -> None:
    """With ``serving_zones``: a serving (or promoting) request takes the first feasible GPU by (a
    protected node, outside the serving zones, then the order without zone roles); a standby's
    order is the one without zone roles. So serving leaves the serving zones only when no GPU there
    (off the protected nodes, if any GPU off them fits) can take it."""
    zone_of = {s.id: s.zone for s in scenario.inventory}
    for step in run(scenario):
        options = plain_options(step, scenario)
        result = step.result
        request = step.request
        if isinstance(result, PlacementError):
            assert not options, f"{request} refused ({result.reason}) though {sorted(options)} fit"
            continue
        assert isinstance(result, Placement)
        if result.preempted:
            assert not options
            continue
        serving = request.tier in SERVING_TIERS
        keys = {
            gpu: (rank[0][0], serving and zone_of[gpu] not in request.serving_zones, rank)  # type: ignore[index]
            for gpu, (rank, _borrowed) in options.items()
        }
        assert result.gpu.id in keys
        assert keys[result.gpu.id] == min(keys.values())
        outside = serving and result.gpu.zone not in request.serving_zones
        assert ("outside the active zones" in result.reason) == outside


# -- reconciliation and failover ------------------------------------------------------------------------


def promoted_to_standby_zone() -> list[Instance]:
    """The example fleet after mistral's serving instance failed and a standby in az-3 took over."""
    fleet = apply([], plan_reconcile(POLICY, []).actions)
    serving = next(i for i in fleet if i.model == "mistral-7b" and i.role == Role.SERVING)
    taker = next(i for i in fleet if i.model == "mistral-7b" and i.role != Role.SERVING and i.zone == "az-3")
    out = [i for i in fleet if i.id != serving.id]
    return [i.model_copy(update={"role": Role.SERVING}) if i.id == taker.id else i for i in out]


def test_reconcile_reports_serving_left_in_the_standby_zone_and_never_moves_it() -> None:
    fleet = promoted_to_standby_zone()
    taker = next(i for i in fleet if i.model == "mistral-7b" and i.role == Role.SERVING)
    assert taker.zone == "az-3"
    plan = plan_reconcile(POLICY, fleet)
    assert not any(a.instance == taker.id for a in plan.actions)  # serving is never moved by reconcile
    said = [v for v in plan.violations if v.startswith(f"serving {taker.id} ")]
    assert len(said) == 1
    assert "in zone az-3, outside the active zones (az-1, az-2)" in said[0]
    assert "(reconcile never moves a serving instance)" in said[0]


def test_during_a_zone_failover_serving_in_the_standby_zone_is_not_a_violation() -> None:
    fleet = promoted_to_standby_zone()
    az2 = [s.id for s in gpu_inventory(POLICY.gpu_pool) if s.zone == "az-2"]
    plan = plan_reconcile(POLICY, fleet, cordoned=az2)
    assert not any("outside the active zones" in v for v in plan.violations)
    # A single drained GPU is no zone failover: still said.
    plan = plan_reconcile(POLICY, fleet, cordoned=az2[:1])
    assert any("outside the active zones" in v for v in plan.violations)


def _settled(policy: DRPolicy, fleet: list[Instance], cordoned: Sequence[str] = ()) -> list[Instance]:
    """Reconcile passes applied until one plans nothing (at most 10)."""
    for _ in range(10):
        plan = plan_reconcile(policy, fleet, cordoned=cordoned)
        if not plan.actions:
            return fleet
        fleet = apply(fleet, plan.actions)
    raise AssertionError("reconciliation did not settle in 10 passes")


def _zone_failed_over(fleet: list[Instance], zone: str) -> list[Instance]:
    """Each model serving in ``zone`` served by a standby elsewhere (the standby zone first, as its
    runbook picks); the zone's instances gone."""
    out: list[Instance] = []
    for model in POLICY.model_names:
        mine = [i for i in fleet if i.model == model]
        failed = next((i for i in mine if i.role == Role.SERVING and i.zone == zone), None)
        taker = None
        if failed is not None:
            order = sorted(
                (i for i in mine if i.role != Role.SERVING and i.zone != zone),
                key=lambda i: (["hot", "warm", "cold"].index(i.role.value), i.zone != "az-3", i.id),
            )
            taker = order[0].id
        out += [i.model_copy(update={"role": Role.SERVING}) if i.id == taker else i for i in mine if i.zone != zone]
    return out


def test_after_a_failback_the_standbys_spread_back_and_the_next_failover_stacks_nothing() -> None:
    """While az-2 is failed over every standby must leave it and avoid az-1 (where everything
    serves): all of them go to az-3's one node. After the failback reconciliation moves some of
    them back onto az-2 (a node with more of a class than another by more than the slack), so the
    failover of az-1 that follows does not serve every model from one node and GPU."""
    zone_gpus = {z: [s.id for s in gpu_inventory(POLICY.gpu_pool) if s.zone == z] for z in ("az-1", "az-2")}
    fleet = _settled(POLICY, [])
    fleet = _settled(POLICY, _zone_failed_over(fleet, "az-2"), zone_gpus["az-2"])
    assert {i.node for i in fleet if i.role != Role.SERVING} == {"gpu-node-2"}
    fleet = _settled(POLICY, fleet)  # failback: az-2's GPUs usable again
    assert sum(1 for i in fleet if i.role != Role.SERVING and i.node == "gpu-node-1") >= 3
    fleet = _settled(POLICY, _zone_failed_over(fleet, "az-1"), zone_gpus["az-1"])
    serving = [i for i in fleet if i.role == Role.SERVING]
    assert len(serving) == 3 and len({i.gpu for i in serving}) == 3, serving
    plan = plan_reconcile(POLICY, fleet, cordoned=zone_gpus["az-1"])
    assert not [v for v in plan.violations if "stacked" in v]


# -- hung nodes -------------------------------------------------------------------------------------


def test_a_replacement_is_not_placed_on_a_hung_node_and_nothing_on_it_moves() -> None:
    """A zone's nodes hang (its instance pools stopped) before any zone failover cordons them: a
    standby lost meanwhile is replaced away from them, while the standbys on them stay put (a
    cordon would move them; a hang may end, and its failures are the runbooks')."""
    fleet = _settled(POLICY, [])
    hung_zone = max(sorted(ACTIVE), key=lambda z: sum(1 for i in fleet if i.zone == z and i.role.is_standby))
    hung = [s.id for s in gpu_inventory(POLICY.gpu_pool) if s.zone == hung_zone]
    lost = next(i for i in fleet if i.zone == hung_zone and i.role == Role.HOT)
    fleet = [i for i in fleet if i.id != lost.id]  # its runbook ejected it: reconciliation replaces it
    where_free = plan_reconcile(POLICY, fleet)
    assert [(a.kind, a.zone) for a in where_free.actions if a.model == lost.model] == [
        (ReconcileActionKind.CREATE, hung_zone)
    ], "without the hang the replacement goes back to the same zone: the test needs that"
    plan = plan_reconcile(POLICY, fleet, hung=hung)
    creates = [a for a in plan.actions if a.kind == ReconcileActionKind.CREATE]
    assert lost.model in {a.model for a in creates} and not [a for a in creates if a.gpu in hung]
    on_hung = {i.id for i in fleet if i.gpu in hung}
    assert on_hung and not [a for a in plan.actions if a.instance in on_hung]
    cordoned = plan_reconcile(POLICY, fleet, cordoned=hung)
    assert {
        a.instance for a in cordoned.actions if a.kind == ReconcileActionKind.DELETE
    } & on_hung  # a cordon moves them


def test_an_emergency_instance_is_not_placed_on_a_hung_node() -> None:
    fleet = [i for i in _settled(POLICY, []) if i.model != "llama-2-7b" or i.role == Role.SERVING]
    failed = next(i for i in fleet if i.model == "llama-2-7b")
    free = plan_emergency(POLICY, fleet, "llama-2-7b", failed.id)
    chosen = free.actions[-1].node
    hung = [s.id for s in gpu_inventory(POLICY.gpu_pool) if s.node == chosen]
    plan = plan_emergency(POLICY, fleet, "llama-2-7b", failed.id, hung=hung)
    assert plan.actions and plan.actions[-1].node != chosen and plan.actions[-1].gpu not in hung
