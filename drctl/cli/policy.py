"""``drctl policy validate`` and ``drctl policy explain``: a policy file checked and explained
before any stack runs it, so a mistake is found at the desk, not during a failover."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from drctl.cli.common import EXIT_BAD_INPUT, fail, load_policy, out, show
from drctl.cli.render import explain_data, explain_lines, lit, validated_line

if TYPE_CHECKING:
    from drctl.policies.explain import RtoAssumptions

app = typer.Typer(help="Check DR policy files.", no_args_is_help=True)


@app.command("validate")
def validate(
    file: Annotated[Path, typer.Argument(help="policy YAML file")],
    strict: Annotated[bool, typer.Option("--strict", help="exit 2 on a warning too, not only on an error")] = False,
) -> None:
    """Check a policy file; print every error with its path and line, exit 2 on any. Then warn about
    what validates but most likely is a mistake (an active zone without nodes, models that do not
    fit the pool, ...): exit 0 unless --strict."""
    from drctl.policies.sanity import policy_warnings

    policy = load_policy(file)
    warnings = policy_warnings(policy)
    show([validated_line(file, policy), *(f"[yellow]warning[/]: {lit(line)}" for line in warnings)])
    if warnings and strict:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command("explain")
def explain(
    file: Annotated[Path, typer.Argument(help="policy YAML file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    gpu_figures: Annotated[
        Path | None,
        typer.Option(
            help="figures written by scripts/gpu_check.py --out on a GPU machine: warm and cold estimates "
            "from the measured wake and load rates instead of assumed ones"
        ),
    ] = None,
) -> None:
    """Per model: instances per tier, GPU memory per zone, expected RTO after each failure vs the target."""
    from drctl.policies.explain import RtoAssumptions
    from drctl.policies.explain import explain as explain_policy

    assumptions, measured_on = RtoAssumptions(), None
    if gpu_figures is not None:
        assumptions, measured_on = measured_assumptions(gpu_figures)
    items = explain_policy(load_policy(file), assumptions)
    if as_json:
        out.print_json(json.dumps(explain_data(items)))
        return
    show(explain_lines(items, assumptions, measured_on))


def measured_assumptions(path: Path) -> tuple[RtoAssumptions, str]:
    """The RTO assumptions with the wake and cold-load rates a GPU run measured; exits 2 on a file
    that is not such a run (a ``--cpu`` dry run says nothing about a GPU)."""
    import dataclasses

    from drctl.policies.explain import RtoAssumptions

    try:
        figures = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read --gpu-figures {path}: {exc.strerror or exc}", EXIT_BAD_INPUT)
    except ValueError as exc:
        fail(f"--gpu-figures {path} is not JSON: {exc}", EXIT_BAD_INPUT)
    if not isinstance(figures, dict):
        fail(f"--gpu-figures {path} is not a gpu_check.py report (not a JSON object)", EXIT_BAD_INPUT)
    summary = figures.get("summary")
    if not isinstance(summary, dict):
        fail(f"--gpu-figures {path} has no measured rates: {figures.get('error', 'no summary')}", EXIT_BAD_INPUT)
    if not figures.get("gpu_figures"):
        fail(f"--gpu-figures {path} comes from a --cpu dry run: it says nothing about a GPU", EXIT_BAD_INPUT)
    try:
        wake, load = float(summary["wake_gib_per_s"]), float(summary["cold_load_gib_per_s"])
    except (KeyError, TypeError, ValueError):
        fail(f"--gpu-figures {path}: summary needs wake_gib_per_s and cold_load_gib_per_s", EXIT_BAD_INPUT)
    if wake <= 0 or load <= 0:
        fail(f"--gpu-figures {path}: rates must be positive", EXIT_BAD_INPUT)
    measured = dataclasses.replace(RtoAssumptions(), wake_gib_per_s=wake, cold_load_gib_per_s=load)
    return measured, str(figures.get("gpu") or figures.get("machine") or "a GPU")
