"""``drctl budget`` and ``drctl budget reset``: the fleet's blast-radius budget, and the one way a
person closes its breaker once tripped (manual mode), recorded as an Update in its history."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from drctl.cli.common import (
    EXIT_BAD_INPUT,
    PolicyOption,
    StateOption,
    connect,
    fail,
    make_settings,
    out,
    reporter,
    show,
)
from drctl.cli.render import budget_lines
from drctl.payloads import BudgetReset, budget_workflow_id
from drctl.temporal.incidents import budget_state

app = typer.Typer(
    help="The fleet's blast-radius budget: recoveries running and waiting, the breaker (manual mode).",
    invoke_without_command=True,
)


@app.callback()
def budget(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print the budget as JSON")] = False,
    policy: PolicyOption = None,
    state_dir: StateOption = None,
) -> None:
    """Show the budget: recoveries running and waiting (and why), starts in the last minute, the breaker."""
    if ctx.invoked_subcommand is not None:
        return
    settings = make_settings(policy, state_dir)

    async def read() -> None:
        state = await budget_state(await connect(settings), settings.task_queue)
        if as_json:
            out.print_json(state.model_dump_json() if state else "null")
        elif state is None:
            out.print("no recovery has asked the budget yet (nothing running, nothing waiting)")
        else:
            show(budget_lines(state))

    asyncio.run(read())


@app.command("reset")
def reset(
    actor: Annotated[str, typer.Option(help="who resets it (recorded)")] = "",
    comment: Annotated[str, typer.Option(help="why (recorded)")] = "",
    policy: PolicyOption = None,
    state_dir: StateOption = None,
) -> None:
    """Close a tripped breaker: the recoveries waiting start again, within the budget.

    The same is the ``reset`` Update of the workflow ``drctl-budget`` in the Temporal UI.
    """
    from drctl.workflows.budget import BudgetWorkflow

    settings = make_settings(policy, state_dir)
    try:
        request = BudgetReset(actor=actor or reporter().removeprefix("cli "), comment=comment)
    except ValueError as exc:
        fail(str(exc), EXIT_BAD_INPUT)

    async def send() -> str:
        client = await connect(settings)
        if await budget_state(client, settings.task_queue) is None:
            return "no budget yet: nothing to reset"
        handle = client.get_workflow_handle(budget_workflow_id(settings.task_queue))
        return await handle.execute_update(BudgetWorkflow.reset, request)

    out.print(asyncio.run(send()), highlight=False, markup=False)
