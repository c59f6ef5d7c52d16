"""Load a policy file and report every error with its path (and line) in the file.

Reading the file is the only I/O, and it is done by the caller-facing ``load_policy_file``; the
parsing itself (``parse_policy``) takes text so it stays pure and testable.

Validation is linear in the file and lean (``bench/policy_validate_bench.py``): the YAML is read
by :mod:`drctl.policies.yaml_load` in one pass, and lines are looked up only for the errors there
are. A file over :data:`MAX_POLICY_BYTES` is refused before it is read, and an error message lists
at most :data:`MAX_ISSUES_SHOWN` issues (``PolicyError.issues`` has them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from drctl.policies.schema import DRPolicy
from drctl.policies.yaml_load import lines_of, load

MAX_POLICY_BYTES = 64 << 20
"""64 MiB: far more than any fleet's policy (50,000 models are about 9 MB)."""
MAX_ISSUES_SHOWN = 50


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy file: where it is and what is wrong."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path or '<top level>'}: {self.message}"


class PolicyError(ValueError):
    """A policy file that cannot be used. Lists every issue, each with its path in the file."""

    def __init__(self, source: str, issues: list[PolicyIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  - {issue}" for issue in issues[:MAX_ISSUES_SHOWN])
        if len(issues) > MAX_ISSUES_SHOWN:
            lines += f"\n  … and {len(issues) - MAX_ISSUES_SHOWN} more"
        super().__init__(f"{source}: invalid policy ({len(issues)} error(s)):\n{lines}")


def _format_path(loc: tuple[int | str, ...], document: Any) -> str:
    parts: list[str] = []
    node = document
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and item < len(node):
                node = node[item]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    label += f" ({_clip(node['name'])})"
            else:
                node = None
            parts.append(label)
        else:
            parts.append(("." if parts else "") + _clip(str(item)))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts)


def _clip(text: str, limit: int = 64) -> str:
    """A name or key from the file, as an error message shows it: never more than ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_policy(text: str, source: str = "<policy>") -> DRPolicy:
    """Parse and validate policy YAML; raise :class:`PolicyError` naming every bad field."""
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(source, [PolicyIssue("", f"larger than {MAX_POLICY_BYTES >> 20} MiB; not read")])
    try:
        document = load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source, [PolicyIssue("", f"not valid YAML: {problem}", line)]) from None
    if not isinstance(document, dict):
        kind = "empty" if document is None else f"a {type(document).__name__}"
        raise PolicyError(source, [PolicyIssue("", f"expected a mapping with a 'models' list, got {kind}")])
    try:
        return DRPolicy.model_validate(document)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        lines = lines_of(text, [tuple(error["loc"]) for error in errors])
        issues = []
        for error in errors:
            loc = tuple(error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field (check the spelling; keys are camelCase, e.g. hotStandby)"
            issues.append(PolicyIssue(_format_path(loc, document), message, lines.get(loc)))
        raise PolicyError(source, issues) from None


def load_policy_file(path: str | Path) -> DRPolicy:
    """Read and validate a policy file; a missing or unreadable file is a :class:`PolicyError` too."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            # Read one byte more than allowed: a FIFO or /dev/zero has no size to check beforehand.
            data = file.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(str(path), [PolicyIssue("", f"cannot read the file: {exc.strerror or exc}")]) from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(str(path), [PolicyIssue("", f"larger than {MAX_POLICY_BYTES >> 20} MiB; not read")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), [PolicyIssue("", f"not UTF-8 text (byte {exc.start})")]) from None
    return parse_policy(text, str(path))
