"""Hostile and huge policy files: values that make no sense are named errors, size is bounded, and
validation stays linear (a 10,000-model policy validates; see bench/policy_validate_bench.py for time)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from drctl.policies.loader import MAX_ISSUES_SHOWN, MAX_POLICY_BYTES, PolicyError, load_policy_file, parse_policy
from drctl.policies.sizes import parse_size

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from policy_validate_bench import generate_policy

BASE = """\
models:
  - name: llama-2-7b
    rto: 10s
gpuPool:
  nodes:
    - name: gpu-node-0
      gpus: 2
      gpuMemory: 80Gi
"""


def _issues(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "bad.yaml")
    return [str(issue) for issue in info.value.issues]


@pytest.mark.parametrize(
    ("section", "line", "field"),
    [
        ("detection:\n  probeInterval: 0s\n", 10, "detection.probeInterval"),
        ("detection:\n  probeTimeout: 0\n", 10, "detection.probeTimeout"),
        ("detection:\n  flapWindow: 0ms\n", 10, "detection.flapWindow"),
        ("detection:\n  holdDown: 0s\n", 10, "detection.holdDown"),
        ("reconcile:\n  interval: 0s\n", 10, "reconcile.interval"),
        ("az_failover:\n  healthCheckInterval: 0s\n", 10, "az_failover.healthCheckInterval"),
        ("loadBalancer:\n  healthCheck: {interval: 0s}\n", 10, "loadBalancer.healthCheck.interval"),
        ("loadBalancer:\n  healthCheck: {timeout: 0s}\n", 10, "loadBalancer.healthCheck.timeout"),
        ("loadBalancer:\n  retries: {perTryTimeout: 0s}\n", 10, "loadBalancer.retries.perTryTimeout"),
        ("loadBalancer:\n  outlierDetection: {interval: 0s}\n", 10, "loadBalancer.outlierDetection.interval"),
    ],
)
def test_a_zero_interval_or_timeout_is_an_error_naming_field_and_line(section: str, line: int, field: str) -> None:
    issues = _issues(BASE + section)
    assert len(issues) == 1, issues
    assert issues[0].startswith(f"line {line}: {field}: must be more than 0 (got 0s)"), issues


def test_zero_rto_zero_gpus_and_zero_memory_are_errors() -> None:
    text = BASE.replace("rto: 10s", "rto: 0s").replace("gpus: 2", "gpus: 0").replace("gpuMemory: 80Gi", "gpuMemory: 0")
    issues = _issues(text)
    assert any(i.startswith("line 3: models[0] (llama-2-7b).rto: must be more than 0") for i in issues), issues
    assert any(
        i.startswith("line 7: gpuPool.nodes[0] (gpu-node-0).gpus:") and "greater than or equal to 1" in i
        for i in issues
    )
    assert any(
        i.startswith("line 8: gpuPool.nodes[0] (gpu-node-0).gpuMemory:") and "greater than 0" in i for i in issues
    )
    assert _issues(BASE.replace("rto: 10s", "rto: 10s\n    gpuMemory: 0Gi"))


def test_zero_where_zero_means_something_still_loads() -> None:
    """rpo 0 (the seed's, no data loss) and the route timeout 0 (Envoy's "no timeout") are meanings."""
    policy = parse_policy(BASE.replace("rto: 10s", "rto: 10s\n    rpo: 0") + "loadBalancer: {requestTimeout: 0s}\n")
    assert policy.models[0].rpo.total_seconds() == 0
    assert policy.load_balancer.request_timeout.total_seconds() == 0


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("99999999999999d", "longer than any duration"),
        (".nan", "NaN"),
        (".inf", "longer than any duration"),
        ("1" * 500 + "s", "is not a duration"),
    ],
)
def test_absurd_durations_are_errors_not_crashes(value: str, words: str) -> None:
    issues = _issues(BASE.replace("rto: 10s", f"rto: {value}"))
    assert len(issues) == 1 and "models[0] (llama-2-7b).rto" in issues[0] and words in issues[0], issues
    assert len(issues[0]) < 300


def test_absurd_sizes_are_errors_not_crashes() -> None:
    issues = _issues(BASE.replace("gpuMemory: 80Gi", "gpuMemory: " + "9" * 400))
    assert len(issues) == 1 and "gpuMemory" in issues[0] and len(issues[0]) < 300, issues
    with pytest.raises(ValueError, match="larger than any size"):
        parse_size("999999999999999999999Ti")


def test_names_from_the_file_are_clipped_in_messages() -> None:
    long_name = "x" * 100_000
    issues = _issues(BASE.replace("- name: llama-2-7b", f"- name: {long_name}\n    colour: red"))
    assert len(issues) == 2 and all(len(issue) < 300 for issue in issues), [i[:300] for i in issues]
    assert any("colour: unknown field" in issue and "xxx…)" in issue for issue in issues)


def test_a_policy_of_10000_models_validates() -> None:
    text = generate_policy(10_000, 64)
    policy = parse_policy(text, "big.yaml")
    assert len(policy.models) == 10_000 and len(policy.gpu_pool.nodes) == 64
    assert policy.models[9_999].name == "model-009999" and policy.models[9_999].tenant == "search"
    assert policy.models[1].hot_standby == 1 and policy.models[1].rto.total_seconds() == 20
    assert {t.name for t in policy.tenants} == {"search", "chat", "batch"}


def test_errors_in_a_big_policy_name_their_lines_and_the_message_is_capped() -> None:
    text = generate_policy(2_000, 4).replace("rto: 30s", "rto: 0s")  # every third model
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "big.yaml")
    issues = info.value.issues
    assert len(issues) == 666
    first = issues[0]
    assert (first.path, first.line) == ("models[2] (model-000002).rto", 2 + 2 * 10 + 7)
    assert text.splitlines()[first.line - 1].strip() == "rto: 0s"
    last = issues[-1]
    assert last.path == "models[1997] (model-001997).rto" and text.splitlines()[last.line - 1].strip() == "rto: 0s"
    message = str(info.value)
    assert message.count("\n  - ") == MAX_ISSUES_SHOWN and message.endswith(f"… and {666 - MAX_ISSUES_SHOWN} more")


def test_duplicate_nodes_are_named_once() -> None:
    text = BASE + "    - {name: gpu-node-1}\n    - {name: gpu-node-0}\n    - {name: gpu-node-1}\n"
    issues = _issues(text)
    assert issues == ["line 5: gpuPool: node(s) listed twice: gpu-node-0, gpu-node-1"]


def test_a_file_over_the_cap_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as file:
        file.truncate(MAX_POLICY_BYTES + 1)  # sparse: no disk used
    with pytest.raises(PolicyError, match="larger than 64 MiB; not read"):
        load_policy_file(big)
    with pytest.raises(PolicyError, match="larger than 64 MiB"):
        parse_policy(" " * (MAX_POLICY_BYTES + 1))


def test_endless_and_undecodable_files(tmp_path: Path) -> None:
    if os.path.exists("/dev/zero"):
        with pytest.raises(PolicyError, match="larger than 64 MiB"):
            load_policy_file("/dev/zero")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"models:\n  - name: \xff\xfe\n")
    with pytest.raises(PolicyError, match=r"not UTF-8 text \(byte 18\)"):
        load_policy_file(binary)


BILLION_LAUGHS = """\
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
models: [*h]
"""


@pytest.mark.parametrize(
    ("text", "words", "line"),
    [
        (BILLION_LAUGHS, "aliases expand to more than", 6),
        ("models: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 64 levels", 1),
        ("models:\n  - &m\n    name: a\n    x: *m\n", "inside the node it names", 4),
        ("models: !!python/object:os.system x\n", "could not determine a constructor", 1),
    ],
)
def test_hostile_yaml_is_refused_with_its_line(text: str, words: str, line: int) -> None:
    issues = _issues(text)
    assert len(issues) == 1 and words in issues[0] and issues[0].startswith(f"line {line}: "), issues
