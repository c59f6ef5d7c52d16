"""``drctl``: bring up the local stack, inspect it, start and audit failovers.

This module only assembles the commands, one module per group (``stack``, ``status``, ``failover``,
``runbooks``, ``reconcile``, ``audit``, ``policy``, ``drills``, ``budget``; what they print is made
in ``render``), in the order ``drctl --help`` lists them, and runs them (:func:`main`, the console
script). Bad input exits 2 with a message, a failure 1; never a traceback (see ``common``).
"""

from __future__ import annotations

import inspect
import os
import sys

import typer
from temporalio.client import RPCTimeoutOrCancelledError, WorkflowFailureError
from temporalio.exceptions import FailureError
from temporalio.service import RPCError

from drctl.cli import audit, budget, drills, failover, policy, reconcile, runbooks, stack, status, trace


def temporal_failure(exc: RPCTimeoutOrCancelledError | RPCError) -> str:
    """What a Temporal call that failed after the connection means to an operator. A call that timed
    out waits for drctl's worker (an Update is answered by the workflow, so by a worker): with none
    polling, a report to a guardian times out after 10 s."""
    if isinstance(exc, RPCTimeoutOrCancelledError):
        return (
            "Temporal did not answer in time: no drctl worker may be running "
            "(`drctl status` shows it; `drctl up` restarts it). A report may still be recorded and "
            "acted on once a worker runs; `drctl audit` shows what ran."
        )
    return f"Temporal refused the call: {exc.message or exc} (status {exc.status.name})"


def workflow_failure(exc: WorkflowFailureError) -> str:
    """A runbook the command followed failed (or was terminated or timed out): what Temporal says
    of its end, in one line (the history has the rest: `drctl audit show ID`)."""
    cause = exc.cause
    while isinstance(cause, FailureError) and cause.cause is not None and not str(cause):
        cause = cause.cause  # an empty wrapper: say what it wraps
    return f"the workflow failed: {cause or exc}"


app = typer.Typer(
    help="drctl: disaster recovery for GPU model-inference fleets (failover runbooks as Temporal workflows).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(policy.app, name="policy")
app.add_typer(budget.app, name="budget")

app.command()(stack.up)
app.command()(status.status)
app.command()(failover.failover)
app.command()(reconcile.reconcile)
app.add_typer(audit.app, name="audit")
app.command()(trace.trace)
app.command("alert-receiver", context_settings=stack.PASS_THROUGH, add_help_option=False)(stack.alert_receiver)
app.command("node-agent", context_settings=stack.PASS_THROUGH, add_help_option=False)(stack.node_agent)
app.command()(runbooks.drain)
app.command("zone-failover")(runbooks.zone_failover)
app.command()(runbooks.failback)
app.command()(runbooks.approve)
app.command()(drills.drill)
app.command()(stack.worker)


def one_line_summaries(group: typer.Typer) -> None:
    """Each command's line in its group's ``--help`` list: the first paragraph of its docstring as
    one line. Typer's rich help keeps the docstring's line breaks there, so a summary wrapped in
    the source showed as ragged lines in the list (its own ``--help`` page was already reflowed)."""
    for info in group.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if info.short_help is None and doc:
            info.short_help = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            one_line_summaries(sub.typer_instance)


one_line_summaries(app)


def main() -> None:
    try:
        app()
        code = 0
    except (RPCTimeoutOrCancelledError, RPCError) as exc:
        # Temporal answered the connection but not the call: said in one line, not a traceback.
        print(f"error: {temporal_failure(exc)}", file=sys.stderr)
        code = 1
    except WorkflowFailureError as exc:
        print(f"error: {workflow_failure(exc)}", file=sys.stderr)
        code = 1
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    # Exit without interpreter finalisation: the Temporal client's Rust runtime threads can still
    # be winding down then, and CPython aborts ("PyGILState_Release ... finalizing", seen in CI
    # once in ~50 CLI runs). Everything the command does is finished and flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
