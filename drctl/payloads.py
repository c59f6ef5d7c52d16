"""Typed payloads shared by workflows, activities and clients.

These are the wire format of every runbook: Temporal carries them as JSON through
``temporalio.contrib.pydantic``. The same JSON starts a failover from the CLI, an alert or the
Temporal UI's "Start Workflow" form. Pure data, no I/O.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

INSTANCE_ID_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,125}[a-z0-9])?$"

MODEL_NAME_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$"
"""DNS-label-like: safe in Envoy cluster names, workflow IDs, file names and Kubernetes labels."""

ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN, description="model name from the DR policy")]
InstanceId = Annotated[str, Field(pattern=INSTANCE_ID_PATTERN, description="instance id, e.g. llama-2-7b-0")]


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Trigger(StrEnum):
    """What started a runbook; recorded as a search attribute."""

    MANUAL = "manual"
    ALERT = "alert"
    PROBE = "probe"
    DRILL = "drill"
    GPU_HEALTH = "gpu-health"
    ZONE_FAILOVER = "zone-failover"
    """A zone failover's report of a serving instance of its zone (whoever started the zone failover:
    the zone checks, an alert, the CLI); before, these were recorded as ``alert``."""


class Role(StrEnum):
    """What an instance is for. Hot/warm/cold are the standby tiers of seed §4.1."""

    SERVING = "serving"
    HOT = "hot"
    WARM = "warm"
    COLD = "cold"
    PROMOTING = "promoting"
    FAILED = "failed"

    @property
    def is_standby(self) -> bool:
        return self in (Role.HOT, Role.WARM, Role.COLD)


class Instance(Payload):
    """One model instance as the platform sees it: the fields every platform has. A platform keeps
    its own details (the local platform's process id, a pod's name) in its own records."""

    id: InstanceId
    model: ModelName
    role: Role
    address: str | None = None
    """``host:port`` where the instance answers on its platform's network (a local process's
    loopback port, a pod's IP and container port); None while it has no process or pod (a cold
    standby)."""
    lb_priority: int | None = None
    """Priority in the load balancer (0 serves, 1 is the hot backup); None when not registered."""
    gpu: str | None = None
    zone: str | None = None
    node: str | None = None
    note: str = ""
    created_at: datetime | None = None
    """When the platform made this instance (a pod's creation time; the local platform's create).
    Reconciliation gives a replacement the id of the instance it replaces when that was the
    model's last: a failure reported before ``created_at`` was the earlier instance's, and the
    runbook probes this one before acting on the report. None: not known (made before it was kept)."""


class InstanceRef(Payload):
    model: ModelName
    instance: InstanceId
    epoch: int | None = None
    """The fencing epoch of the runbook acting (see ``EpochGrant``); None: not fenced (a read)."""


class ModelRef(Payload):
    model: ModelName


class InstanceList(Payload):
    model: str
    instances: list[Instance]
    duration_ms: float = 0.0
    serving_zones: list[str] = Field(default_factory=list)
    """Where serving belongs under the policy as the listing read it (``serving_zones`` of
    :mod:`drctl.policies.placement`: an active-passive policy's active zones; empty, every zone
    alike, when the policy names no standby zone). Recorded with the listing, so the failover's
    choice of standby replays from its history. Empty in listings recorded before it existed."""


class RegisterRequest(Payload):
    model: ModelName
    instance: InstanceId
    priority: Annotated[int, Field(ge=0, le=1)] = 0
    epoch: int | None = None


class EjectRequest(Payload):
    model: ModelName
    instance: InstanceId
    reason: str = ""
    epoch: int | None = None


class ProbeResult(Payload):
    instance: str
    healthy: bool
    detail: str
    duration_ms: float


class StepReport(Payload):
    """What an activity did and how long it took by its own clock (excludes orchestration)."""

    detail: str = ""
    duration_ms: float = 0.0


class FailoverRequest(Payload):
    """Input of ``FailoverWorkflow``. This exact JSON works in the Temporal UI's Start Workflow form."""

    model: ModelName
    instance: InstanceId
    reason: Annotated[str, Field(max_length=500)] = ""
    trigger: Trigger = Trigger.MANUAL
    failed_at: datetime | None = None
    """When the failure began, if known (an alert's startsAt, a drill's kill). RTO counts from here;
    without it, from the start of the workflow."""
    confirmed: bool = False
    """The failure is already established by the caller (its GPU is being drained, a zone failed
    over, the prober saw ``unhealthyThreshold`` failed probes): skip the confirm probe, which would
    see a process that still answers, or wait out a hung one's timeouts again."""
    prefer_zone: str | None = None
    """Try standbys in this zone first, tier by tier (a zone failover: the policy's standby zone).
    Without it, an active-passive policy's active zones go first within a tier, after the standbys
    away from the failed node (``InstanceList.serving_zones``, ``standby_candidates``)."""
    epoch: int | None = None
    """The fencing epoch the model's guardian claimed for this runbook; every promote, register and
    eject carries it, and the platform refuses a stale one. None: the run was started directly (the
    UI, ``temporal workflow start``): it hands the report to the guardian and follows the runbook
    the guardian runs, so that one failure still gets one recovery."""
    listing: InstanceList | None = None
    """The model's instances as listed right after the guardian claimed ``epoch`` (its
    ``claim_epoch`` step lists them): the runbook decides from this listing, recorded in its start,
    instead of listing again as a step of its own (a regular activity: a server round trip and a
    workflow task more per runbook). Used only with ``epoch``; None: the runbook lists itself."""
    plan_only: bool = False
    """Decide and report every step (instances touched, standby promoted), change nothing."""
    joined: list[str] = Field(default_factory=list)
    """Reports of this failure that joined its incident before the guardian started this run (the
    first few), listed in its result as those that join later are (signal ``joined``). Passed here
    rather than signalled right after the start: a signal that lands while the run's one workflow
    task completes makes the server refuse the completion, and the task (its local activities too)
    runs again."""
    joined_total: int = Field(default=0, ge=0)
    """How many reports joined before the start in all (``joined`` keeps the first few)."""
    local_activities: bool = True
    """Run the short steps as local activities (recorded as markers in the history, about one
    server round trip cheaper each; see docs/benchmarks.md). Loading a warm or cold standby always
    runs as a regular activity: it can take minutes and heartbeats. False: every step is a regular
    activity, each an ActivityTaskScheduled event in the UI."""
    switched: SwitchRecord | None = None
    """The failure was already recovered by a zone failover's batch (``ZoneFailoverWorkflow``
    switched the model to its hot standby in one activity with the rest of the zone): this run
    records that recovery, its steps and timings, as the model's runbook in the audit, and changes
    nothing. None: an ordinary runbook."""


class AlertResolved(Payload):
    """Signal ``alert_resolved`` to a failover started by an alert: Alertmanager says it resolved."""

    fingerprint: str
    ends_at: datetime | None = None


class FailoverOutcome(StrEnum):
    RUNNING = "running"
    RECOVERED = "recovered"
    FALSE_ALARM = "false-alarm"
    ALREADY_EJECTED = "already-ejected"
    """An earlier failover already took this instance out; nothing left to do."""
    STANDBY_EJECTED = "standby-ejected"
    """The failed instance was a standby: it was ejected; reconciliation replaces it."""
    NO_STANDBY = "no-standby"
    FAILED = "failed"
    JOINED = "joined"
    """Started directly (UI or CLI) for an instance: handed to the model's guardian, which ran (or
    was already running) the one recovering runbook; this run only followed it."""
    PLANNED = "planned"
    """Plan mode: what would be done, nothing changed."""


class StepTiming(Payload):
    step: str
    started_at: datetime
    duration_ms: float
    """As the workflow saw it: activity time plus scheduling."""
    activity_ms: float | None = None
    """As the activity measured itself."""
    ok: bool = True
    detail: str = ""


class FailoverResult(Payload):
    model: str
    instance: str
    outcome: FailoverOutcome
    reason: str = ""
    promoted: str | None = None
    tier: Role | None = None
    """The standby tier that took over; None for an emergency instance (see ``emergency``)."""
    emergency: bool = False
    """No standby could take over: a new serving instance was placed on the pool."""
    preempted: list[str] = Field(default_factory=list)
    """Lower-priority instances an emergency placement took capacity from."""
    eject_deferred: bool = False
    """True when the failed instance was the last serving one and was ejected only after its
    replacement served (the last-instance safety rule)."""
    steps: list[StepTiming] = Field(default_factory=list)
    started_at: datetime
    finished_at: datetime | None = None
    switch_ms: float | None = None
    """Workflow start to replacement verified."""
    rto_ms: float | None = None
    """Failure (``failed_at``, else workflow start) to replacement verified."""
    orchestration_ms: float | None = None
    """Workflow wall time minus the sum of the activities' own durations."""
    epoch: int | None = None
    joined: list[str] = Field(default_factory=list)
    """Other reports of the same failure that joined this run (prober, alerts, CLI, zone checks)."""
    joined_total: int = 0
    """How many joined in all (``joined`` keeps the first few)."""
    handled_by: str | None = None
    """Outcome ``joined``: the workflow id of the runbook that handled the failure."""
    plan: list[str] = Field(default_factory=list)
    """Plan mode: the steps it would take, in order."""
    alert_resolved: AlertResolved | None = None
    """Set when the alert that started the run resolved meanwhile. The run still trusts its own
    probe: a healthy instance at confirm ends it as a false alarm; a dead one is failed over."""


class SwitchRecord(Payload):
    """One model's switch to its hot standby, done in a zone failover's batch (see
    ``FailoverRequest.switched``)."""

    standby: str
    tier: Role = Role.HOT
    epoch: int
    steps: list[StepTiming] = Field(default_factory=list)
    started_at: datetime
    verified_at: datetime
    handled_by: str
    """The ``ZoneFailoverWorkflow`` whose batch switched it."""


FailoverRequest.model_rebuild()


class ZoneSwitch(Payload):
    """A zone failover's decision for one failed serving instance: switch to ``standby`` (hot, out
    of the failed zone) under ``epoch``, claimed for the model with the listing it was decided from."""

    model: str
    instance: str
    standby: str
    epoch: int
    defer_eject: bool = True
    """The failed instance is the model's last serving one: ejected once the standby serves."""
    started_at: datetime


class ZoneSwitchClaim(Payload):
    """The serving instances of a failed zone that a zone failover may switch in one batch."""

    zone: str
    instances: list[InstanceRef]
    prefer_zone: str | None = None
    lease: str
    """The zone failover's lease: models under any other lease are busy with a recovery of their own."""


class ZoneSwitchPlan(Payload):
    switches: list[ZoneSwitch] = Field(default_factory=list)
    left: dict[str, str] = Field(default_factory=dict)
    """Instance → why it is left to its model's guardian (a recovery of the model already runs, no
    hot standby out of the zone, a second failed instance of the model)."""
    duration_ms: float = 0.0


class ZoneSwitchBatch(Payload):
    switches: list[ZoneSwitch]
    reason: str = ""
    handled_by: str
    """The zone failover's workflow id: each switch's record names it."""
    at_once: int = 16


class ZoneSwitchDone(Payload):
    model: str
    instance: str
    standby: str
    switched: bool
    stale: bool = False
    """A newer runbook of the model claimed a higher epoch: nothing more was done here."""
    detail: str = ""
    record: str | None = None
    """The workflow id of the ``FailoverWorkflow`` that records the switch."""


class ZoneSwitchOutcomes(Payload):
    done: list[ZoneSwitchDone] = Field(default_factory=list)
    duration_ms: float = 0.0


class ActivityName:
    """Activity type names. Workflows call activities by these names so any implementation (local,
    Kubernetes, a test fake) registers under the same name."""

    PROBE_INSTANCE = "probe_instance"
    LIST_INSTANCES = "list_instances"
    EJECT_INSTANCE = "eject_instance"
    PROMOTE_STANDBY = "promote_standby"
    LOAD_MODEL = "load_model"
    REGISTER_INSTANCE = "register_instance"
    VERIFY_SERVING = "verify_serving"
    REQUEST_RECONCILE = "request_reconcile"
    OBSERVE_FLEET = "observe_fleet"
    PLAN_RECONCILE = "plan_reconcile"
    CORDON_GPU = "cordon_gpu"
    CORDON_GPUS = "cordon_gpus"
    UNCORDON_GPU = "uncordon_gpu"
    CREATE_INSTANCE = "create_instance"
    RETIER_INSTANCE = "retier_instance"
    DELETE_INSTANCE = "delete_instance"
    APPLY_CHANGES = "apply_changes"
    RESTORE_CHECKPOINT = "restore_checkpoint"
    CLAIM_EPOCH = "claim_epoch"
    REPORT_FAILURE = "report_failure"
    REQUEST_LEASE = "request_lease"
    AWAIT_RUNBOOKS = "await_runbooks"
    REPORT_AND_AWAIT = "report_and_await"
    HAND_BACK_LEASE = "hand_back_lease"
    AWAIT_RECONCILE_PASS = "await_reconcile_pass"
    AWAIT_ZONE_FAILOVERS = "await_zone_failovers"
    PLAN_ZONE_SWITCH = "plan_zone_switch"
    SWITCH_ZONE_TO_HOT = "switch_zone_to_hot"
    BUDGET_ALERT = "raise_budget_alert"
    DRILL_PREPARE = "drill_prepare"
    DRILL_RUN = "drill_run"
    DRILL_RESTORE = "drill_restore"
    DRILL_REPORT = "drill_report"


class ErrorType:
    """Application error types that activities raise and workflows treat as final (non-retryable)."""

    UNKNOWN_INSTANCE = "UnknownInstance"
    UNKNOWN_MODEL = "UnknownModel"
    MODEL_LOAD_FAILED = "ModelLoadFailed"
    NOT_A_STANDBY = "NotAStandby"
    INSTANCE_FAILED = "InstanceFailed"
    DRILL_NOT_READY = "DrillNotReady"
    """The fleet is not at the policy's redundancy (or the platform cannot run the drill): nothing injected."""
    CHECKPOINT_CORRUPT = "CheckpointCorrupt"
    """The checkpoint failed its checksum while loading: restore a good copy, then load again."""
    STALE_EPOCH = "StaleEpoch"
    """A newer runbook of the model claimed a higher fencing epoch: this step must change nothing."""
    GUARDIAN_CLOSED = "GuardianClosed"
    """The model's guardian has closed (failed, terminated) with the incident waited for still open."""


class SearchAttr:
    """Custom search attributes registered by ``drctl up`` and set on every runbook."""

    MODEL = "DrctlModel"
    INSTANCE = "DrctlInstance"
    TRIGGER = "DrctlTrigger"
    OUTCOME = "DrctlOutcome"
    TIER = "DrctlTier"
    RTO_MS = "DrctlRtoMs"

    KEYWORDS = (MODEL, INSTANCE, TRIGGER, OUTCOME, TIER)
    INTS = (RTO_MS,)


RECONCILE_SCHEDULE_ID = "drctl-reconcile-standbys"
RECONCILE_WORKFLOW_ID = "reconcile-standbys"


def unknown_instance_message(model: str, instance: str, known: list[str]) -> str:
    """What an ``UnknownInstance`` error says, where the platform raises it and where a runbook
    started directly refuses a wrong id before reporting it."""
    return f"{model} has no instance {instance!r} (known: {', '.join(known) or 'none'})"


def failover_workflow_id(model: str, instance: str) -> str:
    """One failover per failed instance: a second start with this ID joins the running one."""
    return f"failover-{model}-{instance}"


# -- standby reconciliation -------------------------------------------------------------------------


class ReconcileActionKind(StrEnum):
    CREATE = "create"
    """Start a new instance of a tier on the GPU placement chose (a cold one only reserves)."""
    RETIER = "retier"
    """Move an existing standby to another tier (a surplus warm standby becomes the missing hot)."""
    DELETE = "delete"
    """Remove a surplus instance: out of the load balancer, process stopped, record dropped."""


class ReconcileAction(Payload):
    kind: ReconcileActionKind
    model: str
    instance: str
    epoch: int | None = None
    """The model's fencing epoch when the fleet was observed: the platform refuses the action if a
    failover has claimed a newer one since (it acts on a fleet that has changed)."""
    tier: Role
    """Tier after the action (for DELETE: the tier it had)."""
    gpu: str | None = None
    node: str | None = None
    zone: str | None = None
    preempts: list[str] = Field(default_factory=list)
    """Instances placement takes capacity from (quota reclaim or a critical emergency)."""
    reason: str = ""


class ReconcileRequest(Payload):
    """Input of ``ReconcileStandbysWorkflow``; ``{}`` reconciles every model."""

    models: list[ModelName] | None = None
    dry_run: bool = False


class FleetSnapshot(Payload):
    """What exists now, with the policy it is measured against (read by one activity)."""

    epochs: dict[str, int] = Field(default_factory=dict)
    """Each model's fencing epoch when observed (absent: 0)."""
    busy_models: dict[str, str] = Field(default_factory=dict)
    """Models with a recovery in flight or waiting for the budget → its runbook: reconcile leaves
    them alone (told by the budget, not inferred from counts)."""
    zones_failing_over: list[str] = Field(default_factory=list)
    """Zones failing over: their ``ZoneFailoverWorkflow`` or its budget lease runs (each for at most
    ``ZONE_FAILOVER_FIRST_FOR``). Meanwhile reconciliation makes no new standbys
    (``drctl.policies.reconcile.zone_failover_first``)."""

    cordoned_gpus: list[str] = Field(default_factory=list)
    """GPUs kept out of placement (drained after a GPU failure)."""
    hung_gpus: list[str] = Field(default_factory=list)
    """GPUs of nodes the platform sees hung now (``SeesHungNodes``): placement does not choose
    them, but unlike a cordon nothing on them is moved for it (absent in snapshots from before the
    field: none)."""
    highest_indexes: dict[str, int] = Field(default_factory=dict)
    """Model → the highest index its instances' ids have had, deleted ones included, where the
    platform keeps it (``KeepsIndexes``): a new instance is named past it, never after a deleted one."""
    policy: dict[str, object]
    """The DR policy as plain data (``DRPolicy.model_dump``), so a workflow sees one consistent
    version for its whole run, even if the file changes meanwhile."""
    instances: list[Instance]


class ReconcilePacing(Payload):
    """How many of a pass's changes run at once (the policy's ``reconcile`` section)."""

    parallel_changes: int = Field(ge=1)
    loads_per_node: int = Field(ge=1)


class ReconcilePlan(Payload):
    actions: list[ReconcileAction] = Field(default_factory=list)
    unplaceable: list[str] = Field(default_factory=list)
    """Wanted instances placement could not fit, each with the reason."""
    skipped_models: list[str] = Field(default_factory=list)
    """Models left alone this round (an instance is mid-promotion: a failover is running)."""
    violations: list[str] = Field(default_factory=list)
    """Placement against anti-affinity or spread where the pool has a better place (a standby on a
    node or zone of its model's serving instances, beside a serving instance or its own model on a
    GPU; serving instances sharing a node or a GPU), each with what this plan does about it."""
    moves: dict[str, str] = Field(default_factory=dict)
    """Moves of misplaced standbys: new instance → the one it replaces. The new one is created
    first and the old one deleted only once it exists: the model never has fewer standbys."""
    after_zone_failover: list[str] = Field(default_factory=list)
    """Zones failing over when planned: the plan makes no new standbys
    (``drctl.policies.reconcile.zone_failover_first``), and its pass waits for those failovers to
    hand their lease back, then plans again."""
    cordoned: list[str] = Field(default_factory=list)
    """The GPUs cordoned in the fleet the plan was made from."""
    pacing: ReconcilePacing | None = None
    """How many changes at once, from the policy when planned. None in a plan made before it was
    recorded here: that pass deletes one at a time and creates four at a time, as it did."""


PASS_WAITED = "waited: "
"""How a reconciliation pass's ``applied`` line of a wait for a zone failover begins."""


class ReconcileResult(Payload):
    plan: ReconcilePlan
    dry_run: bool
    applied: list[str] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    waits: int = 0
    """How often the pass waited for a zone failover and planned again (each wait is also a line of
    ``applied``). 0 in results of passes from before this field, which only have the lines."""


class InstanceChange(Payload):
    """Input of the create/retier/delete activities."""

    action: ReconcileAction


class ZoneNames(Payload):
    """Input of ``await_zone_failovers``."""

    zones: list[str]
    cordoned: list[str] | None = None
    """The GPUs cordoned when the waiting pass planned (``ReconcilePlan.cordoned``): the wait ends
    as soon as they differ, so the pass plans again on the zone failover's cordon. None (a pass
    from before): waits for the zone failover only."""


class ChangeBatch(Payload):
    """Input of ``apply_changes``: a pass's changes applied side by side in one activity, at most
    ``loads_per_node`` of those that load a model on one node at once."""

    actions: list[ReconcileAction]
    loads_per_node: int = Field(ge=1)


class ChangeOutcome(Payload):
    """What became of one change of a batch: ``detail`` when done, else ``error`` (and its
    ``error_type``, an :class:`ErrorType`, where the platform gave one)."""

    instance: str
    detail: str = ""
    error: str | None = None
    error_type: str | None = None


class ChangeOutcomes(Payload):
    outcomes: list[ChangeOutcome] = Field(default_factory=list)
    """In the order of the batch's actions."""


# -- GPU drain ----------------------------------------------------------------------------------------


class DrainGpuRequest(Payload):
    """Input of ``DrainGpuWorkflow``: move everything off one GPU and keep it out of placement."""

    gpu: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]*/[0-9]{1,3}$", description="GPU id, {node}/{index}")]
    reason: Annotated[str, Field(max_length=500)] = ""


class CordonGpusRequest(Payload):
    """Input of the ``cordon_gpus`` activity: keep every GPU of a failed zone out of placement in
    one activity (a zone failover's cordon)."""

    gpus: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]*/[0-9]{1,3}$")]] = Field(max_length=4096)
    reason: Annotated[str, Field(max_length=500)] = ""


class DrainGpuResult(Payload):
    gpu: str
    failovers: list[str] = Field(default_factory=list)
    """Serving instances failed over (each its own FailoverWorkflow, as a child)."""
    deleted: list[str] = Field(default_factory=list)
    """Standbys removed from the GPU (reconciliation recreates them elsewhere)."""
    failed: list[str] = Field(default_factory=list)


def drain_workflow_id(gpu: str) -> str:
    return "drain-gpu-" + gpu.replace("/", "-")


def gpu_of_drain_workflow_id(workflow_id: str) -> str:
    """The inverse of :func:`drain_workflow_id`: ``drain-gpu-gpu-node-0-3`` → ``gpu-node-0/3``."""
    node, _, index = workflow_id.removeprefix(drain_workflow_id("")).rpartition("-")
    return f"{node}/{index}"


# -- zone failover ------------------------------------------------------------------------------------


class ZoneFailoverRequest(Payload):
    """Input of ``ZoneFailoverWorkflow``: move the serving of every model out of ``zone``."""

    zone: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,63}$")]
    reason: Annotated[str, Field(max_length=500)] = ""
    approved: bool = False
    """Pre-approved (the policy's ``requireApproval`` is then satisfied at once)."""
    plan_only: bool = False
    """Decide and list what would be done (GPUs cordoned, each serving instance and the standby it
    would promote, the budget used), change nothing."""


class ZoneApproval(Payload):
    """The ``approve`` Update of a zone failover waiting for an operator."""

    approver: Annotated[str, Field(min_length=1, max_length=100)]
    comment: str = ""


class ZoneFailoverResult(Payload):
    zone: str
    approved_by: str | None = None
    moved: list[str] = Field(default_factory=list)
    """``instance → replacement`` for each serving instance failed over out of the zone."""
    failed: list[str] = Field(default_factory=list)
    pending: list[str] = Field(default_factory=list)
    """Serving instances in the zone not handled yet (progress while it runs)."""
    switching: list[str] = Field(default_factory=list)
    """Serving instances the zone failover's batch is switching to their hot standbys now: they
    come into ``moved`` (or go to their guardians) together, when the batch ends."""
    cordoned_gpus: list[str] = Field(default_factory=list)
    reconcile: str = ""
    """Reconciliation requested at the end, so standbys leave the cordoned zone at once."""
    plan: list[str] = Field(default_factory=list)
    """Plan mode: what it would do, in order."""


def zone_failover_workflow_id(zone: str) -> str:
    return f"zone-failover-{zone}"


class ZoneFailbackResult(Payload):
    zone: str
    uncordoned_gpus: list[str] = Field(default_factory=list)
    reconcile: str = ""
    plan: list[str] = Field(default_factory=list)
    """With ``plan_only``: what the failback would do, one line per step; nothing changed."""


def zone_failback_workflow_id(zone: str) -> str:
    return f"zone-failback-{zone}"


# -- drills ----------------------------------------------------------------------------------------


class DrillScenario(StrEnum):
    """The seed's fault-injection scenarios (§5.2's SLA table)."""

    POD_CRASH = "pod-crash"
    """kill -9 of the serving instance (Kubernetes: its pod deleted with grace period 0)."""
    NODE_DOWN = "node-down"
    """Every instance of the serving instance's node, and its node agent, stop answering (SIGSTOP;
    Kubernetes: the Node cordoned, tainted ``NoExecute`` and marked NotReady)."""
    GPU_FAILURE = "gpu-failure"
    """The node agent reports a drain-class Xid (79, fallen off the bus) for the serving GPU."""
    ZONE_OUTAGE = "zone-outage"
    """Every node of the serving instance's zone down (SIGSTOP of instances and node agents;
    Kubernetes: node-down for every Node labelled with the zone)."""
    MODEL_CORRUPTION = "model-corruption"
    """The model's checkpoint is corrupted and the serving instance reloads it: the checksum fails
    (Kubernetes: the weights file in the serving pod, overwritten through ``pods/exec``, only where
    the pod has a copy of its own; the shared model store is never written)."""


class DrillRequest(Payload):
    """``drctl drill SCENARIO [--model M]``, or the JSON a Temporal Schedule starts ``DrillWorkflow`` with."""

    scenario: DrillScenario
    model: ModelName | None = None
    """The model whose serving instance is hit; default: the policy's most critical model."""
    rps: Annotated[int, Field(ge=1, le=1000)] = 50
    """Requests per second the load generator sends through the load balancer."""
    baseline_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    """Load before the fault is injected."""
    tail_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    """Load after redundancy is back."""
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 180.0
    """Give up waiting for recovery after this long (the fault is restored anyway)."""
    ready_wait_s: Annotated[float, Field(ge=0, le=3600)] = 60.0
    """Wait this long for the model to be at its policy's redundancy before refusing (a previous
    drill's replenishment may still be loading)."""


class DrillTarget(Payload):
    """What a drill hits, chosen before anything is injected."""

    scenario: DrillScenario
    model: str
    instance: str
    """The model's serving instance: the one whose failover the figures measure."""
    node: str | None = None
    gpu: str | None = None
    zone: str | None = None
    policy_rto_ms: float
    sla_detection_ms: float
    sla_switch_ms: float
    sla_rto_ms: float


class DrillPlan(Payload):
    request: DrillRequest
    target: DrillTarget


class NodeFault(Payload):
    """What a drill did to one Kubernetes Node, part by part, each recorded before it is written
    (restore undoes a part only where it finds it in place, so a part that never got written is
    left alone)."""

    node: str
    cordoned: bool = False
    """``spec.unschedulable`` set (the node was schedulable): uncordoned on restore."""
    tainted: bool = False
    """The taint ``drctl.io/drill=node-down:NoExecute`` added (it had none): removed on restore."""
    not_ready: bool = False
    """Its ``Ready`` condition set False (reason ``DrctlDrill``) through the Node's status."""
    previous_ready: dict[str, str] | None = None
    """The ``Ready`` condition it had before (None: none), put back on restore while ours is there."""


class PodCorruption(Payload):
    """A weights file a model-corruption drill overwrote inside a Kubernetes pod, recorded before
    the write (restore compares the bytes with ``original`` to tell whether it was written)."""

    pod: str
    uid: str | None = None
    """The pod's uid: a pod of the same name made later is not this one."""
    container: str
    path: str
    """The file as the container sees it, symlinks resolved."""
    length: int
    """Bytes overwritten from offset 0."""
    original: str
    """Those bytes before the write, in hex."""


class InjectedFault(Payload):
    """What was done, so that ``restore`` can undo exactly that. Filled in as the injection goes, so a
    half-done injection is restored too."""

    injected_at: datetime
    detail: str = ""
    stopped_pids: list[int] = Field(default_factory=list)
    xid_agents: list[str] = Field(default_factory=list)
    """Node agent URLs that got an injected Xid (cleared with ``DELETE /faults``)."""
    corrupted: list[str] = Field(default_factory=list)
    """Checkpoint paths that were corrupted."""
    deleted_pods: list[str] = Field(default_factory=list)
    """Kubernetes: pods deleted with grace period 0 (nothing to undo: their Deployment replaces them)."""
    nodes: list[NodeFault] = Field(default_factory=list)
    """Kubernetes: Nodes taken down (cordon, ``NoExecute`` taint, NotReady), as far as it went."""
    corrupted_in_pods: list[PodCorruption] = Field(default_factory=list)
    """Kubernetes: weights files overwritten inside pods (restore deletes a pod still holding one)."""


class LoadBucket(Payload):
    """Requests answered in one 100 ms slice, counted from the fault (negative: before it)."""

    t_ms: int
    ok: int = 0
    failed: int = 0


class RunbookMark(Payload):
    """A runbook step on the drill's timeline (ms from the fault)."""

    runbook: str
    step: str
    at_ms: float
    duration_ms: float
    ok: bool = True


class DrillMeasurement(Payload):
    fault: InjectedFault
    recovered: bool
    """The serving instance's failover recovered and the model's redundancy is back."""
    detection_ms: float | None = None
    """Fault → the first runbook for it started (prober, node agent or zone check)."""
    switch_ms: float | None = None
    """Runbook start → the replacement verified serving through the load balancer."""
    rto_ms: float | None = None
    """Fault → the replacement serving (detection + switch)."""
    redundancy_ms: float | None = None
    """Fault → the policy's standbys for the model are back."""
    zone_failover_ms: float | None = None
    """Zone outage: fault → the zone health checks started ``ZoneFailoverWorkflow``."""
    requests: int = 0
    failed_requests: int = 0
    """Requests sent after the fault was in place that did not get a 200 (judged: zero with a hot standby)."""
    lost_in_flight: int = 0
    """Requests sent before the fault was fully injected that did not get a 200: in flight when the
    process stopped or died, possibly mid-response, which no load balancer can retry (the seed's
    "data loss: in-flight requests"). Reported, not judged."""
    worst_latency_ms: float | None = None
    """Slowest successful request after the fault (retries through Envoy included)."""
    streams: int = 0
    """Streamed chat completions opened after the fault (one is open at all times)."""
    streams_failed: int = 0
    """Of those, the ones that did not end with ``[DONE]``. Reported, not judged."""
    streams_cut: int = 0
    """Streams open when the fault was injected that did not end with ``[DONE]``: cut mid-response
    (the stream's share of "in-flight requests may be lost"). Reported, not judged."""
    streams_by_replacement: int = 0
    """Streams after the fault that the promoted instance served (new streams reach the replacement)."""
    promoted: str | None = None
    promoted_tier: str | None = None
    runbooks: list[str] = Field(default_factory=list)
    """Workflow ids of the runbooks the fault started (failovers, drain, zone failover, reconcile)."""
    zones_failed_over: list[str] = Field(default_factory=list)
    """Zones a ``ZoneFailoverWorkflow`` started by the fault failed over (the drill fails them back)."""
    gpus_drained: list[str] = Field(default_factory=list)
    """GPUs a ``DrainGpuWorkflow`` started by the fault drained (the drill uncordons them)."""
    marks: list[RunbookMark] = Field(default_factory=list)
    buckets: list[LoadBucket] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    error: str | None = None
    """The run broke off (the fault, as far as it was injected, is in ``fault`` and is restored)."""


class DrillRestore(Payload):
    detail: list[str] = Field(default_factory=list)


class DrillReportRequest(Payload):
    request: DrillRequest
    target: DrillTarget
    measurement: DrillMeasurement | None
    restore: list[str]
    error: str | None = None
    drill_id: str


class DrillReport(Payload):
    drill_id: str
    scenario: DrillScenario
    target: DrillTarget
    measurement: DrillMeasurement | None
    restore: list[str]
    error: str | None = None
    verdicts: dict[str, str] = Field(default_factory=dict)
    """Figure → "pass: …" or "FAIL: …" against the policy's RTO and the seed's SLA."""
    passed: bool = False
    files: dict[str, str] = Field(default_factory=dict)
    """json / markdown / png → path of the written report."""


def drill_workflow_id(scenario: str, model: str | None) -> str:
    return f"drill-{scenario}-{model or 'default'}"


# -- one recovery per failure: the model's guardian, the fleet's budget, fencing ----------------------


DEFAULT_TASK_QUEUE = "drctl"


def guardian_workflow_id(model: str, task_queue: str = DEFAULT_TASK_QUEUE) -> str:
    """One guardian per model (per drctl deployment: its task queue), to which every report of a
    failure of the model goes."""
    return f"guardian-{model}" if task_queue == DEFAULT_TASK_QUEUE else f"guardian-{task_queue}-{model}"


def reconcile_pass_workflow_id(task_queue: str = DEFAULT_TASK_QUEUE) -> str:
    """The one reconciliation pass that may change the fleet at a time (per drctl deployment): every
    reconcile run makes its changes in a child workflow with this ID, so Temporal's ID uniqueness
    keeps two passes from planning on the same fleet at once."""
    return "reconcile-pass" if task_queue == DEFAULT_TASK_QUEUE else f"reconcile-pass-{task_queue}"


def budget_workflow_id(task_queue: str = DEFAULT_TASK_QUEUE) -> str:
    """One budget per drctl deployment (its task queue)."""
    return "drctl-budget" if task_queue == DEFAULT_TASK_QUEUE else f"drctl-budget-{task_queue}"


BUDGET_WORKFLOW_ID = budget_workflow_id()

WORKFLOW_TASK_TIMEOUT = timedelta(seconds=2)
"""Workflow task timeout of the guardians, the budget and every runbook (Temporal's default is
10 s): a worker killed while it holds a workflow task costs at most this much before another worker
(or the restarted one) takes the task over."""


class EpochGrant(Payload):
    """A fencing epoch: it only grows, per model; the platform refuses a step carrying an older one."""

    model: str
    epoch: int
    detail: str = ""
    duration_ms: float = 0.0
    listing: InstanceList | None = None
    """The model's instances, listed just after the claim (no runbook of an older epoch can change
    them any more): the guardian hands it to the runbook it starts (``FailoverRequest.listing``).
    None when the listing failed (the runbook then lists itself) or in grants recorded before."""


class FailureReport(Payload):
    """One report that an instance failed, from any trigger: the input of the guardian's ``report``
    Update. The same JSON works from the Temporal UI (an Update on ``guardian-{model}``)."""

    request: FailoverRequest
    reporter: Annotated[str, Field(max_length=200)] = ""
    """Who says so: ``prober``, ``alert <fingerprint>``, ``cli user@host``, ``zone-failover-az-1``…"""
    zone_level: bool = False
    """Part of a zone failover decided at the zone level: its lease skips the per-zone cap and rate."""
    lease: str | None = None
    """The zone-level lease this report runs under (a zone failover's, held in the budget for the
    whole zone): the guardian starts its runbook without asking the budget, and the reporter bounds
    how many run at once. None: the guardian asks the budget for the incident."""


class IncidentState(StrEnum):
    QUEUED = "queued"
    """Waiting for the model's earlier incident to finish, or for the budget."""
    RUNNING = "running"
    DONE = "done"


class IncidentTicket(Payload):
    """What the guardian answers to a report: the incident's runbook, and whether this report
    started it or joined one already open (or just closed)."""

    model: str
    instance: str
    workflow_id: str
    joined: bool
    state: IncidentState
    opened_at: datetime
    """Identifies the incident (with ``instance``): its workflow id is not enough, as an earlier
    incident of the instance may have used it, and a taken id is replaced by ``…-e{epoch}``."""
    outcome: FailoverOutcome | None = None
    detail: str = ""
    run_id: str | None = None
    """The runbook's run, when it had one as the guardian answered (always, under a zone
    failover's lease: the answer waits for it)."""


class Incident(Payload):
    """One failed instance of the model, and the one runbook that recovers it."""

    instance: str
    workflow_id: str
    request: FailoverRequest
    reporter: str = ""
    state: IncidentState = IncidentState.QUEUED
    zone_level: bool = False
    epoch: int | None = None
    run_id: str | None = None
    """The runbook's run, once started."""
    joined: list[str] = Field(default_factory=list)
    joined_total: int = 0
    opened_at: datetime
    closed_at: datetime | None = None
    outcome: FailoverOutcome | None = None
    waiting_for: str = ""
    """Why it has not started yet (the budget's reason), shown by ``drctl status``."""
    lease: str | None = None
    """The zone failover's lease it runs under (:attr:`FailureReport.lease`): no budget request."""
    asked_budget: bool = False
    """It asked the budget for a lease of its own (hand it back when it closes, even if a zone
    failover's lease let it start first)."""


class GuardianState(Payload):
    """What a guardian carries over continue-as-new."""

    model: ModelName
    queue: list[Incident] = Field(default_factory=list)
    recent: list[Incident] = Field(default_factory=list)
    """Closed incidents, newest last (bounded): a late report of a recovered failure joins them."""
    reports: int = 0


class LeaseKind(StrEnum):
    INSTANCE = "instance"
    ZONE = "zone"
    """Part of a zone failover that was decided (and approved) at the zone level: not held to the
    per-zone cap or the rate, which would only slow down a decision already made."""


class LeaseRequest(Payload):
    """A guardian asks the budget for room to run one incident's runbook."""

    holder: str
    """The guardian's workflow id (the grant is signalled there)."""
    incident: str
    """The runbook's workflow id."""
    model: str
    instance: str | None = None
    zone: str | None = None
    """The failed instance's zone (the requesting activity looks it up): the per-zone cap."""
    kind: LeaseKind = LeaseKind.INSTANCE
    requested_at: datetime | None = None
    granted_at: datetime | None = None
    max_per_minute: int = 120
    max_per_zone: int = 3
    trip_after_waiting: int = 50
    """The policy's budget as the requesting activity read it (the budget follows the newest)."""
    max_parallel_zone: int | None = None
    """Zone-level recoveries running at once, fleet-wide (the policy's ``maxParallelFailovers``):
    a zone failover hands the budget every failover of the zone at once and the budget starts them
    this many at a time. None: no cap (a request from before the cap existed)."""
    rank: int = 0
    """The model's priority rank (critical highest), filled in by the requesting activity: zone-level
    requests waiting for ``max_parallel_zone`` start highest first."""
    slots: int = 1
    """Recoveries this lease stands for. A zone failover takes one zone-level lease for its whole
    zone with ``maxParallelFailovers`` slots (fewer when the zone has fewer serving instances) and
    runs that many runbooks at once under it, their guardians asking nothing more of the budget."""
    covers: list[str] = Field(default_factory=list)
    """Models a zone failover's lease recovers: busy for reconciliation while the lease is held."""


class LeaseAnswer(Payload):
    granted: bool
    """Granted at once; otherwise the budget signals ``lease_granted`` when it is."""
    detail: str = ""
    duration_ms: float = 0.0


class LeaseGrant(Payload):
    incident: str
    granted_at: datetime


class LeaseRelease(Payload):
    incident: str


class BudgetReset(Payload):
    """The budget's ``reset`` Update: a person closes the tripped breaker (``drctl budget reset``)."""

    actor: Annotated[str, Field(min_length=1, max_length=100)]
    comment: Annotated[str, Field(max_length=500)] = ""


class InstanceAlertResolved(Payload):
    """Signal ``alert_resolved`` to a guardian: the alert about ``instance`` resolved."""

    instance: InstanceId
    resolved: AlertResolved


class BudgetState(Payload):
    """The fleet's blast-radius budget: what it carries over continue-as-new, and what its query
    ``state`` (``drctl budget``) shows."""

    running: list[LeaseRequest] = Field(default_factory=list)
    waiting: list[LeaseRequest] = Field(default_factory=list)
    why_waiting: dict[str, str] = Field(default_factory=dict)
    starts: list[datetime] = Field(default_factory=list)
    """Grants of the last minute (the rate window)."""
    tripped: str | None = None
    """Why the breaker tripped (manual mode): nothing more starts until a person resets it."""
    tripped_at: datetime | None = None
    resets: list[str] = Field(default_factory=list)
    granted_total: int = 0
    most_waiting: int = 0
    """The most requests ever waiting at once."""
    most_running_per_zone: int = 0
    """The most instance-level recoveries ever running at once in one zone (the nemesis checks it
    against ``max_per_zone``)."""
    max_per_minute: int = 120
    max_per_zone: int = 3
    trip_after_waiting: int = 50
    max_parallel_zone: int | None = None
    failed_over: dict[str, datetime] = Field(default_factory=dict)
    """Zones whose failover handed its lease back, and when: for ``FAILED_OVER_COVERS_FOR`` after,
    a recovery in one still counts as zone-level (``decide(failed_over=...)``)."""


class RunbookOutcome(Payload):
    """The end of one runbook, as a caller waiting for it through an activity sees it."""

    workflow_id: str
    outcome: str
    promoted: str | None = None
    detail: str = ""


class RunbookOutcomes(Payload):
    outcomes: list[RunbookOutcome] = Field(default_factory=list)


class ReportBatch(Payload):
    """Failure reports a runbook (zone failover, drain, a direct start) hands to the guardians."""

    reports: list[FailureReport]
    at_once: int | None = None
    """Report-and-follow (``report_and_await``): at most this many reported and not yet recovered at
    once, in order. None: all at once."""


class IncidentTickets(Payload):
    tickets: list[IncidentTicket] = Field(default_factory=list)


class RunbookIds(Payload):
    """Incidents to wait for (heartbeating) until each has closed, with its runbook's outcome."""

    tickets: list[IncidentTicket]
    at_once: int | None = None
    """Follow at most this many at a time, in order (a zone failover's whole zone: the budget starts
    them ``maxParallelFailovers`` at a time, so watching more would only poll waiting guardians).
    None: all at once."""
