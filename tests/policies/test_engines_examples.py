"""examples/vllm-policy.yaml and examples/sglang-policy.yaml: ``drctl policy validate`` accepts them,
their models run the engine the file is about, and the local command template starts that engine
with what its profile needs (the flags, the port and the served name drctl asks for)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from drctl.policies.engines import Engine, profile
from drctl.policies.loader import load_policy_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = {Engine.VLLM: EXAMPLES / "vllm-policy.yaml", Engine.SGLANG: EXAMPLES / "sglang-policy.yaml"}


@pytest.mark.parametrize("engine", list(FILES), ids=str)
def test_drctl_policy_validate_accepts_it(engine: Engine) -> None:
    drctl = str(Path(sys.executable).parent / "drctl")
    completed = subprocess.run(
        [drctl, "policy", "validate", str(FILES[engine])], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "ok" in completed.stdout and "3 model(s)" in completed.stdout


@pytest.mark.parametrize("engine", list(FILES), ids=str)
def test_its_models_run_the_engine_and_the_command_starts_it_as_drctl_asks(engine: Engine) -> None:
    policy = load_policy_file(FILES[engine])
    assert {m.engine for m in policy.models} == {engine}
    assert any(m.warm_standby for m in policy.models), "a warm standby: the engine's sleep and wake"
    command = policy.local.command
    for flag in profile(engine).server_flags:
        assert flag in command, flag
    assert command[command.index("--port") + 1] == "{port}"
    assert command[command.index("--served-model-name") + 1] == "{model}"  # what /v1/models lists
    assert "{checkpoint}" not in " ".join(command)  # the demo's checksummed file, not an engine's weights
    assert policy.load_balancer.health_check.path == profile(engine).health_path  # Envoy's health check


def test_the_vllm_command_is_vllm_serve() -> None:
    assert load_policy_file(FILES[Engine.VLLM]).local.command[:2] == ["vllm", "serve"]


def test_the_sglang_command_is_launch_server() -> None:
    assert load_policy_file(FILES[Engine.SGLANG]).local.command[:3] == ["python3", "-m", "sglang.launch_server"]
