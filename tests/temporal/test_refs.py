"""Workflow type names come from the classes (their ``@workflow.defn(name=…)``), not from strings."""

from __future__ import annotations

import pytest

from drctl.temporal.refs import workflow_type
from drctl.workers.runbook_worker import WORKFLOWS
from drctl.workflows.failover import FailoverWorkflow


def test_each_registered_workflow_has_its_declared_type_name() -> None:
    names = [workflow_type(w) for w in WORKFLOWS]
    assert workflow_type(FailoverWorkflow) == "FailoverWorkflow"
    assert len(set(names)) == len(WORKFLOWS)  # no two workflows share a type name


def test_a_class_that_is_no_workflow_is_refused() -> None:
    class NotAWorkflow:
        pass

    with pytest.raises(TypeError, match=r"NotAWorkflow is not a @workflow\.defn class"):
        workflow_type(NotAWorkflow)
