"""Hostile names through the CLI: what a user typed or a file holds is printed as written, never read
as rich markup (a model named ``[/]`` crashed the CLI with ``MarkupError``; a regex lost its brackets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drctl.cli.app import app
from drctl.cli.render import zone_progress_line
from drctl.payloads import ZoneFailoverResult
from drctl.policies.schema import MODEL_NAME_PATTERN

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dr-policy.yaml"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _output(result: object) -> str:
    return " ".join(str(getattr(result, "output", "")).split())


@pytest.mark.parametrize("model", ["[/]", "[bold]x", "[red]llama[/red]", "x[/]y", "\\[/]"])
def test_an_unknown_model_with_brackets_is_the_usual_exit_2(runner: CliRunner, model: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["failover", model, "x-0", "--policy", str(EXAMPLE), "--state-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert f"error: unknown model {model!r}; the policy has: llama-2-7b, mistral-7b, gpt-4-8b" in _output(result)
    assert "Traceback" not in result.output and "MarkupError" not in result.output


def test_a_policy_error_shows_the_name_pattern_intact(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: '[/]'\n")
    result = runner.invoke(app, ["policy", "validate", str(bad)])
    assert result.exit_code == 2, result.output
    text = _output(result)
    assert f"line 2: models[0] ([/]).name: String should match pattern '{MODEL_NAME_PATTERN}'" in text, text
    assert "^({0,61})?$" not in text


def test_a_file_name_and_a_big_policy_in_the_ok_line(runner: CliRunner, tmp_path: Path) -> None:
    odd = tmp_path / "[prod] [bold]policy.yaml"
    odd.write_text(EXAMPLE.read_text())
    result = runner.invoke(app, ["policy", "validate", str(odd)])
    assert result.exit_code == 0, result.output
    assert f"ok: {odd} — 3 model(s): llama-2-7b, mistral-7b, gpt-4-8b" in _output(result)
    many = tmp_path / "many.yaml"
    many.write_text("models:\n" + "".join(f"  - name: m-{i}\n" for i in range(500)))
    result = runner.invoke(app, ["policy", "validate", str(many)])
    assert result.exit_code == 0, result.output
    first_line = " ".join(result.output.split("\nwarning: ")[0].split())  # the ok line (then warnings)
    assert re.search(r"500 model\(s\): m-0, m-1, .*, m-19, … \(480 more\)$", first_line), result.output


@pytest.mark.parametrize(
    "args",
    [
        ["drill", "[/]"],
        ["drain", "[/]/0", "--policy", str(EXAMPLE)],
        ["zone-failover", "[red]az[/]", "--policy", str(EXAMPLE)],
        ["audit", "--model", "[/]"],
    ],
    ids=["drill-scenario", "gpu", "zone", "audit-model"],
)
def test_other_bad_input_with_brackets_is_exit_2_with_the_value_shown(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    value = next(a for a in args if "[" in a)
    assert repr(value) in _output(result) and "Traceback" not in result.output


def test_a_plan_with_nothing_to_do_takes_no_lease() -> None:
    """``failover --plan`` of a healthy instance said "would run: nothing", then that it would take
    a lease of the budget."""
    from datetime import UTC, datetime

    from drctl.cli.render import plan_budget_lines
    from drctl.payloads import FailoverOutcome, FailoverResult

    empty = FailoverResult(model="m", instance="m-0", outcome=FailoverOutcome.PLANNED, started_at=datetime.now(UTC))
    lines = [str(line) for line in plan_budget_lines(empty, None)]
    assert lines == ["would run: nothing (nothing to change), and take no lease of the budget"]
    steps = empty.model_copy(update={"plan": ["promote m-1", "register m-1"]})
    lines = [str(line) for line in plan_budget_lines(steps, None)]
    assert lines[0] == "would run, in order: promote m-1 → register m-1"
    assert lines[-1] == "this failover would take one lease of the budget"


def test_an_empty_audit_says_so() -> None:
    from rich.console import Console

    from drctl.cli.render import audit_table

    console = Console(width=200, record=True)
    console.print(audit_table("WorkflowType = 'FailoverWorkflow'", []))
    assert "no failover matches" in console.export_text()


def test_a_zone_failovers_batch_shows_as_one_line_while_it_runs() -> None:
    running = ZoneFailoverResult(zone="az-1", switching=["m0-0", "m1-0", "m2-0"], pending=["m0-0", "m1-0", "m2-0"])
    assert zone_progress_line("switching 3", running) == (
        "… switching 3 serving instances to their hot standbys in one batch"
    )
    done = ZoneFailoverResult(zone="az-1", moved=["m0-0 → m0-1 (recovered)"])
    assert zone_progress_line("m0-0 → m0-1 (recovered)", done).startswith("[green]✓[/]")
