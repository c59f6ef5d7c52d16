"""The policy YAML loader gives what yaml.safe_load gives, and finds the lines of error paths."""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml

from drctl.policies.yaml_load import lines_of, load

SCALARS: list[Any] = [
    0, 1, -7, 10**20, 1.5, -0.25, float("inf"), True, False, None, "", "x", "yes", "no", "on", "null", "~",
    "0x1F", "0o17", "1_000", "1e3", "2001-12-14", "10s", "16Gi", "<<", "=", "a: b", "- x", "#", "'q'", '"q"',
    "multi\nline", " padded ", "ünïcode", "[x]", "{y}", "*alias", "&anchor", "!tag", "%", "@", "`",
]  # fmt: skip


def _random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.5:
        return rng.choice(SCALARS)
    if roll < 0.75:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = [k for k in SCALARS if k is not None and not isinstance(k, float)]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


@pytest.mark.parametrize("flow", [False, True])
def test_random_documents_load_like_safe_load(flow: bool) -> None:
    rng = random.Random(20261130 + flow)
    for _ in range(300):
        text = yaml.safe_dump(_random_value(rng, 0), default_flow_style=flow, allow_unicode=rng.random() < 0.5)
        assert load(text) == yaml.safe_load(text), text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "a: [1, 2.5, yes, no, ~, null, '3', \"x\", 0x1F, 0o17, 1_000, .inf, -.inf, 2001-12-14]\n",
        "t: 2001-12-14t21:59:43.10-05:00\n",
        "- !!str 123\n- !!int '7'\n- !!float 1\n- !!binary aGVsbG8=\n- !!null ''\n- !!bool yes\n",
        "a: &x {b: 1, c: 2}\nd:\n  <<: *x\n  c: 3\n",
        "a: &x {b: 1}\nb: &y {b: 2, c: 2}\nd:\n  <<: [*x, *y]\n  e: 1\n",
        "a: &x {b: 1}\nb: &y {b: 2}\nd:\n  <<: *x\n  <<: *y\n",
        "a: &s scalar\nb: *s\nc: &l [1, *s]\nd: *l\n",
        "k: |\n  line\n  two\n",
        "k: >-\n  folded\n  text\n",
        "=: 3\n",
        "[1, [2, [3, {a: [4]}]]]",
        "--- {a: 1}\n...\n",
        "!!map {a: !!seq [1]}",
    ],
)
def test_corner_cases_load_like_safe_load(text: str) -> None:
    assert load(text) == yaml.safe_load(text)


@pytest.mark.parametrize(
    ("text", "line"),
    [("a: 1\na: 2\n", 2), ("m:\n  - rto: 10s\n    x: 1\n    rto: 20s\n", 4), ("{a: 1, b: {c: 1, c: 1}}", 1)],
)
def test_a_key_given_twice_is_refused_where_safe_load_keeps_the_last(text: str, line: int) -> None:
    """Unlike ``yaml.safe_load``: a policy with ``rto`` twice in one model is a mistake, not 'the last wins'."""
    with pytest.raises(yaml.YAMLError) as refused:
        load(text)
    assert "found duplicate key" in str(refused.value)
    mark = getattr(refused.value, "problem_mark", None)
    assert mark is not None and mark.line + 1 == line


@pytest.mark.parametrize(
    "text",
    [
        "? [a, b]\n: 1\n",  # an unhashable key
        "a: *nope\n",
        "--- 1\n--- 2\n",
        "a: !!python/object:os.system x\n",
        "<<: 1\n",
        "a: [1\n",
    ],
)
def test_what_safe_load_refuses_is_refused(text: str) -> None:
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)
    with pytest.raises(yaml.YAMLError) as info:
        load(text)
    assert getattr(info.value, "problem_mark", None) is not None


def test_what_no_policy_needs_is_refused_though_safe_load_builds_it() -> None:
    with pytest.raises(yaml.YAMLError, match="inside the node it names"):
        load("a: &a\n  - *a\n")
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor for the tag"):
        load("a: !!set {x}\n")


def test_lines_of_paths() -> None:
    text = """\
models:
  - name: a
    rto: 10s
  - {name: b, rto: 1m}
gpuPool:
  nodes:
    - name: n0
      gpus: 2
? [complex, key]
: value
tail: 1
"""
    lines = lines_of(
        text,
        [
            ("models", 0, "rto"),
            ("models", 1, "rto"),
            ("models", 1),
            ("gpuPool", "nodes", 0, "gpus"),
            ("gpuPool", "nodes", 0, "missing"),  # the mapping's line
            ("gpuPool", "nodes", 5, "gpus"),  # past the list: the list's line
            ("models", 0, "rto", "deeper"),  # through a scalar: the scalar's line
            ("tail",),
            ("nothing",),
            (),
        ],
    )
    assert lines == {
        ("models", 0, "rto"): 3,
        ("models", 1, "rto"): 4,
        ("models", 1): 4,
        ("gpuPool", "nodes", 0, "gpus"): 8,
        ("gpuPool", "nodes", 0, "missing"): 7,
        ("gpuPool", "nodes", 5, "gpus"): 7,
        ("models", 0, "rto", "deeper"): 3,
        ("tail",): 11,
        ("nothing",): 1,
        (): 1,
    }


def test_a_number_longer_than_python_reads_is_a_yaml_error_at_its_line() -> None:
    """More than 4,300 digits: ``int()`` raises ``ValueError``; it escaped as a traceback (exit 1)."""
    with pytest.raises(yaml.MarkedYAMLError, match="4300 digits") as raised:
        load("models:\n  - name: m\n    hotStandby: " + "1" * 5001 + "\n")
    assert raised.value.problem_mark is not None and raised.value.problem_mark.line == 2
    assert "set_int_max_str_digits" not in str(raised.value)
