"""The runbook worker runs workflow code unsandboxed unless DRCTL_WORKFLOW_SANDBOX says otherwise
(the sandbox's per-run cost at fleet scale; CI checks the code in the sandbox)."""

from __future__ import annotations

import pytest
from temporalio.worker import UnsandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from drctl.settings import DrctlSettings
from drctl.workers.runbook_worker import workflow_runner


def test_unsandboxed_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRCTL_WORKFLOW_SANDBOX", raising=False)
    assert isinstance(workflow_runner(DrctlSettings()), UnsandboxedWorkflowRunner)


def test_the_setting_puts_the_sandbox_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRCTL_WORKFLOW_SANDBOX", "true")
    assert isinstance(workflow_runner(DrctlSettings()), SandboxedWorkflowRunner)
