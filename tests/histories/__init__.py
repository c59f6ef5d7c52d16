"""Recorded workflow histories (``record.py``) and the replay test that guards determinism."""

from temporalio import workflow

REPLAY_QUEUE_PREFIX = "replay-"
"""Each scenario runs on task queue ``replay-<scenario>``: the SDK's ``Replayer`` runs workflows on
``replay-<build_id>``, and ``test_replay.py`` passes ``build_id=<scenario>``, so that
``workflow.info().task_queue`` is in replay what it was when recorded (``ReconcileStandbysWorkflow``
names its child after it, and a child's ID is part of what replay checks)."""


def workflow_type(cls: type) -> str:
    """The workflow type name a ``@workflow.defn`` class registers under."""
    return workflow._Definition.must_from_class(cls).name or cls.__name__
