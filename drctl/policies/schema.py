"""The DR policy file as pydantic models.

The seed's ``dr-policy.yaml`` (seed §4.1) loads exactly as written: camelCase keys per model, the
snake_case ``az_failover`` section, duration strings, ``rpo: 0``. Every section it does not have
gets a default that a platform team would pick. Unknown keys are errors, so a typo is named instead
of silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import timedelta
from enum import StrEnum
from functools import cached_property
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator
from pydantic.alias_generators import to_camel

from drctl.payloads import MODEL_NAME_PATTERN
from drctl.policies.durations import format_duration, parse_duration, require_positive
from drctl.policies.engines import Engine, EngineProfile, profile
from drctl.policies.sizes import parse_size

Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
"""A duration written as ``10s``/``1m``/``0`` in the file and serialised back the same way."""

PositiveDuration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    AfterValidator(require_positive),
    PlainSerializer(format_duration, return_type=str),
]
"""A duration where zero makes no sense (an interval, a timeout, a window, a target): ``0s`` is an
error naming the field, not a busy loop or a schedule Temporal refuses."""

ByteSize = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
PositiveByteSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Priority(StrEnum):
    """How much a model matters when capacity is short. Critical models are recovered first."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"

    @property
    def rank(self) -> int:
        """Higher is more important."""
        return {Priority.CRITICAL: 2, Priority.HIGH: 1, Priority.NORMAL: 0}[self]


class ModelPolicy(_Section):
    """What one model needs: how many serving instances, standbys per tier, and its recovery targets."""

    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    priority: Priority = Priority.NORMAL
    tenant: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)] = "default"
    replicas: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    """Serving instances (priority 0 in the load balancer). The seed implies one."""
    hot_standby: Annotated[int, Field(strict=True, ge=0, le=64)] = 0
    warm_standby: Annotated[int, Field(strict=True, ge=0, le=64)] = 0
    cold_standby: Annotated[int, Field(strict=True, ge=0, le=64)] = 0
    rto: PositiveDuration = timedelta(minutes=5)
    rpo: Duration = timedelta(minutes=5)
    gpu_memory: PositiveByteSize = parse_size("16Gi")
    """GPU memory one loaded instance needs (used by placement)."""
    checkpoint_size: ByteSize | None = None
    """Size of the demo checkpoint on the local platform; defaults to ``local.checkpointSize``."""
    engine: Engine = Engine.VLLM
    """The inference engine its instances run (``vllm``, ``sglang``, or ``demo``: drctl's stand-in
    for the embedded stack): the paths drctl probes, sleeps, wakes and verifies on
    (:mod:`drctl.policies.engines`)."""

    @property
    def engine_profile(self) -> EngineProfile:
        return profile(self.engine)


class ZoneFailoverStrategy(StrEnum):
    ACTIVE_PASSIVE = "active-passive"


class ZoneFailoverPolicy(_Section):
    """The seed's ``az_failover`` section: active-passive across zones."""

    strategy: ZoneFailoverStrategy = ZoneFailoverStrategy.ACTIVE_PASSIVE
    active_zones: list[str] = Field(default_factory=lambda: ["az-1"])
    standby_zone: str | None = None
    health_check_interval: PositiveDuration = timedelta(seconds=10)
    failover_threshold: Annotated[int, Field(strict=True, ge=1)] = 3
    require_approval: bool = False
    """Wait for an operator's approval (a workflow Update) before moving a zone's serving."""
    max_parallel_failovers: Annotated[int, Field(strict=True, ge=1, le=64)] = 4
    """Runbooks of a zone failover running at once (its lease's slots): those that load a warm or
    cold standby, and every other recovery the zone's guardians run."""
    max_parallel_switches: Annotated[int, Field(strict=True, ge=1, le=256)] = 32
    """Hot standbys a zone failover switches at once in its batch (promote, hot check, register,
    verify, eject: nothing is loaded). At 1,000 instances on a 2-core machine every model switched
    in ~10 s at 16, ~9 s at 32 and ~7 s at 64 (docs/benchmarks.md); at 4 the batch waited on its
    own cap."""
    confirm_from_instances: bool = True
    """Judge a zone down at the first failed check, without waiting ``failoverThreshold`` checks,
    when the prober also has every instance it watches in the zone down (each past its own
    ``unhealthyThreshold``): two independent signals agree. False: always wait the threshold."""

    def checked_zones(self, node_zones: Iterable[str]) -> list[str]:
        """The zones the zone health checks watch, given the zones the nodes are in: the active ones
        first, then the standby zone and every zone of ``node_zones``. Serving leaves the active
        zones (a zone failover moves it to the standby zone; without zone roles it is placed
        anywhere), and a zone the checks did not watch failed instance by instance, its failures
        queued behind the budget's per-zone cap until the breaker tripped and waited for a person."""
        active = list(dict.fromkeys(self.active_zones))
        others = set(node_zones) | ({self.standby_zone} if self.standby_zone else set())
        return active + sorted(others - set(active))


class HealthCheckPolicy(_Section):
    """Envoy's active health check of every endpoint (seed §3: 5 s / 3 fails / 2 passes).

    The local default checks every second so the demo stack reacts quickly; retries on the
    route, not the health check, are what keep clients from seeing a failure.
    """

    interval: PositiveDuration = timedelta(seconds=1)
    timeout: PositiveDuration = timedelta(milliseconds=500)
    unhealthy_threshold: Annotated[int, Field(strict=True, ge=1)] = 3
    healthy_threshold: Annotated[int, Field(strict=True, ge=1)] = 2
    path: str = "/healthz"


class OutlierDetectionPolicy(_Section):
    """Passive ejection of endpoints that return 5xx (seed §3: 5 consecutive, 30 s, 60 s, 50 %)."""

    consecutive5xx: Annotated[int, Field(strict=True, ge=1, alias="consecutive5xx")] = 5
    interval: PositiveDuration = timedelta(seconds=30)
    base_ejection_time: PositiveDuration = timedelta(seconds=60)
    max_ejection_percent: Annotated[int, Field(strict=True, ge=0, le=100)] = 50


class RetryPolicy(_Section):
    """Route retries (seed §3: connect-failure, refused-stream, gateway errors)."""

    attempts: Annotated[int, Field(strict=True, ge=0, le=10)] = 3
    per_try_timeout: PositiveDuration = timedelta(seconds=5)
    retry_on: str = "connect-failure,refused-stream,gateway-error,reset"


class LoadBalancerPolicy(_Section):
    health_check: HealthCheckPolicy = HealthCheckPolicy()
    outlier_detection: OutlierDetectionPolicy = OutlierDetectionPolicy()
    retries: RetryPolicy = RetryPolicy()
    request_timeout: Duration = timedelta(seconds=30)
    """Envoy's route timeout; ``0s`` means none (Envoy's meaning), so zero is allowed here."""


class LocalPlatformPolicy(_Section):
    """How the embedded local platform runs model instances."""

    command: list[str] = Field(
        default_factory=lambda: [
            "{python}",
            "-m",
            "drctl.sim.inference_server",
            "--model",
            "{model}",
            "--instance",
            "{instance}",
            "--port",
            "{port}",
            "--checkpoint",
            "{checkpoint}",
            "--load-seconds-per-gib",
            "{load_seconds_per_gib}",
        ]
    )
    """Command template for one instance. Placeholders: ``{python} {model} {instance} {port}
    {checkpoint} {gpu} {load_seconds_per_gib}``. On a GPU box this can run vLLM instead of the demo server."""
    checkpoint_size: ByteSize = parse_size("4MiB")
    load_seconds_per_gib: Annotated[float, Field(ge=0)] = 0.0
    """Extra simulated load time of the demo server (``{load_seconds_per_gib}`` in the template), to
    mimic real weight loading."""

    @model_validator(mode="after")
    def _template_names_known_placeholders(self) -> LocalPlatformPolicy:
        known = {"python", "model", "instance", "port", "checkpoint", "gpu", "load_seconds_per_gib"}
        for arg in self.command:
            for name in re.findall(r"{(\w*)}", arg):
                if name not in known:
                    raise ValueError(
                        f"command template uses unknown placeholder {{{name}}}; known: " + ", ".join(sorted(known))
                    )
        if not self.command:
            raise ValueError("command template is empty")
        return self


class GpuNodePolicy(_Section):
    """One GPU node of the shared pool."""

    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    zone: str = "az-1"
    gpus: Annotated[int, Field(strict=True, ge=1, le=64)] = 4
    """A node without GPUs has no place in the pool: leave it out instead."""
    gpu_memory: PositiveByteSize = parse_size("80Gi")
    """Memory of each GPU on the node."""


def _seed_nodes() -> list[GpuNodePolicy]:
    # The seed's pool (§2.1): gpu-node-0..3, 16 GPUs in all.
    zones = ["az-1", "az-2", "az-3", "az-1"]
    return [GpuNodePolicy(name=f"gpu-node-{i}", zone=zones[i]) for i in range(4)]


class GpuPoolPolicy(_Section):
    """The shared GPU pool (seed §2): nodes, GPUs per node and their memory, overcommit ratio.

    Overcommit applies only to warm/cold reservations; loaded models never exceed a GPU's memory.
    """

    overcommit_ratio: Annotated[float, Field(ge=1.0, le=10.0)] = 1.5
    discover: bool = False
    """Take the GPUs from NVML (the node agent) instead of ``nodes``; ``nodes`` is the fallback."""
    nodes: list[GpuNodePolicy] = Field(default_factory=_seed_nodes)

    @model_validator(mode="after")
    def _node_names_unique(self) -> GpuPoolPolicy:
        seen: set[str] = set()
        duplicates: set[str] = set()
        for node in self.nodes:  # one pass: a pool of many nodes must not validate in quadratic time
            (duplicates if node.name in seen else seen).add(node.name)
        if duplicates:
            raise ValueError(f"node(s) listed twice: {', '.join(sorted(duplicates))}")
        return self


class TenantCapability(_Section):
    """Caps of one tenant (seed §2.1 ``capability``); None = no cap."""

    gpus: Annotated[int, Field(strict=True, ge=0)] | None = None
    memory: ByteSize | None = None


class TenantPolicy(_Section):
    """A tenant's queue on the shared pool (seed §2.1: weight, capability, reclaimable)."""

    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    weight: Annotated[int, Field(strict=True, ge=1, le=1000)] = 1
    capability: TenantCapability = TenantCapability()
    reclaimable: bool = True
    """Whether capacity this tenant does not use may be lent to others (and taken back)."""


class DetectionPolicy(_Section):
    """The health prober (seed §3: every 5 s, 3 failures mark down, 2 successes mark up)."""

    probe_interval: PositiveDuration = timedelta(seconds=5)
    probe_timeout: PositiveDuration = timedelta(seconds=1)
    unhealthy_threshold: Annotated[int, Field(strict=True, ge=1)] = 3
    healthy_threshold: Annotated[int, Field(strict=True, ge=1)] = 2
    flap_window: PositiveDuration = timedelta(minutes=5)
    flap_limit: Annotated[int, Field(strict=True, ge=2)] = 3
    """This many down-transitions within ``flapWindow`` hold the instance out instead of failing
    it over again and again."""
    hold_down: PositiveDuration = timedelta(minutes=10)
    max_failovers_per_model: Annotated[int, Field(strict=True, ge=1, le=1)] = 1
    """Recoveries of one model at once: always 1 (the model's guardian runs its incidents one after
    the other, so two runbooks never pick the same standby). Kept so older policies still load."""
    max_failovers_per_zone: Annotated[int, Field(strict=True, ge=1)] = 3
    """Recoveries running at once in one zone, fleet-wide (the budget's per-zone cap): past it a
    recovery waits for a running one to end. See ``budget``."""


class ReconcilePolicy(_Section):
    """How often standbys are brought back to the policy's counts (a Temporal Schedule)."""

    interval: PositiveDuration = timedelta(seconds=30)
    """Temporal refuses a schedule every 0s; ``enabled: false`` is how to turn it off."""
    enabled: bool = True
    max_parallel_changes: Annotated[int, Field(strict=True, ge=1, le=1000)] = 16
    """Instances a pass deletes, creates or re-tiers at once: its deletes side by side first (they
    free the capacity its creates were planned into), then its creates and re-tiers. After a zone
    failover a pass has hundreds of each; one at a time, the fleet stayed short of its standbys for
    tens of seconds (``docs/benchmarks.md``)."""
    max_loads_per_node: Annotated[int, Field(strict=True, ge=1, le=256)] = 4
    """Of those, how many load a model on one node at once: each reads a checkpoint from the node's
    disk or network and copies it to a GPU, and too many at once slow every one of them."""


class BudgetPolicy(_Section):
    """The blast-radius budget every trigger shares (enforced by ``BudgetWorkflow``).

    Per model, the model's guardian runs one recovery at a time. Fleet-wide, at most
    ``detection.maxFailoversPerZone`` recoveries run at once in a zone and at most
    ``maxRunbooksPerMinute`` start per minute. Past either, a recovery waits (it is never dropped);
    when more than ``tripAfterWaiting`` wait at once, the breaker trips: nothing more starts until a
    person resets it (``drctl budget reset``), because that many failures at once is more likely a
    problem of drctl's view (network, a zone, a bad probe) than of that many instances."""

    max_runbooks_per_minute: Annotated[int, Field(strict=True, ge=1, le=100_000)] = 120
    trip_after_waiting: Annotated[int, Field(strict=True, ge=1, le=100_000)] = 50


class DRPolicy(_Section):
    """The whole policy file."""

    models: Annotated[list[ModelPolicy], Field(min_length=1)]
    az_failover: ZoneFailoverPolicy = Field(default_factory=ZoneFailoverPolicy, alias="az_failover")
    gpu_pool: GpuPoolPolicy = Field(default_factory=GpuPoolPolicy)
    tenants: list[TenantPolicy] = Field(default_factory=lambda: [TenantPolicy(name="default")])
    reconcile: ReconcilePolicy = ReconcilePolicy()
    detection: DetectionPolicy = DetectionPolicy()
    budget: BudgetPolicy = BudgetPolicy()
    load_balancer: LoadBalancerPolicy = LoadBalancerPolicy()
    local: LocalPlatformPolicy = Field(default_factory=LocalPlatformPolicy)

    @model_validator(mode="after")
    def _tenants_known(self) -> DRPolicy:
        known = {t.name for t in self.tenants}
        for model in self.models:
            if model.tenant not in known:
                raise ValueError(
                    f"model {model.name!r} names tenant {model.tenant!r}, which is not in tenants "
                    f"(known: {', '.join(sorted(known))})"
                )
        return self

    def tenant(self, name: str) -> TenantPolicy:
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        raise KeyError(name)

    @model_validator(mode="after")
    def _model_names_unique(self) -> DRPolicy:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model {model.name!r} is listed twice")
            seen.add(model.name)
        return self

    def model(self, name: str) -> ModelPolicy:
        """The policy of one model; raises ``KeyError`` with the known names when absent."""
        return self._models_by_name[name]

    def has_model(self, name: str) -> bool:
        return name in self._models_by_name

    @cached_property
    def _models_by_name(self) -> dict[str, ModelPolicy]:
        # A lookup by name is a dict's, not a scan of the list: reconcile asks once per instance.
        return {model.name: model for model in self.models}

    @property
    def zones(self) -> set[str]:
        """Every zone the policy names: the active ones and those of the pool's nodes."""
        return set(self.az_failover.active_zones) | {node.zone for node in self.gpu_pool.nodes}

    @property
    def checked_zones(self) -> list[str]:
        """The zones the zone health checks watch: :meth:`ZoneFailoverPolicy.checked_zones` of the
        pool's nodes."""
        return self.az_failover.checked_zones(node.zone for node in self.gpu_pool.nodes)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]
