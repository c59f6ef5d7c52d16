"""Policy files: the seed's dr-policy.yaml loads as written; every error names its field and line."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from drctl.policies.durations import format_duration, parse_duration
from drctl.policies.engines import Engine
from drctl.policies.loader import PolicyError, load_policy_file, parse_policy
from drctl.policies.schema import Priority

# Seed §4.1, verbatim (only the ConfigMap wrapper removed).
SEED_POLICY = """\
models:
  - name: llama-2-7b
    priority: critical
    hotStandby: 2  # 2 个热备实例
    warmStandby: 0
    coldStandby: 1
    rto: 10s
    rpo: 0
  - name: mistral-7b
    priority: high
    hotStandby: 1
    warmStandby: 1
    coldStandby: 1
    rto: 30s
    rpo: 1m
  - name: gpt-4-8b
    priority: normal
    hotStandby: 0
    warmStandby: 1
    coldStandby: 2
    rto: 5m
    rpo: 5m
az_failover:
  strategy: active-passive  # 主备模式
  activeZones: [az-1, az-2]
  standbyZone: az-3
  healthCheckInterval: 10s
  failoverThreshold: 3  # 连续 3 次健康检查失败触发切换
"""


def test_seed_policy_loads_as_written() -> None:
    policy = parse_policy(SEED_POLICY)
    llama = policy.model("llama-2-7b")
    assert (llama.priority, llama.hot_standby, llama.warm_standby, llama.cold_standby) == (Priority.CRITICAL, 2, 0, 1)
    assert llama.rto == timedelta(seconds=10) and llama.rpo == timedelta(0)
    assert policy.model("mistral-7b").rpo == timedelta(minutes=1)
    assert policy.model("gpt-4-8b").rto == timedelta(minutes=5)
    assert policy.az_failover.active_zones == ["az-1", "az-2"]
    assert policy.az_failover.standby_zone == "az-3"
    assert policy.az_failover.failover_threshold == 3
    # Sections the seed does not have get defaults.
    assert policy.load_balancer.retries.attempts == 3
    assert llama.replicas == 1


def test_example_policy_matches_the_seed_models() -> None:
    example = load_policy_file(Path(__file__).resolve().parents[2] / "examples" / "dr-policy.yaml")
    seed = parse_policy(SEED_POLICY)
    # The seed's models, run on the demo stand-in (the seed names no engine: vLLM by default).
    assert [m.engine for m in seed.models] == [Engine.VLLM] * len(seed.models)
    assert example.models == [m.model_copy(update={"engine": Engine.DEMO}) for m in seed.models]


def _issues(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "bad.yaml")
    assert str(info.value).startswith("bad.yaml: invalid policy")
    return [str(issue) for issue in info.value.issues]


def test_every_error_is_reported_with_path_and_line() -> None:
    text = SEED_POLICY.replace("rto: 30s", "rto: 30x").replace("hotStandby: 0", "hotStandb: 0")
    text = text.replace("priority: normal", "priority: urgent")
    issues = _issues(text)
    assert len(issues) == 3
    assert any(i.startswith("line 14: models[1] (mistral-7b).rto:") and "'30x' is not a duration" in i for i in issues)
    assert any("models[2] (gpt-4-8b).hotStandb: unknown field" in i for i in issues)
    assert any("models[2] (gpt-4-8b).priority:" in i and "critical" in i for i in issues)


def test_negative_standby_count_and_duplicate_model() -> None:
    assert any(
        "models[0] (llama-2-7b).hotStandby" in i
        for i in _issues(SEED_POLICY.replace("hotStandby: 2", "hotStandby: -1"))
    )
    dup = SEED_POLICY.replace("name: mistral-7b", "name: llama-2-7b")
    assert any("listed twice" in i for i in _issues(dup))


@pytest.mark.parametrize("count", ["true", '"2"', "2.0"])
def test_a_count_that_is_not_an_integer_is_refused(count: str) -> None:
    """YAML's ``true`` or a quoted ``"2"`` read as 1 and 2 before: a count is an integer, nothing else."""
    issues = _issues(SEED_POLICY.replace("hotStandby: 2", f"hotStandby: {count}"))
    assert any("models[0] (llama-2-7b).hotStandby: Input should be a valid integer" in i for i in issues), issues


def test_a_key_given_twice_is_refused_with_its_line() -> None:
    text = SEED_POLICY.replace("rto: 30s", "rto: 30s\n    rto: 20s", 1)
    line = text.splitlines().index("    rto: 20s") + 1
    assert _issues(text) == [f"line {line}: <top level>: not valid YAML: found duplicate key 'rto'"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "got empty"), ("- a\n- b\n", "got a list"), ("models: [\n", "not valid YAML"), ("models: []\n", "models")],
)
def test_shape_errors(text: str, expected: str) -> None:
    assert any(expected in i for i in _issues(text))


def test_bad_command_template_placeholder() -> None:
    issues = _issues(SEED_POLICY + "local:\n  command: ['{python}', '{modle}']\n")
    assert any("local.command" in i or "local" in i for i in issues)
    assert any("{modle}" in i for i in issues)


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10), ("1m", 60), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), (0, 0), ("2", 2)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds
    assert parse_duration(format_duration(parse_duration(text))).total_seconds() == seconds


@pytest.mark.parametrize("text", ["10x", "s", "-1", "", True, "1m 5"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def _drctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    drctl = str(Path(sys.executable).parent / "drctl")
    return subprocess.run([drctl, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_cli_names_file_and_field_of_a_bad_policy(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(SEED_POLICY.replace("coldStandby: 2", "coldStandby: two"))
    for args in (("policy", "validate", str(bad)), ("failover", "--policy", str(bad), "gpt-4-8b", "gpt-4-8b-0")):
        completed = _drctl(*args, cwd=tmp_path)
        message = " ".join(completed.stderr.split())
        assert completed.returncode == 2, completed
        assert str(bad) in message and "models[2] (gpt-4-8b).coldStandby" in message
        assert "Traceback" not in completed.stderr
    good = tmp_path / "good.yaml"
    good.write_text(SEED_POLICY)
    completed = _drctl("policy", "validate", str(good), cwd=tmp_path)
    assert completed.returncode == 0 and "3 model(s)" in completed.stdout


def test_cli_missing_policy_file(tmp_path: Path) -> None:
    completed = _drctl("policy", "validate", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert completed.returncode == 2 and f"policy not found: {tmp_path / 'nope.yaml'}" in completed.stderr
    assert "invalid policy" not in completed.stderr and "Traceback" not in completed.stderr
