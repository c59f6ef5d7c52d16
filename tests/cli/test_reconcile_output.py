"""``drctl reconcile`` claims no more than it checked: a model skipped (a failover in flight) was
not compared with the policy, so the headline must not say the fleet is in line. It used to print
"in line with the policy: nothing to create…" and only then "skipped: …"."""

from __future__ import annotations

import io

from drctl.cli.common import make_console, show
from drctl.cli.render import reconcile_lines, reconcile_progress
from drctl.payloads import ReconcileAction, ReconcileActionKind, ReconcilePlan, ReconcileResult, Role

SKIPPED = "llama-2-7b: an instance is being promoted (failover running)"


def _printed(plan: ReconcilePlan, dry_run: bool = False) -> list[str]:
    file = io.StringIO()
    show(reconcile_lines(ReconcileResult(plan=plan, dry_run=dry_run)), make_console(file=file))
    return [line.rstrip() for line in file.getvalue().splitlines()]


def test_nothing_to_do_but_a_model_skipped_is_not_in_line() -> None:
    lines = _printed(ReconcilePlan(skipped_models=[SKIPPED]))
    assert lines == [
        f"skipped: {SKIPPED}",
        "in line with the policy except the 1 skipped model above: nothing to create, re-tier or delete for the others",
    ]


def test_nothing_to_do_and_nothing_skipped_is_in_line() -> None:
    assert _printed(ReconcilePlan()) == ["in line with the policy: nothing to create, re-tier or delete"]


def test_misplaced_with_models_skipped() -> None:
    plan = ReconcilePlan(skipped_models=[SKIPPED, "mistral-7b: x all serving"], violations=["gpt-4-8b-1 shares a node"])
    assert _printed(plan) == [
        f"skipped: {SKIPPED}",
        "skipped: mistral-7b: x all serving",
        "counts in line except the 2 skipped models above, placement is not: nothing this pass can move (below)",
        "misplaced: gpt-4-8b-1 shares a node",
    ]


def test_what_does_not_fit_is_never_in_line() -> None:
    lines = _printed(ReconcilePlan(unplaceable=["mistral-7b warm: no GPU with 16 GiB free"]))
    assert not any(line.startswith("in line") for line in lines)
    assert lines[-1] == "not placed: mistral-7b warm: no GPU with 16 GiB free"


def test_a_plan_comes_after_the_models_skipped() -> None:
    action = ReconcileAction(kind=ReconcileActionKind.CREATE, model="gpt-4-8b", instance="gpt-4-8b-3", tier=Role.HOT)
    lines = _printed(ReconcilePlan(actions=[action], skipped_models=[SKIPPED]), dry_run=True)
    assert lines[0] == f"skipped: {SKIPPED}"
    assert lines[1] == "plan (dry run: nothing changed)"
    assert any("gpt-4-8b-3" in line for line in lines[2:])


def test_progress_says_what_a_pass_going_does_and_why_it_waits() -> None:
    delete = ReconcileAction(kind=ReconcileActionKind.DELETE, model="m", instance="m-1", tier=Role.HOT)
    waiting = ReconcileResult(
        plan=ReconcilePlan(actions=[delete], after_zone_failover=["az-1"]), dry_run=False, applied=["delete m-1"]
    )
    assert reconcile_progress(None).startswith("planning")
    assert reconcile_progress(waiting) == (
        "1 change(s) made; new standbys wait for the failover of zone az-1 to end (its recoveries go first)"
    )
    after = waiting.model_copy(
        update={
            "plan": ReconcilePlan(actions=[delete, delete, delete]),
            "applied": ["delete m-1", "waited: zone failover of az-1 ended", "create m-2"],
            "failed": ["create m-3: no room"],
        }
    )
    assert reconcile_progress(after) == "3 change(s) made; the plan after the zone failover has 3"
    # Counted by the pass itself (``waits``), whatever the wait's line says.
    counted = after.model_copy(update={"applied": ["delete m-1", "zone az-1 done", "create m-2"], "waits": 1})
    assert reconcile_progress(counted) == "3 change(s) made; the plan after the zone failover has 3"
    assert reconcile_progress(after.model_copy(update={"applied": ["create m-2"], "failed": []})) == (
        "1 change(s) made of 3 planned"
    )
