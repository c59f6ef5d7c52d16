"""A Temporal call that fails after the connection (an Update no worker answers in time, a refused
call) ends ``drctl`` with one line and exit 1, never a traceback."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowFailureError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.exceptions import ApplicationError, TerminatedError
from temporalio.service import RPCError, RPCStatusCode

from drctl.cli import app as cli


class Exited(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _run_main(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> int:
    def failing_app() -> None:
        raise error

    def exit_(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(cli, "app", failing_app)
    monkeypatch.setattr(cli.os, "_exit", exit_)
    with pytest.raises(Exited) as exited:
        cli.main()
    return exited.value.code


def test_an_update_no_worker_answers_is_one_line_naming_the_worker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run_main(monkeypatch, WorkflowUpdateRPCTimeoutOrCancelledError())
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: Temporal did not answer in time") and "worker" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_refused_call_says_what_temporal_said(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run_main(monkeypatch, RPCError("namespace drctl not found", RPCStatusCode.NOT_FOUND, b""))
    err = capsys.readouterr().err
    assert code == 1 and "namespace drctl not found" in err and "NOT_FOUND" in err
    assert "Traceback" not in err


def _wrapped(outer: ApplicationError, inner: BaseException) -> ApplicationError:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    ("cause", "said"),
    [
        (ApplicationError("no standby could take over", type="NoStandby"), "no standby could take over"),
        (TerminatedError("terminated by sre-on-call", []), "terminated by sre-on-call"),
        # An empty wrapper says what it wraps.
        (_wrapped(ApplicationError(""), ApplicationError("the zone's lease was taken back")), "lease was taken back"),
    ],
)
def test_a_followed_workflow_that_failed_is_one_line_with_its_cause(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cause: BaseException, said: str
) -> None:
    code = _run_main(monkeypatch, WorkflowFailureError(cause=cause))
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: the workflow failed") and said in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
