"""``drctl up`` checks the alert tokens before it starts anything: a token the receiver would refuse
used to bring the stack up "with" a receiver that exited at once and was restarted every 10 s."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from drctl.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dr-policy.yaml"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DRCTL_ALERT_TOKENS": '{"team-b": "s3cret-token-for-team-b"}'}, "tenant(s) the policy lacks: team-b"),
        ({"DRCTL_ALERT_TOKENS": "{not json"}, "not valid JSON"),
        ({"DRCTL_ALERT_TOKENS_FILE": "/nonexistent/tokens"}, "cannot read it"),
    ],
)
def test_tokens_the_receiver_would_refuse_stop_drctl_up_before_anything_starts(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    state = tmp_path / "state"
    result = CliRunner().invoke(app, ["up", "--policy", str(EXAMPLE), "--state-dir", str(state)], env=env)
    assert result.exit_code == 2, result.output
    assert "alert receiver:" in result.output and expected in result.output
    assert "Traceback" not in result.output and "s3cret-token" not in result.output
    assert not state.exists()  # nothing started, nothing written
