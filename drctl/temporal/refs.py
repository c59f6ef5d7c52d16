"""Workflow types by reference, not by string.

Starting a workflow goes through its class's run method (``client.start_workflow(FailoverWorkflow.run,
…)``, as the SDK's samples do): a renamed or mistyped workflow then fails the type check, not a
failover at 3 a.m. A few places need the type's *name* itself — visibility queries
(``WorkflowType = '…'``), the alert receiver's raw start request, reading ``workflow_type`` back from a
listing — and take it from the class with :func:`workflow_type`.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow


def workflow_type(workflow_class: type[Any]) -> str:
    """The registered type name of a ``@workflow.defn`` class (its ``name=``, else the class name)."""
    definition = getattr(workflow_class, "__temporal_workflow_definition", None)
    if not isinstance(definition, workflow._Definition):
        raise TypeError(f"{workflow_class.__name__} is not a @workflow.defn class")
    name = definition.name
    if name is None:  # a dynamic workflow has no type name of its own
        raise TypeError(f"{workflow_class.__name__} is a dynamic workflow: it has no type name")
    return name
