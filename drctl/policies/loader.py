"""Load a policy file and report every error with its path (and line) in the file.

Reading the file is the only I/O, and it is done by the caller-facing ``load_policy_file``; the
parsing itself (``parse_policy``) takes text so it stays pure and testable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from drctl.policies.schema import DRPolicy


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
        lines = "\n".join(f"  - {issue}" for issue in issues)
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
                    label += f" ({node['name']})"
            else:
                node = None
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts)


def _line_of(loc: tuple[int | str, ...], root: yaml.Node | None) -> int | None:
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for item in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == item), None)
            if match is None:
                key = next((k for k, _ in node.value if getattr(k, "value", None) == item), None)
                return key.start_mark.line + 1 if key is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and item < len(node.value):
            node = node.value[item]
        else:
            break
        line = node.start_mark.line + 1
    return line


def parse_policy(text: str, source: str = "<policy>") -> DRPolicy:
    """Parse and validate policy YAML; raise :class:`PolicyError` naming every bad field."""
    try:
        document = yaml.safe_load(text)
        root = yaml.compose(text)
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
        issues = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field (check the spelling; keys are camelCase, e.g. hotStandby)"
            issues.append(PolicyIssue(_format_path(loc, document), message, _line_of(loc, root)))
        raise PolicyError(source, issues) from None


def load_policy_file(path: str | Path) -> DRPolicy:
    """Read and validate a policy file; a missing or unreadable file is a :class:`PolicyError` too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), [PolicyIssue("", f"cannot read the file: {exc.strerror}")]) from None
    return parse_policy(text, str(path))
