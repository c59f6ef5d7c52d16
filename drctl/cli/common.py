"""What every command shares: its settings and policy, the Temporal connection, the two consoles,
exit codes and the one way to fail.

Bad input (an unknown model or instance, a broken or missing policy file) exits with status 2 and a
message; an unreachable Temporal or a failed runbook exits with status 1. No tracebacks for either.
"""

from __future__ import annotations

import asyncio
import getpass
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console, RenderableType
from rich.text import Text
from temporalio.client import Client, Interceptor, WorkflowHandle

from drctl.cli.policy_path import PolicyNotFound, find_policy
from drctl.payloads import Instance
from drctl.policies.loader import PolicyError, load_policy_file
from drctl.policies.schema import DRPolicy
from drctl.settings import DrctlSettings
from drctl.temporal.client import TemporalSettingsError
from drctl.temporal.client import connect as temporal_connect

R = TypeVar("R")
Q = TypeVar("Q")

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

PIPED_WIDTH = 200
"""Tables printed to a pipe or a file get this many columns instead of 80."""


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A console for a terminal as rich makes it; for a pipe or a file, one that never breaks a line:
    a script reading an error or a line of output gets it whole (rich wrapped at 80 columns there).
    Tables still need a width; they get :data:`PIPED_WIDTH`. ``--json`` is never wrapped either way
    (``print_json`` soft-wraps)."""
    console = Console(stderr=stderr, file=file)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, file=file, width=PIPED_WIDTH, soft_wrap=True)


out = make_console()
err = make_console(stderr=True)


def show(lines: Sequence[RenderableType], console: Console | None = None) -> None:
    """Print what :mod:`drctl.cli.render` made: strings are markup whose data is escaped already,
    ``Text`` is data as written, anything else (a table, a panel) is printed as rich does."""
    target = console or out
    for line in lines:
        if isinstance(line, str | Text):
            target.print(line, highlight=False)
        else:
            target.print(line)


PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        "-p",
        help="DR policy file \\[default: $DRCTL_POLICY, else the one the running stack uses, "
        "else ./dr-policy.yaml or ./examples/dr-policy.yaml]",
    ),
]
StateOption = Annotated[
    Path | None, typer.Option("--state-dir", help="state folder \\[default: $DRCTL_STATE_DIR or .drctl]")
]


def make_settings(policy: Path | None = None, state_dir: Path | None = None) -> DrctlSettings:
    """Settings from ``DRCTL_*`` and ``.env``, with the command's options over them."""
    overrides: dict[str, object] = {}
    if policy is not None:
        overrides["policy"] = policy
    if state_dir is not None:
        overrides["state_dir"] = state_dir
    return DrctlSettings(**overrides)  # type: ignore[arg-type]


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``error: message`` and exit. The message is never read as markup: it carries what a
    user typed or a file holds (a model named ``[/]``, a regex ``[a-z0-9]``), printed as written."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    raise typer.Exit(code)


def input_said(exc: ValueError, options: dict[str, str] | None = None) -> str:
    """A request the command built that does not validate, said in the command's own terms
    (``--reason: String should have at most 500 characters``), not as pydantic's dump. ``options``:
    field name → the option or argument a user typed it as (default ``--field-name``)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return clip_input(str(exc))
    said = []
    for error in errors(include_url=False, include_input=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        name = (options or {}).get(field, "--" + field.replace("_", "-")) if field else "request"
        said.append(f"{name}: {error['msg']}")
    return "; ".join(said)


def clip_input(value: str, limit: int = 200) -> str:
    """What a user typed, shown back at most ``limit`` characters long (a 5,000-character id was)."""
    return value if len(value) <= limit else f"{value[:limit]}… ({len(value)} characters)"


def require_model(dr_policy: DRPolicy, model: str) -> None:
    """Exit 2 with the policy's models when ``model`` is not one of them."""
    if model not in dr_policy.model_names:
        fail(f"unknown model {clip_input(model)!r}; the policy has: {', '.join(dr_policy.model_names)}", EXIT_BAD_INPUT)


def with_policy(policy: Path | None = None, state_dir: Path | None = None) -> tuple[DrctlSettings, DRPolicy]:
    """The settings and the policy a command acts on: found as :mod:`drctl.cli.policy_path` says
    (``settings.policy`` is then the file found, which the stack hands on to what it starts), and
    loaded. Exits 2 when no policy is found or it is invalid."""
    settings = make_settings(policy, state_dir)
    try:
        path = find_policy(settings, option=policy)
    except PolicyNotFound as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    settings = settings.model_copy(update={"policy": path})
    return settings, load_policy(path)


def load_policy(path: Path) -> DRPolicy:
    """The policy in ``path`` (a file the user named); exits 2 when it is missing or invalid."""
    if not path.exists():
        fail(f"policy not found: {path}", EXIT_BAD_INPUT)
    try:
        return load_policy_file(path)
    except PolicyError as exc:
        fail(str(exc), EXIT_BAD_INPUT)


def platform_place(settings: DrctlSettings) -> str:
    """Where the platform the settings choose keeps its instances, for messages."""
    if settings.platform == "local":
        return str(settings.state_dir)
    return f"Kubernetes namespace {settings.kubernetes_namespace!r}"


async def read_fleet(
    settings: DrctlSettings, policy: DRPolicy, models: Sequence[str] | None = None
) -> tuple[dict[str, list[Instance]], list[str]]:
    """Each model's instances (every model of the policy, or ``models``) and the cordoned GPUs, as
    the platform the settings choose (``DRCTL_PLATFORM``) knows them, through the one Platform
    interface: the local registry, or the cluster. Only reads (a platform that is not started
    changes nothing). Exits 1 when the platform does not answer (a cluster out of reach)."""
    from drctl.platforms.factory import make_platform  # the Kubernetes client is slow to import

    try:
        platform = make_platform(settings, policy)
    except Exception as exc:  # no kubeconfig, no in-cluster account: said plainly
        fail(f"cannot use the {settings.platform} platform: {type(exc).__name__}: {exc}")
    try:
        fleet = {model: await platform.list_instances(model) for model in models or policy.model_names}
        return fleet, await platform.cordoned_gpus()
    except Exception as exc:
        fail(f"cannot read the fleet from {platform_place(settings)}: {type(exc).__name__}: {exc}")
    finally:
        await platform.close()


async def connect(settings: DrctlSettings, interceptors: Sequence[Interceptor] = ()) -> Client:
    """A Temporal client, or exit 1 (unreachable) or 2 (TLS settings that do not go together).
    ``interceptors``: the tracing one of a command that starts a runbook (:mod:`drctl.cli.failover`)."""
    try:
        return await temporal_connect(settings, interceptors=interceptors)
    except TemporalSettingsError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except RuntimeError as exc:
        fail(
            f"cannot reach Temporal at {settings.temporal_address} ({exc}). "
            "Is `drctl up` running? (or set DRCTL_TEMPORAL_ADDRESS)"
        )


def reporter() -> str:
    """Who reports from this CLI, for the workflow history: ``cli user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli {user}@{socket.gethostname()}"[:200]


async def await_with_progress(
    handle: WorkflowHandle[Any, R],
    query: Callable[[Any], Q | None],
    show: Callable[[Q], None],
    every_s: float = 0.5,
    asked: WorkflowHandle[Any, Any] | None = None,
) -> R:
    """The workflow's result; meanwhile, every ``every_s``, its ``query`` answer handed to ``show``
    (a query that fails, say before the first workflow task, or has no answer yet is skipped).
    ``asked``: the workflow to query instead, when another one does the work (a child)."""
    result = asyncio.ensure_future(handle.result())
    while not result.done():
        try:
            answer = await (asked or handle).query(query)
        except Exception:
            answer = None
        if answer is not None:
            show(answer)
        await asyncio.wait([result], timeout=every_s)
    return result.result()
