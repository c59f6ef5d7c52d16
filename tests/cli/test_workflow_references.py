"""The CLI starts, queries and updates workflows by their methods (typed: argument and result
checked by mypy, the name taken from ``@workflow.defn``), never by a type-name string that can drift
from the workflow (``"ReconcileStandbysWorkflow"``, ``WorkflowName.FAILOVER``)."""

from __future__ import annotations

import ast
from pathlib import Path

import drctl.cli

CALLS = {"start_workflow", "execute_workflow", "execute_update", "query"}


def _by_name(arg: ast.expr) -> bool:
    if isinstance(arg, ast.Constant | ast.JoinedStr):
        return True
    return isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "WorkflowName"


def test_no_workflow_is_started_queried_or_updated_by_a_string() -> None:
    found = []
    for path in sorted(Path(drctl.cli.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                continue
            if node.func.attr in CALLS and _by_name(node.args[0]):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, found
