"""``drctl policy validate`` and ``drctl policy explain``: a policy file checked and explained
before any stack runs it, so a mistake is found at the desk, not during a failover."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from drctl.cli.common import load_policy, out, show
from drctl.cli.render import explain_data, explain_lines, validated_line

app = typer.Typer(help="Check DR policy files.", no_args_is_help=True)


@app.command("validate")
def validate(file: Annotated[Path, typer.Argument(help="policy YAML file")]) -> None:
    """Check a policy file; print every error with its path and line, exit non-zero on any."""
    show([validated_line(file, load_policy(file))])


@app.command("explain")
def explain(
    file: Annotated[Path, typer.Argument(help="policy YAML file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Per model: instances per tier, GPU memory per zone, expected RTO after each failure vs the target."""
    from drctl.policies.explain import explain as explain_policy

    items = explain_policy(load_policy(file))
    if as_json:
        out.print_json(json.dumps(explain_data(items)))
        return
    show(explain_lines(items))
