"""Bad input to the runbook commands is said in the command's terms and clipped, exit 2, before
anything connects: no pydantic dump, no 5,000-character id echoed back, no Temporal call."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from drctl.cli.app import app
from drctl.cli.common import clip_input

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml"
LONG = "g" * 5000


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["zone-failover", "az-1", "--reason", "x" * 600, "--plan"], "error: --reason: String should have at most 500"),
        (["drain", "gpu-node-0/0", "--reason", "x" * 600], "error: --reason: String should have at most 500"),
        (["drain", LONG], f"unknown GPU '{'g' * 200}… (5000 characters)'"),
        (["approve", "az-9", "--approver", "bob"], "unknown zone 'az-9'"),
        (["approve", "az-1", "--approver", " "], "--approver: say who approves"),
        (["drill", "pod-crash", "--model", LONG], "(5000 characters)"),
    ],
    ids=["zone-reason", "drain-reason", "drain-long-gpu", "approve-zone", "approve-nobody", "drill-long-model"],
)
def test_bad_input_is_said_in_the_command_s_terms(args: list[str], said: str) -> None:
    result = CliRunner().invoke(app, [*args, "--policy", str(EXAMPLE)])
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert "validation error" not in result.output and "errors.pydantic.dev" not in result.output
    assert LONG not in result.output


def test_audit_limit_must_be_at_least_one() -> None:
    result = CliRunner().invoke(app, ["audit", "--limit", "0"])
    assert result.exit_code == 2 and "--limit" in result.output


def test_clip_input_keeps_short_values_and_says_how_long_a_long_one_was() -> None:
    assert clip_input("llama-2-7b-0") == "llama-2-7b-0"
    assert clip_input("x" * 81, limit=80) == "x" * 80 + "… (81 characters)"
