"""The nemesis in CI: a few seeded rounds of faults and duplicate triggers on a real stack under load,
the invariants checked after each (``bench/chaos.py`` runs many more); the checks themselves shown
to fail on broken state; and the guardian bug the nemesis found, pinned on the time-skipping server."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import (
    Interceptor,
    SignalChildWorkflowInput,
    Worker,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from drctl.payloads import (
    BudgetState,
    FailoverOutcome,
    FailoverRequest,
    FailureReport,
    GuardianState,
    Incident,
    IncidentState,
    IncidentTicket,
    Instance,
    LeaseRequest,
    ReconcileAction,
    ReconcileActionKind,
    Role,
    Trigger,
    guardian_workflow_id,
)
from drctl.platforms.local import processes
from drctl.platforms.local.envoy import HostStatus
from drctl.platforms.local.platform import LocalPlatform
from drctl.platforms.local.registry import LocalInstance
from drctl.policies.loader import load_policy_file
from drctl.settings import DrctlSettings
from drctl.temporal.incidents import guardian_state, report_failure, runbook_result
from drctl.workflows.budget import BudgetWorkflow
from drctl.workflows.failover import FailoverWorkflow
from drctl.workflows.guardian import ModelGuardianWorkflow
from tests.chaos.nemesis import (
    EXAMPLE_POLICY,
    ChaosStack,
    FaultKind,
    Injected,
    Nemesis,
    RoundReport,
    chaos_stack,
    fleet_problems,
    invariant_violations,
    plan_round,
    summarize,
)
from tests.workflows.fakes import FakeFleet

# -- the nemesis on a real stack -------------------------------------------------------------------

SEED = 373
"""Its first three rounds draw every kind of fault but ``duplicates`` (whose extra reports its
instance faults carry anyway): SIGSTOP of a serving instance reported again by the CLI and an alert,
kill -9 of Temporal and of the worker during that recovery; kill -9 of a hot standby reported again,
a flap, a serving instance killed; SIGSTOP of a hot standby and kill -9 of Envoy."""
ROUNDS = (1, 2, 3)


@pytest.fixture(scope="module")
async def chaos(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ChaosStack]:
    async with chaos_stack(tmp_path_factory.mktemp("chaos")) as stack:
        yield stack


@pytest.mark.integration
async def test_seeded_faults_and_duplicate_triggers_under_load_keep_the_invariants(chaos: ChaosStack) -> None:
    said: list[str] = []
    nemesis = Nemesis(chaos, SEED, quiesce_timeout_s=60.0, say=said.append)
    reports: list[RoundReport] = []
    for round_no in ROUNDS:
        reports.append(await nemesis.run_round(round_no))  # raises InvariantViolation, with seed and round
        print(reports[-1].line())
    summary = summarize(reports)
    print(summary)

    # What the rounds did (a plan generator that stops drawing these would make this test weaker).
    assert set(summary["faults"]) == set(FaultKind) - {FaultKind.DUPLICATES}
    injected = [i for r in reports for i in r.injected]
    assert len(injected) >= 6 and summary["duplicate_reports"] >= 6
    assert {i.how for i in injected} == {"SIGKILL", "SIGSTOP"}
    assert {i.role for i in injected} == {Role.SERVING, Role.HOT}
    # Each failure: closed by its one runbook, every extra report counted on it.
    for fault in injected:
        assert fault.recover_s is not None and fault.recover_s < 30, (fault.instance, fault.recover_s)
        assert fault.joined_total >= len(fault.reporters) - 1, fault
    # Every killed part came back and did its job again.
    assert {k.kind for r in reports for k in r.infra} == {
        FaultKind.KILL_WORKER,
        FaultKind.KILL_TEMPORAL,
        FaultKind.KILL_ENVOY,
    }
    assert all(k.back_s is not None for r in reports for k in r.infra), [r.infra for r in reports]
    assert summary["requests_ok"] > 100
    assert not summary["lingering"], summary["lingering"]


# -- the checks fail on broken state ---------------------------------------------------------------

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _incident(instance: str, outcome: FailoverOutcome | None, **changes: object) -> Incident:
    incident = Incident(
        instance=instance,
        workflow_id=f"failover-llama-2-7b-{instance}",
        request=FailoverRequest(model="llama-2-7b", instance=instance),
        reporter="prober",
        state=IncidentState.DONE if outcome else IncidentState.RUNNING,
        opened_at=NOW,
        closed_at=NOW + timedelta(seconds=1) if outcome else None,
        outcome=outcome,
    )
    return incident.model_copy(update=changes)


def _injected(instance: str, role: Role = Role.SERVING, reporters: list[str] | None = None) -> Injected:
    return Injected(
        FaultKind.KILL_SERVING, "llama-2-7b", instance, role, 4242, "SIGKILL", NOW, reporters=reporters or []
    )


def _guardians(*incidents: Incident, queue: tuple[Incident, ...] = ()) -> dict[str, GuardianState | None]:
    return {"llama-2-7b": GuardianState(model="llama-2-7b", recent=list(incidents), queue=list(queue))}


FAILED_0 = Instance(id="llama-2-7b-0", model="llama-2-7b", role=Role.FAILED)


def test_the_invariants_hold_on_a_clean_recovery() -> None:
    incident = _incident("llama-2-7b-0", FailoverOutcome.RECOVERED, joined=["cli a"], joined_total=1)
    ticket = IncidentTicket(
        model="llama-2-7b", instance="llama-2-7b-0", workflow_id=incident.workflow_id, joined=True,
        state=IncidentState.RUNNING, opened_at=NOW,
    )  # fmt: skip
    fault = _injected("llama-2-7b-0", reporters=["cli a"])
    fault.tickets.append(ticket)
    assert invariant_violations(_guardians(incident), BudgetState(most_running_per_zone=3), [FAILED_0], [fault]) == []


def test_a_failure_recovered_twice_or_ejected_in_the_lb_violates_invariant_1() -> None:
    twice = _guardians(
        _incident("llama-2-7b-0", FailoverOutcome.RECOVERED),
        _incident("llama-2-7b-0", FailoverOutcome.RECOVERED, workflow_id="failover-llama-2-7b-llama-2-7b-0-e2"),
    )
    ghost = FAILED_0.model_copy(update={"lb_priority": 0})
    problems = invariant_violations(twice, None, [ghost], [])
    assert any(p.startswith("invariant 1: llama-2-7b-0 recovered 2 times") for p in problems), problems
    assert any("is ejected but in the LB at priority 0" in p for p in problems), problems


def test_a_budget_exceeded_or_still_holding_violates_invariant_3() -> None:
    lease = LeaseRequest(holder="guardian-llama-2-7b", incident="failover-x", model="llama-2-7b")
    over = BudgetState(most_running_per_zone=4, max_per_zone=3, waiting=[lease], tripped="too many")
    problems = invariant_violations({}, over, [], [])
    assert [p.split(":")[0] for p in problems] == ["invariant 3"] * 3, problems


def test_a_failure_without_its_one_recovery_or_its_reports_violates_invariant_4() -> None:
    fault = _injected("llama-2-7b-0", reporters=["cli a", "alert b"])
    unsettled = _guardians(queue=(_incident("llama-2-7b-0", None),))
    assert any("0 settled incidents" in p for p in invariant_violations(unsettled, None, [FAILED_0], [fault]))
    # Recovered, but one of the nemesis' reports is nowhere: not the opener, not joined.
    lost = _guardians(_incident("llama-2-7b-0", FailoverOutcome.RECOVERED, joined=["cli a"], joined_total=1))
    problems = invariant_violations(lost, None, [FAILED_0], [fault])
    assert any("not visible as opener or joined: ['alert b']" in p for p in problems), problems
    # A serving instance that "recovered" as a standby would: its promotion is in no audit.
    ejected = _guardians(_incident("llama-2-7b-0", FailoverOutcome.ALREADY_EJECTED))
    problems = invariant_violations(ejected, None, [FAILED_0], [_injected("llama-2-7b-0")])
    assert any("ended already-ejected" in p for p in problems), problems
    # Still serving after its "recovery".
    serving = FAILED_0.model_copy(update={"role": Role.SERVING, "lb_priority": 0})
    recovered = _guardians(_incident("llama-2-7b-0", FailoverOutcome.RECOVERED))
    problems = invariant_violations(recovered, None, [serving], [_injected("llama-2-7b-0")])
    assert any("is serving after its recovery" in p for p in problems), problems


def test_a_standby_reconciliation_replaced_before_its_runbook_ran_settles_already_ejected() -> None:
    """A hung hot standby reported by the prober: while the report waited behind the model's other
    incident, reconciliation replaced it; its runbook found it gone (patch
    failover-gone-instance-settles) and ended already-ejected (seed 2, round 6). The same for a
    serving instance would hide a lost promotion."""
    gone = _guardians(_incident("llama-2-7b-1", FailoverOutcome.ALREADY_EJECTED))
    assert invariant_violations(gone, None, [], [_injected("llama-2-7b-1", role=Role.HOT)]) == []
    serving_gone = _guardians(_incident("llama-2-7b-0", FailoverOutcome.ALREADY_EJECTED))
    problems = invariant_violations(serving_gone, None, [], [_injected("llama-2-7b-0")])
    assert any("is gone after its recovery" in p for p in problems), problems


def test_a_standby_ejected_as_a_broken_candidate_needs_no_incident_of_its_own() -> None:
    """A hung hot standby another runbook tried first and ejected (seed 1, round 21), or that
    reconciliation moved (seed 1, round 40): handled, in that runbook's audit."""
    hung = Instance(id="llama-2-7b-1", model="llama-2-7b", role=Role.FAILED, note="promotion failed: timeout")
    fault = _injected("llama-2-7b-1", role=Role.HOT)
    assert invariant_violations(_guardians(), None, [hung], [fault]) == []
    # Not for a serving instance, nor for a standby nobody ejected.
    problems = invariant_violations(_guardians(), None, [hung], [_injected("llama-2-7b-1")])
    assert any("0 settled incidents" in p for p in problems), problems
    plain = hung.model_copy(update={"note": ""})
    assert any("0 settled incidents" in p for p in invariant_violations(_guardians(), None, [plain], [fault]))
    # Or deleted by reconciliation (a placement move) before the prober had confirmed it down.
    assert invariant_violations(_guardians(), None, [], [fault]) == []


def _fleet(extra_hot_in_lb: bool = False) -> tuple[list[LocalInstance], dict[str, list[HostStatus]]]:
    policy = load_policy_file(EXAMPLE_POLICY)
    instances, hosts = [], {}
    port = 30000
    for model in policy.models:
        roles = [Role.SERVING] * model.replicas + [Role.HOT] * model.hot_standby + [Role.WARM] * model.warm_standby
        seen = []
        for n, role in enumerate(roles + [Role.COLD] * model.cold_standby):
            port += 1
            instance = LocalInstance(
                id=f"{model.name}-{n}", model=model.name, role=role, port=None if role == Role.COLD else port, pid=1
            )
            instances.append(instance)
            if role in (Role.SERVING, Role.HOT):
                seen.append(HostStatus("127.0.0.1", port, 0 if role == Role.SERVING else 1, True))
        if extra_hot_in_lb and model.name == "llama-2-7b":
            seen.append(HostStatus("127.0.0.1", 39999, 1, True))  # a deleted standby Envoy still routes to
        hosts[model.name] = seen
    return instances, hosts


def test_invariant_2_holds_at_the_policy_counts_and_fails_off_them() -> None:
    policy = load_policy_file(EXAMPLE_POLICY)
    alive: Callable[[int | None], bool] = lambda pid: True  # noqa: E731
    stopped: Callable[[int | None], bool] = lambda pid: False  # noqa: E731
    instances, hosts = _fleet()
    assert fleet_problems(policy, instances, hosts, [], alive, stopped) == []

    ghost_instances, ghost_hosts = _fleet(extra_hot_in_lb=True)
    [problem] = fleet_problems(policy, ghost_instances, ghost_hosts, [], alive, stopped)
    assert problem.startswith("llama-2-7b: Envoy has [") and "healthy at priority 1" in problem

    one_hot_short = [i for i in instances if i.id != "llama-2-7b-1"]
    problems = fleet_problems(policy, one_hot_short, hosts, ["create llama-2-7b-4 (hot)"], alive, stopped)
    assert "llama-2-7b: 1 hot (llama-2-7b-2), policy 2" in problems
    assert "reconcile would: create llama-2-7b-4 (hot)" in problems

    hung = fleet_problems(policy, instances, hosts, [], alive, lambda pid: True)
    assert any("is stopped (hung)" in p for p in hung), hung


def test_rounds_are_a_pure_function_of_seed_and_round() -> None:
    assert plan_round(7, 3) == plan_round(7, 3)
    plans = [plan_round(seed, n) for seed in range(40) for n in range(1, 6)]
    assert {len(p) for p in plans} == {1, 2, 3}
    assert all(len({f.kind for f in p}) == len(p) for p in plans)  # no kind twice in a round
    assert {f.kind for p in plans for f in p} == set(FaultKind)
    assert any(f.alert and f.reports for p in plans for f in p if f.kind != FaultKind.DUPLICATES)


# -- the guardian bug the nemesis found (seed 1, round 3) ------------------------------------------


class _LateChildSignals(WorkflowOutboundInterceptor):
    async def signal_child_workflow(self, input: SignalChildWorkflowInput) -> None:
        await workflow.sleep(timedelta(seconds=30))  # the runbook ends meanwhile
        await super().signal_child_workflow(input)


class _Inbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_LateChildSignals(outbound))


class LateChildSignals(Interceptor):
    """Every signal a workflow sends its child lands 30 s (skipped) late: after a quick child ended."""

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return _Inbound


def _report(instance: str, reporter: str) -> FailureReport:
    request = FailoverRequest(model="llama-2-7b", instance=instance, confirmed=True, trigger=Trigger.PROBE)
    return FailureReport(request=request, reporter=reporter)


async def test_a_runbook_that_ends_before_its_joined_signal_does_not_fail_the_guardian(
    own_time_skipping_env: WorkflowEnvironment,
) -> None:
    """A report joined an incident while it was queued; the guardian tells the runbook once it runs.
    A hot failover can end before that signal lands (on the real stack under load it did, between
    two of three signals): the guardian failed with ``ExternalWorkflowExecutionNotFound``, its
    incident stuck in the queue, and the model without a guardian."""
    fleet = FakeFleet.of(
        ("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.SERVING), ("llama-2-7b-2", Role.HOT),
        ("llama-2-7b-3", Role.HOT),
    )  # fmt: skip
    fleet.promote_gate = asyncio.Event()  # the first runbook holds, the second incident queues behind it
    queue = f"nemesis-{uuid.uuid4().hex[:8]}"
    time_skipping_env = own_time_skipping_env
    client = time_skipping_env.client
    async with Worker(
        client,
        task_queue=queue,
        workflows=[ModelGuardianWorkflow, BudgetWorkflow, FailoverWorkflow],
        activities=fleet.activities(),
        interceptors=[LateChildSignals()],
    ):
        await report_failure(client, queue, _report("llama-2-7b-0", "prober"))
        await report_failure(client, queue, _report("llama-2-7b-1", "prober"))
        duplicate = await report_failure(client, queue, _report("llama-2-7b-1", "alert abc"))
        assert duplicate.joined and duplicate.state == IncidentState.QUEUED
        fleet.promote_gate.set()
        # The second runbook running (or, on a busy machine, already through: the time-skipping
        # server skips the signal's timer by itself once nothing else runs; seen in the full suite).
        state = await _guardian_when(
            client,
            queue,
            lambda s: (
                (bool(s.queue) and s.queue[0].instance == "llama-2-7b-1" and bool(s.queue[0].run_id))
                or len(s.recent) == 2
            ),
        )
        await asyncio.sleep(0.3)  # the second runbook ends; its joined signal waits on the skipped timer
        await time_skipping_env.sleep(60)
        state = await _guardian_when(client, queue, lambda s: len(s.recent) == 2)
        description = await client.get_workflow_handle(guardian_workflow_id("llama-2-7b", queue)).describe()
    assert description.status == WorkflowExecutionStatus.RUNNING
    assert [i.outcome for i in state.recent] == [FailoverOutcome.RECOVERED, FailoverOutcome.RECOVERED]
    assert state.recent[1].joined == ["alert abc"] and not state.queue


async def test_a_signal_during_a_hot_failover_does_not_run_it_again_on_a_changed_fleet(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    """A report joins while the hot failover runs (its local activities inside one open workflow
    task). The task's completion is refused (``UnhandledCommand``: a new signal) and the task runs
    again: before the fix it listed the fleet the first run had already changed and ended
    ``already-ejected``, so the promotion that recovered the model was in no audit (nemesis seed 1,
    round 3). Now the listing is recorded before any change, and the second run finishes the same."""
    fleet = FakeFleet.of(("llama-2-7b-0", Role.SERVING), ("llama-2-7b-1", Role.HOT), ("llama-2-7b-2", Role.HOT))
    fleet.promote_gate = asyncio.Event()
    queue = f"nemesis-{uuid.uuid4().hex[:8]}"
    client = time_skipping_env.client
    async with Worker(
        client,
        task_queue=queue,
        workflows=[ModelGuardianWorkflow, BudgetWorkflow, FailoverWorkflow],
        activities=fleet.activities(),
    ):
        await report_failure(client, queue, _report("llama-2-7b-0", "prober"))
        for _ in range(200):  # the runbook is in its promote step, its workflow task open
            if ("promote", "llama-2-7b-1") in fleet.calls:
                break
            await asyncio.sleep(0.02)
        duplicate = await report_failure(client, queue, _report("llama-2-7b-0", "alert abc"))
        assert duplicate.joined and duplicate.state == IncidentState.RUNNING  # the runbook was signalled
        fleet.promote_gate.set()
        state = await _guardian_when(client, queue, lambda s: len(s.recent) == 1)
        result = await runbook_result(client, state.recent[0])
    [incident] = state.recent
    assert incident.outcome == FailoverOutcome.RECOVERED, result.reason
    assert result.promoted == "llama-2-7b-1" and result.joined == ["alert abc"]
    assert fleet.instances["llama-2-7b-1"].role == Role.SERVING
    assert fleet.instances["llama-2-7b-2"].role == Role.HOT  # one failure, one promotion
    assert fleet.instances["llama-2-7b-0"].role == Role.FAILED


async def _guardian_when(
    client: Client, queue: str, ok: Callable[[GuardianState], bool], model: str = "llama-2-7b"
) -> GuardianState:
    state = None
    for _ in range(200):
        state = await guardian_state(client, queue, model)
        if state is not None and ok(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"the guardian never got there: {state}")


# -- the reconcile delete bug the nemesis found (seed 1, round 1) ------------------------------------


def _eds_ports(platform: LocalPlatform, model: str) -> set[int]:
    document = yaml.safe_load(platform.layout.eds_file(model).read_text())
    return {
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for locality in document["resources"][0]["endpoints"]
        for e in locality["lb_endpoints"]
    }


async def test_a_delete_cut_short_by_a_worker_crash_is_finished_by_its_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reconcile moves a misplaced hot standby: create the replacement, then delete the old one. The
    worker was killed inside the delete, after the registry forgot the instance and before the EDS
    file and the process followed; the retry found it "already gone", and Envoy kept a ghost hot
    standby (a third at priority 1, the policy wants two) whose process nothing would stop."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("models:\n  - name: alpha\n    hotStandby: 1\n")
    settings = DrctlSettings(policy=policy_file, state_dir=tmp_path / "state")
    platform = LocalPlatform(settings, load_policy_file(policy_file))
    pid = processes.spawn(["sleep", "60"], tmp_path / "standby.log")
    try:
        with platform.registry.edit() as instances:
            instances["alpha-1"] = LocalInstance(
                id="alpha-1", model="alpha", role=Role.HOT, port=45678, pid=pid, lb_priority=1
            )
        platform.sync_load_balancer("alpha")
        assert _eds_ports(platform, "alpha") == {45678}
        delete = ReconcileAction(
            kind=ReconcileActionKind.DELETE, model="alpha", instance="alpha-1", tier=Role.HOT, epoch=0, reason="moved"
        )

        def worker_killed(model: str) -> None:
            raise RuntimeError("the worker died here")

        monkeypatch.setattr(platform, "sync_load_balancer", worker_killed)
        with pytest.raises(RuntimeError):
            await platform.delete_instance(delete)
        monkeypatch.undo()
        assert processes.is_alive(pid)
        await platform.delete_instance(delete)  # the activity's retry on the restarted worker

        assert "alpha-1" not in platform.registry.load()
        assert _eds_ports(platform, "alpha") == set()
        assert not processes.is_alive(pid)
    finally:
        processes.terminate(pid, grace_s=0.5)
        await platform.close()


async def test_a_restarted_worker_stops_an_ejected_instance_whose_draining_died_with_its_predecessor(
    tmp_path: Path,
) -> None:
    """An ejected instance's process is stopped after its connection draining by a task of the worker
    that ejected it. Killed within that drain (nemesis seed 1, round 9: an instance SIGSTOPped, ejected,
    then continued), the process ran on for good. The next worker takes the draining over."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "models:\n  - name: alpha\n    hotStandby: 1\n"
        "loadBalancer:\n  retries: {attempts: 3, perTryTimeout: 200ms, retryOn: connect-failure}\n"
    )
    settings = DrctlSettings(policy=policy_file, state_dir=tmp_path / "state")
    platform = LocalPlatform(settings, load_policy_file(policy_file))
    # The interpreter itself, not `python3` from PATH: a pyenv shim is a chain of scripts exec'ing
    # each other, and in one link of it the command line does not name the instance (CI saw
    # drain_leftovers miss the process then).
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ejected = processes.spawn([*sleeper, "alpha-0"], tmp_path / "alpha-0.log")
    serving = processes.spawn([*sleeper, "alpha-1"], tmp_path / "alpha-1.log")
    try:
        with platform.registry.edit() as instances:
            instances["alpha-0"] = LocalInstance(id="alpha-0", model="alpha", role=Role.FAILED, port=45670, pid=ejected)
            instances["alpha-1"] = LocalInstance(
                id="alpha-1", model="alpha", role=Role.SERVING, port=45671, pid=serving, lb_priority=0
            )
        # Until it has exec'd, the child's command line is still this test's: drain_leftovers only
        # stops a process that names its instance.
        for _ in range(100):
            if processes.runs_instance(ejected, "alpha-0"):
                break
            await asyncio.sleep(0.02)
        assert platform.drain_leftovers() == ["alpha-0"]
        assert processes.is_alive(ejected)  # not at once: its connections drain first (1.2 s here)
        for _ in range(100):
            if not processes.is_alive(ejected):
                break
            await asyncio.sleep(0.05)
        assert not processes.is_alive(ejected)
        assert processes.is_alive(serving)
    finally:
        processes.terminate(ejected, grace_s=0.5)
        processes.terminate(serving, grace_s=0.5)
        await platform.close()
