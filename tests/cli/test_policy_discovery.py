"""Which policy a command uses: ``--policy``, ``DRCTL_POLICY``, the stack's, the working directory's.

Run outside the repository, ``drctl status`` used to report the missing ``examples/dr-policy.yaml``
as an "invalid policy"; it now finds the policy the user runs, and says "not found" (and where it
looked) when there is none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drctl.cli.app import app
from drctl.cli.policy_path import PolicyNotFound, find_policy
from drctl.settings import DrctlSettings, StateLayout

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dr-policy.yaml"


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory outside the repository, with no DRCTL_* settings."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("DRCTL_POLICY", "DRCTL_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    return work


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _policy_at(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(EXAMPLE.read_text())
    return path


def _record_stack(state_dir: Path, policy: Path) -> None:
    layout = StateLayout(state_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.stack_file.write_text(json.dumps({"policy": str(policy.resolve()), "supervisor_pid": 1}))


def test_outside_the_repository_it_is_not_found_not_invalid(elsewhere: Path) -> None:
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2, result.output
    text = _one_line(result.output)
    assert "invalid policy" not in text and "Traceback" not in text
    assert "error: policy not found: looked in the state folder" in text
    assert str(elsewhere / "dr-policy.yaml") in text and str(elsewhere / "examples" / "dr-policy.yaml") in text
    assert "--policy or DRCTL_POLICY" in text


def test_the_worker_says_not_found_before_it_starts(elsewhere: Path) -> None:
    result = CliRunner().invoke(app, ["worker"])
    assert result.exit_code == 2, result.output
    assert "policy not found" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "env", "source"),
    [(["--policy", "nope.yaml"], {}, "--policy"), ([], {"DRCTL_POLICY": "nope.yaml"}, "DRCTL_POLICY")],
)
def test_a_named_policy_that_is_missing_is_not_found_and_not_replaced(
    elsewhere: Path, args: list[str], env: dict[str, str], source: str
) -> None:
    _policy_at(elsewhere / "dr-policy.yaml")  # there, but the user named another one
    result = CliRunner().invoke(app, ["status", *args], env=env)
    assert result.exit_code == 2, result.output
    assert f"error: policy not found: nope.yaml (from {source})" in _one_line(result.output)


def test_policy_validate_of_a_missing_file_is_not_found(elsewhere: Path) -> None:
    result = CliRunner().invoke(app, ["policy", "validate", "nope.yaml"])
    assert result.exit_code == 2
    assert "error: policy not found: nope.yaml" in _one_line(result.output)
    assert "invalid policy" not in result.output


def test_the_running_stacks_policy_is_found_from_its_state_folder(elsewhere: Path, tmp_path: Path) -> None:
    mine = _policy_at(tmp_path / "fleet" / "prod.yaml")
    _record_stack(elsewhere / ".drctl", mine)
    assert find_policy(DrctlSettings()) == mine.resolve()
    # and through the CLI: the policy loads, then status finds no instances file
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 1 and "no local stack state" in result.output, result.output


def test_the_state_folder_comes_from_the_option_too(elsewhere: Path, tmp_path: Path) -> None:
    mine = _policy_at(tmp_path / "fleet" / "prod.yaml")
    state = tmp_path / "state"
    _record_stack(state, mine)
    assert find_policy(DrctlSettings(state_dir=state)) == mine.resolve()


def test_the_working_directory_last(elsewhere: Path) -> None:
    example = _policy_at(elsewhere / "examples" / "dr-policy.yaml")
    assert find_policy(DrctlSettings()) == example
    top = _policy_at(elsewhere / "dr-policy.yaml")
    assert find_policy(DrctlSettings()) == top


def test_the_order_option_environment_stack_directory(
    elsewhere: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _policy_at(elsewhere / "dr-policy.yaml")
    stacks = _policy_at(tmp_path / "stack.yaml")
    _record_stack(elsewhere / ".drctl", stacks)
    assert find_policy(DrctlSettings()) == stacks.resolve()
    from_env = _policy_at(tmp_path / "env.yaml")
    monkeypatch.setenv("DRCTL_POLICY", str(from_env))
    assert find_policy(DrctlSettings()) == from_env
    option = _policy_at(tmp_path / "option.yaml")
    assert find_policy(DrctlSettings(policy=option), option=option) == option


def test_a_stack_file_whose_policy_is_gone_is_said(elsewhere: Path, tmp_path: Path) -> None:
    _record_stack(elsewhere / ".drctl", tmp_path / "deleted.yaml")
    with pytest.raises(PolicyNotFound, match=r"the stack's policy .*deleted\.yaml is gone"):
        find_policy(DrctlSettings())
